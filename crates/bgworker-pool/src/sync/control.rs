//! One task's control, shared by the Lua thread and the worker that runs
//! it (a job, or a worker's init): whether it was cancelled, and how many
//! of its progress items are in flight (delivered, not yet decoded or
//! dropped).
//!
//! # Invariants
//! - `cancelled` only ever goes from false to true.
//! - `cancel` sets the flag before it takes the lock to wake waiters, and
//!   a waiter checks the flag under that lock before each wait: so a
//!   waiter never sleeps through a cancellation.
//! - Every `reserve` that returned true is matched by exactly one
//!   `release`, by the drop of the [`InFlight`] it returns: after its
//!   item was decoded, or when the item was dropped unread.

use std::sync::{Arc, PoisonError};

use crate::sync::locks::{AtomicBool, Condvar, Mutex, MutexGuard, Ordering};

/// Most progress items of one job in flight at once; a job that emits
/// faster than the Lua thread drains waits in `progress()` for the
/// oldest ones to be decoded.
pub const PROGRESS_IN_FLIGHT: usize = 64;

#[derive(Default)]
pub struct Control {
    cancelled: AtomicBool,
    in_flight: Mutex<usize>,
    /// An item in flight was decoded or dropped, or the task was cancelled.
    changed: Condvar,
}

/// One progress item in flight: released when dropped.
pub struct InFlight(Arc<Control>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut in_flight = self.0.lock();
        *in_flight -= 1;
        drop(in_flight);
        self.0.changed.notify_all();
    }
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, usize> {
        // A count only: consistent whatever panicked.
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let _wake = self.lock();
        self.changed.notify_all();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Wait until fewer than `bound` items are in flight, and count one
    /// more: `None` if the task is cancelled first. The wait's owner is
    /// the Lua thread, which decodes the items (or drops them when it
    /// stops its dispatcher or closes), or cancels the task.
    pub fn reserve(self: &Arc<Self>, bound: usize) -> Option<InFlight> {
        let mut in_flight = self.lock();
        loop {
            if self.is_cancelled() {
                return None;
            }
            if *in_flight < bound {
                *in_flight += 1;
                return Some(InFlight(Arc::clone(self)));
            }
            in_flight = self.changed.wait(in_flight).unwrap_or_else(PoisonError::into_inner);
        }
    }

    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        *self.lock()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn reserve_waits_for_a_release_or_a_cancel() {
        let control = Arc::new(Control::default());
        let first = control.reserve(2).unwrap();
        let second = control.reserve(2).unwrap();
        assert_eq!(control.in_flight(), 2);
        let waiter = {
            let control = Arc::clone(&control);
            thread::spawn(move || control.reserve(2).is_some())
        };
        thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "a third item waits while two are in flight");
        drop(first);
        assert!(waiter.join().unwrap(), "a release lets it through");
        drop(second);

        let _third = control.reserve(1).unwrap();
        let waiter = {
            let control = Arc::clone(&control);
            thread::spawn(move || control.reserve(1).is_some())
        };
        thread::sleep(Duration::from_millis(20));
        control.cancel();
        assert!(!waiter.join().unwrap(), "a cancel ends the wait empty-handed");
        assert!(control.reserve(5).is_none(), "nothing is reserved once cancelled");
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::thread;

    /// A worker's `progress` waits for room while the one item in flight
    /// stays there (bound 1).
    fn waiting_for_room(control: &Arc<Control>) -> thread::JoinHandle<bool> {
        let control = Arc::clone(control);
        thread::spawn(move || control.reserve(1).is_some())
    }

    /// The Lua thread cancels the task while a worker waits for room, or
    /// is about to: the waiter comes back empty-handed (loom reports a
    /// deadlock if it sleeps through the cancel).
    #[test]
    fn a_waiter_never_misses_a_cancellation() {
        loom::model(|| {
            let control = Arc::new(Control::default());
            let _in_flight = control.reserve(1).unwrap();
            let waiter = waiting_for_room(&control);
            control.cancel();
            assert!(!waiter.join().unwrap(), "room was made after a cancel");
        });
    }

    /// The Lua thread decodes the item in flight while a worker waits for
    /// room: the waiter gets its item, and releases it.
    #[test]
    fn a_waiter_never_misses_a_release() {
        loom::model(|| {
            let control = Arc::new(Control::default());
            let in_flight = control.reserve(1).unwrap();
            let waiter = waiting_for_room(&control);
            drop(in_flight);
            assert!(waiter.join().unwrap());
            assert_eq!(control.in_flight(), 0, "every reserve released once");
        });
    }
}

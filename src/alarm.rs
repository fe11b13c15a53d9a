//! Alarms: wake a reader at a given time even when nothing is delivered.
//!
//! Most event loops have timers of their own; a plain `socket.select` loop
//! and Copas 1.x do not, yet a coroutine waiting there with a timeout must
//! be resumed when the time is up. The Lua layer keeps its deadlines and
//! asks for one alarm per instance, at the earliest; when it rings, the
//! instance's signal is raised as `core.wake()` would, and the dispatcher
//! expires what is due at its next drain.
//!
//! # Invariants
//!
//! - One clock per process, with one thread that serves every instance's
//!   alarm. The thread starts on the first alarm and is never busy: it
//!   sleeps on a condition variable until the earliest alarm is due, or for
//!   ever when there is none (no system calls while idle).
//! - A forked child has no thread of its parent's, and the parent's clock
//!   may be locked by the parent's thread for good: a child never touches
//!   it (fork.rs), and makes a clock of its own on its first alarm. A key
//!   tells which clock it belongs to, so cancelling a parent's key in the
//!   child does nothing.
//! - An alarm holds only a `Weak` reference: an instance that is gone is
//!   skipped, never kept alive by its alarm.
//! - The clock's lock is never held while a wake-up is sent, so a slow
//!   signal never delays another instance's alarm registration.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Instant;

use crate::fork;
use crate::instance::Shared;

/// Identifies one alarm: its clock's fork generation, its due time, then a
/// number that tells apart two alarms due at the same instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    due: Instant,
    serial: u64,
    generation: u64,
}

struct Clock {
    /// The fork generation of the process this clock serves.
    generation: u64,
    alarms: Mutex<Alarms>,
    changed: Condvar,
}

#[derive(Default)]
struct Alarms {
    due: BTreeMap<Key, Weak<Shared>>,
    next_serial: u64,
}

/// This process's clock, once made; a child's first alarm replaces the
/// parent's (leaked: it may be locked for good). Only touched inside
/// `fork::quiet`, so no fork ever finds it locked.
static CURRENT: Mutex<Option<&'static Clock>> = Mutex::new(None);

fn current() -> MutexGuard<'static, Option<&'static Clock>> {
    CURRENT.lock().unwrap_or_else(|e| e.into_inner())
}

impl Clock {
    fn alarms(&self) -> MutexGuard<'_, Alarms> {
        // A plain map: consistent even if a holder panicked.
        self.alarms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The clock's thread: rings each alarm when due.
    fn ring(&'static self) {
        let mut alarms = self.alarms();
        loop {
            let Some((&key, _)) = alarms.due.iter().next() else {
                alarms = self.changed.wait(alarms).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let now = Instant::now();
            if key.due > now {
                alarms = self.changed.wait_timeout(alarms, key.due - now).unwrap_or_else(|e| e.into_inner()).0;
                continue;
            }
            let shared = alarms.due.remove(&key).and_then(|weak| weak.upgrade());
            drop(alarms);
            if let Some(shared) = shared {
                shared.wake();
            }
            alarms = self.alarms();
        }
    }
}

/// This process's clock, made (with its thread) on first use; `None` when
/// no thread could be started.
fn clock() -> Option<&'static Clock> {
    let generation = fork::generation();
    fork::quiet(|| {
        let mut current = current();
        if let Some(clock) = *current {
            if clock.generation == generation {
                return Some(clock);
            }
        }
        let clock: &'static Clock =
            Box::leak(Box::new(Clock { generation, alarms: Mutex::new(Alarms::default()), changed: Condvar::new() }));
        thread::Builder::new().name("bgworker-alarm".into()).spawn(move || clock.ring()).ok()?;
        *current = Some(clock);
        Some(clock)
    })
}

/// Ring `shared`'s signal at `due`. Returns the key to cancel it with, or
/// `None` when no thread could be started (the alarm is then not set).
pub fn set(shared: &Arc<Shared>, due: Instant) -> Option<Key> {
    let clock = clock()?;
    let mut alarms = clock.alarms();
    let key = Key { due, serial: alarms.next_serial, generation: clock.generation };
    alarms.next_serial += 1;
    let earliest = alarms.due.keys().next().is_none_or(|first| key < *first);
    alarms.due.insert(key, Arc::downgrade(shared));
    drop(alarms);
    if earliest {
        clock.changed.notify_one();
    }
    Some(key)
}

/// Forget an alarm (rung or not). A key of a parent process is ignored.
pub fn cancel(key: Key) {
    if key.generation != fork::generation() {
        return;
    }
    let clock = fork::quiet(|| *current());
    if let Some(clock) = clock.filter(|clock| clock.generation == key.generation) {
        clock.alarms().due.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::Instance;
    use crate::signal::{FdKind, Signal};
    use std::time::Duration;

    fn readable(fd: std::os::fd::RawFd, timeout_ms: i32) -> bool {
        let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pollfd, 1, timeout_ms) == 1 }
    }

    #[test]
    fn an_alarm_raises_the_signal_when_due_and_a_cancelled_one_never_does() {
        let mut instance = Instance::default();
        instance.start(Signal::fd(FdKind::native()).unwrap()).unwrap();
        let fd = instance.reader_fd().unwrap();

        let cancelled = set(instance.shared(), Instant::now() + Duration::from_millis(20)).unwrap();
        cancel(cancelled);
        assert!(!readable(fd, 100), "a cancelled alarm rang");

        let start = Instant::now();
        set(instance.shared(), start + Duration::from_millis(30)).unwrap();
        assert!(readable(fd, 2000), "the alarm did not ring");
        assert!(start.elapsed() >= Duration::from_millis(30), "the alarm rang early");
    }

    #[test]
    fn an_alarm_of_an_instance_that_is_gone_is_skipped() {
        let mut instance = Instance::default();
        instance.start(Signal::fd(FdKind::native()).unwrap()).unwrap();
        set(instance.shared(), Instant::now() + Duration::from_millis(5)).unwrap();
        drop(instance);
        // The thread survives it and serves the next one.
        let mut next = Instance::default();
        next.start(Signal::fd(FdKind::native()).unwrap()).unwrap();
        set(next.shared(), Instant::now() + Duration::from_millis(20)).unwrap();
        assert!(readable(next.reader_fd().unwrap(), 2000));
    }
}

//! Messages to jobs (`job:send` on the Lua thread, `receive` in the job):
//! a bounded queue per job, made by its first message or its first
//! `receive`, and dropped when the Lua thread learns that the job ended.
//!
//! # Invariants
//! - A message is queued only for a job that `live` says is queued or
//!   running and has not returned yet, checked under this lock, and each
//!   is taken at most once, in the order sent.
//! - A job's queue holds at most [`MESSAGES_QUEUED`] messages; `send`
//!   refuses more rather than wait (the Lua thread never waits for a job).
//! - Every queue is dropped once its job ended: the Lua thread calls
//!   `discard` when it settles an outcome, cancels a job or learns it was
//!   lost, and `live` refuses later messages, so none makes a queue anew;
//!   `clear` drops those of a closed pool.
//! - A receiver checks its job's control under this lock before each wait,
//!   and `wake` takes the lock after the control was cancelled: so a
//!   receiver never sleeps through a cancellation (as in `control`).

use std::collections::{HashMap, VecDeque};
use std::sync::PoisonError;
use std::time::Instant;

use crate::sync::board::Id;
use crate::sync::control::Control;
use crate::sync::locks::{AtomicUsize, Condvar, Mutex, MutexGuard, Ordering};

/// Most messages queued for one job; `send` refuses more (`NotSent::Full`).
pub const MESSAGES_QUEUED: usize = 64;

pub struct Mail<M> {
    queues: Mutex<HashMap<Id, VecDeque<M>>>,
    /// A message arrived, or a job was cancelled.
    arrived: Condvar,
    /// How many queues exist: `discard` skips the lock while there are none
    /// (most pools never send a message).
    count: AtomicUsize,
}

/// Why `send` refused a message, which it gives back.
pub enum NotSent<M> {
    /// The job ended (or returned, or is unknown).
    Ended(M),
    /// [`MESSAGES_QUEUED`] messages wait for the job already.
    Full(M),
}

/// What `receive` got.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<M> {
    Message(M),
    TimedOut,
    /// The job was cancelled: it is to end now.
    Cancelled,
}

impl<M> Default for Mail<M> {
    fn default() -> Self {
        Mail { queues: Mutex::new(HashMap::new()), arrived: Condvar::new(), count: AtomicUsize::new(0) }
    }
}

impl<M> Mail<M> {
    fn lock(&self) -> MutexGuard<'_, HashMap<Id, VecDeque<M>>> {
        // Queues of values only: consistent whatever panicked.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue `message` for job `id`, if `live()` (called under the lock).
    pub fn send(&self, id: Id, message: M, live: impl FnOnce() -> bool) -> Result<(), NotSent<M>> {
        let mut queues = self.lock();
        if !live() {
            return Err(NotSent::Ended(message));
        }
        let queue = queues.entry(id).or_insert_with(|| {
            self.count.fetch_add(1, Ordering::SeqCst);
            VecDeque::new()
        });
        if queue.len() >= MESSAGES_QUEUED {
            return Err(NotSent::Full(message));
        }
        queue.push_back(message);
        drop(queues);
        self.arrived.notify_all();
        Ok(())
    }

    /// For job `id`, run under `control`: the next message, waiting until
    /// `deadline` (`None`: until one comes or the job is cancelled).
    pub fn receive(&self, id: Id, control: &Control, deadline: Option<Instant>) -> Received<M> {
        let mut queues = self.lock();
        loop {
            if control.is_cancelled() {
                return Received::Cancelled;
            }
            if let Some(message) = queues.get_mut(&id).and_then(VecDeque::pop_front) {
                return Received::Message(message);
            }
            queues = match deadline {
                None => self.arrived.wait(queues).unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Received::TimedOut;
                    }
                    self.arrived.wait_timeout(queues, deadline - now).unwrap_or_else(PoisonError::into_inner).0
                }
            };
        }
    }

    /// Job `id` ended: drop its messages. The values are dropped after the
    /// lock is released.
    pub fn discard(&self, id: Id) -> Option<VecDeque<M>> {
        if self.count.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let removed = self.lock().remove(&id);
        if removed.is_some() {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        removed
    }

    /// The pool closed (its jobs' controls are cancelled): drop every
    /// queue, and wake the receivers. The values are dropped after the lock
    /// is released.
    pub fn clear(&self) -> HashMap<Id, VecDeque<M>> {
        let mut queues = self.lock();
        let all = std::mem::take(&mut *queues);
        self.count.store(0, Ordering::SeqCst);
        drop(queues);
        self.arrived.notify_all();
        all
    }

    /// A job's control was cancelled: its receive, if it waits, returns.
    pub fn wake(&self) {
        let _wake = self.lock();
        self.arrived.notify_all();
    }

    #[cfg(test)]
    pub fn queues(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    fn live() -> bool {
        true
    }

    #[test]
    fn messages_come_in_order_once_and_no_more_than_the_bound() {
        let mail = Mail::default();
        let control = Control::default();
        for n in 0..MESSAGES_QUEUED {
            assert!(mail.send(7, n, live).is_ok());
        }
        assert!(matches!(mail.send(7, 99, live), Err(NotSent::Full(99))));
        assert!(matches!(mail.send(8, 1, || false), Err(NotSent::Ended(1))));
        for n in 0..MESSAGES_QUEUED {
            assert_eq!(mail.receive(7, &control, None), Received::Message(n));
        }
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(mail.receive(7, &control, Some(soon)), Received::TimedOut);
        assert!(mail.discard(7).is_some_and(|queue| queue.is_empty()));
        assert_eq!(mail.queues(), 0, "no queue for a message refused as ended");
        assert!(mail.discard(7).is_none());
    }

    #[test]
    fn a_receiver_waits_for_a_message_or_a_cancel() {
        let mail = Arc::new(Mail::default());
        let control = Arc::new(Control::default());
        let receiver = {
            let (mail, control) = (Arc::clone(&mail), Arc::clone(&control));
            thread::spawn(move || (mail.receive(1, &control, None), mail.receive(1, &control, None)))
        };
        thread::sleep(Duration::from_millis(20));
        assert!(mail.send(1, "first", live).is_ok());
        thread::sleep(Duration::from_millis(20));
        control.cancel();
        mail.wake();
        assert_eq!(receiver.join().unwrap(), (Received::Message("first"), Received::Cancelled));
    }

    /// Producers on one thread each, per job: each job's messages arrive
    /// exactly once and in order, under contention.
    #[test]
    fn many_jobs_each_get_their_own_messages_in_order() {
        const JOBS: u64 = 4;
        const EACH: usize = 2000;
        let mail = Arc::new(Mail::default());
        let receivers: Vec<_> = (1..=JOBS)
            .map(|id| {
                let mail = Arc::clone(&mail);
                thread::spawn(move || {
                    let control = Control::default();
                    (0..EACH)
                        .map(|_| match mail.receive(id, &control, None) {
                            Received::Message(n) => n,
                            other => panic!("job {id}: {other:?}"),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut sent = vec![0; JOBS as usize];
        while sent.iter().any(|&n| n < EACH) {
            for (index, next) in sent.iter_mut().enumerate() {
                if *next < EACH && mail.send(index as Id + 1, *next, live).is_ok() {
                    *next += 1;
                }
            }
        }
        for receiver in receivers {
            assert_eq!(receiver.join().unwrap(), (0..EACH).collect::<Vec<_>>());
        }
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use crate::sync::locks::bounded_model;
    use loom::thread;
    use std::sync::Arc;

    /// A job waits for a message while the Lua thread cancels it: the
    /// receiver returns (loom reports a deadlock if it sleeps through the
    /// cancel), and never with a message nobody sent.
    #[test]
    fn a_receiver_never_misses_a_cancellation() {
        bounded_model(|| {
            let mail = Arc::new(Mail::<u8>::default());
            let control = Arc::new(Control::default());
            let receiver = {
                let (mail, control) = (Arc::clone(&mail), Arc::clone(&control));
                thread::spawn(move || mail.receive(1, &control, None))
            };
            control.cancel();
            mail.wake();
            assert_eq!(receiver.join().unwrap(), Received::Cancelled);
        });
    }

    /// Two messages sent while the job waits: it gets both, in order, and
    /// discarding afterwards leaves no queue.
    #[test]
    fn a_receiver_never_misses_a_message() {
        bounded_model(|| {
            let mail = Arc::new(Mail::default());
            let receiver = {
                let mail = Arc::clone(&mail);
                thread::spawn(move || {
                    let control = Control::default();
                    (mail.receive(1, &control, None), mail.receive(1, &control, None))
                })
            };
            assert!(mail.send(1, 1, || true).is_ok());
            assert!(mail.send(1, 2, || true).is_ok());
            assert_eq!(receiver.join().unwrap(), (Received::Message(1), Received::Message(2)));
            assert!(mail.discard(1).is_some());
            assert_eq!(mail.queues(), 0);
        });
    }
}

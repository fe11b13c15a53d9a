//! One Lua state's threads for blocking jobs: one per job, at most
//! [`MAX_THREADS`] at once.
//!
//! Why per state: a thread delivers its answer into its state's queue, and
//! waits when that queue is bounded and full. Shared by several states, a
//! thread waiting for one state's room would hold up every other state's
//! lookups (and for ever, if that state never drains). So each state that
//! opens the module gets its own `Workers`, and a state's backpressure
//! stalls only its own lookups.
//!
//! Why not a fixed pool: `getaddrinfo` blocks for as long as the resolver
//! takes, seconds for a name whose server does not answer. A small fixed
//! pool lets a few such names stall every other lookup; idle pool threads
//! also live for ever. Why a cap: without one, a burst of lookups would
//! start a thread each. So a job gets a thread of its own while fewer than
//! `MAX_THREADS` run; beyond that it queues, and a thread that finishes its
//! job takes the next queued one before it ends. No lookups pending means
//! no threads.
//!
//! Invariant: `queue` is not empty only while `running == MAX_THREADS`, and
//! a thread ends only when it found the queue empty, under the lock.

use std::collections::VecDeque;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;

pub const MAX_THREADS: usize = 16;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub struct Workers {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Threads started and not yet ended.
    running: usize,
    /// Jobs waiting for a thread.
    queue: VecDeque<Job>,
}

impl Workers {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside the lock, so a poisoned lock still holds valid counts.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Run `job` on a thread of these workers, now or when one is free.
    /// Errors when no thread could be started (the job is dropped).
    pub fn spawn(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = Box::new(job);
        let mut state = self.lock();
        if state.running == MAX_THREADS {
            state.queue.push_back(job);
            return Ok(());
        }
        state.running += 1;
        drop(state);
        let workers = Arc::clone(self);
        thread::Builder::new().name("bgworker-dns".into()).spawn(move || workers.work(job)).map(drop).inspect_err(
            |_| {
                self.lock().running -= 1;
            },
        )
    }

    fn work(&self, mut job: Job) {
        loop {
            // A panicking job must not take the thread down without counting it out.
            let _ = panic::catch_unwind(AssertUnwindSafe(job));
            let mut state = self.lock();
            match state.queue.pop_front() {
                Some(next) => job = next,
                None => {
                    state.running -= 1;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn more_jobs_than_threads_all_run_and_the_threads_end() {
        let workers = Arc::new(Workers::default());
        let (tx, rx) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate_rx));
        let jobs = MAX_THREADS * 3;
        for i in 0..jobs {
            let (tx, gate) = (tx.clone(), gate.clone());
            workers
                .spawn(move || {
                    // Hold the first MAX_THREADS jobs until the rest are queued.
                    if i < MAX_THREADS {
                        let _ = gate.lock().unwrap().recv();
                    }
                    tx.send(i).unwrap();
                })
                .unwrap();
        }
        assert_eq!(workers.lock().running, MAX_THREADS);
        assert_eq!(workers.lock().queue.len(), jobs - MAX_THREADS);
        drop(gate_tx);
        let mut done: Vec<usize> = (0..jobs).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
        done.sort();
        assert_eq!(done, (0..jobs).collect::<Vec<_>>());
        for _ in 0..500 {
            if workers.lock().running == 0 {
                return;
            }
            thread::sleep(Duration::from_millis(2));
        }
        panic!("worker threads did not end");
    }
}

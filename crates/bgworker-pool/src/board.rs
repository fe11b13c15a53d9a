//! The pool's bookkeeping: the queue, the state of every live job, and the
//! counts and times that `stats` reports. Lua-free: jobs are any `J`.
//!
//! A job is *live* from `submit` until it ends, and it ends exactly once,
//! by one of: `settle` (its outcome reached the Lua thread), `cancel`,
//! `close`, or `lose` (its outcome was dropped unread: no dispatcher, or
//! the pool closed while it waited for room). Each of them removes the
//! job's entry under the lock and the others then find none, which is
//! what makes "exactly once" hold when they race.
//!
//! # Invariants (at every unlock)
//! - `jobs` holds exactly the live jobs. A queued job's id is in `queue`
//!   (stale ids of jobs cancelled while queued may follow it there; `take`
//!   skips them).
//! - `queued + running + done + failed + cancelled == submitted`: every
//!   transition moves one job between two of them, under the lock.
//! - Once closed, no job is queued: `close` takes them all and `submit`
//!   refuses, so a worker that finds the queue empty and the board closed
//!   is owed nothing.
//! - A running job's outcome is delivered only if `finish` said so, and
//!   `finish` says so only for a job nobody cancelled; after that, `cancel`
//!   refuses it: the outcome is on its way.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::control::Control;

/// A job's id: unique within its pool, from 1.
pub type Id = u64;

pub struct Board<J> {
    state: Mutex<State<J>>,
    /// A job was queued, or the board closed.
    work: Condvar,
}

/// Hashes ids, which are sequential: a multiplication spreads them over
/// the whole word (SipHash, the default, costs more than the job itself).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|&b| self.write_u64(u64::from(b)));
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

struct State<J> {
    next_id: Id,
    queue: VecDeque<Id>,
    jobs: HashMap<Id, Entry<J>, BuildHasherDefault<IdHasher>>,
    /// Workers waiting in `take`: only then does `submit` wake one.
    idle: usize,
    closed: bool,
    counts: Counts,
    waits: Times,
    runs: Times,
}

enum Entry<J> {
    Queued {
        job: J,
        since: Instant,
    },
    /// `produced`: its function ended and its outcome is on its way.
    Running {
        worker: usize,
        control: Arc<Control>,
        produced: bool,
    },
}

/// Jobs by where they are; see the invariants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub submitted: u64,
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// Durations of one kind: how many, their sum and the longest.
#[derive(Debug, Clone, Copy, Default)]
struct Times {
    count: u64,
    total: Duration,
    max: Duration,
}

impl Times {
    fn add(&mut self, time: Duration) {
        self.count += 1;
        self.total += time;
        self.max = self.max.max(time);
    }

    /// Mean and max in seconds; 0 before the first.
    fn seconds(&self) -> (f64, f64) {
        let mean = if self.count == 0 { 0.0 } else { self.total.as_secs_f64() / self.count as f64 };
        (mean, self.max.as_secs_f64())
    }
}

/// One consistent snapshot, for `pool:stats()`.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub counts: Counts,
    /// Submit to start, over the jobs started.
    pub wait_mean: f64,
    pub wait_max: f64,
    /// Start to the end of the function, over the jobs that produced an
    /// outcome (cancelled ones stopped early and would only blur it).
    pub run_mean: f64,
    pub run_max: f64,
}

/// Where a live job is, for `pool:status(id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Running,
    /// It ended: done, failed, cancelled or lost.
    Finished,
}

/// What `cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// Taken out of the queue: it will never run.
    Queued,
    /// Its worker runs it: its control is now cancelled, and that worker
    /// is to be interrupted.
    Running { worker: usize },
    /// Nothing to cancel: its outcome is on its way, it ended, or the id
    /// is unknown.
    No,
}

/// A job a worker took.
pub struct Taken<J> {
    pub id: Id,
    pub job: J,
    pub control: Arc<Control>,
    pub started: Instant,
}

impl<J> Default for Board<J> {
    fn default() -> Self {
        let state = State {
            next_id: 1,
            queue: VecDeque::new(),
            jobs: HashMap::default(),
            idle: 0,
            closed: false,
            counts: Counts::default(),
            waits: Times::default(),
            runs: Times::default(),
        };
        Board { state: Mutex::new(state), work: Condvar::new() }
    }
}

impl<J> Board<J> {
    fn lock(&self) -> MutexGuard<'_, State<J>> {
        // Nothing panics under the lock; were it to, each operation leaves
        // the state consistent before anything that could panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue `job`: its id, or `Err(job)` when the board is closed.
    pub fn submit(&self, job: J) -> Result<Id, J> {
        let mut state = self.lock();
        if state.closed {
            return Err(job);
        }
        let id = state.next_id;
        state.next_id += 1;
        state.jobs.insert(id, Entry::Queued { job, since: Instant::now() });
        state.queue.push_back(id);
        state.counts.submitted += 1;
        state.counts.queued += 1;
        let idle = state.idle > 0;
        drop(state);
        if idle {
            self.work.notify_one();
        }
        Ok(id)
    }

    /// For `worker`: the next queued job, now running, waiting for one;
    /// `None` once the board is closed (its queue is then empty).
    pub fn take(&self, worker: usize) -> Option<Taken<J>> {
        let mut state = self.lock();
        loop {
            while let Some(id) = state.queue.pop_front() {
                let Some(entry) = state.jobs.get_mut(&id) else { continue };
                let control = Arc::new(Control::default());
                let running = Entry::Running { worker, control: Arc::clone(&control), produced: false };
                let Entry::Queued { job, since } = std::mem::replace(entry, running) else {
                    unreachable!("a queued id names a queued job")
                };
                let started = Instant::now();
                state.waits.add(started - since);
                state.counts.queued -= 1;
                state.counts.running += 1;
                return Some(Taken { id, job, control, started });
            }
            if state.closed {
                return None;
            }
            state.idle += 1;
            state = self.work.wait(state).unwrap_or_else(PoisonError::into_inner);
            state.idle -= 1;
        }
    }

    /// The function of running job `id`, started at `started`, ended.
    /// True when its outcome is to be delivered (then `settle` or `lose`
    /// ends the job); false when it was cancelled meanwhile.
    pub fn finish(&self, id: Id, started: Instant) -> bool {
        let mut state = self.lock();
        let State { jobs, runs, .. } = &mut *state;
        match jobs.get_mut(&id) {
            Some(Entry::Running { produced, .. }) if !*produced => {
                *produced = true;
                runs.add(started.elapsed());
                true
            }
            _ => false,
        }
    }

    /// Job `id`'s outcome reached the Lua thread: it ends, done or failed.
    /// False if it had already ended.
    pub fn settle(&self, id: Id, failed: bool) -> bool {
        let mut state = self.lock();
        if state.jobs.remove(&id).is_none() {
            return false;
        }
        state.counts.running -= 1;
        if failed {
            state.counts.failed += 1;
        } else {
            state.counts.done += 1;
        }
        true
    }

    /// Job `id`'s outcome was dropped unread: it ends, counted cancelled.
    pub fn lose(&self, id: Id) {
        let mut state = self.lock();
        if state.jobs.remove(&id).is_some() {
            state.counts.running -= 1;
            state.counts.cancelled += 1;
        }
    }

    /// True while job `id` runs (so its progress is still wanted).
    pub fn is_running(&self, id: Id) -> bool {
        matches!(self.lock().jobs.get(&id), Some(Entry::Running { .. }))
    }

    pub fn cancel(&self, id: Id) -> Cancelled {
        let mut state = self.lock();
        let State { jobs, counts, .. } = &mut *state;
        let cancelled = match jobs.get(&id) {
            Some(Entry::Queued { .. }) => {
                counts.queued -= 1;
                Cancelled::Queued
            }
            Some(Entry::Running { worker, control, produced: false }) => {
                control.cancel();
                counts.running -= 1;
                Cancelled::Running { worker: *worker }
            }
            _ => return Cancelled::No,
        };
        jobs.remove(&id);
        counts.cancelled += 1;
        cancelled
    }

    pub fn status(&self, id: Id) -> Option<Status> {
        let state = self.lock();
        match state.jobs.get(&id) {
            Some(Entry::Queued { .. }) => Some(Status::Queued),
            Some(Entry::Running { .. }) => Some(Status::Running),
            None if id >= 1 && id < state.next_id => Some(Status::Finished),
            None => None,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let (wait_mean, wait_max) = state.waits.seconds();
        let (run_mean, run_max) = state.runs.seconds();
        Snapshot { counts: state.counts, wait_mean, wait_max, run_mean, run_max }
    }

    /// Close: refuse new jobs, cancel the queued ones and the running ones
    /// whose outcome is not on its way yet. Returns the workers running
    /// those, to interrupt. Wakes every waiting `take`. Closing again does
    /// nothing.
    pub fn close(&self) -> Vec<usize> {
        let mut state = self.lock();
        state.closed = true;
        state.queue.clear();
        let mut interrupt = Vec::new();
        let State { jobs, counts, .. } = &mut *state;
        jobs.retain(|_, entry| {
            match entry {
                Entry::Queued { .. } => counts.queued -= 1,
                Entry::Running { worker, control, produced: false } => {
                    control.cancel();
                    interrupt.push(*worker);
                    counts.running -= 1;
                }
                Entry::Running { produced: true, .. } => return true,
            }
            counts.cancelled += 1;
            false
        });
        drop(state);
        self.work.notify_all();
        interrupt
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(test)]
mod tests;

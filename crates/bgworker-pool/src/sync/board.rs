//! The pool's bookkeeping: the queue, the state of every live job, and the
//! counts and times that `stats` reports. Lua-free: jobs are any `J`.
//!
//! A job is *live* from `submit` until it ends, and it ends exactly once,
//! by one of: `settle` (its outcome reached the Lua thread), `cancel`,
//! `close`, or `lose` (its outcome was dropped unread: no dispatcher, or
//! the pool closed while it waited for room; the Lua side is told later,
//! see `take_lost`). Each of them ends it under
//! the lock (removes its entry, or marks it dropped while queued) and the
//! others then find it ended, which is what makes "exactly once" hold
//! when they race.
//!
//! Two locks, so that the Lua thread, which submits, and the workers,
//! which take jobs and finish them, rarely wait for each other:
//! - `incoming` (a submit pushes its job there, and nothing else) holds
//!   the jobs submitted since a worker last took them all;
//! - `state` holds the jobs the workers took from `incoming` (in `queue`,
//!   still queued), the running ones, the ended counts and the times.
//!
//! Queued jobs are held in the queues themselves, in id order; only running
//! jobs have an entry in a map, which stays as small as the number of
//! workers and outcomes on their way.
//!
//! # Invariants (at every unlock)
//! - Locks are taken in the order `state`, then `incoming`.
//! - `state.queue` then `incoming.queue` hold the jobs with ids
//!   `front..next_id`, in order (`front`: the first of them, or `next_id`):
//!   ids enter `incoming` when submitted, move to `state.queue` all at
//!   once, and leave its front when taken (or all at once when closed).
//!   Those in `dropped` were cancelled while queued; the others are the
//!   queued jobs. So `submitted == next_id - 1` and `queued == next_id -
//!   front - dropped.len()`, and `counts` keeps the others.
//! - `running` holds exactly the live jobs a worker took.
//! - `queued + running + done + failed + cancelled == submitted`: every
//!   transition moves one job between two of them, under the locks that
//!   guard both (a snapshot takes both).
//! - Once closed (both `closed` flags, set under both locks), no job is
//!   queued: `close` takes them all and `submit` refuses, so a worker that
//!   finds the queues empty and the board closed is owed nothing.
//! - `waking <= idle`: of the workers waiting for a submit, those that
//!   `submit` woke and that have not returned from their wait yet (or
//!   fewer, after a spurious wakeup). A worker waits only after it saw
//!   both queues empty under both locks, and keeps `incoming` locked until
//!   it waits, so that no job arrives unseen; a submit wakes one more
//!   whenever `idle > waking`: a queued job never waits while every worker
//!   sleeps.
//! - A running job's outcome is delivered only if `finish` said so, and
//!   `finish` says so only for a job nobody cancelled; after that, `cancel`
//!   refuses it: the outcome is on its way.
//! - Retirement: `stuck` holds the workers still running a job that was
//!   cancelled while it ran (since when), until they are back from it
//!   (`finish`). `retire_stuck` retires those stuck for a grace or more;
//!   a retired worker takes no other job (`finish` and `take` give it
//!   none, under the lock that `retire_stuck` holds), so a worker is
//!   either back in time and serves on, or retired and replaced, never
//!   both. A worker given up in its init (`retire`) is retired before it
//!   serves. `retired` holds the retired workers until they leave `serve`
//!   (or `left`, whose init failed): the `abandoned` of a snapshot.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crate::sync::control::Control;
use crate::sync::locks::{Condvar, Mutex, MutexGuard};

/// A job's id: unique within its pool, from 1.
pub type Id = u64;

pub struct Board<J> {
    // Each on cache lines of its own: the workers write `state`, the Lua
    // thread `incoming`.
    state: Padded<Mutex<State<J>>>,
    incoming: Padded<Mutex<Incoming<J>>>,
    /// A job was submitted, or the board closed (with `incoming`).
    work: Condvar,
}

/// A value alone on its cache lines (two: the prefetcher pairs them).
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
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

type IdMap<V> = HashMap<Id, V, BuildHasherDefault<IdHasher>>;

struct State<J> {
    /// Jobs taken from `incoming`, not yet by a worker.
    queue: VecDeque<Queued<J>>,
    /// Ids in the queues whose jobs were cancelled.
    dropped: HashSet<Id, BuildHasherDefault<IdHasher>>,
    running: IdMap<Running>,
    /// Jobs that `lose` ended and that the Lua side has not been told of
    /// yet (`take_lost`).
    lost: Vec<Id>,
    /// Workers still running a job cancelled while it ran, since then.
    stuck: HashMap<usize, Instant>,
    /// Workers retired from serving (`retire_stuck`), until they leave.
    retired: HashSet<usize>,
    closed: bool,
    /// `running`, `done`, `failed`, `cancelled` (the others are derived).
    counts: Counts,
    waits: Times,
    runs: Times,
}

struct Incoming<J> {
    next_id: Id,
    queue: VecDeque<Queued<J>>,
    /// Workers waiting for a submit: only then does `submit` wake one.
    idle: usize,
    /// Of those, how many `submit` has woken and are yet to return from
    /// their wait: a burst of submits wakes each idle worker once, not
    /// once per job (a wake is a system call).
    waking: usize,
    closed: bool,
}

struct Queued<J> {
    id: Id,
    job: J,
    since: Instant,
}

struct Running {
    worker: usize,
    control: Arc<Control>,
    /// Its function ended and its outcome is on its way.
    produced: bool,
}

/// Both locks, for what looks at the queues as a whole.
struct Both<'a, J> {
    state: MutexGuard<'a, State<J>>,
    incoming: MutexGuard<'a, Incoming<J>>,
}

impl<J> Both<'_, J> {
    /// The first id in the queues (`next_id` when they are empty).
    fn front(&self) -> Id {
        let first = self.state.queue.front().or(self.incoming.queue.front());
        first.map_or(self.incoming.next_id, |queued| queued.id)
    }

    fn is_queued(&self, id: Id) -> bool {
        (self.front()..self.incoming.next_id).contains(&id) && !self.state.dropped.contains(&id)
    }

    fn counts(&self) -> Counts {
        let submitted = self.incoming.next_id - 1;
        let queued = self.incoming.next_id - self.front() - self.state.dropped.len() as u64;
        Counts { submitted, queued, ..self.state.counts }
    }
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
    /// Retired workers still running the job (or the init) they were
    /// retired in.
    pub abandoned: u64,
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
            queue: VecDeque::new(),
            dropped: HashSet::default(),
            running: HashMap::default(),
            lost: Vec::new(),
            stuck: HashMap::new(),
            retired: HashSet::new(),
            closed: false,
            counts: Counts::default(),
            waits: Times::default(),
            runs: Times::default(),
        };
        let incoming = Incoming { next_id: 1, queue: VecDeque::new(), idle: 0, waking: 0, closed: false };
        Board { state: Padded(Mutex::new(state)), incoming: Padded(Mutex::new(incoming)), work: Condvar::new() }
    }
}

/// Lock `mutex`, poisoned or not: the board's state is consistent at every
/// point that could panic (nothing under its locks panics but an
/// allocation failure, which aborts).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<J> Board<J> {
    fn lock(&self) -> MutexGuard<'_, State<J>> {
        lock(&self.state)
    }

    fn lock_both(&self) -> Both<'_, J> {
        let state = self.lock();
        Both { state, incoming: lock(&self.incoming) }
    }

    /// Queue `job`: its id, or `Err(job)` when the board is closed. Takes
    /// only `incoming`.
    pub fn submit(&self, job: J) -> Result<Id, J> {
        let since = Instant::now();
        let mut incoming = lock(&self.incoming);
        if incoming.closed {
            return Err(job);
        }
        let id = incoming.next_id;
        incoming.next_id += 1;
        incoming.queue.push_back(Queued { id, job, since });
        let wake = incoming.idle > incoming.waking;
        if wake {
            incoming.waking += 1;
        }
        drop(incoming);
        if wake {
            self.work.notify_one();
        }
        Ok(id)
    }

    /// Under the `state` lock: the next queued job (taking those in
    /// `incoming` first when there are none), now running on `worker` since
    /// `now`, with the control in `spare` (taken from there).
    fn start_next(
        &self,
        state: &mut State<J>,
        worker: usize,
        spare: &mut Option<Arc<Control>>,
        now: Instant,
    ) -> Option<Taken<J>> {
        loop {
            if state.queue.is_empty() {
                // Empty, so the swap moves them all, and both keep their buffers.
                std::mem::swap(&mut state.queue, &mut lock(&self.incoming).queue);
            }
            let Queued { id, job, since } = state.queue.pop_front()?;
            if state.dropped.remove(&id) {
                // Cancelled while queued (and counted then).
                continue;
            }
            let control = spare.take().unwrap_or_default();
            state.running.insert(id, Running { worker, control: Arc::clone(&control), produced: false });
            state.waits.add(now.saturating_duration_since(since));
            state.counts.running += 1;
            return Some(Taken { id, job, control, started: now });
        }
    }

    /// Worker `worker`'s loop, until the board closes or retires it: take a job
    /// (waiting for one), `run` it, and hand its outcome to `deliver` when
    /// `finish` says it is to be delivered. Each job's control is made
    /// before the lock that starts it is taken.
    pub fn serve<O>(&self, worker: usize, mut run: impl FnMut(&Taken<J>) -> O, mut deliver: impl FnMut(Id, O)) {
        let mut spare = Some(Arc::default());
        let mut next = self.take(worker, &mut spare);
        while let Some(taken) = next {
            let outcome = run(&taken);
            spare.get_or_insert_with(Arc::default);
            let (delivered, following) = self.finish(taken.id, taken.started, worker, &mut spare);
            if delivered {
                deliver(taken.id, outcome);
            }
            next = following.or_else(|| self.take(worker, &mut spare));
        }
    }

    /// For `worker`: the next queued job, now running, waiting for one;
    /// `None` once the board is closed (its queues are then empty), or
    /// once the worker is retired. The
    /// job's control is taken from `spare` when there is one there (made
    /// out of the locks by the caller).
    fn take(&self, worker: usize, spare: &mut Option<Arc<Control>>) -> Option<Taken<J>> {
        let mut now = Instant::now();
        loop {
            let mut state = self.lock();
            if state.retired.remove(&worker) {
                // Retired while in its last job: it leaves, and no longer
                // counts as abandoned.
                return None;
            }
            if let Some(taken) = self.start_next(&mut state, worker, spare, now) {
                return Some(taken);
            }
            if state.closed {
                return None;
            }
            // Both queues are empty (start_next looked at both under the
            // locks), and `incoming` stays locked until the wait: no
            // submit comes unseen.
            let mut incoming = lock(&self.incoming);
            drop(state);
            if incoming.queue.is_empty() && !incoming.closed {
                incoming.idle += 1;
                incoming = self.work.wait(incoming).unwrap_or_else(PoisonError::into_inner);
                incoming.idle -= 1;
                // Woken by a submit, or spuriously (then a later wake finds
                // `waking` too low, which only costs a wake more).
                incoming.waking = incoming.waking.saturating_sub(1);
            }
            drop(incoming);
            now = Instant::now();
        }
    }

    /// The function of running job `id`, started at `started`, ended on
    /// `worker`: true when its outcome is to be delivered (then `settle`
    /// or `lose` ends the job), false when it was cancelled meanwhile. In
    /// the same lock, the worker's next job if one is queued (as `take`
    /// gives it, without waiting): a busy worker locks once per job.
    fn finish(
        &self,
        id: Id,
        started: Instant,
        worker: usize,
        spare: &mut Option<Arc<Control>>,
    ) -> (bool, Option<Taken<J>>) {
        let now = Instant::now();
        let mut state = self.lock();
        let State { running, runs, stuck, retired, .. } = &mut *state;
        stuck.remove(&worker);
        let deliver = match running.get_mut(&id) {
            Some(Running { produced, .. }) if !*produced => {
                *produced = true;
                runs.add(now.saturating_duration_since(started));
                true
            }
            _ => false,
        };
        if retired.contains(&worker) {
            // `take` lets it go.
            return (deliver, None);
        }
        (deliver, self.start_next(&mut state, worker, spare, now))
    }

    /// Retire the workers that have run a cancelled job for `grace` or
    /// more: they take no other job, and leave `serve` once back from it.
    /// Returns them, for the caller to replace.
    pub fn retire_stuck(&self, grace: Duration) -> Vec<usize> {
        let now = Instant::now();
        let mut state = self.lock();
        let State { stuck, retired, .. } = &mut *state;
        let mut retiring = Vec::new();
        stuck.retain(|&worker, since| {
            if now.saturating_duration_since(*since) < grace {
                return true;
            }
            retired.insert(worker);
            retiring.push(worker);
            false
        });
        retiring
    }

    /// Retire `worker`, given up in its init (a replacement whose init
    /// failed or ran too long, crew.rs): if its init returns, it takes no
    /// job; it counts as abandoned until it leaves.
    pub fn retire(&self, worker: usize) {
        self.lock().retired.insert(worker);
    }

    /// `worker`'s thread ends without serving (its init failed): it no
    /// longer counts as abandoned.
    pub fn left(&self, worker: usize) {
        self.lock().retired.remove(&worker);
    }

    /// These outcomes (`id, failed`) reached the Lua thread: each job ends,
    /// done or failed, unless it had already ended.
    pub fn settle(&self, outcomes: impl IntoIterator<Item = (Id, bool)>) {
        let mut state = self.lock();
        let State { running, counts, .. } = &mut *state;
        for (id, failed) in outcomes {
            if running.remove(&id).is_some() {
                counts.running -= 1;
                if failed {
                    counts.failed += 1;
                } else {
                    counts.done += 1;
                }
            }
        }
    }

    /// These jobs' outcomes were dropped unread: each ends, counted
    /// cancelled, unless it had already ended, and is kept for
    /// `take_lost`. True when one of them ended here.
    pub fn lose(&self, ids: impl IntoIterator<Item = Id>) -> bool {
        let mut state = self.lock();
        let State { running, counts, lost, .. } = &mut *state;
        let before = lost.len();
        for id in ids {
            if running.remove(&id).is_some() {
                counts.running -= 1;
                counts.cancelled += 1;
                lost.push(id);
            }
        }
        lost.len() > before
    }

    /// The jobs `lose` ended since the last call, in the order lost.
    pub fn take_lost(&self) -> Vec<Id> {
        std::mem::take(&mut self.lock().lost)
    }

    /// Put back jobs that `take_lost` took but could not pass on.
    pub fn give_back_lost(&self, ids: Vec<Id>) {
        let mut state = self.lock();
        let mut ids = ids;
        ids.append(&mut state.lost);
        state.lost = ids;
    }

    /// Whether `lose` ended jobs that `take_lost` has not taken yet.
    pub fn has_lost(&self) -> bool {
        !self.lock().lost.is_empty()
    }

    /// Keep in `events` those whose `progress_id` is `None` or names a job
    /// that still runs (so its progress is still wanted); the others are
    /// returned, to be dropped once the lock is released.
    pub fn retain_running<E>(&self, events: &mut Vec<E>, progress_id: impl Fn(&E) -> Option<Id>) -> Vec<E> {
        if events.iter().all(|event| progress_id(event).is_none()) {
            return Vec::new();
        }
        let state = self.lock();
        let wanted = |event: &E| progress_id(event).is_none_or(|id| state.running.contains_key(&id));
        let (kept, unwanted) = std::mem::take(events).into_iter().partition(wanted);
        *events = kept;
        unwanted
    }

    pub fn cancel(&self, id: Id) -> Cancelled {
        let mut both = self.lock_both();
        let cancelled = if both.is_queued(id) {
            both.state.dropped.insert(id);
            Cancelled::Queued
        } else {
            let state = &mut *both.state;
            match state.running.get(&id) {
                Some(Running { worker, control, produced: false }) => {
                    control.cancel();
                    let worker = *worker;
                    state.running.remove(&id);
                    state.counts.running -= 1;
                    state.stuck.insert(worker, Instant::now());
                    Cancelled::Running { worker }
                }
                _ => return Cancelled::No,
            }
        };
        both.state.counts.cancelled += 1;
        cancelled
    }

    pub fn status(&self, id: Id) -> Option<Status> {
        let both = self.lock_both();
        if both.state.running.contains_key(&id) {
            Some(Status::Running)
        } else if both.is_queued(id) {
            Some(Status::Queued)
        } else if id >= 1 && id < both.incoming.next_id {
            Some(Status::Finished)
        } else {
            None
        }
    }

    /// Is job `id` queued, or running and not yet returned? What a
    /// message to it needs (mail.rs).
    pub fn is_pending(&self, id: Id) -> bool {
        let both = self.lock_both();
        match both.state.running.get(&id) {
            Some(running) => !running.produced,
            None => both.is_queued(id),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let both = self.lock_both();
        let (wait_mean, wait_max) = both.state.waits.seconds();
        let (run_mean, run_max) = both.state.runs.seconds();
        let abandoned = both.state.retired.len() as u64;
        Snapshot { counts: both.counts(), abandoned, wait_mean, wait_max, run_mean, run_max }
    }

    /// Close: refuse new jobs, cancel the queued ones and the running ones
    /// whose outcome is not on its way yet. Returns the workers running
    /// those, to interrupt. Wakes every waiting `take`. Closing again does
    /// nothing.
    pub fn close(&self) -> Vec<usize> {
        let mut both = self.lock_both();
        let queued = both.counts().queued;
        both.state.closed = true;
        both.incoming.closed = true;
        let jobs = (std::mem::take(&mut both.state.queue), std::mem::take(&mut both.incoming.queue));
        let State { running, counts, dropped, .. } = &mut *both.state;
        dropped.clear();
        counts.cancelled += queued;
        let mut interrupt = Vec::new();
        running.retain(|_, Running { worker, control, produced }| {
            if *produced {
                return true;
            }
            control.cancel();
            interrupt.push(*worker);
            counts.running -= 1;
            counts.cancelled += 1;
            false
        });
        drop(both);
        self.work.notify_all();
        // The jobs' values, freed out of the locks.
        drop(jobs);
        interrupt
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_model;

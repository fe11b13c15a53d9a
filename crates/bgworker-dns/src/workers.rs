//! One Lua state's threads for blocking jobs: a thread per running job,
//! within two bounds.
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
//! also live for ever. So a job gets a thread of its own, and a thread that
//! finishes its job takes the next queued one before it ends. No jobs
//! pending means no threads.
//!
//! Why two bounds: a job can be given up on (its `wanted` turns false: the
//! caller timed out and cancelled its token) while its thread is still
//! inside `getaddrinfo`, for as long as the resolver takes. Counted against
//! the bound, sixteen names whose server never answers held every thread
//! long after their callers gave up, and every later lookup timed out
//! behind them. So:
//! - at most [`MAX_WANTED`] jobs that are still wanted run at once: a burst
//!   starts that many threads, and the rest wait in the queue. A job given
//!   up on stops counting at once: a new thread may start while its own
//!   finishes (and delivers nothing, lib.rs);
//! - at most [`MAX_THREADS`] threads in all, those still finishing jobs
//!   given up on included, so a resolver that never answers cannot make
//!   them grow without bound. Past it, jobs wait until one of those threads
//!   ends, which it does when its `getaddrinfo` returns.
//!
//! A queued job given up on is dropped unrun. Whether a job is wanted is
//! asked (a token is polled: nothing tells us when it is cancelled), so the
//! counts are brought up to date whenever a thread may start or end: when a
//! job is added ([`Workers::spawn`]), when the caller gave one up
//! ([`Workers::start_waiting`]), when a thread finished its job.
//!
//! Threads take their jobs from the queue themselves, also their first, so
//! a thread that could not be started loses no job.
//!
//! Invariant: the queue is not empty only while a thread runs. A thread
//! ends only when it found no job it may take, under the lock: the queue
//! was empty, or `MAX_WANTED` wanted jobs run on other threads, which will
//! look at the queue when they finish.

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;

/// Jobs still wanted that run at once.
pub const MAX_WANTED: usize = 16;
/// Threads at once, those finishing jobs given up on included.
pub const MAX_THREADS: usize = 64;

/// Whether a job is still wanted. Asked under the lock: it must be quick
/// and take no lock (a token's is an atomic load). Once false, never true
/// again.
type Wanted = Arc<dyn Fn() -> bool + Send + Sync>;

struct Job {
    wanted: Wanted,
    run: Box<dyn FnOnce() + Send>,
}

#[derive(Default)]
pub struct Workers {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Threads started and not yet ended.
    threads: usize,
    /// Of those, the ones started that have not yet looked at the queue:
    /// each will take a job, so no more threads are started for them.
    starting: usize,
    /// The jobs running that were still wanted when last asked.
    running: Vec<Wanted>,
    /// Jobs waiting for a thread.
    queue: VecDeque<Job>,
}

impl State {
    /// Forget what was given up on: running jobs stop counting, and queued
    /// ones are returned, for the caller to drop once it let go of the lock
    /// (dropping a job releases its token and its bgworker handle).
    fn forget_unwanted(&mut self) -> VecDeque<Job> {
        self.running.retain(|wanted| wanted());
        let (queue, unwanted) = mem::take(&mut self.queue).into_iter().partition(|job| (job.wanted)());
        self.queue = queue;
        unwanted
    }

    /// Should one more thread start? Only for a queued job that no starting
    /// thread will take, within both bounds.
    fn may_start(&self) -> bool {
        self.queue.len() > self.starting
            && self.running.len() + self.starting < MAX_WANTED
            && self.threads < MAX_THREADS
    }

    /// The next job for a thread that has none, counted as running; none
    /// while `MAX_WANTED` wanted jobs run.
    fn take(&mut self) -> Option<Job> {
        if self.running.len() >= MAX_WANTED {
            return None;
        }
        let job = self.queue.pop_front()?;
        self.running.push(Arc::clone(&job.wanted));
        Some(job)
    }
}

impl Workers {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside the lock, so a poisoned lock still holds valid counts.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Run `job` on a thread of these workers, now or when the bounds allow;
    /// never once `wanted()` is false. Errors when no thread could be
    /// started and none runs to take the job: it is dropped.
    pub fn spawn(
        self: &Arc<Self>,
        wanted: impl Fn() -> bool + Send + Sync + 'static,
        job: impl FnOnce() + Send + 'static,
    ) -> io::Result<()> {
        self.lock().queue.push_back(Job { wanted: Arc::new(wanted), run: Box::new(job) });
        let Err(error) = self.start_threads() else {
            return Ok(());
        };
        let mut state = self.lock();
        if state.threads > 0 {
            // They will take it (the invariant).
            return Ok(());
        }
        // The job just added is all there is: the queue is empty without threads.
        let orphans = mem::take(&mut state.queue);
        drop(state);
        drop(orphans);
        Err(error)
    }

    /// Start the threads that queued jobs may have now: to be called after
    /// giving a job up (cancelling its token), so that the jobs waiting
    /// behind it need not wait for its thread to finish.
    pub fn start_waiting(self: &Arc<Self>) {
        // A thread that cannot be started leaves the queue to the threads
        // that run, which exist while it is not empty (the invariant).
        let _ = self.start_threads();
    }

    /// Start threads while [`State::may_start`]. Errors when one could not
    /// be started; the queue is left as it was.
    fn start_threads(self: &Arc<Self>) -> io::Result<()> {
        loop {
            let mut state = self.lock();
            let unwanted = state.forget_unwanted();
            if !state.may_start() {
                return Ok(());
            }
            state.threads += 1;
            state.starting += 1;
            drop(state);
            drop(unwanted);
            let workers = Arc::clone(self);
            if let Err(error) = thread::Builder::new().name("bgworker-dns".into()).spawn(move || workers.work()) {
                let mut state = self.lock();
                state.threads -= 1;
                state.starting -= 1;
                return Err(error);
            }
        }
    }

    fn work(&self) {
        let mut state = self.lock();
        state.starting -= 1;
        loop {
            let unwanted = state.forget_unwanted();
            let Some(Job { wanted, run }) = state.take() else {
                state.threads -= 1;
                return;
            };
            drop(state);
            drop(unwanted);
            // A panicking job must not take the thread down without counting it out.
            let _ = panic::catch_unwind(AssertUnwindSafe(run));
            state = self.lock();
            state.running.retain(|running| !Arc::ptr_eq(running, &wanted));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    const PATIENCE: Duration = Duration::from_secs(5);

    /// A job's `wanted`, which the test turns off: the caller giving up.
    fn wish() -> (Arc<AtomicBool>, impl Fn() -> bool + Send + Sync + 'static) {
        let flag = Arc::new(AtomicBool::new(true));
        let wanted = Arc::clone(&flag);
        (flag, move || wanted.load(Ordering::SeqCst))
    }

    /// A job that blocks until `gate` closes (its sender dropped), as a
    /// lookup blocks in `getaddrinfo`, then sends `i`.
    fn blocked(i: usize, gate: &Arc<Mutex<mpsc::Receiver<()>>>, done: &mpsc::Sender<usize>) -> impl FnOnce() + Send {
        let (gate, done) = (Arc::clone(gate), done.clone());
        move || {
            let _ = gate.lock().unwrap().recv();
            done.send(i).unwrap();
        }
    }

    fn gate() -> (mpsc::Sender<()>, Arc<Mutex<mpsc::Receiver<()>>>) {
        let (open, gate) = mpsc::channel();
        (open, Arc::new(Mutex::new(gate)))
    }

    fn until(workers: &Workers, what: &str, cond: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !cond(&workers.lock()) {
            assert!(Instant::now() < deadline, "{what}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn all_threads_end(workers: &Workers) {
        until(workers, "worker threads did not end", |state| state.threads == 0 && state.queue.is_empty());
    }

    #[test]
    fn more_jobs_than_threads_all_run_and_the_threads_end() {
        let workers = Arc::new(Workers::default());
        let (tx, rx) = mpsc::channel();
        let (open, gate) = gate();
        let jobs = MAX_WANTED * 3;
        for i in 0..jobs {
            // Hold the first MAX_WANTED jobs until the rest are queued.
            let tx = tx.clone();
            if i < MAX_WANTED {
                workers.spawn(|| true, blocked(i, &gate, &tx)).unwrap();
            } else {
                workers.spawn(|| true, move || tx.send(i).unwrap()).unwrap();
            }
        }
        until(&workers, "the first jobs did not start", |state| state.starting == 0);
        assert_eq!(workers.lock().threads, MAX_WANTED);
        assert_eq!(workers.lock().queue.len(), jobs - MAX_WANTED);
        drop(open);
        let mut done: Vec<usize> = (0..jobs).map(|_| rx.recv_timeout(PATIENCE).unwrap()).collect();
        done.sort();
        assert_eq!(done, (0..jobs).collect::<Vec<_>>());
        all_threads_end(&workers);
    }

    #[test]
    fn jobs_given_up_on_leave_their_place_to_new_ones() {
        let workers = Arc::new(Workers::default());
        let (done_tx, done) = mpsc::channel();
        let (open, gate) = gate();
        let flags: Vec<_> = (0..MAX_WANTED)
            .map(|i| {
                let (flag, wanted) = wish();
                workers.spawn(wanted, blocked(i, &gate, &done_tx)).unwrap();
                flag
            })
            .collect();
        for flag in &flags {
            flag.store(false, Ordering::SeqCst);
        }
        // Their threads are still blocked: a new job runs beside them.
        workers.spawn(|| true, move || done_tx.send(100).unwrap()).unwrap();
        assert_eq!(done.recv_timeout(PATIENCE).unwrap(), 100);
        drop(open);
        all_threads_end(&workers);
    }

    #[test]
    fn a_queued_job_starts_when_those_ahead_are_given_up_on() {
        let workers = Arc::new(Workers::default());
        let (done_tx, done) = mpsc::channel();
        let (open, gate) = gate();
        let mut flags = Vec::new();
        // MAX_WANTED running, then 4 queued that will be given up on too,
        // then the one that must run.
        for i in 0..MAX_WANTED + 4 {
            let (flag, wanted) = wish();
            workers.spawn(wanted, blocked(i, &gate, &done_tx)).unwrap();
            flags.push(flag);
        }
        workers.spawn(|| true, move || done_tx.send(100).unwrap()).unwrap();
        assert!(done.recv_timeout(Duration::from_millis(50)).is_err(), "ran before any was given up on");
        for flag in &flags {
            flag.store(false, Ordering::SeqCst);
        }
        workers.start_waiting();
        assert_eq!(done.recv_timeout(PATIENCE).unwrap(), 100);
        // The queued jobs given up on never ran.
        drop(open);
        all_threads_end(&workers);
        let ran: Vec<usize> = done.try_iter().collect();
        assert_eq!(ran.len(), MAX_WANTED, "{ran:?}");
        assert!(ran.iter().all(|&i| i < MAX_WANTED), "{ran:?}");
    }

    #[test]
    fn threads_never_exceed_the_ceiling_and_jobs_past_it_wait() {
        let workers = Arc::new(Workers::default());
        let (done_tx, done) = mpsc::channel();
        let (open, gate) = gate();
        // Every job is given up on once it started, and blocks: a resolver
        // that never answers, and callers that keep timing out.
        for i in 0..MAX_THREADS {
            let (flag, wanted) = wish();
            workers.spawn(wanted, blocked(i, &gate, &done_tx)).unwrap();
            until(&workers, "a job did not start", |state| state.starting == 0);
            flag.store(false, Ordering::SeqCst);
        }
        // Past the ceiling: one job given up on while it waits, and one wanted.
        let (flag, wanted) = wish();
        workers.spawn(wanted, blocked(MAX_THREADS, &gate, &done_tx)).unwrap();
        flag.store(false, Ordering::SeqCst);
        workers.spawn(|| true, move || done_tx.send(100).unwrap()).unwrap();
        workers.start_waiting();
        assert_eq!(workers.lock().threads, MAX_THREADS);
        assert!(done.recv_timeout(Duration::from_millis(50)).is_err(), "ran past the ceiling");
        // The blocked jobs return: the wanted one runs, the other never.
        drop(open);
        let mut ran: Vec<usize> = (0..MAX_THREADS + 1).map(|_| done.recv_timeout(PATIENCE).unwrap()).collect();
        all_threads_end(&workers);
        ran.extend(done.try_iter());
        ran.sort();
        assert_eq!(ran, (0..MAX_THREADS).chain([100]).collect::<Vec<_>>());
    }
}

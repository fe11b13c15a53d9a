//! A pool's workers as a group: which finished their init, the first init
//! failure, which ended. What `new` waits for before it returns, and
//! `close` before it joins. A worker that replaces a retired one joins
//! the group later (`add`): it is *joining* until its init returns, and
//! `given_up` tells the pool which of those to give up on (their init
//! failed, or ran past the pool's init timeout). Lua-free: the failure is
//! any `F`.
//!
//! # Invariants
//! - Each worker reports `ready` or `failed` at most once, then `ended`
//!   exactly once (a drop guard of its thread, after its Lua state closed).
//!   A worker that never started is marked ended at once.
//! - `joining` holds exactly the added workers not yet ready and not yet
//!   given up; `given_up` returns each worker at most once.
//! - Every wait takes a deadline: `None` only when the caller was given an
//!   unbounded timeout.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crate::sync::control::Control;
use crate::sync::locks::{Condvar, Mutex, MutexGuard};

pub struct Crew<F> {
    state: Mutex<State<F>>,
    changed: Condvar,
}

struct State<F> {
    ready: usize,
    /// How many `new` started with: what the startup waits for.
    starting: usize,
    failure: Option<F>,
    ended: Vec<bool>,
    /// Each worker's init task, so that `close` can cancel one that runs.
    init: Vec<Arc<Control>>,
    joining: HashMap<usize, Joining>,
}

/// Where the init of a worker added after the startup is.
enum Joining {
    /// Running, since then.
    Since(Instant),
    Failed,
}

/// How the workers' start went.
pub enum Startup<F> {
    /// Every worker finished its init.
    Ready,
    /// One failed: the first failure.
    Failed(F),
    TimedOut,
}

/// Marks its worker ended when dropped.
pub struct Ending<F> {
    crew: Arc<Crew<F>>,
    worker: usize,
}

impl<F> Drop for Ending<F> {
    fn drop(&mut self) {
        self.crew.lock().ended[self.worker] = true;
        self.crew.changed.notify_all();
    }
}

impl<F> Crew<F> {
    pub fn new(workers: usize) -> Crew<F> {
        let init = (0..workers).map(|_| Arc::new(Control::default())).collect();
        let state = State {
            ready: 0,
            starting: workers,
            failure: None,
            ended: vec![false; workers],
            init,
            joining: HashMap::new(),
        };
        Crew { state: Mutex::new(state), changed: Condvar::new() }
    }

    /// One more worker, after the startup (to replace a retired one): its
    /// index.
    pub fn add(&self) -> usize {
        let mut state = self.lock();
        state.ended.push(false);
        state.init.push(Arc::new(Control::default()));
        let worker = state.ended.len() - 1;
        state.joining.insert(worker, Joining::Since(Instant::now()));
        worker
    }

    /// The added workers to give up on: those whose init failed (their
    /// thread ends by itself: `false`), and those whose init has run for
    /// `timeout` or more (`None`: no limit), which is cancelled (`true`:
    /// their thread may run on). Each is returned once.
    pub fn given_up(&self, timeout: Option<Duration>) -> Vec<(usize, bool)> {
        let now = Instant::now();
        let mut state = self.lock();
        let State { joining, init, .. } = &mut *state;
        let mut given_up = Vec::new();
        joining.retain(|&worker, joining| {
            let running = match joining {
                Joining::Failed => false,
                Joining::Since(since) if timeout.is_some_and(|t| now.saturating_duration_since(*since) >= t) => {
                    init[worker].cancel();
                    true
                }
                Joining::Since(_) => return true,
            };
            given_up.push((worker, running));
            false
        });
        given_up
    }

    fn lock(&self) -> MutexGuard<'_, State<F>> {
        // Counts and flags only: consistent whatever panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_until(&self, deadline: Option<Instant>, mut done: impl FnMut(&mut State<F>) -> bool) -> bool {
        let mut state = self.lock();
        loop {
            if done(&mut state) {
                return true;
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return false;
                    }
                    self.changed.wait_timeout(state, deadline - now).unwrap_or_else(PoisonError::into_inner).0
                }
            };
        }
    }

    /// The guard a worker's thread holds from its start to its end.
    pub fn ending(self: &Arc<Self>, worker: usize) -> Ending<F> {
        Ending { crew: Arc::clone(self), worker }
    }

    pub fn init_task(&self, worker: usize) -> Arc<Control> {
        Arc::clone(&self.lock().init[worker])
    }

    /// Cancel the init of every worker still running it.
    pub fn cancel_init(&self) {
        self.lock().init.iter().for_each(|task| task.cancel());
    }

    pub fn ready(&self, worker: usize) {
        let mut state = self.lock();
        if worker < state.starting {
            state.ready += 1;
        } else {
            state.joining.remove(&worker);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// A worker's init failed (or its state could not be made). The first
    /// failure of the startup is kept, for `new`; an added worker's is
    /// dropped, and the worker is to be given up (if it was not already).
    pub fn failed(&self, worker: usize, failure: F) {
        let mut state = self.lock();
        if worker < state.starting {
            state.failure.get_or_insert(failure);
        } else if let Some(joining) = state.joining.get_mut(&worker) {
            *joining = Joining::Failed;
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Wait until every worker finished its init, one failed, or `deadline`.
    pub fn wait_startup(&self, deadline: Option<Instant>) -> Startup<F> {
        let mut outcome = Startup::TimedOut;
        self.wait_until(deadline, |state| {
            if let Some(failure) = state.failure.take() {
                outcome = Startup::Failed(failure);
            } else if state.ready == state.starting {
                outcome = Startup::Ready;
            } else {
                return false;
            }
            true
        });
        outcome
    }

    /// Wait until every worker ended, or `deadline`: which ended.
    pub fn wait_ended(&self, deadline: Option<Instant>) -> Vec<bool> {
        let mut ended = Vec::new();
        self.wait_until(deadline, |state| {
            ended.clone_from(&state.ended);
            state.ended.iter().all(|&ended| ended)
        });
        ended
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn startup_waits_for_every_worker_or_the_first_failure_or_the_deadline() {
        let crew = Arc::new(Crew::<&str>::new(2));
        let soon = || Some(Instant::now() + Duration::from_millis(30));
        crew.ready(0);
        assert!(matches!(crew.wait_startup(soon()), Startup::TimedOut));
        let other = {
            let crew = Arc::clone(&crew);
            thread::spawn(move || crew.ready(1))
        };
        assert!(matches!(crew.wait_startup(None), Startup::Ready));
        other.join().unwrap();

        let crew = Crew::<&str>::new(3);
        crew.ready(0);
        crew.failed(1, "first");
        crew.failed(2, "second");
        assert!(matches!(crew.wait_startup(None), Startup::Failed("first")));
    }

    #[test]
    fn a_worker_added_later_is_waited_for_at_the_close_but_not_at_the_startup() {
        let crew = Arc::new(Crew::<()>::new(1));
        crew.ready(0);
        assert!(matches!(crew.wait_startup(None), Startup::Ready));
        let first = crew.ending(0);
        assert_eq!(crew.add(), 1);
        let added = crew.ending(1);
        drop(first);
        assert_eq!(crew.wait_ended(Some(Instant::now())), [true, false]);
        crew.cancel_init();
        assert!(crew.init_task(1).is_cancelled(), "close cancels an added worker's init too");
        drop(added);
        assert_eq!(crew.wait_ended(None), [true, true]);
    }

    #[test]
    fn added_workers_whose_init_fails_or_runs_too_long_are_given_up_once() {
        let crew = Crew::<&str>::new(1);
        crew.ready(0);
        let (failing, slow, quick) = (crew.add(), crew.add(), crew.add());
        crew.failed(failing, "raised");
        crew.ready(quick);
        assert_eq!(crew.given_up(None), [(failing, false)], "no limit: only the failure");
        assert!(matches!(crew.wait_startup(None), Startup::Ready), "an added worker's failure is not the startup's");
        thread::sleep(Duration::from_millis(20));
        assert_eq!(crew.given_up(Some(Duration::from_secs(5))), []);
        assert_eq!(crew.given_up(Some(Duration::from_millis(10))), [(slow, true)]);
        assert!(crew.init_task(slow).is_cancelled(), "its init is cancelled");
        assert!(!crew.init_task(quick).is_cancelled());
        assert_eq!(crew.given_up(Some(Duration::ZERO)), [], "each once; the startup's workers never");
    }

    #[test]
    fn ending_guards_say_which_workers_ended() {
        let crew = Arc::new(Crew::<()>::new(2));
        let first = crew.ending(0);
        let second = crew.ending(1);
        drop(first);
        assert_eq!(crew.wait_ended(Some(Instant::now() + Duration::from_millis(10))), [true, false]);
        let late = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            drop(second)
        });
        assert_eq!(crew.wait_ended(None), [true, true]);
        late.join().unwrap();
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use crate::sync::locks::bounded_model;
    use loom::thread;

    /// Two workers: the first finishes its init, the second's fails; each
    /// then ends. `new` (the main thread) waits for the startup, then, as
    /// `close` does, for the ends: it sees the failure and both ends,
    /// whatever the order (loom reports a deadlock if a wait sleeps
    /// through the report it waits for).
    #[test]
    fn startup_and_close_never_miss_a_workers_report() {
        bounded_model(|| {
            let crew = Arc::new(Crew::new(2));
            let workers: Vec<_> = [Ok(()), Err("init raised")]
                .into_iter()
                .enumerate()
                .map(|(worker, init)| {
                    let crew = Arc::clone(&crew);
                    thread::spawn(move || {
                        let _ending = crew.ending(worker);
                        match init {
                            Ok(()) => crew.ready(worker),
                            Err(failure) => crew.failed(worker, failure),
                        }
                    })
                })
                .collect();
            assert!(matches!(crew.wait_startup(None), Startup::Failed("init raised")));
            assert_eq!(crew.wait_ended(None), [true, true]);
            workers.into_iter().for_each(|worker| worker.join().unwrap());
        });
    }
}

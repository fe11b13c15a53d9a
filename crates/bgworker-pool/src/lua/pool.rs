//! A pool: its worker threads, and what the Lua thread does with them.
//!
//! # Invariants
//! - `workers` holds every started worker's `JoinHandle` until `close`
//!   joins it (it ended) or drops it (abandoned: detached, never signalled
//!   again). So a worker is only ever interrupted through a valid thread.
//! - In a child forked after the pool was made (its generation,
//!   `bgworker_ffi::fork`, tells), `close` and `Drop` touch no lock and no
//!   thread, and the methods refuse (module.rs): the workers' handles are forgotten, and the board is left to
//!   its other owners, the parent's threads, which the child does not have.
//! - Every wait is bounded by the caller's timeout: `new` by
//!   `init_timeout`, `close` by its argument; `Drop` does not wait. An
//!   abandoned worker owns (through `Arc`s) everything it still touches,
//!   and this library stays loaded (`Sender::new` pins it), so it may end
//!   whenever it does, or never.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bgworker_ffi::fork;
use mlua::{Function, Lua};

use crate::lua::events::Events;
use crate::sync::board::{Board, Cancelled, Id, Snapshot, Status};
use crate::sync::crew::{Crew, Startup};
use crate::sync::mail::NotSent;
use crate::worker::interrupt::{self, Interrupt};
use crate::worker::job::Job;
use crate::worker::state::Setup;
use crate::worker::thread::{self as worker, InitFailure, Worker};
use crate::worker::value::Values;

/// How long `close` waits for the workers by default (the Lua layer's
/// default; this module's `close` takes it as an argument).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Stack of a worker thread: that of a usual main thread, since jobs are
/// ordinary Lua code that may recurse through C functions and modules.
const WORKER_STACK: usize = 8 << 20;

/// How long a cancelled job may go on running before its worker is retired
/// and replaced (`retire_stuck`): a hook stops Lua code within
/// milliseconds, so only code it cannot reach (compiled by LuaJIT, blocked
/// in C, a finaliser, a loop that turns the hook off) takes longer.
pub const RETIRE_GRACE: Duration = Duration::from_millis(250);

pub struct Options {
    pub threads: usize,
    pub setup: Setup,
    /// The Lua side's `on_events` (lib.rs).
    pub on_events: Function,
    /// `None`: wait for the workers' init for ever.
    pub init_timeout: Option<Duration>,
}

/// Why `new` made no pool.
pub enum Refused {
    /// A worker's init raised (or its state could not be made).
    Failed(InitFailure),
    TimedOut,
    /// A thread could not be started.
    NoThread(String),
}

struct WorkerThread {
    thread: JoinHandle<()>,
    interrupt: Arc<Interrupt>,
}

pub struct Pool {
    board: Arc<Board<Job>>,
    events: Events,
    crew: Arc<Crew<InitFailure>>,
    setup: Arc<Setup>,
    /// Every worker by index (the board's and the crew's), retired ones
    /// included; `None` for one whose thread could not start. Empty once
    /// closed.
    workers: Vec<Option<WorkerThread>>,
    /// The workers that serve: what `new` was asked for, less the
    /// replacements given up in their init (`give_up_late_inits`).
    threads: usize,
    /// How long a worker's init may run (its replacements' too).
    init_timeout: Option<Duration>,
    /// The fork generation of the process that made it.
    generation: u64,
}

/// `now + timeout`, or `None` (no deadline) when that is out of reach.
fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

impl Pool {
    /// Start the workers and wait until each finished its init. Raises
    /// only when bgworker.core is not loaded (or Lua fails).
    pub fn new(lua: &Lua, options: Options) -> mlua::Result<Result<Pool, Refused>> {
        interrupt::ensure_handler();
        let board = Arc::new(Board::default());
        let crew = Arc::new(Crew::new(options.threads));
        let events = Events::new(lua, options.on_events, Arc::clone(&board), Arc::default())?;
        let until = options.init_timeout.and_then(deadline);
        let setup = Arc::new(options.setup);
        let generation = fork::generation();
        let mut pool = Pool {
            board,
            crew,
            events,
            setup,
            workers: Vec::with_capacity(options.threads),
            threads: options.threads,
            init_timeout: options.init_timeout,
            generation,
        };
        for index in 0..options.threads {
            if let Err(e) = pool.start_worker(index) {
                (index..options.threads).for_each(|never| drop(pool.crew.ending(never)));
                pool.close_until(until);
                let message = format!("cannot start worker thread {} of {}: {e}", index + 1, options.threads);
                return Ok(Err(Refused::NoThread(message)));
            }
        }
        Ok(match pool.crew.wait_startup(until) {
            Startup::Ready => Ok(pool),
            Startup::Failed(failure) => {
                pool.close_until(until);
                Err(Refused::Failed(failure))
            }
            Startup::TimedOut => {
                pool.close_until(Some(Instant::now()));
                Err(Refused::TimedOut)
            }
        })
    }

    /// Start worker `index` (the crew knows it).
    fn start_worker(&mut self, index: usize) -> std::io::Result<()> {
        let interrupt = Arc::new(Interrupt::default());
        let worker = Worker {
            index,
            setup: Arc::clone(&self.setup),
            board: Arc::clone(&self.board),
            crew: Arc::clone(&self.crew),
            events: self.events.clone(),
            interrupt: Arc::clone(&interrupt),
        };
        let started = thread::Builder::new()
            .name(format!("bgworker-pool-{}", index + 1))
            .stack_size(WORKER_STACK)
            .spawn(move || worker::work(worker));
        debug_assert_eq!(index, self.workers.len(), "workers start in the crew's order");
        match started {
            Ok(thread) => {
                self.workers.push(Some(WorkerThread { thread, interrupt }));
                Ok(())
            }
            Err(e) => {
                self.workers.push(None);
                Err(e)
            }
        }
    }

    /// Retire the workers whose cancelled job has run on for `RETIRE_GRACE`
    /// (the board's `retire_stuck`), and start a worker in each one's place,
    /// so that the pool serves with all its threads again. The retired
    /// threads are left to end when their code returns. Returns how many
    /// were replaced.
    pub fn retire_stuck(&mut self) -> usize {
        self.give_up_late_inits();
        if self.is_inherited() || self.workers.is_empty() {
            return 0;
        }
        let retired = self.board.retire_stuck(RETIRE_GRACE);
        for _ in &retired {
            let index = self.crew.add();
            if self.start_worker(index).is_err() {
                // No thread: the pool serves with one less (a worker of the
                // startup failing would have refused the pool).
                drop(self.crew.ending(index));
            }
        }
        retired.len()
    }

    /// Give up the replacements whose init failed or has run for
    /// `init_timeout`: the pool serves with one thread less for each (a
    /// replacement of a replacement would most likely fail the same way).
    /// One still in its init is cancelled, and retired so that it never
    /// serves: it is abandoned like a worker retired in a job. Looked at
    /// lazily, whenever the pool retires workers or reports its stats.
    /// Nothing once closed, or in a fork's child (the threads are not its
    /// own).
    fn give_up_late_inits(&mut self) {
        if self.is_inherited() || self.workers.is_empty() {
            return;
        }
        for (worker, running) in self.crew.given_up(self.init_timeout) {
            if running {
                self.board.retire(worker);
                self.interrupt(worker);
            }
            self.threads -= 1;
        }
    }

    /// Queue `job`: its id, or `None` when the pool is closed.
    pub fn submit(&self, job: Job) -> Option<Id> {
        self.board.submit(job).ok()
    }

    pub fn cancel(&self, id: Id) -> Cancelled {
        let cancelled = self.board.cancel(id);
        if cancelled != Cancelled::No {
            drop(self.events.mail().discard(id));
        }
        if let Cancelled::Running { worker } = cancelled {
            // A job waiting for a message returns at once; one running Lua
            // code is interrupted.
            self.events.mail().wake();
            self.interrupt(worker);
        }
        cancelled
    }

    /// Queue `message` for job `id`, if it is queued or running and has
    /// not returned.
    pub fn send(&self, id: Id, message: Values) -> Result<(), NotSent<Values>> {
        self.events.mail().send(id, message, || self.board.is_pending(id))
    }

    pub fn status(&self, id: Id) -> Option<Status> {
        self.board.status(id)
    }

    pub fn snapshot(&mut self) -> Snapshot {
        self.give_up_late_inits();
        self.board.snapshot()
    }

    /// Tell the Lua side of the jobs whose outcomes were lost (events.rs).
    pub fn notify_lost(&self) {
        self.events.notify_lost();
    }

    /// True in a process forked after the pool was made: its threads
    /// and locks are not this process's to use.
    pub fn is_inherited(&self) -> bool {
        fork::generation() != self.generation
    }

    /// Worker threads that serve: 0 once closed.
    pub fn threads(&self) -> usize {
        if self.workers.is_empty() {
            0
        } else {
            self.threads
        }
    }

    fn interrupt(&self, worker: usize) {
        if let Some(Some(worker)) = self.workers.get(worker) {
            interrupt::ensure_handler();
            worker.interrupt.send(worker.thread.as_pthread_t());
        }
    }

    /// Close: cancel the queued jobs, interrupt the running ones (and any
    /// init still running), wait at most `timeout` for the workers to end,
    /// join those that did and abandon the others. True when none was
    /// abandoned. Closing a closed pool returns true.
    pub fn close(&mut self, timeout: Duration) -> bool {
        self.close_until(deadline(timeout))
    }

    fn close_until(&mut self, until: Option<Instant>) -> bool {
        if self.is_inherited() {
            // The workers are the parent's: neither joined nor detached here.
            std::mem::forget(std::mem::take(&mut self.workers));
        }
        if self.workers.is_empty() {
            return true;
        }
        self.board.close();
        drop(self.events.mail().clear());
        self.crew.cancel_init();
        // Every worker, running or idle: an idle one ignores it.
        (0..self.workers.len()).for_each(|worker| self.interrupt(worker));
        let ended = self.crew.wait_ended(until);
        let mut all = true;
        for (worker, ended) in self.workers.drain(..).zip(ended) {
            let Some(worker) = worker else {
                continue;
            };
            if ended {
                // It ended: only its last return is left to wait for. A
                // worker that panicked has nothing left to deliver.
                let _ = worker.thread.join();
            } else {
                // Dropping the handle detaches the thread.
                all = false;
            }
        }
        all
    }
}

/// Collected, or its Lua state closed: close without waiting. A finaliser
/// that waited would stall the Lua thread at some allocation (a job in
/// `socket.sleep` held it up to the grace it was given); the workers that
/// are still running are abandoned, interrupted, and end on their own.
impl Drop for Pool {
    fn drop(&mut self) {
        self.close(Duration::ZERO);
    }
}

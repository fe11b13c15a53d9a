//! A worker thread's body: make its Lua state, run the pool's init, then
//! run jobs until the pool closes or retires it.

use std::sync::Arc;

use crate::lua::events::Events;
use crate::sync::board::Board;
use crate::sync::crew::Crew;
use crate::worker::interrupt::Interrupt;
use crate::worker::job::{Job, Outcome};
use crate::worker::state::{Setup, WorkerState};
use crate::worker::value::ErrorValue;

/// Why a worker did not start: its init raised `error` (with its
/// traceback), or its state could not be made (with none).
pub struct InitFailure {
    pub error: ErrorValue,
    pub traceback: Option<String>,
}

/// What a worker thread starts with.
pub struct Worker {
    pub index: usize,
    pub setup: Arc<Setup>,
    pub board: Arc<Board<Job>>,
    pub crew: Arc<Crew<InitFailure>>,
    pub events: Events,
    pub interrupt: Arc<Interrupt>,
}

pub fn work(worker: Worker) {
    // Declared first, so dropped last: "ended" means the state is closed.
    let _ending = worker.crew.ending(worker.index);
    let state = match WorkerState::new(&worker.setup, &worker.interrupt, worker.events.clone()) {
        Ok(state) => state,
        Err(e) => {
            let error = ErrorValue::Described(format!("the worker's Lua state could not be set up: {e}"));
            worker.crew.failed(worker.index, InitFailure { error, traceback: None });
            worker.board.left(worker.index);
            return;
        }
    };
    if let Some(init) = &worker.setup.init {
        let task = worker.crew.init_task(worker.index);
        if let Outcome::Failed { error, traceback } = state.run(&task, None, &init.func, &init.args) {
            worker.crew.failed(worker.index, InitFailure { error, traceback });
            worker.board.left(worker.index);
            return;
        }
    }
    worker.crew.ready(worker.index);
    worker.board.serve(
        worker.index,
        |taken| state.run(&taken.control, Some(taken.id), &taken.job.func, &taken.job.args),
        |id, outcome| worker.events.outcome(id, outcome),
    );
}

//! What a worker runs, and what comes of it.

use crate::value::{ErrorValue, Values};

/// The function of a task: a job's, or a pool's init.
pub enum Func {
    /// A function's `string.dump`.
    Code(Box<[u8]>),
    /// `"module.function"`, required in the worker.
    Named(Box<[u8]>),
}

impl Func {
    /// From the Lua side's `code, named` pair.
    pub fn new(code: &[u8], named: bool) -> Func {
        let code = code.to_vec().into_boxed_slice();
        if named {
            Func::Named(code)
        } else {
            Func::Code(code)
        }
    }
}

pub struct Job {
    pub func: Func,
    pub args: Values,
}

/// How a task's function ended (a cancelled one's is dropped).
pub enum Outcome {
    /// It returned these values.
    Done(Values),
    /// It raised `error` (or its results cannot cross: a message), with
    /// the traceback of where, or an empty string.
    Failed { error: ErrorValue, traceback: String },
}

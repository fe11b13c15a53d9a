//! What a worker runs, and what comes of it.

use std::sync::Arc;

use crate::worker::value::{ErrorValue, Values};

/// The function of a task: a job's, or a pool's init.
#[derive(PartialEq, Eq)]
pub enum Func {
    /// A function's `string.dump`.
    Code(Box<[u8]>),
    /// `"module.function"`, required in the worker.
    Named(Box<[u8]>),
}

impl Func {
    /// From the Lua side's `code, named` pair.
    pub fn new(code: &[u8], named: bool) -> Func {
        let code = code.into();
        if named {
            Func::Named(code)
        } else {
            Func::Code(code)
        }
    }

    fn is(&self, code: &[u8], named: bool) -> bool {
        match self {
            Func::Code(own) => !named && **own == *code,
            Func::Named(own) => named && **own == *code,
        }
    }
}

/// How many functions [`Recent`] remembers.
const RECENT: usize = 4;

/// The functions submitted last, so that a function submitted again is
/// shared rather than copied: a job then costs no allocation for its
/// function, and a worker finds it by address among those it loaded.
#[derive(Default)]
pub struct Recent {
    funcs: [Option<Arc<Func>>; RECENT],
    /// The slot the next new function replaces.
    next: usize,
}

impl Recent {
    /// The function `code, named`: a remembered one, or a new one, then
    /// remembered in place of the oldest.
    pub fn get(&mut self, code: &[u8], named: bool) -> Arc<Func> {
        if let Some(func) = self.funcs.iter().flatten().find(|func| func.is(code, named)) {
            return Arc::clone(func);
        }
        let func = Arc::new(Func::new(code, named));
        self.funcs[self.next] = Some(Arc::clone(&func));
        self.next = (self.next + 1) % RECENT;
        func
    }
}

pub struct Job {
    pub func: Arc<Func>,
    pub args: Values,
}

/// How a task's function ended (a cancelled one's is dropped).
pub enum Outcome {
    /// It returned these values.
    Done(Values),
    /// It raised `error`, with the traceback of where; or it did not
    /// raise, but its results cannot cross (a message), and there is no
    /// traceback.
    Failed { error: ErrorValue, traceback: Option<String> },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_submitted_again_is_shared_and_the_oldest_is_forgotten() {
        let mut recent = Recent::default();
        let first = recent.get(b"code", false);
        assert!(Arc::ptr_eq(&first, &recent.get(b"code", false)));
        assert!(!Arc::ptr_eq(&first, &recent.get(b"code", true)), "a name is not code");
        for other in [b"b", b"c", b"d"] {
            recent.get(other, false);
        }
        assert!(!Arc::ptr_eq(&first, &recent.get(b"code", false)), "replaced by the four after it");
        assert!(*recent.get(b"d", false) == Func::new(b"d", false));
    }
}

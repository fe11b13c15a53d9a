//! The locks and atomics of this layer: std's, or loom's when the crate is
//! built with `--cfg loom`, so that the loom models explore every
//! interleaving of the real code. As in the core's `src/sync.rs`.
//!
//! `Arc` stays std's: what it shares is what the models look at, not its
//! count.

#[cfg(loom)]
pub use loom::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Condvar, Mutex, MutexGuard,
};
#[cfg(not(loom))]
pub use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Condvar, Mutex, MutexGuard,
};

/// Run a loom model with at most 3 preemptions per execution, unless
/// `LOOM_MAX_PREEMPTIONS` asks for another bound: bugs need few, and a
/// model of three threads that notify out of their locks otherwise
/// takes half a minute or more.
#[cfg(all(test, loom))]
pub fn bounded_model(model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound.get_or_insert(3);
    builder.check(model);
}

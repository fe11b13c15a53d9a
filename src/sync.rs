//! The locks and atomics of the concurrency modules: std's, or loom's when
//! the crate is built with `--cfg loom`, so that the loom models explore
//! every interleaving of the real code (`room.rs`, `reply.rs`, the route
//! and the keepers of `instance.rs`, `wake.rs`) rather than of a copy.
//!
//! Only what those models run goes through here. Process-wide statics
//! (`fork.rs`, `handle.rs`) keep std's: loom's types cannot be statics, and
//! no model runs them.

#[cfg(loom)]
pub use loom::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard,
};
#[cfg(not(loom))]
pub use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard,
};

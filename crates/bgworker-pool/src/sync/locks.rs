//! The locks and atomics of this layer: std's, or loom's when the crate is
//! built with `--cfg loom`, so that the loom models explore every
//! interleaving of the real code. As in the core's `src/sync.rs`.
//!
//! `Arc` stays std's: what it shares is what the models look at, not its
//! count.

#[cfg(loom)]
pub use loom::sync::{
    atomic::{AtomicBool, Ordering},
    Condvar, Mutex, MutexGuard,
};
#[cfg(not(loom))]
pub use std::sync::{
    atomic::{AtomicBool, Ordering},
    Condvar, Mutex, MutexGuard,
};

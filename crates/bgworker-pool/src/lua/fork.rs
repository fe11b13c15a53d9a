//! Pools after `fork()`: a child process inherits a pool's memory but none
//! of its threads, and a lock a worker held at the moment of the fork stays
//! held for ever in the child. So a pool belongs to the process that made
//! it: in a child, its methods refuse, and collecting or closing it touches
//! neither its locks nor its threads (what it owns is left as it is).
//!
//! A `pthread_atfork` handler counts the forks in each child, so that a
//! pool tells it was inherited with one atomic load (no system call on the
//! hot path).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// Forks this process descends from (0 in the original one).
static FORKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn in_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// This process's generation, counting forks from the first time it is
/// asked. Call it before making anything that must tell.
pub fn generation() -> u64 {
    static WATCHING: Once = Once::new();
    // SAFETY: registers a handler that only touches an atomic.
    WATCHING.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(in_child));
    });
    FORKS.load(Ordering::Relaxed)
}

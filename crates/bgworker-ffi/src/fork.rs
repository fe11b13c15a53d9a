//! fork(): which process a library's state belongs to.
//!
//! A forked child inherits a copy of the parent's memory but none of its
//! threads: a lock a parent thread held at that moment stays held in the
//! child for good, and the threads that would answer are not there. So
//! whatever a library makes that owns threads or locks (the core's runs
//! and round trips, a pool) records the *generation* it was made in, and
//! in a child, where the generation has moved on, it knows it was
//! inherited and is left alone.
//!
//! The generation is 0 until the process forks, and one more in each
//! child: a `pthread_atfork` child handler bumps it, before any code of
//! the child runs. Reading it is one relaxed load, cheap enough for every
//! deliver and poll; `getpid()` would be a system call.
//!
//! Each library counts in its own copy of this module (lib.rs says why
//! that is enough), from the moment it calls [`watch`]: in its `luaopen`,
//! before it makes anything that records a generation. Only `fork()`
//! through the C library runs the handlers; a raw `clone` without exec is
//! not supported.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::library;

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The fork generation of this process, as this library counts it.
/// Inlined into the callers' hot paths, across the crate boundary.
#[inline]
pub fn generation() -> u64 {
    GENERATION.load(Relaxed)
}

/// Count this process's forks from now on; once per library, the later
/// calls do nothing. It pins the library first: the handler is its code,
/// and `lua_close` would otherwise unload it from under the next fork. A
/// swap rather than a `Once`: a `Once` that a parent thread was running
/// when the process forked would block the child for good.
pub fn watch() {
    static WATCHING: AtomicBool = AtomicBool::new(false);
    if !WATCHING.swap(true, Relaxed) {
        library::keep_this_library_loaded();
        // SAFETY: registers a handler that only touches an atomic.
        unsafe { libc::pthread_atfork(None, None, Some(child)) };
    }
}

/// `pthread_atfork` child handler: runs before any other code of the child.
extern "C" fn child() {
    GENERATION.fetch_add(1, Relaxed);
}

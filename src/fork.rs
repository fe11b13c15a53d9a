//! fork(): which process the core's state belongs to.
//!
//! A forked child inherits a copy of the parent's memory but none of its
//! threads. Locks that a parent thread held at that moment stay held in the
//! child for good, and the run's socket or eventfd is shared with the
//! parent. So the core keeps two things per process:
//!
//! - A *fork generation*: 0 in a process that never forked, one more in
//!   each child (a `pthread_atfork` child handler bumps it, before any code
//!   of the child runs). Whatever records the generation it was made in
//!   (a `Shared`, a run, a round trip) knows in a child that it was
//!   inherited, and is then left alone: never locked, never signalled,
//!   never freed. Reading the generation is one relaxed load, cheap enough
//!   for every deliver and poll; `getpid()` would be a system call.
//! - A *quiet* lock, held shared by the few short sections that must not be
//!   cut in half by a fork (recycling handle boxes, making a child's fresh
//!   state). The prepare handler takes it exclusively, so no such section
//!   is under way while the process forks, and a child never finds one of
//!   their locks held.
//!
//! Only `fork()` through the C library runs the handlers; a raw `clone`
//! without exec is not supported. The Lua binding installs them
//! (`pthread_atfork(prepare, parent, child)`) when `bgworker.core` is
//! first opened, before any run can exist.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{RwLock, RwLockWriteGuard};

static GENERATION: AtomicU64 = AtomicU64::new(0);
static QUIET: RwLock<()> = RwLock::new(());

thread_local! {
    /// The quiet lock, held by the forking thread from prepare to parent/child.
    static HELD: RefCell<Option<RwLockWriteGuard<'static, ()>>> = const { RefCell::new(None) };
}

/// The fork generation of this process.
pub fn generation() -> u64 {
    GENERATION.load(Relaxed)
}

/// Run `f` where no fork can cut it in half. `f` must be short and must
/// not call code that could fork.
pub fn quiet<R>(f: impl FnOnce() -> R) -> R {
    let _shared = QUIET.read().unwrap_or_else(|e| e.into_inner());
    f()
}

/// `pthread_atfork` prepare handler.
pub extern "C" fn prepare() {
    let guard = QUIET.write().unwrap_or_else(|e| e.into_inner());
    HELD.with(|held| *held.borrow_mut() = Some(guard));
}

/// `pthread_atfork` parent handler.
pub extern "C" fn parent() {
    HELD.with(|held| drop(held.borrow_mut().take()));
}

/// `pthread_atfork` child handler: runs before any other code of the child.
pub extern "C" fn child() {
    GENERATION.fetch_add(1, Relaxed);
    HELD.with(|held| drop(held.borrow_mut().take()));
}

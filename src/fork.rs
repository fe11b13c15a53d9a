//! fork(): which process the core's state belongs to.
//!
//! A forked child inherits a copy of the parent's memory but none of its
//! threads. Locks that a parent thread held at that moment stay held in the
//! child for good, and the run's socket or eventfd is shared with the
//! parent. So the core keeps two things per process:
//!
//! - A *fork generation* ([`generation`], counted by `bgworker_ffi::fork`):
//!   whatever records the generation it was made in (a `Shared`, a run, a
//!   round trip) knows in a child that it was inherited, and is then left
//!   alone: never locked, never signalled, never freed.
//! - A *quiet* lock, held shared by the few short sections that must not be
//!   cut in half by a fork (recycling handle boxes, making a child's fresh
//!   state). The prepare handler takes it exclusively, so no such section
//!   is under way while the process forks, and a child never finds one of
//!   their locks held.
//!
//! The Lua binding starts both when `bgworker.core` is first opened, before
//! any run can exist: the count, and the handlers below
//! (`pthread_atfork(prepare, release, release)`).

use std::cell::RefCell;
use std::sync::{RwLock, RwLockWriteGuard};

pub use bgworker_ffi::fork::generation;

static QUIET: RwLock<()> = RwLock::new(());

thread_local! {
    /// The quiet lock, held by the forking thread from prepare to parent/child.
    static HELD: RefCell<Option<RwLockWriteGuard<'static, ()>>> = const { RefCell::new(None) };
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

/// `pthread_atfork` parent and child handler: the fork is over.
pub extern "C" fn release() {
    HELD.with(|held| drop(held.borrow_mut().take()));
}

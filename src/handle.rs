//! What a `bgw_handle *` points to: a box that holds one counted
//! reference to a Lua state's producers' side, and that is never given
//! back to the allocator.
//!
//! # Why boxes that are never freed
//!
//! Releasing a handle twice, or using it after its release, is a bug in
//! the caller (`bgworker.h`). It must not corrupt memory, and should be
//! seen. A released box keeps its memory and reads "released" (a null
//! target), so a late call finds that out with the load it makes anyway,
//! reports the misuse once on stderr (`capi.rs`) and refuses it. Released
//! boxes are recycled first in, first out, and only once more than
//! `QUARANTINE` of them wait: a stale handle is recognised until at least
//! that many later handles were released. After that it may be live again
//! for another holder; it still points into memory that is a box.
//!
//! # Invariants
//!
//! - A box's target is set (non-null) from `acquire` to its first
//!   `release`, and null otherwise. Only `release` swaps it back to null,
//!   so of two releases exactly one gets the target.
//! - A box is on the free list only while its target is null, and at most
//!   once: only the release that got the target puts it there.
//! - The free list is touched only in `fork::quiet`: a forked child never
//!   finds its lock held by a thread it did not inherit.
//! - `kept` says whether the box counts among its target's keepers
//!   (`Shared::keep`): set by `new`, and changed only by swaps, so each
//!   change of it is counted exactly once, by the swap that made it.
//!
//! The target is a raw pointer, made and dereferenced by `capi.rs`; this
//! module only stores it.

use std::collections::VecDeque;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Mutex;

use crate::fork;
use crate::instance::Shared;

/// Released boxes kept aside before one is reused.
const QUARANTINE: usize = 64;

pub struct HandleBox {
    target: AtomicPtr<Shared>,
    /// Does this handle keep its Lua state's loop alive (`bgw_api.ref`)?
    kept: AtomicBool,
}

/// Released boxes, oldest first.
struct FreeList {
    boxes: VecDeque<&'static HandleBox>,
}

impl FreeList {
    const fn new() -> Self {
        FreeList { boxes: VecDeque::new() }
    }

    /// The oldest released box, once more than `QUARANTINE` wait.
    fn take(&mut self) -> Option<&'static HandleBox> {
        if self.boxes.len() > QUARANTINE {
            self.boxes.pop_front()
        } else {
            None
        }
    }

    fn put(&mut self, released: &'static HandleBox) {
        self.boxes.push_back(released);
    }
}

static FREE: Mutex<FreeList> = Mutex::new(FreeList::new());

fn free_list<R>(f: impl FnOnce(&mut FreeList) -> R) -> R {
    fork::quiet(|| f(&mut FREE.lock().unwrap_or_else(|e| e.into_inner())))
}

impl HandleBox {
    /// A box for `target`: a recycled one, or a new one leaked for good.
    pub fn new(target: *const Shared) -> &'static HandleBox {
        let recycled = free_list(FreeList::take);
        let boxed = recycled.unwrap_or_else(|| {
            Box::leak(Box::new(HandleBox { target: AtomicPtr::new(ptr::null_mut()), kept: AtomicBool::new(false) }))
        });
        boxed.kept.store(true, Ordering::Release);
        boxed.target.store(target.cast_mut(), Ordering::Release);
        boxed
    }

    /// The target, or `None` once released.
    pub fn target(&self) -> Option<*const Shared> {
        let target = self.target.load(Ordering::Acquire);
        (!target.is_null()).then_some(target.cast_const())
    }

    /// Say whether the handle keeps its loop alive: what it said before.
    pub fn set_kept(&self, kept: bool) -> bool {
        self.kept.swap(kept, Ordering::AcqRel)
    }

    /// Release: the target, which the caller now owns, or `None` when the
    /// box was released already.
    pub fn release(&'static self) -> Option<*const Shared> {
        let target = self.target.swap(ptr::null_mut(), Ordering::AcqRel);
        if target.is_null() {
            return None;
        }
        free_list(|free| free.put(self));
        Some(target.cast_const())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn fake(n: usize) -> *const Shared {
        ptr::without_provenance(n * 64)
    }

    #[test]
    fn a_box_is_released_once_and_then_reads_released() {
        let handle = HandleBox::new(fake(1));
        assert_eq!(handle.target(), Some(fake(1)));
        assert_eq!(handle.release(), Some(fake(1)));
        assert_eq!(handle.target(), None);
        assert_eq!(handle.release(), None, "a second release gets nothing");
    }

    #[test]
    fn a_new_box_is_kept_and_each_change_is_seen_once() {
        let handle = HandleBox::new(fake(2));
        assert!(handle.set_kept(false), "a new box is kept");
        assert!(!handle.set_kept(false), "a second unref finds it not kept");
        assert!(!handle.set_kept(true));
        assert!(handle.set_kept(true), "a second ref finds it kept");
        handle.release();
    }

    #[test]
    fn a_released_box_is_reused_after_quarantine_oldest_first() {
        let mut free = FreeList::new();
        let boxes: Vec<&'static HandleBox> = (0..QUARANTINE + 2)
            .map(|_| &*Box::leak(Box::new(HandleBox { target: AtomicPtr::default(), kept: AtomicBool::default() })))
            .collect();
        for (n, released) in boxes[..=QUARANTINE].iter().enumerate() {
            assert!(free.take().is_none(), "reused with only {n} released");
            free.put(released);
        }
        assert!(ptr::eq(free.take().unwrap(), boxes[0]));
        assert!(free.take().is_none());
        free.put(boxes[QUARANTINE + 1]);
        assert!(ptr::eq(free.take().unwrap(), boxes[1]));
    }
}

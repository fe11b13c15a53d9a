//! The coalesced wake-up protocol between producers and the Lua-side reader.
//!
//! # Invariant
//!
//! Whenever the queue is not empty, at least one of these holds:
//! 1. a wake datagram has been sent that the reader has not yet drained after, or
//! 2. the reader is draining: it will call [`WakeFlag::take`] until that returns `None`.
//!
//! `armed == true` means "one of the two holds, producers need not send".
//!
//! # How each side keeps it
//!
//! - A producer pushes its item *first*, then calls [`WakeFlag::arm`]. If that
//!   finds the flag down, it raises it and the producer sends one datagram.
//!   Every other producer only pushes: one datagram per drain, not per item.
//! - The reader, after receiving a datagram, calls `take` until it returns
//!   `None`. `take` lowers the flag only when it finds the queue empty, and
//!   then looks at the queue once more. A producer whose push that second
//!   look missed must have read the flag after it was lowered (the queue's
//!   lock orders the push after the look, and the look after the lowering),
//!   so that producer raises the flag and sends a datagram. Nothing is
//!   stranded.
//! - A reader that stops draining before `take` returned `None` (a budget)
//!   leaves the flag up with no datagram outstanding; it must send one itself
//!   (`core.wake()`), which restores (1).
//!
//! The queue must order a push and a later pop through a lock or a
//! sequentially consistent operation (`queue.rs` is a mutex over a buffer).
//! The `loom` model at the bottom checks the protocol with two producers
//! and one reader.

use crate::sync::{AtomicBool, Ordering::SeqCst};

#[derive(Debug, Default)]
pub struct WakeFlag {
    armed: AtomicBool,
}

impl WakeFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// Producer side, called after the item is in the queue. Returns `true`
    /// when the caller must send a wake datagram.
    ///
    /// The plain load first keeps the flag's cache line shared while the
    /// reader is busy: a saturated producer pays a load, not a locked swap.
    pub fn arm(&self) -> bool {
        !self.armed.load(SeqCst) && !self.armed.swap(true, SeqCst)
    }

    /// Reader side: raise the flag without a producer, for a wake the reader
    /// sends itself (see the invariant's last point).
    pub fn force(&self) {
        self.armed.store(true, SeqCst);
    }

    /// Producer side: a datagram that was due could not be sent. Lower the
    /// flag so that the next deliver tries again rather than trusting a wake
    /// that never left.
    pub fn disarm_after_failed_send(&self) {
        self.armed.store(false, SeqCst);
    }

    /// Reset for a fresh start, before any producer can reach the queue.
    pub fn reset(&self) {
        self.armed.store(false, SeqCst);
    }

    /// Reader side: the next item, or `None` when the queue is empty, in
    /// which case the flag is down and the next push will send a datagram.
    ///
    /// `clear` runs at the empty poll just before the flag goes down: a
    /// descriptor signal consumes its readiness there. Any signal after the
    /// flag is down comes from a later push, so clearing never eats one that
    /// announces an item this drain has not seen.
    pub fn take<T>(&self, mut try_pop: impl FnMut() -> Option<T>, clear: impl FnOnce()) -> Option<T> {
        if let Some(item) = try_pop() {
            return Some(item);
        }
        clear();
        self.armed.store(false, SeqCst);
        let late = try_pop()?;
        // We are draining again: raise the flag so that the producers behind
        // this item do not send datagrams the drain makes useless.
        self.armed.store(true, SeqCst);
        Some(late)
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    use super::WakeFlag;
    use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use loom::sync::{Arc, Mutex};
    use loom::thread;
    use std::collections::VecDeque;

    /// Two producers push one item each and send a "datagram" (a counter)
    /// when `arm` says so. The reader drains after every datagram it
    /// receives. When everything is quiet, no item may be left in the queue:
    /// a lost wake-up would leave one there with no datagram to announce it.
    #[test]
    fn no_lost_wakeup_two_producers_one_reader() {
        loom::model(|| {
            let queue = Arc::new(Mutex::new(VecDeque::new()));
            let flag = Arc::new(WakeFlag::new());
            let datagrams = Arc::new(AtomicUsize::new(0));

            let producers: Vec<_> = (0..2)
                .map(|id| {
                    let (queue, flag, datagrams) = (queue.clone(), flag.clone(), datagrams.clone());
                    thread::spawn(move || {
                        queue.lock().unwrap().push_back(id);
                        if flag.arm() {
                            datagrams.fetch_add(1, SeqCst);
                        }
                    })
                })
                .collect();

            let mut received = 0;
            let mut taken = Vec::new();
            let drain = |taken: &mut Vec<i32>| {
                while let Some(item) = flag.take(|| queue.lock().unwrap().pop_front(), || {}) {
                    taken.push(item);
                }
            };
            // The reader runs concurrently with the producers: one pass over
            // whatever datagrams it can see while they work.
            if datagrams.load(SeqCst) > received {
                received += 1;
                drain(&mut taken);
            }
            for p in producers {
                p.join().unwrap();
            }
            // Quiet now: the reader handles the datagrams still waiting.
            while datagrams.load(SeqCst) > received {
                received += 1;
                drain(&mut taken);
            }

            taken.sort();
            assert_eq!(taken, vec![0, 1], "an item was stranded or duplicated");
            assert!(queue.lock().unwrap().is_empty());
        });
    }

    /// The descriptor signal: a level ("readable") instead of datagrams, and
    /// the reader clears it at the empty poll. Clearing must never swallow
    /// the signal of an item the drain has not taken.
    #[test]
    fn descriptor_signal_cleared_at_the_empty_poll_loses_nothing() {
        loom::model(|| {
            let queue = Arc::new(Mutex::new(VecDeque::new()));
            let flag = Arc::new(WakeFlag::new());
            let readable = Arc::new(loom::sync::atomic::AtomicBool::new(false));

            let producers: Vec<_> = (0..2)
                .map(|id| {
                    let (queue, flag, readable) = (queue.clone(), flag.clone(), readable.clone());
                    thread::spawn(move || {
                        queue.lock().unwrap().push_back(id);
                        if flag.arm() {
                            readable.store(true, SeqCst);
                        }
                    })
                })
                .collect();

            let mut taken = Vec::new();
            let drain = |taken: &mut Vec<i32>| {
                while let Some(item) = flag.take(|| queue.lock().unwrap().pop_front(), || readable.store(false, SeqCst))
                {
                    taken.push(item);
                }
            };
            if readable.load(SeqCst) {
                drain(&mut taken);
            }
            for p in producers {
                p.join().unwrap();
            }
            while readable.load(SeqCst) {
                drain(&mut taken);
            }
            taken.sort();
            assert_eq!(taken, vec![0, 1], "an item was stranded with the descriptor quiet");
        });
    }

    /// A reader that stops early on a budget and forces a wake keeps the
    /// invariant: the rest is drained after the forced datagram.
    #[test]
    fn budget_stop_with_forced_wake_strands_nothing() {
        loom::model(|| {
            let queue = Arc::new(Mutex::new(VecDeque::new()));
            let flag = Arc::new(WakeFlag::new());
            let datagrams = Arc::new(AtomicUsize::new(0));

            let producer = {
                let (queue, flag, datagrams) = (queue.clone(), flag.clone(), datagrams.clone());
                thread::spawn(move || {
                    for id in 0..2 {
                        queue.lock().unwrap().push_back(id);
                        if flag.arm() {
                            datagrams.fetch_add(1, SeqCst);
                        }
                    }
                })
            };

            let mut received = 0;
            let mut taken = Vec::new();
            if datagrams.load(SeqCst) > received {
                received += 1;
                // Budget of one item, then a self-sent wake.
                if let Some(item) = flag.take(|| queue.lock().unwrap().pop_front(), || {}) {
                    taken.push(item);
                    flag.force();
                    datagrams.fetch_add(1, SeqCst);
                }
            }
            producer.join().unwrap();
            while datagrams.load(SeqCst) > received {
                received += 1;
                while let Some(item) = flag.take(|| queue.lock().unwrap().pop_front(), || {}) {
                    taken.push(item);
                }
            }
            taken.sort();
            assert_eq!(taken, vec![0, 1]);
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::WakeFlag;
    use std::collections::VecDeque;

    #[test]
    fn only_the_first_push_after_a_drain_asks_for_a_datagram() {
        let flag = WakeFlag::new();
        assert!(flag.arm());
        assert!(!flag.arm());
        assert!(!flag.arm());
        let mut queue: VecDeque<u32> = VecDeque::new();
        assert_eq!(flag.take(|| queue.pop_front(), || {}), None);
        assert!(flag.arm(), "an empty take must lower the flag");
    }

    #[test]
    fn a_late_item_found_by_the_second_look_is_returned_and_rearms() {
        let flag = WakeFlag::new();
        flag.force();
        let mut looks = 0;
        let item = flag.take(
            || {
                looks += 1;
                (looks == 2).then_some(7)
            },
            || {},
        );
        assert_eq!(item, Some(7));
        assert!(!flag.arm(), "the reader is draining again: producers need not wake it");
    }

    #[test]
    fn a_failed_send_lets_the_next_push_retry() {
        let flag = WakeFlag::new();
        assert!(flag.arm());
        flag.disarm_after_failed_send();
        assert!(flag.arm());
    }
}

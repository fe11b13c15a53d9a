//! Room in a bounded queue: a counting semaphore that producers wait on and
//! the reader releases as it takes items.
//!
//! Bounding is opt-in; an unbounded dispatcher has no `Room` and its
//! deliver path touches no lock of this module.
//!
//! # Invariants
//!
//! - `taken` counts the queued items that hold a slot: one per successful
//!   `acquire` not yet given back by `release`, plus the items a room made
//!   for a non-empty queue starts with (the reader releases a slot for
//!   every item it takes once the room exists). A producer may take a slot
//!   only while `taken < capacity`.
//! - The capacity can change while producers wait, also below `taken`:
//!   producers then wait until the reader has taken enough. Every change
//!   that can let a producer go (`release`, `resize`, `lift`, `close`) is
//!   made under the lock the waiters check under and then notifies them,
//!   and a woken waiter checks again before it looks at its deadline, so
//!   none sleeps through a slot. Counts are unsigned and compared, never subtracted, so no
//!   capacity, however large, can wrap around.
//! - `Closed` is final; `Lifted` lets everyone through without counting.
//!
//! The loom model at the bottom checks waiting producers against resizes,
//! releases and a close.

use crate::status::Status;
use crate::sync::{Condvar, Mutex, MutexGuard};
use crate::wait::Wait;

/// The largest bound a queue can have, from Lua or C: larger requests are
/// refused (`BGW_INVALID`, or a Lua argument error). It is what every Lua
/// version reads as an exact integer, and far beyond any queue that fits in
/// memory; a larger `size_t` is most likely a negative number converted.
pub const MAX_CAPACITY: usize = i32::MAX as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The queue became unbounded: everyone may go, no slot is counted.
    Lifted,
    /// The dispatcher stopped: everyone is refused.
    Closed,
}

#[derive(Debug)]
struct Slots {
    capacity: usize,
    taken: usize,
    state: State,
}

#[derive(Debug)]
pub struct Room {
    slots: Mutex<Slots>,
    released: Condvar,
}

impl Room {
    /// A room of `capacity` for a queue that holds `queued` items already.
    pub fn new(capacity: usize, queued: usize) -> Self {
        Room { slots: Mutex::new(Slots { capacity, taken: queued, state: State::Open }), released: Condvar::new() }
    }

    /// Change the capacity; waiting producers see the new one at once.
    pub fn resize(&self, capacity: usize) {
        self.slots().capacity = capacity;
        self.released.notify_all();
    }

    /// The queue no longer has a bound: let every producer through.
    pub fn lift(&self) {
        self.set_state(State::Lifted);
    }

    fn set_state(&self, state: State) {
        self.slots().state = state;
        self.released.notify_all();
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take one slot: `Ok` when taken (or no longer needed), else `Full`,
    /// `Timeout` or `Closed`.
    pub fn acquire(&self, wait: Wait) -> Status {
        let mut slots = self.slots();
        loop {
            match slots.state {
                State::Closed => return Status::Closed,
                State::Lifted => return Status::Ok,
                State::Open => {}
            }
            if slots.taken < slots.capacity {
                slots.taken += 1;
                return Status::Ok;
            }
            slots = match wait.block(&self.released, slots) {
                Ok(slots) => slots,
                Err(_) if wait == Wait::No => return Status::Full,
                Err(_) => return Status::Timeout,
            };
        }
    }

    /// Give one slot back: the reader took an item, or a producer that
    /// holds a slot could not queue its item after all.
    pub fn release(&self) {
        let mut slots = self.slots();
        debug_assert!(slots.taken > 0, "a slot released that nobody held");
        slots.taken = slots.taken.saturating_sub(1);
        drop(slots);
        self.released.notify_one();
    }

    /// Refuse all waiting and future producers with `Closed`.
    pub fn close(&self) {
        self.set_state(State::Closed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    #[test]
    fn full_then_room_again_after_release() {
        let room = Room::new(1, 0);
        assert_eq!(room.acquire(Wait::No), Status::Ok);
        assert_eq!(room.acquire(Wait::No), Status::Full);
        assert_eq!(room.acquire(Wait::Until(Instant::now() + Duration::from_millis(5))), Status::Timeout);
        room.release();
        assert_eq!(room.acquire(Wait::No), Status::Ok);
    }

    #[test]
    fn a_blocked_producer_is_released_by_close() {
        let room = Arc::new(Room::new(1, 0));
        assert_eq!(room.acquire(Wait::No), Status::Ok);
        let waiter = {
            let room = room.clone();
            thread::spawn(move || room.acquire(Wait::Forever))
        };
        thread::sleep(Duration::from_millis(20));
        room.close();
        assert_eq!(waiter.join().unwrap(), Status::Closed);
    }

    fn blocked(room: &Arc<Room>) -> thread::JoinHandle<Status> {
        let room = room.clone();
        let waiter = thread::spawn(move || room.acquire(Wait::Forever));
        thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "the producer should wait for room");
        waiter
    }

    #[test]
    fn growing_lets_a_waiting_producer_in_and_shrinking_waits_for_the_reader() {
        let room = Arc::new(Room::new(1, 0));
        assert_eq!(room.acquire(Wait::No), Status::Ok);
        let waiter = blocked(&room);
        room.resize(2);
        assert_eq!(waiter.join().unwrap(), Status::Ok);
        // Two queued; shrink to one: two releases before there is room again.
        room.resize(1);
        room.release();
        assert_eq!(room.acquire(Wait::No), Status::Full);
        room.release();
        assert_eq!(room.acquire(Wait::No), Status::Ok);
    }

    #[test]
    fn a_room_made_for_a_full_queue_counts_what_is_queued() {
        let room = Room::new(2, 3);
        assert_eq!(room.acquire(Wait::No), Status::Full);
        room.release();
        room.release();
        assert_eq!(room.acquire(Wait::No), Status::Ok);
        assert_eq!(room.acquire(Wait::No), Status::Full);
    }

    #[test]
    fn any_capacity_counts_without_wrapping_around() {
        for capacity in [usize::MAX, isize::MAX as usize + 1, MAX_CAPACITY] {
            let room = Room::new(capacity, 0);
            assert_eq!(room.acquire(Wait::No), Status::Ok, "capacity {capacity}");
            room.resize(1);
            assert_eq!(room.acquire(Wait::No), Status::Full);
            room.resize(capacity);
            assert_eq!(room.acquire(Wait::No), Status::Ok);
        }
    }

    #[test]
    fn lifting_lets_every_producer_through() {
        let room = Arc::new(Room::new(1, 1));
        let waiter = blocked(&room);
        room.lift();
        assert_eq!(waiter.join().unwrap(), Status::Ok);
        assert_eq!(room.acquire(Wait::No), Status::Ok);
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Two producers wait for room in a full queue (capacity 1, one item
    /// queued), each for as long as it takes.
    fn two_waiting_producers(room: &Arc<Room>) -> Vec<thread::JoinHandle<Status>> {
        (0..2)
            .map(|_| {
                let room = room.clone();
                thread::spawn(move || room.acquire(Wait::Forever))
            })
            .collect()
    }

    /// The reader raises the bound to 2, then takes the queued item: that
    /// makes room for both producers, whatever the order. Loom reports a
    /// deadlock if a producer sleeps through the slot meant for it, and the
    /// count must come out exact.
    #[test]
    fn a_resize_and_a_release_let_both_waiting_producers_in() {
        loom::model(|| {
            let room = Arc::new(Room::new(1, 1));
            let producers = two_waiting_producers(&room);
            room.resize(2);
            room.release();
            for producer in producers {
                assert_eq!(producer.join().unwrap(), Status::Ok);
            }
            assert_eq!(room.slots().taken, 2, "1 queued - 1 taken by the reader + 2 producers");
        });
    }

    /// The dispatcher stops while both producers wait: both are refused,
    /// none sleeps on.
    #[test]
    fn a_close_refuses_every_waiting_producer() {
        loom::model(|| {
            let room = Arc::new(Room::new(1, 1));
            let producers = two_waiting_producers(&room);
            room.close();
            for producer in producers {
                assert_eq!(producer.join().unwrap(), Status::Closed);
            }
        });
    }
}

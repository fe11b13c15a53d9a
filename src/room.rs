//! Room in a bounded queue: a counting semaphore that producers wait on and
//! the reader releases as it takes items.
//!
//! Bounding is opt-in; an unbounded dispatcher has no `Room` and its
//! deliver path touches no lock of this module.
//!
//! The capacity can change while producers wait. `free` may then go below
//! zero (more items queued than the new capacity): producers wait until the
//! reader has taken enough. A room made for a queue that already holds items
//! starts with those counted, since the reader releases a slot for every
//! item it takes once the room exists.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::status::Status;

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
    free: isize,
    state: State,
}

#[derive(Debug)]
pub struct Room {
    slots: Mutex<Slots>,
    released: Condvar,
}

/// How long a producer may wait for room.
#[derive(Clone, Copy, Debug)]
pub enum Wait {
    No,
    Forever,
    Until(Instant),
}

impl Room {
    /// A room of `capacity` for a queue that holds `queued` items already.
    pub fn new(capacity: usize, queued: usize) -> Self {
        let slots = Slots { capacity, free: capacity as isize - queued as isize, state: State::Open };
        Room { slots: Mutex::new(slots), released: Condvar::new() }
    }

    /// Change the capacity; waiting producers see the new one at once.
    pub fn resize(&self, capacity: usize) {
        let mut slots = self.slots();
        slots.free += capacity as isize - slots.capacity as isize;
        slots.capacity = capacity;
        drop(slots);
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
            if slots.free > 0 {
                slots.free -= 1;
                return Status::Ok;
            }
            slots = match wait {
                Wait::No => return Status::Full,
                Wait::Forever => self.released.wait(slots).unwrap_or_else(|e| e.into_inner()),
                Wait::Until(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Status::Timeout;
                    }
                    self.released.wait_timeout(slots, deadline - now).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
    }

    /// Give one slot back: the reader took an item, or a producer that
    /// holds a slot could not queue its item after all.
    pub fn release(&self) {
        self.slots().free += 1;
        self.released.notify_one();
    }

    /// Refuse all waiting and future producers with `Closed`.
    pub fn close(&self) {
        self.set_state(State::Closed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

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
    fn lifting_lets_every_producer_through() {
        let room = Arc::new(Room::new(1, 1));
        let waiter = blocked(&room);
        room.lift();
        assert_eq!(waiter.join().unwrap(), Status::Ok);
        assert_eq!(room.acquire(Wait::No), Status::Ok);
    }
}

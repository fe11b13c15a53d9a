//! Room in a bounded queue: a counting semaphore that producers wait on and
//! the reader releases as it takes items.
//!
//! Bounding is opt-in; an unbounded dispatcher has no `Room` and its
//! deliver path touches no lock of this module.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::status::Status;

#[derive(Debug)]
struct Slots {
    free: usize,
    open: bool,
}

#[derive(Debug)]
pub struct Room {
    capacity: usize,
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
    pub fn new(capacity: usize) -> Self {
        Room { capacity, slots: Mutex::new(Slots { free: capacity, open: true }), released: Condvar::new() }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take one slot: `Ok` when taken, else `Full`, `Timeout` or `Closed`.
    pub fn acquire(&self, wait: Wait) -> Status {
        let mut slots = self.slots();
        loop {
            if !slots.open {
                return Status::Closed;
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
        self.slots().open = false;
        self.released.notify_all();
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
        let room = Room::new(1);
        assert_eq!(room.acquire(Wait::No), Status::Ok);
        assert_eq!(room.acquire(Wait::No), Status::Full);
        assert_eq!(room.acquire(Wait::Until(Instant::now() + Duration::from_millis(5))), Status::Timeout);
        room.release();
        assert_eq!(room.acquire(Wait::No), Status::Ok);
    }

    #[test]
    fn a_blocked_producer_is_released_by_close() {
        let room = Arc::new(Room::new(1));
        assert_eq!(room.acquire(Wait::No), Status::Ok);
        let waiter = {
            let room = room.clone();
            thread::spawn(move || room.acquire(Wait::Forever))
        };
        thread::sleep(Duration::from_millis(20));
        room.close();
        assert_eq!(waiter.join().unwrap(), Status::Closed);
    }
}

//! The queue between the producers and the Lua thread: items in a
//! `VecDeque` behind a mutex, with the arena of copied records beside them
//! (`copy.rs`). The reader takes everything at once by swapping the queued
//! buffer for its own empty one, so a refill costs one lock and no copy,
//! and both buffers keep their capacity: a producer that keeps pace with a
//! fast reader does not allocate as the queue refills, for items or for
//! copied records.
//!
//! # Invariants
//!
//! A push and a later `take_all` are ordered by the mutex, as the wake
//! protocol requires (`wake.rs`): a take that misses a push happened
//! before it under the lock, so that push sees the flag the reader lowered
//! before the take.
//!
//! A copied item's place refers to the arena of the buffer that holds it:
//! they move together (a swap), or the place moves with the bytes (an
//! append). The reader clears its arena only when its buffer holds no item.

use std::collections::VecDeque;
use std::ffi::c_void;

use crate::copy::{self, Scratch, Slot};
use crate::item::{Delivery, Item};
use crate::sync::{Mutex, MutexGuard};

/// Items and the copied records they refer to.
#[derive(Default)]
pub struct Batch {
    items: VecDeque<Item>,
    arena: Vec<Slot>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The next item and decode's data: the caller's, or a copied record
    /// copied out into `scratch` (see `copy.rs` for why).
    pub fn pop(&mut self, scratch: &mut Scratch) -> Option<(Item, *mut c_void)> {
        let item = self.items.pop_front()?;
        let data = match (item.data(), item.place()) {
            (Some(data), _) => data,
            (None, place) => scratch.fill(&self.arena, place.expect("an item is owned or copied")),
        };
        Some((item, data))
    }

    /// After a burst, keep at most `items` slots of each kind.
    pub fn shrink_to(&mut self, items: usize) {
        self.items.shrink_to(items);
        self.arena.shrink_to(items);
    }

    fn push(&mut self, delivery: Delivery) {
        let item = match delivery {
            Delivery::Item(item) => item,
            Delivery::Copy { decode, bytes } => Item::copied(decode, copy::append(&mut self.arena, bytes)),
        };
        self.items.push_back(item);
    }
}

impl IntoIterator for Batch {
    type Item = Item;
    type IntoIter = std::collections::vec_deque::IntoIter<Item>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

#[derive(Default)]
pub struct Queue {
    queued: Mutex<Batch>,
}

impl Queue {
    fn queued(&self) -> MutexGuard<'_, Batch> {
        // A poisoned lock only means a panic elsewhere; the items are intact.
        self.queued.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, delivery: Delivery) {
        self.queued().push(delivery);
    }

    /// Move every queued item to the back of `into`: by swapping buffers
    /// when `into` is empty (its arena, which no item refers to any more,
    /// is cleared first). Nothing changes when the queue is empty, so
    /// `into` keeps its own buffer then.
    pub fn take_all(&self, into: &mut Batch) {
        let mut queued = self.queued();
        if queued.is_empty() {
            return;
        }
        if into.is_empty() {
            into.arena.clear();
            std::mem::swap(into, &mut *queued);
        } else {
            let by = into.arena.len();
            into.arena.append(&mut queued.arena);
            into.items.extend(queued.items.drain(..).map(|mut item| {
                item.move_copy_by(by);
                item
            }));
        }
    }

    pub fn len(&self) -> usize {
        self.queued().len()
    }
}

#[cfg(test)]
mod test_items {
    use super::Batch;
    use crate::copy::Scratch;
    use crate::item::{Delivery, Item, Payload};
    use std::ffi::{c_int, c_void};

    unsafe extern "C-unwind" fn never_decoded(_state: *mut c_void, _data: *mut c_void) -> c_int {
        unreachable!("the queue's tests never decode")
    }

    unsafe extern "C" fn free_number(data: *mut c_void) {
        drop(unsafe { Box::from_raw(data as *mut (usize, usize)) });
    }

    /// Hand item `seq` of `producer` to `push`: owned data, freed when
    /// dropped, for an even `seq`; a copied record for an odd one, so that
    /// both kinds interleave.
    pub fn item(producer: usize, seq: usize, push: impl FnOnce(Delivery)) {
        if seq % 2 == 1 {
            let bytes = [producer.to_ne_bytes(), seq.to_ne_bytes()].concat();
            return push(Delivery::Copy { decode: never_decoded, bytes: &bytes });
        }
        let data = Box::into_raw(Box::new((producer, seq))) as *mut c_void;
        // SAFETY: `data` is a fresh box that free_number takes back once.
        push(Delivery::Item(Item::new(never_decoded, unsafe { Payload::new(data, Some(free_number)) }, None)))
    }

    /// Pop every item of `batch`: its producer and sequence number.
    pub fn numbers(batch: &mut Batch) -> Vec<(usize, usize)> {
        let mut scratch = Scratch::default();
        std::iter::from_fn(|| batch.pop(&mut scratch))
            // SAFETY: both kinds hold two words there while the item is alive.
            .map(|(_item, data)| unsafe { *(data as *const (usize, usize)) })
            .collect()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::test_items::{item, numbers};
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn a_take_into_an_empty_buffer_swaps_and_keeps_both_capacities() {
        let queue = Queue::default();
        let mut batch = Batch { items: VecDeque::with_capacity(64), arena: Vec::with_capacity(64) };
        let ours = (batch.items.as_slices().0.as_ptr(), batch.arena.as_ptr());
        for seq in 0..3 {
            item(0, seq, |d| queue.push(d));
        }
        queue.take_all(&mut batch);
        assert_eq!(numbers(&mut batch), [(0, 0), (0, 1), (0, 2)]);
        assert_eq!(queue.len(), 0);
        // The producers now fill the buffers the reader gave them.
        item(0, 3, |d| queue.push(d));
        let queued = queue.queued();
        assert_eq!((queued.items.as_slices().0.as_ptr(), queued.arena.as_ptr()), ours);
        assert!(queued.items.capacity() >= 64 && queued.arena.capacity() >= 64);
    }

    #[test]
    fn a_take_into_a_non_empty_buffer_appends_in_order() {
        let queue = Queue::default();
        let mut batch = Batch::default();
        item(0, 0, |d| batch.push(d));
        item(0, 1, |d| batch.push(d));
        item(0, 2, |d| queue.push(d));
        item(0, 3, |d| queue.push(d));
        queue.take_all(&mut batch);
        assert_eq!(numbers(&mut batch), [(0, 0), (0, 1), (0, 2), (0, 3)]);
    }

    #[test]
    fn the_readers_arena_is_cleared_only_when_it_swaps() {
        let queue = Queue::default();
        let mut batch = Batch::default();
        item(0, 1, |d| queue.push(d));
        queue.take_all(&mut batch);
        assert_eq!(numbers(&mut batch), [(0, 1)]);
        assert_eq!(batch.arena.len(), 1, "kept until the next swap");
        item(0, 3, |d| queue.push(d));
        queue.take_all(&mut batch);
        assert_eq!(queue.queued().arena.len(), 0);
        assert_eq!(numbers(&mut batch), [(0, 3)]);
    }

    #[test]
    fn an_empty_queue_leaves_the_readers_buffer_alone() {
        let queue = Queue::default();
        let mut batch = Batch { items: VecDeque::with_capacity(16), arena: Vec::new() };
        let ours = batch.items.as_slices().0.as_ptr();
        queue.take_all(&mut batch);
        assert_eq!(batch.items.as_slices().0.as_ptr(), ours);
        assert!(batch.items.capacity() >= 16);
    }

    #[test]
    fn producers_against_a_reader_lose_nothing_and_keep_their_order() {
        const PRODUCERS: usize = 4;
        const ITEMS: usize = 50_000;
        let queue = Arc::new(Queue::default());
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let queue = queue.clone();
                thread::spawn(move || (0..ITEMS).for_each(|seq| item(p, seq, |d| queue.push(d))))
            })
            .collect();
        let mut next = [0; PRODUCERS];
        let mut batch = Batch::default();
        while next.iter().sum::<usize>() < PRODUCERS * ITEMS {
            queue.take_all(&mut batch);
            for (p, seq) in numbers(&mut batch) {
                assert_eq!(seq, next[p], "producer {p} out of order");
                next[p] += 1;
            }
        }
        producers.into_iter().for_each(|p| p.join().unwrap());
        assert_eq!(queue.len(), 0);
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    use super::test_items::{item, numbers};
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Two producers push two items each (one owned, one copied) while the
    /// reader takes twice, into a buffer that is empty or not, popping
    /// between takes: every item arrives once, with its own bytes, in its
    /// producer's order.
    #[test]
    fn takes_during_pushes_lose_nothing_and_keep_order() {
        loom::model(|| {
            let queue = Arc::new(Queue::default());
            let producers: Vec<_> = (0..2)
                .map(|p| {
                    let queue = queue.clone();
                    thread::spawn(move || (0..2).for_each(|seq| item(p, seq, |d| queue.push(d))))
                })
                .collect();
            let mut batch = Batch::default();
            queue.take_all(&mut batch);
            let mut taken = numbers(&mut batch);
            queue.take_all(&mut batch);
            producers.into_iter().for_each(|p| p.join().unwrap());
            queue.take_all(&mut batch);
            taken.extend(numbers(&mut batch));
            let mut next = [0; 2];
            for (p, seq) in taken {
                assert_eq!(seq, next[p]);
                next[p] += 1;
            }
            assert_eq!(next, [2, 2]);
        });
    }
}

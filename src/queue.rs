//! The queue between the producers and the Lua thread: items in a
//! `VecDeque` behind a mutex. The reader takes everything at once by
//! swapping the queued buffer for its own empty one, so a refill costs one
//! lock and no copy, and both buffers keep their capacity: a producer that
//! keeps pace with a fast reader does not allocate as the queue refills.
//!
//! # Invariant
//!
//! A push and a later `take_all` are ordered by the mutex, as the wake
//! protocol requires (`wake.rs`): a take that misses a push happened
//! before it under the lock, so that push sees the flag the reader lowered
//! before the take.

use std::collections::VecDeque;

use crate::item::Item;
use crate::sync::{Mutex, MutexGuard};

#[derive(Default)]
pub struct Queue {
    items: Mutex<VecDeque<Item>>,
}

impl Queue {
    fn items(&self) -> MutexGuard<'_, VecDeque<Item>> {
        // A poisoned lock only means a panic elsewhere; the items are intact.
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, item: Item) {
        self.items().push_back(item);
    }

    /// Move every queued item to the back of `into`: by swapping buffers
    /// when `into` is empty. Nothing changes when the queue is empty, so
    /// `into` keeps its own buffer then.
    pub fn take_all(&self, into: &mut VecDeque<Item>) {
        let mut items = self.items();
        if items.is_empty() {
            return;
        }
        if into.is_empty() {
            std::mem::swap(into, &mut *items);
        } else {
            into.extend(items.drain(..));
        }
    }

    pub fn len(&self) -> usize {
        self.items().len()
    }
}

#[cfg(test)]
mod test_items {
    use crate::item::{Item, Payload};
    use std::ffi::{c_int, c_void};

    unsafe extern "C-unwind" fn never_decoded(_state: *mut c_void, _data: *mut c_void) -> c_int {
        unreachable!("the queue's tests never decode")
    }

    unsafe extern "C" fn free_number(data: *mut c_void) {
        drop(unsafe { Box::from_raw(data as *mut (usize, usize)) });
    }

    /// Item `seq` of `producer`, freed when dropped.
    pub fn item(producer: usize, seq: usize) -> Item {
        let data = Box::into_raw(Box::new((producer, seq))) as *mut c_void;
        // SAFETY: `data` is a fresh box that free_number takes back once.
        Item::new(never_decoded, unsafe { Payload::new(data, Some(free_number)) }, None)
    }

    pub fn number(item: &Item) -> (usize, usize) {
        // SAFETY: made by `item` above, alive while the item is.
        unsafe { *(item.data() as *const (usize, usize)) }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::test_items::{item, number};
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn a_take_into_an_empty_buffer_swaps_and_keeps_both_capacities() {
        let queue = Queue::default();
        let mut batch = VecDeque::with_capacity(64);
        let ours = batch.as_slices().0.as_ptr();
        for seq in 0..3 {
            queue.push(item(0, seq));
        }
        queue.take_all(&mut batch);
        assert_eq!(batch.iter().map(number).collect::<Vec<_>>(), [(0, 0), (0, 1), (0, 2)]);
        assert_eq!(queue.len(), 0);
        // The producers now fill the buffer the reader gave them.
        queue.push(item(0, 3));
        assert_eq!(queue.items().as_slices().0.as_ptr(), ours);
        assert!(queue.items().capacity() >= 64);
    }

    #[test]
    fn a_take_into_a_non_empty_buffer_appends_in_order() {
        let queue = Queue::default();
        let mut batch = VecDeque::new();
        batch.push_back(item(0, 0));
        queue.push(item(0, 1));
        queue.push(item(0, 2));
        queue.take_all(&mut batch);
        assert_eq!(batch.iter().map(number).collect::<Vec<_>>(), [(0, 0), (0, 1), (0, 2)]);
    }

    #[test]
    fn an_empty_queue_leaves_the_readers_buffer_alone() {
        let queue = Queue::default();
        let mut batch: VecDeque<Item> = VecDeque::with_capacity(16);
        let ours = batch.as_slices().0.as_ptr();
        queue.take_all(&mut batch);
        assert_eq!(batch.as_slices().0.as_ptr(), ours);
        assert!(batch.capacity() >= 16);
    }

    #[test]
    fn producers_against_a_reader_lose_nothing_and_keep_their_order() {
        const PRODUCERS: usize = 4;
        const ITEMS: usize = 50_000;
        let queue = Arc::new(Queue::default());
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let queue = queue.clone();
                thread::spawn(move || (0..ITEMS).for_each(|seq| queue.push(item(p, seq))))
            })
            .collect();
        let mut next = [0; PRODUCERS];
        let mut batch = VecDeque::new();
        while next.iter().sum::<usize>() < PRODUCERS * ITEMS {
            queue.take_all(&mut batch);
            for taken in batch.drain(..) {
                let (p, seq) = number(&taken);
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
    use super::test_items::{item, number};
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Two producers push two items each while the reader takes twice,
    /// into a buffer that is empty or not: every item arrives once, in its
    /// producer's order.
    #[test]
    fn takes_during_pushes_lose_nothing_and_keep_order() {
        loom::model(|| {
            let queue = Arc::new(Queue::default());
            let producers: Vec<_> = (0..2)
                .map(|p| {
                    let queue = queue.clone();
                    thread::spawn(move || (0..2).for_each(|seq| queue.push(item(p, seq))))
                })
                .collect();
            let mut batch = VecDeque::new();
            queue.take_all(&mut batch);
            queue.take_all(&mut batch);
            producers.into_iter().for_each(|p| p.join().unwrap());
            queue.take_all(&mut batch);
            let mut next = [0; 2];
            for taken in &batch {
                let (p, seq) = number(taken);
                assert_eq!(seq, next[p]);
                next[p] += 1;
            }
            assert_eq!(next, [2, 2]);
        });
    }
}

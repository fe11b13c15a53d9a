//! The pool's job queue: the Lua thread pushes, worker threads pop.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

/// A FIFO that can be closed once.
///
/// Invariant: once closed it stays empty. `close` takes every queued item
/// and `push` refuses new ones under the same lock, so a worker that gets
/// `None` from `pop` will never be owed an item, and every item pushed is
/// either popped by a worker or returned by `close`, exactly once.
pub struct Queue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

impl<T> Queue<T> {
    pub fn new() -> Self {
        Queue { state: Mutex::new(State { items: VecDeque::new(), closed: false }), ready: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // No code panics while holding the lock, but a poisoned queue is
        // still consistent: every operation is a single VecDeque call.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queue `item`, or give it back when the queue is closed.
    pub fn push(&self, item: T) -> Result<(), T> {
        let mut state = self.lock();
        if state.closed {
            return Err(item);
        }
        state.items.push_back(item);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// The next item, waiting for one; `None` once the queue is closed.
    pub fn pop(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(item) = state.items.pop_front() {
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Close the queue and take the items nobody popped. Wakes every waiting
    /// `pop`. Closing again returns nothing.
    pub fn close(&self) -> VecDeque<T> {
        let mut state = self.lock();
        state.closed = true;
        let items = std::mem::take(&mut state.items);
        drop(state);
        self.ready.notify_all();
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn every_item_is_popped_or_returned_by_close_exactly_once() {
        let queue = Arc::new(Queue::new());
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || std::iter::from_fn(|| queue.pop()).collect::<Vec<u32>>())
            })
            .collect();
        for i in 0..10_000 {
            queue.push(i).unwrap();
        }
        let mut all: Vec<u32> = queue.close().into_iter().collect();
        assert_eq!(queue.push(1), Err(1));
        for worker in workers {
            all.extend(worker.join().unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
        assert!(queue.close().is_empty());
    }
}

//! A pool's events on their way out, carried to the Lua thread in shares:
//! workers post events here, and a core item (a *carrier*) is delivered
//! only when the carriers already on their way cannot take them all. Each
//! carrier, when the Lua thread decodes it (or when it is dropped unread),
//! takes one share: the oldest events, at most `batch` of them. So while
//! the Lua thread is busy, many events cross in one item; when it keeps
//! up, each event gets a carrier of its own. Lua-free: events are any `E`.
//!
//! # Invariants (at every unlock)
//! - `carriers * batch >= events.len()`: the carriers on their way can
//!   take every posted event. `post` counts a new carrier when it would
//!   not hold, and its caller must then deliver one; `take_share`, called
//!   once by each carrier, removes one carrier and at most `batch` events,
//!   which keeps it.
//! - So an event leaves exactly once, in a share, and shares leave in the
//!   order they are taken, each the oldest events: events leave in the
//!   order they were posted. (A carrier that is dropped unread takes its
//!   share too, and its owner drops it: that is how events are lost when
//!   no dispatcher can receive them.)

use std::collections::VecDeque;
use std::sync::PoisonError;

use crate::sync::locks::{Mutex, MutexGuard};

pub struct Outbox<E> {
    state: Mutex<State<E>>,
    /// Most events in one share: 1 gives every event a carrier of its own.
    batch: usize,
}

struct State<E> {
    events: VecDeque<E>,
    /// Carriers counted by `post` that have not taken their share yet.
    carriers: usize,
}

impl<E> Outbox<E> {
    pub fn new(batch: usize) -> Outbox<E> {
        assert!(batch >= 1, "a share holds at least one event");
        Outbox { state: Mutex::new(State { events: VecDeque::new(), carriers: 0 }), batch }
    }

    fn lock(&self) -> MutexGuard<'_, State<E>> {
        // Nothing panics under the lock but an allocation failure, which
        // aborts; the state is consistent at every unlock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Post `event`. True when the caller must now deliver a carrier,
    /// whose decode (or drop) calls `take_share` once.
    #[must_use]
    pub fn post(&self, event: E) -> bool {
        let mut state = self.lock();
        state.events.push_back(event);
        let needed = state.carriers * self.batch < state.events.len();
        if needed {
            state.carriers += 1;
        }
        needed
    }

    /// A carrier's share, once per carrier: the oldest events, at most
    /// `batch` (possibly none, when the carriers before took them all).
    pub fn take_share(&self) -> Vec<E> {
        let mut state = self.lock();
        debug_assert!(state.carriers > 0, "a share for a carrier that post did not count");
        state.carriers = state.carriers.saturating_sub(1);
        let count = state.events.len().min(self.batch);
        state.events.drain(..count).collect()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn a_carrier_is_asked_for_only_when_those_on_their_way_are_full() {
        let outbox = Outbox::new(3);
        let asked: Vec<bool> = (0..7).map(|event| outbox.post(event)).collect();
        assert_eq!(asked, [true, false, false, true, false, false, true]);
        assert_eq!(outbox.take_share(), [0, 1, 2]);
        assert!(!outbox.post(7), "two carriers left for five events");
        assert_eq!(outbox.take_share(), [3, 4, 5]);
        assert_eq!(outbox.take_share(), [6, 7]);
        assert!(outbox.post(8), "none left");
        assert_eq!(outbox.take_share(), [8]);
    }

    #[test]
    fn a_batch_of_one_gives_every_event_a_carrier() {
        let outbox = Outbox::new(1);
        assert!((0..4).all(|event| outbox.post(event)));
        assert_eq!((0..4).flat_map(|_| outbox.take_share()).collect::<Vec<_>>(), [0, 1, 2, 3]);
    }

    /// Producers post while the carriers they asked for take their shares
    /// on another thread, as the Lua thread decodes them: every event
    /// leaves once, in each producer's order, in shares of at most `batch`.
    #[test]
    fn under_contention_every_event_leaves_once_and_in_order() {
        const PRODUCERS: usize = 4;
        const EVENTS: usize = 20_000;
        for batch in [1, 32] {
            let outbox = Arc::new(Outbox::new(batch));
            let (carriers, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let producers: Vec<_> = (0..PRODUCERS)
                .map(|p| {
                    let (outbox, carriers, done) = (Arc::clone(&outbox), Arc::clone(&carriers), Arc::clone(&done));
                    thread::spawn(move || {
                        for seq in 0..EVENTS {
                            if outbox.post((p, seq)) {
                                carriers.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                    })
                })
                .collect();
            let mut next = [0; PRODUCERS];
            let mut taken = 0;
            let mut shares = 0;
            loop {
                let finished = done.load(Ordering::SeqCst) == PRODUCERS;
                let owed = carriers.load(Ordering::SeqCst);
                if shares == owed && finished {
                    break;
                }
                if shares == owed {
                    thread::yield_now();
                    continue;
                }
                shares += 1;
                let share = outbox.take_share();
                assert!(share.len() <= batch);
                for (p, seq) in share {
                    assert_eq!(seq, next[p], "producer {p} out of order");
                    next[p] += 1;
                    taken += 1;
                }
            }
            producers.into_iter().for_each(|p| p.join().unwrap());
            assert_eq!(taken, PRODUCERS * EVENTS, "every event left once (batch {batch})");
            assert!(outbox.lock().events.is_empty() && outbox.lock().carriers == 0);
        }
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use crate::sync::locks::bounded_model;
    use loom::sync::mpsc;
    use loom::thread;
    use std::sync::Arc;

    /// Two workers post one and two events into an outbox of batch 2 (an
    /// odd count: no share is ever full by chance at the end), and tell the
    /// Lua thread (the main thread) after each post whether they delivered
    /// a carrier; the Lua thread decodes each carrier as it comes, so
    /// shares are taken between posts. Every event leaves once, in its
    /// producer's order, in shares of at most 2: the carriers always
    /// sufficed, and none is left owed.
    #[test]
    fn carriers_always_suffice_for_the_posted_events() {
        bounded_model(|| {
            let outbox = Arc::new(Outbox::new(2));
            let (carriers, delivered) = mpsc::channel();
            let producers: Vec<_> = (0..2)
                .map(|producer| {
                    let (outbox, carriers) = (Arc::clone(&outbox), carriers.clone());
                    thread::spawn(move || {
                        for seq in 0..=producer {
                            carriers.send(outbox.post((producer, seq))).unwrap();
                        }
                    })
                })
                .collect();
            let mut next = [0; 2];
            for _ in 0..3 {
                if !delivered.recv().unwrap() {
                    continue;
                }
                let share = outbox.take_share();
                assert!(share.len() <= 2, "a share of {}", share.len());
                for (producer, seq) in share {
                    assert_eq!(seq, next[producer], "producer {producer}'s events out of order");
                    next[producer] += 1;
                }
            }
            producers.into_iter().for_each(|producer| producer.join().unwrap());
            assert_eq!(next, [1, 2], "events left behind with no carrier to take them");
            let state = outbox.lock();
            assert!(state.events.is_empty() && state.carriers == 0);
        });
    }
}

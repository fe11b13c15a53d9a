//! The wake-up lag: how long the reader took to answer a wake-up signal,
//! so a user can see a loop that stalls (`core.stats()`, `d:stats()`).
//!
//! Whoever raises the signal (the producer whose deliver armed the flag,
//! or the reader's own `wake`) stamps the moment in the shared [`Stamp`].
//! The reader notes when it takes the first item of a drain, and at the
//! drain's empty poll counts the lag from the stamp to that first take. A
//! producer stamps right after its push, so its stamp can in principle come
//! after the reader's first take: a stamp older than the last empty poll,
//! or newer than the first take, is such a one and is not counted. Only two
//! clock reads per drain: the hot path takes no time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since the first call in this process (never 0 after it).
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    (epoch.elapsed().as_nanos() as u64).max(1)
}

/// When the signal was last raised (nanoseconds, `now_ns`), 0: never.
#[derive(Debug, Default)]
pub struct Stamp(AtomicU64);

impl Stamp {
    pub fn mark(&self) {
        self.0.store(now_ns(), Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// The reader's side: the lag of the last drain and the worst one.
#[derive(Debug, Default, Clone, Copy)]
pub struct Lag {
    pub last_ns: u64,
    pub max_ns: u64,
    /// When this drain took its first item.
    first_take: Option<u64>,
    /// When the last drain ended with an empty poll.
    last_empty: u64,
}

impl Lag {
    /// The reader took an item.
    pub fn took(&mut self) {
        if self.first_take.is_none() {
            self.first_take = Some(now_ns());
        }
    }

    /// The reader found the queue empty: the drain that ends here answered
    /// the signal stamped in `stamp`.
    pub fn empty(&mut self, stamp: &Stamp) {
        let now = now_ns();
        if let Some(first) = self.first_take.take() {
            let raised = stamp.get();
            if raised > self.last_empty && raised <= first {
                self.last_ns = first - raised;
                self.max_ns = self.max_ns.max(self.last_ns);
            }
        }
        self.last_empty = now;
    }

    /// The reader stopped a drain early and raised the signal itself: the
    /// next drain answers that signal.
    pub fn rewoken(&mut self) {
        self.first_take = None;
        self.last_empty = now_ns();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_from_the_stamp_to_the_first_take() {
        let (stamp, mut lag) = (Stamp::default(), Lag::default());
        stamp.mark();
        std::thread::sleep(Duration::from_millis(20));
        lag.took();
        lag.took();
        lag.empty(&stamp);
        assert!(lag.last_ns >= 20_000_000, "{lag:?}");
        assert_eq!(lag.max_ns, lag.last_ns);
        // A drain with no new stamp (its stamp came after the first take)
        // counts nothing and keeps the last figure.
        let last = lag.last_ns;
        lag.took();
        stamp.mark();
        lag.empty(&stamp);
        assert_eq!(lag.last_ns, last);
        // A quick answer lowers the last figure, not the worst one.
        stamp.mark();
        lag.took();
        lag.empty(&stamp);
        assert!(lag.last_ns < last && lag.max_ns == last, "{lag:?}");
    }
}

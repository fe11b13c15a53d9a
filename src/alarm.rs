//! Alarms: wake a reader at a given time even when nothing is delivered.
//!
//! Most event loops have timers of their own; a plain `socket.select` loop
//! and Copas 1.x do not, yet a coroutine waiting there with a timeout must
//! be resumed when the time is up. The Lua layer keeps its deadlines and
//! asks for one alarm per instance, at the earliest; when it rings, the
//! instance's signal is raised as `core.wake()` would, and the dispatcher
//! expires what is due at its next drain.
//!
//! # Invariants
//!
//! - One thread per process serves every instance's alarm, started on the
//!   first alarm and never busy: it sleeps on a condition variable until the
//!   earliest alarm is due, or for ever when there is none (no system calls
//!   while idle).
//! - An alarm holds only a `Weak` reference: an instance that is gone is
//!   skipped, never kept alive by its alarm.
//! - The clock's lock is never held while a wake-up is sent, so a slow
//!   signal never delays another instance's alarm registration.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Instant;

use crate::instance::Shared;

/// Identifies one alarm: its due time, then a number that tells apart two
/// alarms due at the same instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    due: Instant,
    serial: u64,
}

#[derive(Default)]
struct Clock {
    alarms: BTreeMap<Key, Weak<Shared>>,
    next_serial: u64,
    started: bool,
}

static CLOCK: Mutex<Clock> = Mutex::new(Clock { alarms: BTreeMap::new(), next_serial: 0, started: false });
static CHANGED: Condvar = Condvar::new();

fn clock() -> MutexGuard<'static, Clock> {
    // The clock is a plain map: consistent even if a holder panicked.
    CLOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ring `shared`'s signal at `due`. Returns the key to cancel it with, or
/// `None` when no thread could be started (the alarm is then not set).
pub fn set(shared: &Arc<Shared>, due: Instant) -> Option<Key> {
    let mut clock = clock();
    if !clock.started {
        thread::Builder::new().name("bgworker-alarm".into()).spawn(ring).ok()?;
        clock.started = true;
    }
    let key = Key { due, serial: clock.next_serial };
    clock.next_serial += 1;
    let earliest = clock.alarms.keys().next().is_none_or(|first| key < *first);
    clock.alarms.insert(key, Arc::downgrade(shared));
    drop(clock);
    if earliest {
        CHANGED.notify_one();
    }
    Some(key)
}

/// Forget an alarm (rung or not).
pub fn cancel(key: Key) {
    clock().alarms.remove(&key);
}

/// The alarm thread's body.
fn ring() {
    let mut clock = clock();
    loop {
        let Some((&key, _)) = clock.alarms.iter().next() else {
            clock = CHANGED.wait(clock).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let now = Instant::now();
        if key.due > now {
            clock = CHANGED.wait_timeout(clock, key.due - now).unwrap_or_else(|e| e.into_inner()).0;
            continue;
        }
        let shared = clock.alarms.remove(&key).and_then(|weak| weak.upgrade());
        drop(clock);
        if let Some(shared) = shared {
            shared.wake();
        }
        clock = self::clock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::Instance;
    use crate::signal::{FdKind, Signal};
    use std::time::Duration;

    fn readable(fd: std::os::fd::RawFd, timeout_ms: i32) -> bool {
        let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pollfd, 1, timeout_ms) == 1 }
    }

    #[test]
    fn an_alarm_raises_the_signal_when_due_and_a_cancelled_one_never_does() {
        let mut instance = Instance::default();
        instance.start(Signal::fd(FdKind::native()).unwrap()).unwrap();
        let fd = instance.reader_fd().unwrap();

        let cancelled = set(instance.shared(), Instant::now() + Duration::from_millis(20)).unwrap();
        cancel(cancelled);
        assert!(!readable(fd, 100), "a cancelled alarm rang");

        let start = Instant::now();
        set(instance.shared(), start + Duration::from_millis(30)).unwrap();
        assert!(readable(fd, 2000), "the alarm did not ring");
        assert!(start.elapsed() >= Duration::from_millis(30), "the alarm rang early");
    }

    #[test]
    fn an_alarm_of_an_instance_that_is_gone_is_skipped() {
        let mut instance = Instance::default();
        instance.start(Signal::fd(FdKind::native()).unwrap()).unwrap();
        set(instance.shared(), Instant::now() + Duration::from_millis(5)).unwrap();
        drop(instance);
        // The thread survives it and serves the next one.
        let mut next = Instance::default();
        next.start(Signal::fd(FdKind::native()).unwrap()).unwrap();
        set(next.shared(), Instant::now() + Duration::from_millis(20)).unwrap();
        assert!(readable(next.reader_fd().unwrap(), 2000));
    }
}

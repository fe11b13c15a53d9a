//! One Lua state's helper instance: the queue, its producers' side
//! ([`Shared`], reached from any thread through counted handles) and its
//! reader's side ([`Instance`], owned by the Lua state).
//!
//! # Invariants
//!
//! - Producers reach the queue only through `Shared::route`, under its read
//!   lock. `stop` removes the route under the write lock *before* it drains
//!   the queue, so once the write lock is taken no producer is between
//!   "saw the route" and "pushed": every item is either drained by `stop`
//!   or refused with `Closed`. Nothing is stranded in a stopped instance.
//! - A producer never waits for room while holding the route lock, so
//!   `stop` on the Lua thread cannot deadlock against a blocked producer:
//!   it closes the [`Room`] first, which wakes them.
//! - No user code (free_data) runs under the route lock: rejected items
//!   are handed back out of the locked scope and dropped there.
//! - `delivered` is not counted on the hot path: every accepted item is
//!   later polled, cancelled, or still pending, so it is their sum.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Instant;

use crate::alarm;
use crate::item::{DecodeFn, FreeFn, Item, ResultFn, RoundTrip};
use crate::reply::Reply;
use crate::room::{Room, Wait};
use crate::signal::Signal;
use crate::status::Status;
use crate::wake::WakeFlag;

/// What producers need while the instance is started.
struct Route {
    queue: flume::Sender<Item>,
    signal: Arc<Signal>,
    room: Option<Arc<Room>>,
}

/// The producers' side, shared by the Lua state and every handle.
#[derive(Default)]
pub struct Shared {
    route: RwLock<Option<Route>>,
    wake: WakeFlag,
    rejected: AtomicU64,
    wakeups: AtomicU64,
    wake_errors: AtomicU64,
}

impl Shared {
    fn route(&self) -> RwLockReadGuard<'_, Option<Route>> {
        self.route.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `item`. The item is consumed whatever the outcome: a rejected
    /// item is dropped (so freed) before this returns.
    pub fn deliver(&self, item: Item, wait: Wait) -> Status {
        match self.enqueue(item, wait) {
            Ok(()) => Status::Ok,
            Err((status, item)) => {
                self.note_rejected();
                drop(item);
                status
            }
        }
    }

    pub fn note_rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }

    /// Queue a round trip and wait for its outcome until `deadline`.
    pub fn call(
        &self,
        decode: DecodeFn,
        result: ResultFn,
        data: *mut std::ffi::c_void,
        free_data: Option<FreeFn>,
        deadline: Option<std::time::Instant>,
    ) -> Status {
        let reply = Arc::new(Reply::default());
        let item = Item::new(decode, data, free_data, Some(RoundTrip { reply: reply.clone(), result }));
        let wait = deadline.map_or(Wait::Forever, Wait::Until);
        match self.deliver(item, wait) {
            Status::Ok => reply.wait(deadline),
            refused => refused,
        }
    }

    fn enqueue(&self, item: Item, wait: Wait) -> Result<(), (Status, Item)> {
        loop {
            let room = {
                let route = self.route();
                let Some(route) = route.as_ref() else {
                    return Err((Status::Closed, item));
                };
                match &route.room {
                    None => return self.push(route, item),
                    Some(room) => room.clone(),
                }
            };
            match room.acquire(wait) {
                Status::Ok => {}
                refused => return Err((refused, item)),
            }
            let route = self.route();
            match route.as_ref() {
                None => {
                    room.release();
                    return Err((Status::Closed, item));
                }
                Some(route) => match &route.room {
                    Some(current) if Arc::ptr_eq(current, &room) => return self.push(route, item),
                    // The bound was lifted while we waited.
                    None => return self.push(route, item),
                    // Another room came meanwhile (a new bound, or a stop and
                    // a start): our slot means nothing there; try again.
                    Some(_) => room.release(),
                },
            }
        }
    }

    fn push(&self, route: &Route, item: Item) -> Result<(), (Status, Item)> {
        route.queue.send(item).map_err(|flume::SendError(item)| (Status::Closed, item))?;
        if self.wake.arm() {
            self.send_wake(route);
        }
        Ok(())
    }

    /// Raise the signal now, whether or not anything was delivered (a
    /// reader that stopped draining early, or an alarm). `false` when not
    /// started.
    pub fn wake(&self) -> bool {
        let route = self.route();
        let Some(route) = route.as_ref() else {
            return false;
        };
        self.wake.force();
        self.send_wake(route);
        true
    }

    fn send_wake(&self, route: &Route) {
        // A connected UDP socket reports an earlier ICMP error on the next
        // send without sending; one retry sends the datagram after all.
        for _ in 0..2 {
            if route.signal.notify().is_ok() {
                self.wakeups.fetch_add(1, Relaxed);
                return;
            }
        }
        self.wake_errors.fetch_add(1, Relaxed);
        self.wake.disarm_after_failed_send();
    }
}

/// Slots of the batch buffer kept across an empty poll: enough for a busy
/// steady state, small next to what a burst of a million items grows.
const BATCH_KEPT: usize = 4096;

/// The reader's side of a started instance.
struct Inbox {
    queue: flume::Receiver<Item>,
    /// Items moved out of `queue` in one go, not yet handed out: the reader
    /// takes the channel's lock once per batch, not once per item, so it
    /// contends far less with the producers. Still pending: they count in
    /// `pending()`, hold their room, and are cancelled by `stop`.
    batch: VecDeque<Item>,
    room: Option<Arc<Room>>,
    signal: Arc<Signal>,
}

impl Inbox {
    fn len(&self) -> usize {
        self.batch.len() + self.queue.len()
    }
}

/// Counters kept by the Lua thread alone.
#[derive(Default, Debug, Clone, Copy)]
struct ReaderCounters {
    polled: u64,
    cancelled: u64,
    errors: u64,
    empty_polls: u64,
}

/// A snapshot of all counters, for `core.stats()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub delivered: u64,
    pub polled: u64,
    pub wakeups: u64,
    pub cancelled: u64,
    pub rejected: u64,
    pub errors: u64,
    pub empty_polls: u64,
    pub wake_errors: u64,
}

impl Stats {
    pub fn fields(&self) -> [(&'static std::ffi::CStr, u64); 8] {
        [
            (c"delivered", self.delivered),
            (c"polled", self.polled),
            (c"wakeups", self.wakeups),
            (c"cancelled", self.cancelled),
            (c"rejected", self.rejected),
            (c"errors", self.errors),
            (c"empty_polls", self.empty_polls),
            (c"wake_errors", self.wake_errors),
        ]
    }
}

/// The Lua state's instance. Only the thread that runs the state touches it.
#[derive(Default)]
pub struct Instance {
    shared: Arc<Shared>,
    inbox: Option<Inbox>,
    /// The bound of the queue, `None`: unbounded. Set before a start, it
    /// applies to that start; `stop` clears it.
    capacity: Option<usize>,
    counters: ReaderCounters,
    /// The alarm set by `set_alarm`, until it is replaced or the run stops.
    alarm: Option<alarm::Key>,
    closed: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum StartError {
    AlreadyStarted,
    Closed,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::AlreadyStarted => f.write_str("already started; call stop() first"),
            StartError::Closed => f.write_str("the instance is closed"),
        }
    }
}

impl Instance {
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn is_running(&self) -> bool {
        self.inbox.is_some()
    }

    /// Whether `start` would succeed, before the caller builds a signal.
    pub fn can_start(&self) -> Result<(), StartError> {
        if self.closed {
            Err(StartError::Closed)
        } else if self.inbox.is_some() {
            Err(StartError::AlreadyStarted)
        } else {
            Ok(())
        }
    }

    /// Start: wake-ups go through `signal`; the queue is bounded by the
    /// capacity set last (see `set_capacity`).
    pub fn start(&mut self, signal: Signal) -> Result<(), StartError> {
        self.can_start()?;
        let signal = Arc::new(signal);
        let (tx, rx) = flume::unbounded();
        let room = self.capacity.map(|c| Arc::new(Room::new(c, 0)));
        // No producer can see the new queue yet: a flag left up by the last
        // run must not swallow the first wake of this one.
        self.shared.wake.reset();
        *self.shared.route.write().unwrap_or_else(|e| e.into_inner()) =
            Some(Route { queue: tx, signal: signal.clone(), room: room.clone() });
        self.inbox = Some(Inbox { queue: rx, batch: VecDeque::new(), room, signal });
        Ok(())
    }

    /// Stop: refuse later delivers, cancel what is queued. Returns how many
    /// items were cancelled.
    pub fn stop(&mut self) -> usize {
        let Some(inbox) = self.inbox.take() else {
            return 0;
        };
        self.capacity = None;
        if let Some(key) = self.alarm.take() {
            alarm::cancel(key);
        }
        if let Some(room) = &inbox.room {
            room.close();
        }
        let route = self.shared.route.write().unwrap_or_else(|e| e.into_inner()).take();
        drop(route);
        // The route is gone, so nobody can push: this drains everything.
        let mut cancelled = 0;
        for item in inbox.batch.into_iter().chain(inbox.queue.drain()) {
            item.finish(Status::Cancelled);
            cancelled += 1;
        }
        self.counters.cancelled += cancelled as u64;
        cancelled
    }

    /// The state is closing: stop for good.
    pub fn close(&mut self) {
        self.stop();
        self.closed = true;
    }

    /// The next item, following the wake protocol (see `wake.rs`).
    pub fn take_next(&mut self) -> Option<Item> {
        let Inbox { queue, batch, room, signal } = self.inbox.as_mut()?;
        let pop = || {
            if batch.is_empty() {
                batch.extend(queue.drain());
            }
            batch.pop_front()
        };
        match self.shared.wake.take(pop, || signal.clear()) {
            Some(item) => {
                if let Some(room) = room {
                    room.release();
                }
                self.counters.polled += 1;
                Some(item)
            }
            None => {
                // A burst grew the batch buffer; idle, it need not stay big.
                batch.shrink_to(BATCH_KEPT);
                self.counters.empty_polls += 1;
                None
            }
        }
    }

    pub fn note_error(&mut self) {
        self.counters.errors += 1;
    }

    pub fn pending(&self) -> usize {
        self.inbox.as_ref().map_or(0, Inbox::len)
    }

    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// Bound the queue to `capacity` items (`None`: unbounded): at once if
    /// started, else from the next start, until the next stop. Producers
    /// waiting for room see the new bound straight away.
    pub fn set_capacity(&mut self, capacity: Option<usize>) {
        self.capacity = capacity;
        let Some(inbox) = self.inbox.as_mut() else {
            return;
        };
        match (inbox.room.clone(), capacity) {
            (Some(room), Some(capacity)) => room.resize(capacity),
            (None, None) => {}
            (old, capacity) => {
                let mut route = self.shared.route.write().unwrap_or_else(|e| e.into_inner());
                let route = route.as_mut().expect("a started instance has a route");
                // Under the write lock nobody pushes: the count is exact.
                let queued = inbox.batch.len() + inbox.queue.len();
                let room = capacity.map(|c| Arc::new(Room::new(c, queued)));
                route.room = room.clone();
                inbox.room = room;
                if let Some(old) = old {
                    old.lift();
                }
            }
        }
    }

    /// Send a wake datagram now (a reader that stopped draining early).
    /// `false` when not started.
    pub fn wake(&self) -> bool {
        self.shared.wake()
    }

    /// Raise the signal at `due` even if nothing is delivered, replacing the
    /// alarm set before; `None` clears it. Ignored when not started; `stop`
    /// clears it. `false` when no alarm thread could be started.
    pub fn set_alarm(&mut self, due: Option<Instant>) -> bool {
        if let Some(key) = self.alarm.take() {
            alarm::cancel(key);
        }
        match due {
            Some(due) if self.inbox.is_some() => {
                self.alarm = alarm::set(&self.shared, due);
                self.alarm.is_some()
            }
            _ => true,
        }
    }

    /// The started signal, for its reader-side details.
    pub fn signal(&self) -> Option<&Signal> {
        self.inbox.as_ref().map(|inbox| &*inbox.signal)
    }

    /// Where wake datagrams come from (or, greeting mode, where to greet).
    pub fn sender(&self) -> Option<SocketAddr> {
        self.signal()?.local_addr()
    }

    /// The descriptor to wait on, for a descriptor signal.
    pub fn reader_fd(&self) -> Option<RawFd> {
        self.signal()?.reader_fd()
    }

    pub fn stats(&self) -> Stats {
        let c = self.counters;
        Stats {
            delivered: c.polled + c.cancelled + self.pending() as u64,
            polled: c.polled,
            wakeups: self.shared.wakeups.load(Relaxed),
            cancelled: c.cancelled,
            rejected: self.shared.rejected.load(Relaxed),
            errors: c.errors,
            empty_polls: c.empty_polls,
            wake_errors: self.shared.wake_errors.load(Relaxed),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests;

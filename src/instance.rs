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
//! - `keepers` counts the handles whose box says `kept` (`handle.rs`): each
//!   change of a box's flag moves it by one. When the last keeper goes on a
//!   producer's thread (`release`), the reader is woken if it listens
//!   (`wake_when_unkept`), so that its loop learns that it may end.
//! - `delivered` is not counted on the hot path: every accepted item is
//!   later polled, cancelled, or still pending, so it is their sum.
//!
//! # fork()
//!
//! A run belongs to the process that started it (`fork.rs`). A `Shared`
//! and a run record the fork generation they were made in. In a forked
//! child:
//!
//! - the inherited run is not running: the instance never touches it (no
//!   lock, no signal, no free), and forgets it at `stop`, `start` or
//!   `close`, leaving its memory and the child's copies of its descriptors
//!   alone;
//! - an inherited `Shared` forwards to a *successor* made in the child, and
//!   handles resolve through it (`Shared::current`): they get `Closed`
//!   until the child starts its own run, which goes to the successor. The
//!   inherited `Shared` is never locked, and its route is never dropped.
//!
//! The loom models at the bottom check the route against stop, start and a
//! bound that changes while producers wait, and the keepers' last release.

use std::ffi::c_void;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::alarm;
use crate::copy::Scratch;
use crate::fork;
use crate::item::{Delivery, Item};
use crate::lag::{Lag, Stamp};
use crate::queue::{Batch, Queue};
use crate::room::{Room, MAX_CAPACITY};
use crate::signal::Signal;
use crate::status::Status;
use crate::sync::{AtomicBool, AtomicUsize, Ordering, RwLock, RwLockReadGuard};
use crate::wait::Wait;
use crate::wake::WakeFlag;

/// What producers need while the instance is started.
struct Route {
    queue: Arc<Queue>,
    signal: Arc<Signal>,
    room: Option<Arc<Room>>,
}

/// The producers' side of one process, shared by the Lua state and every
/// handle.
pub struct Shared {
    route: RwLock<Option<Route>>,
    wake: WakeFlag,
    /// When the signal was last raised, for the reader's lag.
    raised: Stamp,
    rejected: AtomicU64,
    wakeups: AtomicU64,
    wake_errors: AtomicU64,
    /// Handles that keep the Lua state's loop alive (`bgw_api.ref`).
    keepers: AtomicUsize,
    /// Wake the reader when the last keeper is released (`core.on_keep`).
    wake_when_unkept: AtomicBool,
    /// The fork generation this was made in.
    generation: u64,
    /// In a forked child: the child's own `Shared`, which this forwards to.
    successor: OnceLock<Arc<Shared>>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            route: RwLock::default(),
            wake: WakeFlag::default(),
            raised: Stamp::default(),
            rejected: AtomicU64::default(),
            wakeups: AtomicU64::default(),
            wake_errors: AtomicU64::default(),
            keepers: AtomicUsize::default(),
            wake_when_unkept: AtomicBool::default(),
            generation: fork::generation(),
            successor: OnceLock::new(),
        }
    }
}

impl Shared {
    /// This process's producers' side: `self`, or in a forked child the
    /// successor made there (see "fork()" above).
    pub fn current(&self) -> &Shared {
        if self.generation == fork::generation() {
            return self;
        }
        let successor = match self.successor.get() {
            Some(successor) => successor,
            None => fork::quiet(|| self.successor.get_or_init(Arc::default)),
        };
        successor.current()
    }

    fn route(&self) -> RwLockReadGuard<'_, Option<Route>> {
        self.route.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set_route(&self, route: Option<Route>) -> Option<Route> {
        std::mem::replace(&mut *self.route.write().unwrap_or_else(|e| e.into_inner()), route)
    }

    /// Queue `delivery` in this process's run; for a round trip, wait for
    /// its reply too. It is consumed whatever the outcome: a rejected item
    /// is dropped (so freed) before this returns.
    pub fn submit(&self, delivery: Delivery, wait: Wait) -> Status {
        let shared = self.current();
        let reply = delivery.reply();
        match shared.enqueue(delivery, wait) {
            Ok(()) => reply.map_or(Status::Ok, |reply| reply.wait(wait)),
            Err((status, item)) => {
                shared.note_rejected();
                drop(item);
                status
            }
        }
    }

    /// One more handle keeps the loop alive: true when it is the first.
    pub fn keep(&self) -> bool {
        self.keepers.fetch_add(1, Ordering::AcqRel) == 0
    }

    /// One handle less keeps the loop alive: true when it was the last.
    pub fn unkeep(&self) -> bool {
        self.keepers.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Whether the release of the last keeper wakes the reader.
    pub fn wake_when_unkept(&self, wake: bool) {
        self.wake_when_unkept.store(wake, Ordering::Relaxed);
    }

    /// The last keeper was released on a producer's thread: wake the
    /// reader if it listens, so that it learns its loop may end.
    pub fn unkept(&self) {
        if self.wake_when_unkept.load(Ordering::Relaxed) {
            self.wake();
        }
    }

    /// The handles that keep the loop alive now.
    pub fn keepers(&self) -> usize {
        self.keepers.load(Ordering::Acquire)
    }

    pub fn note_rejected(&self) {
        self.current().rejected.fetch_add(1, Relaxed);
    }

    fn enqueue<'a>(&self, item: Delivery<'a>, wait: Wait) -> Result<(), (Status, Delivery<'a>)> {
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

    fn push<'a>(&self, route: &Route, item: Delivery<'a>) -> Result<(), (Status, Delivery<'a>)> {
        route.queue.push(item);
        if self.wake.arm() {
            self.raised.mark();
            self.send_wake(route);
        }
        Ok(())
    }

    /// Raise this process's signal now, whether or not anything was
    /// delivered (a reader that stopped draining early, or an alarm).
    /// `false` when not started.
    pub fn wake(&self) -> bool {
        let shared = self.current();
        let route = shared.route();
        let Some(route) = route.as_ref() else {
            return false;
        };
        shared.wake.force();
        shared.raised.mark();
        shared.send_wake(route);
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

impl Drop for Shared {
    fn drop(&mut self) {
        if self.generation != fork::generation() {
            // Inherited: its queue's and room's locks may be held by threads
            // this process does not have, and its signal is the parent's.
            // `get_mut` takes no lock.
            let route = self.route.get_mut().unwrap_or_else(|e| e.into_inner()).take();
            std::mem::forget(route);
        }
    }
}

/// Slots of the batch buffer kept across an empty poll: enough for a busy
/// steady state, small next to what a burst of a million items grows.
const BATCH_KEPT: usize = 4096;

/// Run ids, unique per start within the process.
static LAST_RUN: AtomicU64 = AtomicU64::new(0);

/// The reader's side of a started instance: one run, from start to stop.
struct Run {
    id: u64,
    /// The fork generation and process that started it.
    generation: u64,
    pid: u32,
    queue: Arc<Queue>,
    /// Items taken from `queue` in one go (a swap of buffers), not yet
    /// handed out: the reader takes the queue's lock once per batch, not
    /// once per item, so it contends far less with the producers. Still
    /// pending: they count in `pending()`, hold their room, and are
    /// cancelled by `stop`.
    batch: Batch,
    room: Option<Arc<Room>>,
    signal: Arc<Signal>,
}

impl Run {
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
    lag: Lag,
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
    pub lag_last_ns: u64,
    pub lag_max_ns: u64,
}

impl Stats {
    pub fn fields(&self) -> [(&'static std::ffi::CStr, u64); 10] {
        [
            (c"delivered", self.delivered),
            (c"polled", self.polled),
            (c"wakeups", self.wakeups),
            (c"cancelled", self.cancelled),
            (c"rejected", self.rejected),
            (c"errors", self.errors),
            (c"empty_polls", self.empty_polls),
            (c"wake_errors", self.wake_errors),
            (c"lag_last_ns", self.lag_last_ns),
            (c"lag_max_ns", self.lag_max_ns),
        ]
    }
}

/// The Lua state's instance. Only the thread that runs the state touches it.
#[derive(Default)]
pub struct Instance {
    /// As made with the state; `shared.current()` in a forked child.
    shared: Arc<Shared>,
    run: Option<Run>,
    /// The bound of the queue, `None`: unbounded. Set before a start, it
    /// applies to that start; `stop` clears it.
    capacity: Option<usize>,
    counters: ReaderCounters,
    /// The alarm set by `set_alarm`, until it is replaced or the run stops.
    alarm: Option<alarm::Key>,
    /// The reader's hand-off to the Lua binding's drain (`lua/drain.rs`).
    drain: DrainState,
    closed: bool,
}

/// What the drain (`lua/drain.rs`) keeps here rather than in its own
/// frames, which a Lua error leaves by longjmp.
#[derive(Default)]
pub struct DrainState {
    /// The item being decoded: owned here, so that a decode that raises
    /// cannot leak it. The drain that catches the error settles it; `close`
    /// frees one still here.
    pub held: Option<Item>,
    /// Items taken so far by the innermost drain in progress (its budget
    /// counts them, the failed one included).
    pub taken: usize,
    /// The innermost drain in progress ends after the running callback
    /// (`drain_cut()`).
    pub cut: bool,
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

/// A run inherited through fork(): it belongs to process `parent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inherited {
    pub parent: u32,
}

impl std::fmt::Display for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the dispatcher was started by process {} before fork(), and this process ({}) cannot use it; \
             stop() forgets it, or start a new one",
            self.parent,
            std::process::id()
        )
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum CapacityError {
    /// Above [`MAX_CAPACITY`].
    TooLarge,
    Inherited(Inherited),
}

impl Instance {
    /// The producers' side as made with the state, for new handles: they
    /// resolve it to this process's on every call.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// This process's run, if started; never one inherited through fork().
    fn own_run(&self) -> Option<&Run> {
        self.run.as_ref().filter(|run| run.generation == fork::generation())
    }

    /// Set when the only run is one inherited through fork(), until `stop`,
    /// `start` or `close` forgets it.
    pub fn inherited(&self) -> Option<Inherited> {
        let run = self.run.as_ref()?;
        (run.generation != fork::generation()).then_some(Inherited { parent: run.pid })
    }

    pub fn is_running(&self) -> bool {
        self.own_run().is_some()
    }

    /// The id of this process's current run, unique per start within the
    /// process; `None` when not started here.
    pub fn run_id(&self) -> Option<u64> {
        self.own_run().map(|run| run.id)
    }

    /// Whether `start` would succeed, before the caller builds a signal.
    pub fn can_start(&self) -> Result<(), StartError> {
        if self.closed {
            Err(StartError::Closed)
        } else if self.is_running() {
            Err(StartError::AlreadyStarted)
        } else {
            Ok(())
        }
    }

    /// Start: wake-ups go through `signal`; the queue is bounded by the
    /// capacity set last (see `set_capacity`). In a forked child, the
    /// inherited run is forgotten first.
    pub fn start(&mut self, signal: Signal) -> Result<(), StartError> {
        self.can_start()?;
        self.forget_inherited();
        let signal = Arc::new(signal);
        let queue = Arc::new(Queue::default());
        let room = self.capacity.map(|c| Arc::new(Room::new(c, 0)));
        let shared = self.shared.current();
        // No producer can see the new queue yet: a flag left up by the last
        // run must not swallow the first wake of this one.
        shared.wake.reset();
        shared.set_route(Some(Route { queue: queue.clone(), signal: signal.clone(), room: room.clone() }));
        self.counters.lag = Lag::default();
        self.run = Some(Run {
            id: LAST_RUN.fetch_add(1, Relaxed) + 1,
            generation: fork::generation(),
            pid: std::process::id(),
            queue,
            batch: Batch::default(),
            room,
            signal,
        });
        Ok(())
    }

    /// A run inherited through fork() belongs to the parent: forget it
    /// without touching it (see "fork()" above). The counters restart.
    fn forget_inherited(&mut self) {
        if self.inherited().is_some() {
            std::mem::forget(self.run.take());
            // The parent's alarm: its clock is the parent's too.
            self.alarm = None;
            self.capacity = None;
            self.counters = ReaderCounters::default();
        }
    }

    /// Stop: refuse later delivers, cancel what is queued. Returns how many
    /// items were cancelled. A run inherited through fork() is forgotten,
    /// with nothing cancelled: its items are the parent's.
    pub fn stop(&mut self) -> usize {
        self.forget_inherited();
        let Some(run) = self.run.take() else {
            return 0;
        };
        self.capacity = None;
        if let Some(key) = self.alarm.take() {
            alarm::cancel(key);
        }
        if let Some(room) = &run.room {
            room.close();
        }
        drop(self.shared.current().set_route(None));
        // The route is gone, so nobody can push: this drains everything.
        let mut cancelled = 0;
        let mut items = run.batch;
        run.queue.take_all(&mut items);
        for item in items {
            item.finish(Status::Cancelled);
            cancelled += 1;
        }
        self.counters.cancelled += cancelled as u64;
        cancelled
    }

    /// The state is closing: stop for good.
    pub fn close(&mut self) {
        self.stop();
        drop(self.drain.held.take());
        self.closed = true;
    }

    pub fn drain_state(&mut self) -> &mut DrainState {
        &mut self.drain
    }

    /// The next item and decode's data, following the wake protocol (see
    /// `wake.rs`). A copied record's data is copied into `scratch`.
    pub fn take_next(&mut self, scratch: &mut Scratch) -> Option<(Item, *mut c_void)> {
        let shared = self.shared.current();
        // As `own_run`, but mutable beside `shared`.
        let Run { queue, batch, room, signal, .. } =
            self.run.as_mut().filter(|run| run.generation == fork::generation())?;
        let pop = || {
            if batch.is_empty() {
                queue.take_all(batch);
            }
            batch.pop(scratch)
        };
        match shared.wake.take(pop, || signal.clear()) {
            Some(taken) => {
                if let Some(room) = room {
                    room.release();
                }
                self.counters.polled += 1;
                self.counters.lag.took();
                Some(taken)
            }
            None => {
                // A burst grew the batch buffer; idle, it need not stay big.
                batch.shrink_to(BATCH_KEPT);
                self.counters.empty_polls += 1;
                self.counters.lag.empty(&shared.raised);
                None
            }
        }
    }

    pub fn note_error(&mut self) {
        self.counters.errors += 1;
    }

    pub fn pending(&self) -> usize {
        self.own_run().map_or(0, Run::len)
    }

    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// Bound the queue to `capacity` items (`None`: unbounded): at once if
    /// started, else from the next start, until the next stop. Producers
    /// waiting for room see the new bound straight away. Refused above
    /// [`MAX_CAPACITY`], and while a run inherited through fork() is there.
    pub fn set_capacity(&mut self, capacity: Option<usize>) -> Result<(), CapacityError> {
        if capacity.is_some_and(|c| c > MAX_CAPACITY) {
            return Err(CapacityError::TooLarge);
        }
        if let Some(inherited) = self.inherited() {
            return Err(CapacityError::Inherited(inherited));
        }
        self.capacity = capacity;
        let shared = self.shared.current();
        let Some(run) = self.run.as_mut() else {
            return Ok(());
        };
        match (run.room.clone(), capacity) {
            (Some(room), Some(capacity)) => room.resize(capacity),
            (None, None) => {}
            (old, capacity) => {
                let mut route = shared.route.write().unwrap_or_else(|e| e.into_inner());
                let route = route.as_mut().expect("a started instance has a route");
                // Under the write lock nobody pushes: the count is exact.
                let room = capacity.map(|c| Arc::new(Room::new(c, run.len())));
                route.room = room.clone();
                run.room = room;
                if let Some(old) = old {
                    old.lift();
                }
            }
        }
        Ok(())
    }

    /// Send a wake datagram now (a reader that stopped draining early).
    /// `false` when not started.
    pub fn wake(&mut self) -> bool {
        self.counters.lag.rewoken();
        self.is_running() && self.shared.wake()
    }

    /// Raise the signal at `due` even if nothing is delivered, replacing the
    /// alarm set before; `None` clears it. Ignored when not started; `stop`
    /// clears it. `false` when no alarm thread could be started.
    pub fn set_alarm(&mut self, due: Option<Instant>) -> bool {
        if let Some(key) = self.alarm.take() {
            alarm::cancel(key);
        }
        match due {
            Some(due) if self.is_running() => {
                self.alarm = alarm::set(&self.shared, due);
                self.alarm.is_some()
            }
            _ => true,
        }
    }

    /// The started signal, for its reader-side details.
    pub fn signal(&self) -> Option<&Signal> {
        self.own_run().map(|run| &*run.signal)
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
        let shared = self.shared.current();
        Stats {
            delivered: c.polled + c.cancelled + self.pending() as u64,
            polled: c.polled,
            wakeups: shared.wakeups.load(Relaxed),
            cancelled: c.cancelled,
            rejected: shared.rejected.load(Relaxed),
            errors: c.errors,
            empty_polls: c.empty_polls,
            wake_errors: shared.wake_errors.load(Relaxed),
            lag_last_ns: c.lag.last_ns,
            lag_max_ns: c.lag.max_ns,
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_model;

//! A pool's events on their way to the Lua thread: progress and outcomes,
//! posted by the workers to the pool's [`Outbox`] and carried through
//! bgworker by core items (outbox.rs says when one is delivered). A
//! carrier's decode (Lua's C API, [`RawItem`]) pushes its share of events
//! as one call `on_events(list, n)`: up to [`BATCH`] events, as `n` values
//! of `list`, pairs `id, value` (lib.rs).
//!
//! Decode asks the board first: a progress event of a job that ended
//! (cancelled) in the meantime is left out, so after a successful `cancel`
//! the Lua side hears nothing more of that job. Decoding an outcome is what
//! ends its job as done or failed; an outcome dropped unread (its carrier
//! was refused or cancelled by the core: no dispatcher, a stopped one, a
//! closed state, a pool that closed while it waited for room, or a decode
//! that raised) ends it as cancelled.
//!
//! So a decode must not raise because of what one event holds, which would
//! take the others of its share with it: the workers send no more values
//! per event than the Lua thread can take ([`MAX_VALUES`]: a job with more
//! results fails, a `progress` with more values raises), and each value is
//! set into its list as soon as it is made, so an event takes a few stack
//! slots whatever its size. What is left to raise is running out of
//! memory.
//!
//! The Lua side hears of every job that ended as cancelled for want of a
//! dispatcher: the board keeps it as lost, and a [`Notice`] takes the lost
//! jobs to `on_events` as pairs `id, false`. One is delivered when a carrier is dropped unread, and again by
//! [`Events::notify_lost`], which the Lua side calls when a dispatcher
//! starts. A notice refused for want of a dispatcher leaves the jobs on
//! the board; the lost jobs are recorded before that delivery is tried, so
//! a dispatcher that starts after the refusal finds them there, and one
//! that started before it receives the notice: no lost job goes unheard.
//!
//! [`MAX_VALUES`]: crate::worker::value::MAX_VALUES

use std::ffi::c_int;
use std::ptr;
use std::sync::Arc;

use bgworker_ffi::lua::push_str;
use bgworker_util::{RawItem, Sender};
use mlua::ffi::{
    luaL_checkstack, lua_Integer, lua_State, lua_createtable, lua_pushboolean, lua_pushcfunction, lua_pushinteger,
    lua_rawgeti, lua_rawseti, lua_setfield, LUA_REGISTRYINDEX,
};
use mlua::{Function, Lua, RegistryKey};

use crate::sync::board::{Board, Id};
use crate::sync::control::{Control, InFlight, PROGRESS_IN_FLIGHT};
use crate::sync::mail::Mail;
use crate::sync::outbox::Outbox;
use crate::worker::job::{Job, Outcome};
use crate::worker::value::Values;

/// Most events one carrier takes to an `on_events` handler. A carrier is
/// one item of the dispatcher's budget, whatever it carries.
pub const BATCH: usize = 32;

enum Event {
    Progress { id: Id, values: Values, _in_flight: InFlight },
    Outcome { id: Id, outcome: Outcome },
}

impl Event {
    fn progress_id(&self) -> Option<Id> {
        match self {
            Event::Progress { id, .. } => Some(*id),
            Event::Outcome { .. } => None,
        }
    }

    /// An outcome's job and whether it failed.
    fn outcome(&self) -> Option<(Id, bool)> {
        match self {
            Event::Outcome { id, outcome } => Some((*id, matches!(outcome, Outcome::Failed { .. }))),
            Event::Progress { .. } => None,
        }
    }
}

/// What the workers and the carriers of one pool share.
struct Shared {
    sender: Sender,
    outbox: Outbox<Event>,
    board: Arc<Board<Job>>,
    /// Messages to the jobs: dropped here as the Lua thread learns that
    /// their jobs ended, and received by the workers (state.rs).
    mail: Arc<Mail<Values>>,
    /// `on_events`, in the Lua thread's registry.
    on_events: RegistryKey,
}

#[derive(Clone)]
pub struct Events {
    shared: Arc<Shared>,
}

/// The callback of a carrier whose share is empty, or holds only progress
/// of a job nobody wants any more.
unsafe extern "C-unwind" fn ignore(_: *mut lua_State) -> c_int {
    0
}

/// A core item that takes a share of the outbox to the Lua thread.
struct Carrier {
    shared: Arc<Shared>,
    /// Its share, once taken (by decode, or by the drop of a carrier never
    /// decoded).
    share: Option<Vec<Event>>,
    /// Its outcomes reached the Lua thread (they were settled).
    delivered: bool,
}

impl Drop for Carrier {
    fn drop(&mut self) {
        let share = self.share.take().unwrap_or_else(|| self.shared.outbox.take_share());
        if !self.delivered && self.shared.board.lose(share.iter().filter_map(Event::outcome).map(|(id, _)| id)) {
            Notice::deliver(&self.shared);
        }
    }
}

/// A core item that tells the Lua thread of the jobs the board lost: it
/// takes them when decoded (none, when an earlier notice took them).
struct Notice {
    shared: Arc<Shared>,
    /// The jobs taken from the board by a decode that has not finished:
    /// a decode that raises (out of memory) gives them back on drop.
    taken: Vec<Id>,
}

impl Notice {
    /// Deliver one, without waiting for room (it may be on the Lua
    /// thread): a notice that is refused (no dispatcher, a full queue)
    /// leaves the lost jobs on the board for the next one.
    fn deliver(shared: &Arc<Shared>) {
        let _ = shared.sender.deliver_raw(Notice { shared: Arc::clone(shared), taken: Vec::new() });
    }
}

impl Drop for Notice {
    fn drop(&mut self) {
        if !self.taken.is_empty() {
            self.shared.board.give_back_lost(std::mem::take(&mut self.taken));
        }
    }
}

// SAFETY: decode pushes a function and its arguments; the jobs it takes
// are given back by `Drop` unless it returns.
unsafe impl RawItem for Notice {
    unsafe fn decode(&mut self, state: *mut lua_State) -> c_int {
        self.taken = self.shared.board.take_lost();
        self.taken.iter().for_each(|&id| drop(self.shared.mail.discard(id)));
        unsafe {
            luaL_checkstack(state, 5, ptr::null());
            lua_rawgeti(state, LUA_REGISTRYINDEX, lua_Integer::from(self.shared.on_events.id()));
            let n = 2 * self.taken.len() as lua_Integer;
            lua_createtable(state, n as c_int, 0);
            let list = mlua::ffi::lua_gettop(state);
            for (index, id) in (1..).step_by(2).zip(&self.taken) {
                lua_pushinteger(state, *id as lua_Integer);
                lua_rawseti(state, list, index);
                lua_pushboolean(state, 0);
                lua_rawseti(state, list, index + 1);
            }
            lua_pushinteger(state, n);
        }
        self.taken.clear();
        3
    }
}

/// Push `values` as a list `{n = count, [head,] values...}`, in a few
/// stack slots whatever their count (the workers send at most
/// [`MAX_VALUES`](crate::worker::value::MAX_VALUES), which the Lua thread can
/// then unpack).
///
/// # Safety
/// On the Lua thread, in a decode (it may raise).
unsafe fn push_list(state: *mut lua_State, head: Option<bool>, values: &Values) {
    unsafe {
        let offset = c_int::from(head.is_some());
        let count = values.len() as c_int + offset;
        luaL_checkstack(state, 2, ptr::null());
        lua_createtable(state, count, 1);
        let list = mlua::ffi::lua_gettop(state);
        if let Some(head) = head {
            lua_pushboolean(state, c_int::from(head));
            lua_rawseti(state, list, 1);
        }
        values.set_into(state, list, offset);
        lua_pushinteger(state, lua_Integer::from(count));
        lua_setfield(state, list, c"n".as_ptr());
    }
}

impl Carrier {
    /// `on_events, list, n`.
    ///
    /// # Safety
    /// On the Lua thread, in a decode.
    unsafe fn push_batch(&self, state: *mut lua_State, share: &[Event]) -> c_int {
        unsafe {
            luaL_checkstack(state, 5, ptr::null());
            lua_rawgeti(state, LUA_REGISTRYINDEX, lua_Integer::from(self.shared.on_events.id()));
            let n = 2 * share.len() as lua_Integer;
            lua_createtable(state, n as c_int, 0);
            let list = mlua::ffi::lua_gettop(state);
            for (index, event) in (1..).step_by(2).zip(share) {
                match event {
                    Event::Progress { id, values, .. } => {
                        lua_pushinteger(state, -(*id as lua_Integer));
                        push_list(state, None, values);
                    }
                    Event::Outcome { id, outcome: Outcome::Done(values) } => {
                        lua_pushinteger(state, *id as lua_Integer);
                        if values.is_empty() {
                            lua_pushboolean(state, 1);
                        } else {
                            push_list(state, Some(true), values);
                        }
                    }
                    Event::Outcome { id, outcome: Outcome::Failed { error, traceback } } => {
                        lua_pushinteger(state, *id as lua_Integer);
                        lua_createtable(state, 3, 1);
                        lua_pushboolean(state, 0);
                        lua_rawseti(state, -2, 1);
                        error.push(state);
                        lua_rawseti(state, -2, 2);
                        if let Some(traceback) = traceback {
                            push_str(state, traceback);
                            lua_rawseti(state, -2, 3);
                        }
                        lua_pushinteger(state, 3);
                        lua_setfield(state, -2, c"n".as_ptr());
                    }
                }
                lua_rawseti(state, list, index + 1);
                lua_rawseti(state, list, index);
            }
            lua_pushinteger(state, n);
        }
        3
    }
}

// SAFETY: decode pushes a function and its arguments; it borrows only
// (the share it takes lives in `self`), and settles once everything is
// pushed (a raise before leaves the share to `Drop`).
unsafe impl RawItem for Carrier {
    unsafe fn decode(&mut self, state: *mut lua_State) -> c_int {
        let share = self.share.get_or_insert_with(|| self.shared.outbox.take_share());
        let unwanted = self.shared.board.retain_running(share, Event::progress_id);
        drop(unwanted);
        let share = self.share.as_deref().unwrap_or_default();
        let count = unsafe {
            match share {
                [] => {
                    lua_pushcfunction(state, ignore);
                    1
                }
                _ => self.push_batch(state, share),
            }
        };
        self.shared.board.settle(share.iter().filter_map(Event::outcome));
        share.iter().filter_map(Event::outcome).for_each(|(id, _)| drop(self.shared.mail.discard(id)));
        self.delivered = true;
        count
    }
}

impl Events {
    /// On the Lua thread, where bgworker.core must be loaded.
    pub fn new(
        lua: &Lua,
        on_events: Function,
        board: Arc<Board<Job>>,
        mail: Arc<Mail<Values>>,
    ) -> mlua::Result<Events> {
        let sender = Sender::new(lua)?;
        // Each job keeps the loop alive from the Lua side (bgworker.pool),
        // and an idle pool must let it end.
        sender.keep_loop_alive(lua, false)?;
        let on_events = lua.create_registry_value(on_events)?;
        Ok(Events { shared: Arc::new(Shared { sender, outbox: Outbox::new(BATCH), board, mail, on_events }) })
    }

    /// Post `event`, and deliver a carrier if the outbox asks for one. The
    /// carrier waits for room in a bounded queue until the pool closes: it
    /// may carry other jobs' events, so one job's cancellation does not
    /// stop it (the Lua thread, which cancelled, drains on).
    fn post(&self, event: Event) {
        if self.shared.outbox.post(event) {
            let carrier = Carrier { shared: Arc::clone(&self.shared), share: None, delivered: false };
            // Not delivered: the carrier was dropped, with its share.
            let _ = self.shared.sender.deliver_raw_while(carrier, || !self.shared.board.is_closed());
        }
    }

    /// From job `id`'s worker: post a progress event, first waiting while
    /// [`PROGRESS_IN_FLIGHT`] of its events are in flight. False when the
    /// job was cancelled first.
    pub fn progress(&self, id: Id, control: &Arc<Control>, values: Values) -> bool {
        let Some(in_flight) = control.reserve(PROGRESS_IN_FLIGHT) else { return false };
        self.post(Event::Progress { id, values, _in_flight: in_flight });
        true
    }

    /// From job `id`'s worker, after `Board::finish` said so: post its
    /// outcome.
    pub fn outcome(&self, id: Id, outcome: Outcome) {
        self.post(Event::Outcome { id, outcome });
    }

    /// The messages to the pool's jobs.
    pub fn mail(&self) -> &Arc<Mail<Values>> {
        &self.shared.mail
    }

    /// On the Lua thread, when a dispatcher starts: deliver a notice of
    /// the jobs lost while none ran, if there are any.
    pub fn notify_lost(&self) {
        if self.shared.board.has_lost() {
            Notice::deliver(&self.shared);
        }
    }
}

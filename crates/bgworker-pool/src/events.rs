//! A pool's events on their way to the Lua thread: each is an item
//! delivered through bgworker, whose decode pushes the pool's `on_event`
//! and its arguments, `id, "progress", values...`, `id, "done",
//! results...` or `id, "failed", error, traceback`. Decode uses Lua's C
//! API ([`RawItem`]): it runs once per job, on the Lua thread.
//!
//! Decode asks the board first: a progress event of a job that ended
//! (cancelled) in the meantime decodes to a function that does nothing,
//! so after a successful `cancel` the Lua side hears nothing more of that
//! job. An outcome's decode is what ends its job as done or failed; an
//! outcome dropped unread (no dispatcher, a stopped one, a closed state,
//! a pool that closed while it waited for room, or a decode that raised)
//! ends it as cancelled.

use std::ffi::{c_int, CStr};
use std::ptr;
use std::sync::Arc;

use bgworker_util::{RawItem, Sender};
use mlua::ffi::{
    luaL_checkstack, lua_Integer, lua_State, lua_pushcfunction, lua_pushinteger, lua_pushstring, lua_rawgeti,
    LUA_REGISTRYINDEX,
};
use mlua::{Function, Lua, RegistryKey};

use crate::board::{Board, Id};
use crate::control::{Control, InFlight, PROGRESS_IN_FLIGHT};
use crate::job::{Job, Outcome};
use crate::raw::push_str;
use crate::value::Values;

#[derive(Clone)]
pub struct Events {
    sender: Sender,
    on_event: Arc<RegistryKey>,
    board: Arc<Board<Job>>,
}

/// `on_event, id, event`: the arguments every event starts with.
///
/// # Safety
/// On the Lua thread, in a decode; `on_event` is a key of this state.
unsafe fn push_head(state: *mut lua_State, on_event: &RegistryKey, id: Id, event: &CStr) -> c_int {
    unsafe {
        luaL_checkstack(state, 4, ptr::null());
        lua_rawgeti(state, LUA_REGISTRYINDEX, lua_Integer::from(on_event.id()));
        lua_pushinteger(state, id as lua_Integer);
        lua_pushstring(state, event.as_ptr());
    }
    3
}

/// The callback of an event nobody wants any more.
unsafe extern "C-unwind" fn ignore(_: *mut lua_State) -> c_int {
    0
}

struct Progress {
    id: Id,
    values: Values,
    board: Arc<Board<Job>>,
    on_event: Arc<RegistryKey>,
    _in_flight: InFlight,
}

// SAFETY: decode pushes a function and its arguments; it borrows only.
unsafe impl RawItem for Progress {
    unsafe fn decode(&mut self, state: *mut lua_State) -> c_int {
        unsafe {
            if !self.board.is_running(self.id) {
                lua_pushcfunction(state, ignore);
                return 1;
            }
            push_head(state, &self.on_event, self.id, c"progress") + self.values.push(state)
        }
    }
}

struct Settled {
    id: Id,
    outcome: Outcome,
    board: Arc<Board<Job>>,
    on_event: Arc<RegistryKey>,
    settled: bool,
}

impl Drop for Settled {
    fn drop(&mut self) {
        if !self.settled {
            self.board.lose(self.id);
        }
    }
}

// SAFETY: decode pushes a function and its arguments; it borrows only, and
// settles once everything is pushed (a raise before leaves it to `Drop`).
unsafe impl RawItem for Settled {
    unsafe fn decode(&mut self, state: *mut lua_State) -> c_int {
        let (failed, count) = unsafe {
            match &self.outcome {
                Outcome::Done(values) => {
                    (false, push_head(state, &self.on_event, self.id, c"done") + values.push(state))
                }
                Outcome::Failed { error, traceback } => {
                    let head = push_head(state, &self.on_event, self.id, c"failed");
                    luaL_checkstack(state, 2, ptr::null());
                    error.push(state);
                    push_str(state, traceback.as_bytes());
                    (true, head + 2)
                }
            }
        };
        self.board.settle(self.id, failed);
        self.settled = true;
        count
    }
}

impl Events {
    /// On the Lua thread, where bgworker.core must be loaded.
    pub fn new(lua: &Lua, on_event: Function, board: Arc<Board<Job>>) -> mlua::Result<Events> {
        let sender = Sender::new(lua)?;
        Ok(Events { sender, on_event: Arc::new(lua.create_registry_value(on_event)?), board })
    }

    /// From job `id`'s worker: deliver a progress event, first waiting
    /// while [`PROGRESS_IN_FLIGHT`] of its events are in flight. False
    /// when the job was cancelled first.
    pub fn progress(&self, id: Id, control: &Arc<Control>, values: Values) -> bool {
        let Some(in_flight) = control.reserve(PROGRESS_IN_FLIGHT) else { return false };
        let event = Progress {
            id,
            values,
            board: Arc::clone(&self.board),
            on_event: Arc::clone(&self.on_event),
            _in_flight: in_flight,
        };
        // Not delivered (no dispatcher, or cancelled while waiting for
        // room): dropped with its reservation, as the Lua side would have.
        let _ = self.sender.deliver_raw_while(event, || !control.is_cancelled());
        true
    }

    /// From job `id`'s worker, after `Board::finish` said so: deliver its
    /// outcome, waiting for room until the pool closes.
    pub fn outcome(&self, id: Id, outcome: Outcome) {
        let event = Settled {
            id,
            outcome,
            board: Arc::clone(&self.board),
            on_event: Arc::clone(&self.on_event),
            settled: false,
        };
        let _ = self.sender.deliver_raw_while(event, || !self.board.is_closed());
    }
}

//! `take(buffer, limit)`: the drain of runners on Lua 5.1 and LuaJIT.
//!
//! There a callback cannot yield across a C function, and every drain runs
//! in a runner that a callback may want to suspend (`bgworker.runner`). So
//! this does the drain's C half only: it takes up to `limit` items, decodes
//! each, frees its data (or moves a round trip's item into its token, as
//! `drain` does) and stores what decode pushed into `buffer`, from index 1:
//! for each item the number of arguments, the function, then the
//! arguments (a round trip's function is the core's wrapper, with the token
//! and the callback before the arguments). Lua then calls them (in
//! `bgworker.drain`) where a yield can pass. It returns
//!
//! - `len, n, true` when it found the queue empty (or the run stopped),
//! - `len, n, false` when `limit` ran out first,
//! - `len, n, nil, err, traceback` when item `n`'s decode raised or pushed
//!   no function; the items before it are stored.
//!
//! `len` is the last index written, `n` counts the items taken, the failed
//! one included, as `drain`'s does. `drop_taken` cancels what a stop left
//! stored, as `stop` cancels the queue's items.
//!
//! # Invariants
//!
//! - **Every item is freed exactly once**, as in `drain`: a taken item is
//!   held by the instance until its data is freed or moved into a token,
//!   and the entry settles one that a decode error left held.
//! - **No user code runs here**: only decodes, which cannot yield. So the
//!   count and the values stored are mirrored in the instance
//!   (`DrainState::taken`, `stored`) for the entry to read after an error,
//!   and the outer drain's mirror, saved on entry, is put back at the end.

use std::ffi::c_int;
use std::ptr;

use bgworker_ffi::lua::{got, LuaResult, Raise};
use mlua::ffi::*;

use super::decode;
use super::drain::{cell, message_handler, push_failure, settle_failed, take_and_hold};
use super::owned;
use super::poll::{push_round_trip, RoundTripCell};
use crate::copy::Scratch;

// The entry's stack: buffer, limit, the message handler, the outer drain's
// count, then the loop's results.
const ENTRY_HANDLER: c_int = 3;
const ENTRY_SAVED: c_int = 4;
// The loop's stack: buffer, limit, run, then one item's values.
const LOOP_BUFFER: c_int = 1;
const LOOP_LIMIT: c_int = 2;
const LOOP_RUN: c_int = 3;

/// `take(buffer, limit)`; upvalues: the instance, the round-trip wrapper,
/// the loop.
unsafe extern "C-unwind" fn take(state: *mut lua_State) -> c_int {
    let (limit, run, saved) = match unsafe { arguments(state) } {
        Ok(arguments) => arguments,
        Err(raise) => unsafe { raise.raise(state) },
    };
    unsafe {
        lua_settop(state, 1);
        lua_pushinteger(state, limit as lua_Integer);
        lua_pushcfunction(state, message_handler);
        lua_pushinteger(state, saved as lua_Integer);
        lua_pushvalue(state, lua_upvalueindex(3));
        lua_pushvalue(state, LOOP_BUFFER);
        lua_pushinteger(state, limit as lua_Integer);
        lua_pushinteger(state, run as lua_Integer);
        let status = lua_pcall(state, 3, 3, ENTRY_HANDLER);
        finish(state, status)
    }
}

/// The limit, the run to drain (0: none) and the outer drain's count.
unsafe fn arguments(state: *mut lua_State) -> LuaResult<(c_int, u64, usize)> {
    unsafe {
        let instance = owned(state, "take")?;
        if lua_type(state, 1) != LUA_TTABLE {
            let got = got(state, 1);
            return Err(Raise::Arg(1, format!("buffer must be a table, got {got}")));
        }
        let limit = match (lua_isnumber(state, 2) != 0, lua_tonumber(state, 2)) {
            (true, n) if n >= 0.0 => n.min(c_int::MAX as f64) as c_int,
            _ => {
                let got = got(state, 2);
                return Err(Raise::Arg(2, format!("limit must be a non-negative number, got {got}")));
            }
        };
        let drain = instance.drain_state();
        drain.stored = 0;
        let saved = std::mem::take(&mut drain.taken);
        Ok((limit, instance.run_id().unwrap_or(0), saved))
    }
}

/// The loop returned or raised: put the outer count back, and return.
unsafe fn finish(state: *mut lua_State, status: c_int) -> c_int {
    unsafe {
        let cell = cell(state);
        let decode_failed = settle_failed(cell);
        let (taken, stored) = match (*cell).instance.as_mut() {
            Some(instance) => {
                let drain = instance.drain_state();
                let saved = lua_tointeger(state, ENTRY_SAVED) as usize;
                (std::mem::replace(&mut drain.taken, saved), drain.stored)
            }
            None => (0, 0),
        };
        if status == LUA_OK {
            return 3;
        }
        let error = lua_gettop(state);
        luaL_checkstack(state, 6, ptr::null());
        lua_pushinteger(state, stored as lua_Integer);
        lua_pushinteger(state, taken as lua_Integer);
        lua_pushnil(state);
        push_failure(state, error, decode_failed);
        5
    }
}

/// The loop: take, decode and store until the limit or an empty queue.
unsafe extern "C-unwind" fn take_loop(state: *mut lua_State) -> c_int {
    unsafe {
        let limit = lua_tointeger(state, LOOP_LIMIT) as c_int;
        let run = lua_tointeger(state, LOOP_RUN) as u64;
        let cell = cell(state);
        luaL_checkstack(state, LUA_MINSTACK + 2, ptr::null());
        let mut scratch = Scratch::default();
        let mut count: c_int = 0;
        let mut stored: lua_Integer = 0;
        loop {
            lua_settop(state, LOOP_RUN);
            if count >= limit {
                return results(state, stored, count, false);
            }
            let Some((decode, data, round_trip)) = take_and_hold(cell, run, &mut scratch) else {
                return results(state, stored, count, true);
            };
            count += 1;
            if let Some(instance) = (*cell).instance.as_mut() {
                instance.drain_state().taken = count as usize;
            }
            let returned = decode::call(state, decode, data, LOOP_RUN);
            let callback = lua_gettop(state) - returned + 1;
            if let Err(message) = decode::callable(state, callback, returned) {
                settle_failed(cell);
                Raise::Message(message).raise(state);
            }
            let item = (*cell).instance.as_mut().and_then(|i| i.drain_state().held.take());
            if round_trip {
                // The function is the wrapper; the token, made before the
                // item moves into it, and the callback come first.
                lua_pushvalue(state, lua_upvalueindex(2));
                let token = push_round_trip(state);
                if let Some(reply) = item.as_ref().and_then(|item| item.reply()) {
                    reply.decoded();
                }
                (*token).hold(item);
                lua_rotate(state, callback, 2);
            } else {
                // Freed now, as poll() and drain do before the callback.
                drop(item);
            }
            // From the top down: the last argument first.
            let values = lua_gettop(state) - callback + 1;
            let first = stored + 1;
            for at in (0..values).rev() {
                lua_rawseti(state, LOOP_BUFFER, (first + 1 + at as lua_Integer) as _);
            }
            lua_pushinteger(state, (values - 1) as lua_Integer);
            lua_rawseti(state, LOOP_BUFFER, first as _);
            stored = first + values as lua_Integer;
            if let Some(instance) = (*cell).instance.as_mut() {
                instance.drain_state().stored = stored as usize;
            }
        }
    }
}

unsafe fn results(state: *mut lua_State, stored: lua_Integer, count: c_int, empty: bool) -> c_int {
    unsafe {
        lua_pushinteger(state, stored);
        lua_pushinteger(state, count as lua_Integer);
        lua_pushboolean(state, empty as c_int);
    }
    3
}

/// `drop_taken(buffer, from, to)`: a stop came before the callbacks of the
/// items stored from index `from` to `to` ran. Each is cancelled, as the
/// queue's items are: a round trip's waiting thread is told so now (its
/// token is found by the wrapper as its function), and the counts move from
/// polled to cancelled. Returns how many. Upvalues: the instance, the
/// wrapper.
unsafe extern "C-unwind" fn drop_taken(state: *mut lua_State) -> c_int {
    unsafe {
        let from = luaL_checkinteger(state, 2);
        let to = luaL_checkinteger(state, 3);
        luaL_checktype(state, 1, LUA_TTABLE);
        let mut at = from;
        let mut dropped: u64 = 0;
        while at <= to {
            lua_rawgeti(state, 1, at as _);
            let arguments = lua_tointeger(state, -1);
            lua_pop(state, 1);
            lua_rawgeti(state, 1, (at + 1) as _);
            if lua_rawequal(state, -1, lua_upvalueindex(2)) != 0 {
                lua_rawgeti(state, 1, (at + 2) as _);
                if let Some(cell) = (lua_touserdata(state, -1) as *mut RoundTripCell).as_mut() {
                    cell.cancel();
                }
                lua_pop(state, 1);
            }
            lua_pop(state, 1);
            dropped += 1;
            at += 2 + arguments.max(0);
        }
        if let Some(instance) = (*cell(state)).instance.as_mut() {
            instance.note_dropped(dropped);
        }
        lua_pushinteger(state, dropped as lua_Integer);
    }
    1
}

/// Set `take` and `drop_taken` in the module table at `module`; the
/// instance userdata is at `instance`, the round-trip wrapper at `wrapper`.
pub unsafe fn open(state: *mut lua_State, module: c_int, instance: c_int, wrapper: c_int) {
    unsafe {
        lua_pushvalue(state, instance);
        lua_pushvalue(state, wrapper);
        lua_pushcclosure(state, drop_taken, 2);
        lua_setfield(state, module, c"drop_taken".as_ptr());
        lua_pushvalue(state, instance);
        lua_pushvalue(state, wrapper);
        lua_pushvalue(state, instance);
        lua_pushvalue(state, wrapper);
        lua_pushcclosure(state, take_loop, 2);
        lua_pushcclosure(state, take, 3);
        lua_setfield(state, module, c"take".as_ptr());
    }
}

//! `drain(limit)`: the dispatchers' hot path. Takes up to `limit` items,
//! decodes each and calls its callback, all inside one protected call, and
//! returns
//!
//! - `n, true` when it found the queue empty (or the run stopped),
//! - `n, false` when `limit` ran out first, or a callback called
//!   `drain_cut()`,
//! - `n, nil, err, traceback` when item `n` raised (its decode, its
//!   callback, or a round trip's result); the items before it ran.
//!
//! `n` counts every item taken, the one that raised included: a caller
//! that goes on after an error asks for `limit - n` more, so the budget
//! holds. A decode error reads "bgworker: decode raised an error: ..." and
//! is counted in `stats().errors`, as with `poll()`.
//!
//! Two C functions: the entry (`drain`) validates, then `lua_pcall`s the
//! loop (`drain_loop`) with a message handler that keeps the traceback. So
//! an item costs no protected call, no Lua-to-C return and no vararg
//! shuffle: the loop calls decode straight, frees the data, and calls the
//! callback.
//!
//! # Invariants
//!
//! - **Every item is freed exactly once.** From the moment an item leaves
//!   the queue until its data is freed, the instance owns it
//!   (`DrainState::held`), never a Rust frame: decode, user code, may leave
//!   by longjmp (a Lua error, or LuaJIT's unwinding), which skips the
//!   loop's frame. The entry, which catches every error of the loop,
//!   settles a held item first thing (finished as an error, so freed), and
//!   `Instance::close` frees one still held. A plain item's data is freed
//!   before its callback runs, as `poll()` does; a round trip's item moves
//!   from the instance into its token userdata, made before the move.
//! - **No destructor is skipped.** The loop's frames hold only integers and
//!   raw pointers whenever they call decode or a callback; `&mut Instance`
//!   is made afresh for each step and never held across user code, which
//!   may call the core too. Errors of our own are raised through
//!   `Raise::raise`, which drops its message before jumping.
//! - **The budget.** The count is the loop's local, kept across a yield as
//!   the continuation's context, and mirrored in `DrainState::taken` before
//!   each item, so that the entry reads it after an error. A drain run from
//!   a callback (a nested dispatch) saves and restores the outer one's
//!   mirror. (Drains interleaved in several coroutines share the mirror:
//!   an error raised by a callback after it yielded may be counted with
//!   another drain's items, as the Lua loop's `self.count` was.)
//! - **Yields.** On Lua 5.2 and later, decode's callback is called with
//!   `lua_callk` and the loop with `lua_pcallk`: a callback may yield
//!   across the drain. A callback that yielded ends its drain once it
//!   returns (`n, false`: the caller comes back for the rest), for the Lua
//!   layer has gone on without it meanwhile (`bgworker.runner`): other
//!   drains ran, so the count and cut mirrors belong to them, and a drain
//!   that returns after a yield neither reads nor restores them (its `n`
//!   is the loop's own count). One that raises after a yield cannot be
//!   told from one that raised in a coroutine without yielding (both come
//!   back through the continuation), so it takes the mirror's count and
//!   puts back the one it saved, as any error does: it may count another
//!   drain's items, or reset the count of a drain that it interrupted
//!   (only a callback that dispatches, inside which a displaced runner is
//!   resumed and raises, can do that). Lua 5.1 and
//!   LuaJIT have no continuations: a yield there is an error ("attempt to
//!   yield across a C-call boundary"), so the Lua layer uses this drain
//!   only where callbacks may yield (`drain_yieldable` tells where).
//! - **Stops.** The loop works for the run that was current when it
//!   started: a callback that stops the run (or stops and starts another)
//!   ends the drain as "empty".
//! - **Cuts.** `drain_cut()` sets `DrainState::cut`, which the loop reads
//!   before it takes each item: the innermost drain in progress ends after
//!   the callback that called it, as if its limit ran out. For a callback
//!   that runs callbacks of its own (a pool's carrier of events) and found
//!   the caller's time up: the items after it stay queued. Each entry
//!   starts with the flag down and puts back the outer drain's at the end,
//!   as for the count, so a cut reaches one drain only (and one made
//!   outside any drain, none).

use std::ffi::{c_int, c_void, CStr};
use std::ptr;

use bgworker_ffi::lua::{error_text, got, has_metatable, push_str, LuaResult, Raise};
use mlua::ffi::*;

use super::decode::{self, DECODE_FAILED};
use super::poll::push_round_trip;
use super::{owned, InstanceCell};
use crate::copy::Scratch;
use crate::item::DecodeFn;
use crate::status::Status;

/// Metatable of the message handler's result: the error and its traceback.
const DRAIN_ERROR_METATABLE: &CStr = c"bgworker.core.DrainError";

// The entry's stack: the limit, the message handler, the outer drain's
// count and cut (restored at the end), then the loop's results.
const ENTRY_HANDLER: c_int = 2;
const ENTRY_SAVED: c_int = 3;
const ENTRY_SAVED_CUT: c_int = 4;
// The loop's stack: the limit and the run it drains, then one item's values.
const LOOP_LIMIT: c_int = 1;
const LOOP_RUN: c_int = 2;

/// The instance cell of the running function's first upvalue (the entry
/// and the loop both have it).
unsafe fn cell(state: *mut lua_State) -> *mut InstanceCell {
    unsafe { lua_touserdata(state, lua_upvalueindex(1)) as *mut InstanceCell }
}

// ---------------------------------------------------------------------------
// Calls that may yield on Lua 5.2+, with the loop or the entry as their
// continuation.

#[cfg(any(feature = "lua53", feature = "lua54"))]
mod calls {
    use super::*;

    pub unsafe fn call_callback(state: *mut lua_State, nargs: c_int, count: c_int) {
        unsafe { lua_callk(state, nargs, 0, count as lua_KContext, Some(loop_resumed)) }
    }

    unsafe extern "C-unwind" fn loop_resumed(state: *mut lua_State, _status: c_int, count: lua_KContext) -> c_int {
        unsafe { finished(state, count as c_int, false) }
    }

    pub unsafe fn call_loop(state: *mut lua_State) -> c_int {
        unsafe {
            let status = lua_pcallk(state, 2, 2, ENTRY_HANDLER, 0, Some(entry_resumed));
            finish(state, status, false)
        }
    }

    unsafe extern "C-unwind" fn entry_resumed(state: *mut lua_State, status: c_int, _: lua_KContext) -> c_int {
        unsafe { finish(state, status, true) }
    }
}

#[cfg(feature = "lua52")]
mod calls {
    use super::*;

    pub unsafe fn call_callback(state: *mut lua_State, nargs: c_int, count: c_int) {
        unsafe { lua_callk(state, nargs, 0, count, Some(loop_resumed)) }
    }

    unsafe extern "C-unwind" fn loop_resumed(state: *mut lua_State) -> c_int {
        unsafe {
            let mut count = 0;
            lua_getctx(state, &mut count);
            finished(state, count, false)
        }
    }

    pub unsafe fn call_loop(state: *mut lua_State) -> c_int {
        unsafe {
            let status = lua_pcallk(state, 2, 2, ENTRY_HANDLER, 0, Some(entry_resumed));
            finish(state, status, false)
        }
    }

    unsafe extern "C-unwind" fn entry_resumed(state: *mut lua_State) -> c_int {
        unsafe {
            let mut ctx = 0;
            let status = lua_getctx(state, &mut ctx);
            finish(state, status, true)
        }
    }
}

#[cfg(any(feature = "lua51", feature = "luajit"))]
mod calls {
    use super::*;

    pub unsafe fn call_callback(state: *mut lua_State, nargs: c_int, _count: c_int) {
        unsafe { lua_call(state, nargs, 0) }
    }

    pub unsafe fn call_loop(state: *mut lua_State) -> c_int {
        unsafe {
            let status = lua_pcall(state, 2, 2, ENTRY_HANDLER);
            finish(state, status, false)
        }
    }
}

/// Whether callbacks run by `drain` may yield (Lua 5.2 and later).
pub const YIELDABLE: bool = cfg!(not(any(feature = "lua51", feature = "luajit")));

// ---------------------------------------------------------------------------
// The entry

/// `drain(limit)`; upvalues: the instance, the round-trip wrapper, the loop.
pub unsafe extern "C-unwind" fn drain(state: *mut lua_State) -> c_int {
    let (limit, run, (saved, saved_cut)) = match unsafe { arguments(state) } {
        Ok(arguments) => arguments,
        Err(raise) => unsafe { raise.raise(state) },
    };
    unsafe {
        lua_settop(state, 0);
        lua_pushinteger(state, limit as lua_Integer);
        lua_pushcfunction(state, message_handler);
        lua_pushinteger(state, saved as lua_Integer);
        lua_pushboolean(state, saved_cut as c_int);
        lua_pushvalue(state, lua_upvalueindex(3));
        lua_pushinteger(state, limit as lua_Integer);
        lua_pushinteger(state, run as lua_Integer);
        calls::call_loop(state)
    }
}

/// The limit, the run to drain (0: none) and the outer drain's count and
/// cut.
unsafe fn arguments(state: *mut lua_State) -> LuaResult<(c_int, u64, (usize, bool))> {
    unsafe {
        let instance = owned(state, "drain")?;
        // Beyond c_int::MAX (the count's type on Lua 5.2), the drain stops
        // there as if the limit ran out: the caller comes back for the rest.
        let limit = match (lua_isnumber(state, 1) != 0, lua_tonumber(state, 1)) {
            (true, n) if n >= 0.0 => n.min(c_int::MAX as f64) as c_int,
            _ => {
                let got = got(state, 1);
                return Err(Raise::Arg(1, format!("limit must be a non-negative number, got {got}")));
            }
        };
        let drain = instance.drain_state();
        let saved = (std::mem::take(&mut drain.taken), std::mem::take(&mut drain.cut));
        Ok((limit, instance.run_id().unwrap_or(0), saved))
    }
}

/// The loop returned (`status` OK, or YIELD after a yield) or raised.
/// `continued`: called as the continuation, which in a coroutine is also
/// how an error arrives, yield or not.
unsafe fn finish(state: *mut lua_State, status: c_int, continued: bool) -> c_int {
    unsafe {
        if continued && status == LUA_YIELD {
            // Returned after a yield: the mirrors are another drain's now.
            return 2;
        }
        // Before anything that could raise: settle the item a decode left.
        let cell = cell(state);
        let decode_failed = settle_failed(cell);
        let taken = match (*cell).instance.as_mut() {
            Some(instance) => {
                let drain = instance.drain_state();
                drain.cut = lua_toboolean(state, ENTRY_SAVED_CUT) != 0;
                std::mem::replace(&mut drain.taken, lua_tointeger(state, ENTRY_SAVED) as usize)
            }
            None => 0,
        };
        if status == LUA_OK || status == LUA_YIELD {
            return 2;
        }
        let error = lua_gettop(state);
        luaL_checkstack(state, 6, ptr::null());
        lua_pushinteger(state, taken as lua_Integer);
        lua_pushnil(state);
        if is_drain_error(state, error) {
            lua_rawgeti(state, error, 1);
            lua_rawgeti(state, error, 2);
        } else {
            // No traceback: a memory error, or one in the message handler.
            lua_pushvalue(state, error);
            lua_pushnil(state);
        }
        if decode_failed {
            let message = format!("{DECODE_FAILED}{}", error_text(state, -2));
            push_str(state, &message);
            drop(message);
            lua_replace(state, -3);
            if lua_type(state, -1) == LUA_TSTRING {
                push_str(state, DECODE_FAILED);
                lua_insert(state, -2);
                lua_concat(state, 2);
            }
        }
        4
    }
}

unsafe fn is_drain_error(state: *mut lua_State, index: c_int) -> bool {
    unsafe { lua_type(state, index) == LUA_TTABLE && has_metatable(state, index, DRAIN_ERROR_METATABLE) }
}

/// The loop's message handler: runs where the error was raised, and
/// returns `{ err, traceback }` (marked by its metatable), the traceback
/// starting with the error as text, like `bgworker.protect`'s.
unsafe extern "C-unwind" fn message_handler(state: *mut lua_State) -> c_int {
    unsafe {
        let text = error_text(state, 1);
        push_str(state, &text);
        drop(text);
        // Level 1: the function that raised (`error`, or decode).
        luaL_traceback(state, state, lua_tostring(state, -1), 1);
        lua_createtable(state, 2, 0);
        lua_pushvalue(state, 1);
        lua_rawseti(state, -2, 1);
        lua_pushvalue(state, -2);
        lua_rawseti(state, -2, 2);
        luaL_getmetatable(state, DRAIN_ERROR_METATABLE.as_ptr());
        lua_setmetatable(state, -2);
    }
    1
}

// ---------------------------------------------------------------------------
// The loop

/// The loop function: `limit` and the run id as arguments.
unsafe extern "C-unwind" fn drain_loop(state: *mut lua_State) -> c_int {
    unsafe { run_loop(state) }
}

/// Drain until the limit, a cut, a yield (see "Yields") or an empty queue.
unsafe fn run_loop(state: *mut lua_State) -> c_int {
    let mut count: c_int = 0;
    unsafe {
        let limit = lua_tointeger(state, LOOP_LIMIT) as c_int;
        let run = lua_tointeger(state, LOOP_RUN) as u64;
        let cell = cell(state);
        // Decode gets at least the room a C function starts with.
        luaL_checkstack(state, LUA_MINSTACK + 2, ptr::null());
        // Decode's copy of a copied record: in this frame (see `copy.rs`).
        let mut scratch = Scratch::default();
        loop {
            lua_settop(state, LOOP_RUN);
            if count >= limit || cut(cell) {
                return finished(state, count, false);
            }
            let Some((decode, data, round_trip)) = take_and_hold(cell, run, &mut scratch) else {
                return finished(state, count, true);
            };
            count += 1;
            if let Some(instance) = (*cell).instance.as_mut() {
                instance.drain_state().taken = count as usize;
            }
            // An error of decode's leaves the item held: the entry reports
            // it as decode's.
            let returned = decode::call(state, decode, data, LOOP_RUN);
            let callback = lua_gettop(state) - returned + 1;
            if let Err(message) = decode::callable(state, callback, returned) {
                settle_failed(cell);
                Raise::Message(message).raise(state);
            }
            if round_trip {
                // `wrapper, token, callback, args...`: the wrapper calls the
                // callback and completes the round trip through the token,
                // made before the item moves into it.
                lua_pushvalue(state, lua_upvalueindex(2));
                let token = push_round_trip(state);
                let item = (*cell).instance.as_mut().and_then(|i| i.drain_state().held.take());
                if let Some(reply) = item.as_ref().and_then(|item| item.reply()) {
                    reply.decoded();
                }
                (*token).hold(item);
                lua_rotate(state, callback, 2);
                calls::call_callback(state, returned + 1, count);
            } else {
                // Freed before the callback runs, as poll() does.
                drop((*cell).instance.as_mut().and_then(|i| i.drain_state().held.take()));
                calls::call_callback(state, returned - 1, count);
            }
        }
    }
}

/// A callback asked the drain to end (`drain_cut`).
unsafe fn cut(cell: *mut InstanceCell) -> bool {
    unsafe { (*cell).instance.as_mut() }.is_some_and(|instance| instance.drain_state().cut)
}

/// Take the next item of `run` and hold it in the instance: its decode,
/// data (in `scratch` for a copied record), and whether it is a round trip.
/// `None` when the queue is empty, or the run stopped or changed.
unsafe fn take_and_hold(
    cell: *mut InstanceCell,
    run: u64,
    scratch: &mut Scratch,
) -> Option<(DecodeFn, *mut c_void, bool)> {
    let instance = unsafe { (*cell).instance.as_mut() }?;
    if instance.run_id() != Some(run) {
        return None;
    }
    let (item, data) = decode::next(instance, scratch)?;
    let taken = (item.decode, data, item.round_trip().is_some());
    instance.drain_state().held = Some(item);
    Some(taken)
}

/// The held item failed (decode raised, or pushed something unusable):
/// finish it as an error, so free it. Whether there was one.
unsafe fn settle_failed(cell: *mut InstanceCell) -> bool {
    let Some(instance) = (unsafe { (*cell).instance.as_mut() }) else {
        return false;
    };
    let Some(item) = instance.drain_state().held.take() else {
        return false;
    };
    item.finish(Status::Error);
    instance.note_error();
    true
}

/// `drain_cut()`; upvalue: the instance. Raises nothing: with no drain in
/// progress it does nothing.
unsafe extern "C-unwind" fn drain_cut(state: *mut lua_State) -> c_int {
    unsafe {
        if let Some(instance) = (*cell(state)).instance.as_mut() {
            instance.drain_state().cut = true;
        }
    }
    0
}

unsafe fn finished(state: *mut lua_State, count: c_int, empty: bool) -> c_int {
    unsafe {
        lua_pushinteger(state, count as lua_Integer);
        lua_pushboolean(state, empty as c_int);
    }
    2
}

/// Register the error metatable and set `drain`, `drain_cut` and
/// `drain_yieldable` in the module table at `module`. The instance userdata is at `instance`,
/// the round-trip wrapper at `wrapper`.
pub unsafe fn open(state: *mut lua_State, module: c_int, instance: c_int, wrapper: c_int) {
    unsafe {
        luaL_newmetatable(state, DRAIN_ERROR_METATABLE.as_ptr());
        lua_pop(state, 1);
        lua_pushvalue(state, instance);
        lua_pushvalue(state, wrapper);
        lua_pushvalue(state, instance);
        lua_pushvalue(state, wrapper);
        lua_pushcclosure(state, drain_loop, 2);
        lua_pushcclosure(state, drain, 3);
        lua_setfield(state, module, c"drain".as_ptr());
        lua_pushvalue(state, instance);
        lua_pushcclosure(state, drain_cut, 1);
        lua_setfield(state, module, c"drain_cut".as_ptr());
        lua_pushboolean(state, YIELDABLE as c_int);
        lua_setfield(state, module, c"drain_yieldable".as_ptr());
    }
}

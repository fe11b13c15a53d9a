//! `poll()`: take one item, decode it on the Lua thread, free it; and the
//! round trip's way back to the waiting thread.
//!
//! Decode and result are utility-library code that may raise Lua errors, so
//! both run under `lua_pcall` through a trampoline: an error unwinds to the
//! pcall, never through a Rust frame that owns the item. The item is then
//! dropped (freed) on the Rust side, and only afterwards is the error raised.

use std::ffi::{c_int, c_void, CStr};
use std::ptr;

use bgworker_ffi::lua::{error_text, LuaResult, Raise};
use mlua::ffi::*;

use super::decode::{self, DECODE_FAILED};
use super::{instance, owned};
use crate::copy::Scratch;
use crate::fork;
use crate::item::{DecodeFn, Item, ResultFn};
use crate::status::Status;

const ROUND_TRIP_METATABLE: &CStr = c"bgworker.core.RoundTrip";

/// A round trip between decode and its completion: owns the item, so data
/// stays alive for `result`. Dropped unfinished (the callback was never
/// completed, or the state closed): the waiter gets `BGW_CANCELLED`.
///
/// In a forked child, an inherited one is left alone: its waiter is a
/// thread of the parent, whose lock this process must not take.
pub struct RoundTripCell {
    item: Option<Item>,
    generation: u64,
}

impl RoundTripCell {
    /// Give the token its item (it is made empty, before the item moves).
    pub fn hold(&mut self, item: Option<Item>) {
        self.item = item;
    }

    /// The item, unless this process inherited it through fork(): then it
    /// is forgotten, never freed nor finished here.
    fn take(&mut self) -> Option<Item> {
        let item = self.item.take();
        if self.generation == fork::generation() {
            return item;
        }
        std::mem::forget(item);
        None
    }
}

/// `poll()`: decode's values, or nothing when the queue is empty.
///
/// Decode is user code: it may collect a guard, which stops the run. So
/// the instance is looked up again after it, never held across it.
pub unsafe fn poll(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        // Decode's copy of a copied record: in this frame (see `copy.rs`).
        let mut scratch = Scratch::default();
        let Some((item, data)) = decode::next(owned(state, "poll")?, &mut scratch) else {
            return Ok(0);
        };
        let base = lua_gettop(state);
        // The trampoline, made once (`push_poll`): on Lua 5.1 and LuaJIT
        // each lua_pushcfunction would make a new closure, garbage per item.
        lua_pushvalue(state, lua_upvalueindex(3));
        lua_pushlightuserdata(state, item.decode as *mut c_void);
        lua_pushlightuserdata(state, data);
        let decoded = match lua_pcall(state, 2, LUA_MULTRET, 0) {
            LUA_OK => decode::callable(state, base + 1, lua_gettop(state) - base),
            _ => Err(format!("{DECODE_FAILED}{}", error_text(state, -1))),
        };
        if let Err(message) = decoded {
            lua_settop(state, base);
            note_error(state);
            item.finish(Status::Error);
            return Err(Raise::Message(message));
        }
        let count = lua_gettop(state) - base;
        let Some(reply) = item.reply() else {
            drop(item);
            return Ok(count);
        };
        reply.decoded();
        // Return `wrapper, token, callback, args...`: the wrapper calls
        // the callback and completes the round trip through the token.
        luaL_checkstack(state, 2, ptr::null());
        lua_pushvalue(state, lua_upvalueindex(2));
        (*push_round_trip(state)).hold(Some(item));
        lua_rotate(state, base + 1, 2);
        Ok(count + 2)
    }
}

/// Push `poll`: a closure of the instance userdata at `instance_index`,
/// the round-trip wrapper at `wrapper_index` (upvalues 1 and 2, as every
/// function of the module has), and the decode trampoline.
pub unsafe fn push_poll(state: *mut lua_State, instance_index: c_int, wrapper_index: c_int) {
    unsafe {
        lua_pushvalue(state, instance_index);
        lua_pushvalue(state, wrapper_index);
        lua_pushcfunction(state, decode_trampoline);
        lua_pushcclosure(state, super::core_poll, 3);
    }
}

/// Count a failed decode, callback or result, if the state is still open.
unsafe fn note_error(state: *mut lua_State) {
    if let Ok(instance) = unsafe { instance(state) } {
        instance.note_error();
    }
}

unsafe extern "C-unwind" fn decode_trampoline(state: *mut lua_State) -> c_int {
    unsafe {
        // Poll pushed these two light userdata: decode and its data.
        let decode: DecodeFn = std::mem::transmute::<*mut c_void, DecodeFn>(lua_touserdata(state, 1));
        let data = lua_touserdata(state, 2);
        lua_settop(state, 0);
        decode::call(state, decode, data, 0)
    }
}

unsafe extern "C-unwind" fn result_trampoline(state: *mut lua_State) -> c_int {
    unsafe {
        // Complete pushed result and its data, then the values.
        let result: ResultFn = std::mem::transmute::<*mut c_void, ResultFn>(lua_touserdata(state, 1));
        let data = lua_touserdata(state, 2);
        result(state.cast(), data, lua_gettop(state) - 2);
    }
    0
}

/// Push a new, empty round-trip token; `hold` gives it its item. Made
/// empty so that a memory error here cannot leak an item.
pub unsafe fn push_round_trip(state: *mut lua_State) -> *mut RoundTripCell {
    unsafe {
        let cell = lua_newuserdata(state, std::mem::size_of::<RoundTripCell>()) as *mut RoundTripCell;
        ptr::write(cell, RoundTripCell { item: None, generation: fork::generation() });
        luaL_getmetatable(state, ROUND_TRIP_METATABLE.as_ptr());
        lua_setmetatable(state, -2);
        cell
    }
}

unsafe extern "C-unwind" fn round_trip_gc(state: *mut lua_State) -> c_int {
    // Only set as __gc of RoundTripCell userdata.
    if let Some(cell) = unsafe { (lua_touserdata(state, 1) as *mut RoundTripCell).as_mut() } {
        drop(cell.take());
    }
    0
}

/// `complete(token, ok, ...)`, called by the wrapper with the callback's
/// pcall results. Hands the values to `result` and releases the waiter;
/// returns the values, or re-raises the callback's error.
pub unsafe fn complete(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let cell = luaL_checkudata(state, 1, ROUND_TRIP_METATABLE.as_ptr()) as *mut RoundTripCell;
        if (*cell).generation != fork::generation() {
            drop((*cell).take());
            return Err(Raise::Message(
                "bgworker: this round trip was polled before fork(); its caller waits in the parent".into(),
            ));
        }
        let Some(item) = (*cell).take() else {
            return Err(Raise::Message("bgworker: this round trip is already complete".into()));
        };
        let values = lua_gettop(state) - 2;
        if lua_toboolean(state, 2) == 0 {
            note_error(state);
            item.finish(Status::Error);
            lua_settop(state, 3);
            return Err(Raise::Value);
        }
        let round_trip = item.round_trip().expect("a round-trip token holds a round trip");
        if !round_trip.reply.begin_result() {
            // The caller timed out while the callback ran: nobody to hand values to.
            drop(item);
            return Ok(values);
        }
        luaL_checkstack(state, values + 3, ptr::null());
        lua_pushcfunction(state, result_trampoline);
        lua_pushlightuserdata(state, round_trip.result as *mut c_void);
        lua_pushlightuserdata(state, item.data().expect("a round trip carries the caller's data"));
        for index in 3..3 + values {
            lua_pushvalue(state, index);
        }
        if lua_pcall(state, values + 2, 0, 0) != LUA_OK {
            let message =
                format!("bgworker: a round trip's result function raised an error: {}", error_text(state, -1));
            note_error(state);
            item.finish(Status::Error);
            return Err(Raise::Message(message));
        }
        item.finish(Status::Ok);
        Ok(values)
    }
}

/// Register the round-trip metatable and build the wrapper: pushes it.
/// `instance_index` holds the instance userdata.
pub unsafe fn open(state: *mut lua_State, instance_index: c_int) {
    unsafe {
        luaL_newmetatable(state, ROUND_TRIP_METATABLE.as_ptr());
        lua_pushcfunction(state, round_trip_gc);
        lua_setfield(state, -2, c"__gc".as_ptr());
        lua_pop(state, 1);

        let chunk = include_str!("round_trip.lua");
        if luaL_loadbuffer(state, chunk.as_ptr().cast(), chunk.len(), c"=bgworker.core.round_trip".as_ptr()) != LUA_OK {
            lua_error(state);
        }
        lua_pushvalue(state, instance_index);
        lua_pushcclosure(state, super::core_complete, 1);
        // Lua 5.1's pcall cannot be yielded across; LuaJIT's and 5.2's can.
        lua_pushboolean(state, cfg!(feature = "lua51") as c_int);
        lua_call(state, 2, 1);
    }
}

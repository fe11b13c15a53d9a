//! One item's decode, as `poll()` and `drain()` both run it: which item is
//! next, decode's call, the checks of what it pushed, and their messages.
//!
//! The drain calls these once per item: they are inlined, and allocate
//! only for an error's message.
//!
//! Decode is utility-library code that may raise. Both callers run it
//! where its error reaches a protected call, never a Rust frame that owns
//! the item (poll.rs and drain.rs say how), and both report an error of
//! decode's, or a count that is not what it pushed, as [`DECODE_FAILED`]
//! followed by the error.

use std::ffi::{c_int, c_void};

use bgworker_ffi::lua::type_name;
use mlua::ffi::*;

use crate::copy::Scratch;
use crate::instance::Instance;
use crate::item::{DecodeFn, Item};

/// How the message of a decode that raised begins.
pub const DECODE_FAILED: &str = "bgworker: decode raised an error: ";

/// The next item to decode and decode's data (a copied record's in
/// `scratch`). A round trip whose caller timed out while it was queued is
/// dropped unrun: nobody waits for it.
#[inline]
pub fn next(instance: &mut Instance, scratch: &mut Scratch) -> Option<(Item, *mut c_void)> {
    loop {
        let (item, data) = instance.take_next(scratch)?;
        if let Some(reply) = item.reply() {
            if !reply.begin_decode() {
                continue;
            }
        }
        return Some((item, data));
    }
}

/// Call `decode` with `data`, with the stack above `base` for its values,
/// and return how many it says it pushed: the top ones. A count it did
/// not push is raised as its error.
#[inline]
pub unsafe fn call(state: *mut lua_State, decode: DecodeFn, data: *mut c_void, base: c_int) -> c_int {
    unsafe {
        let returned = decode(state.cast(), data);
        let pushed = lua_gettop(state) - base;
        if returned < 0 || returned > pushed {
            lua_pushfstring(state, c"decode returned %d but pushed %d values".as_ptr(), returned, pushed);
            lua_error(state);
        }
        returned
    }
}

/// Whether decode's `count` values, from stack index `first`, can be
/// called: a function first. The message when not.
#[inline]
pub unsafe fn callable(state: *mut lua_State, first: c_int, count: c_int) -> Result<(), String> {
    if count > 0 && unsafe { lua_type(state, first) } == LUA_TFUNCTION {
        return Ok(());
    }
    Err(unsafe { not_callable(state, first, count) })
}

#[cold]
unsafe fn not_callable(state: *mut lua_State, first: c_int, count: c_int) -> String {
    let pushed = match count {
        0 => "nothing".to_string(),
        _ => format!("a {} first", unsafe { type_name(state, first) }),
    };
    format!("bgworker: decode must push a function first; it pushed {pushed}")
}

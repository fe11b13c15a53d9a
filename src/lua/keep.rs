//! Keeping the loop alive: `bgw_api.ref` and `unref`, `core.keepers()`
//! and `core.on_keep(fn)`.
//!
//! As with libuv's handles and Node-API's thread-safe functions, a handle
//! of a utility library keeps its Lua state's loop alive from `acquire` on,
//! until `unref` or its release. The count of such handles is the
//! instance's (`Shared::keep`); the Lua layer reads it with `keepers()`,
//! and hears of each change between none and some through the function
//! given to `on_keep`: at once when it happens on the Lua thread (acquire,
//! ref, unref), through a wake-up when the last keeper is released on
//! another thread (`capi::release`). Only readers that listen are woken:
//! the loops that never end by themselves do not hook `on_keep`, and get
//! no extra wake-ups.

use std::ffi::{c_int, c_void, CStr};

use bgworker_ffi::lua::{got, LuaResult, Raise};
use mlua::ffi::*;

use crate::capi::{self, Handle};
use crate::status::Status;

/// Registry field holding the function given to `on_keep`.
const HOOK_KEY: &CStr = c"bgworker.core.on_keep";

/// Call the `on_keep` function, if any, in protected mode: the C functions
/// that call this never raise, and its errors are the Lua layer's to
/// report, so they are dropped here. Leaves the stack as it was.
///
/// # Safety
/// `state` is valid, on its thread.
pub unsafe fn notify(state: *mut lua_State) {
    unsafe {
        if lua_checkstack(state, 2) == 0 {
            return;
        }
        let top = lua_gettop(state);
        lua_getfield(state, LUA_REGISTRYINDEX, HOOK_KEY.as_ptr());
        if lua_type(state, -1) == LUA_TFUNCTION {
            lua_pcall(state, 0, 0, 0);
        }
        lua_settop(state, top);
    }
}

/// `bgw_api.ref` and `unref`: the handle keeps the loop alive, or no longer.
unsafe fn set_kept(state: *mut c_void, handle: *mut Handle, kept: bool) -> c_int {
    // SAFETY: the contract: a handle from acquire, or NULL.
    match unsafe { capi::set_kept(handle, kept) } {
        Ok(changed) => {
            if changed {
                unsafe { notify(state as *mut lua_State) };
            }
            Status::Ok.code()
        }
        Err(status) => status.code(),
    }
}

/// `bgw_api.ref`.
pub unsafe extern "C-unwind" fn ref_(state: *mut c_void, handle: *mut Handle) -> c_int {
    unsafe { set_kept(state, handle, true) }
}

/// `bgw_api.unref`.
pub unsafe extern "C-unwind" fn unref(state: *mut c_void, handle: *mut Handle) -> c_int {
    unsafe { set_kept(state, handle, false) }
}

/// `keepers()`: how many handles keep the loop alive now.
pub unsafe fn keepers(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let keepers = super::instance(state)?.shared().keepers();
        lua_pushinteger(state, keepers as lua_Integer);
    }
    Ok(1)
}

/// `on_keep(fn)`: call `fn()` when the handles that keep the loop alive go
/// from none to some or back, and wake the reader when the last one is
/// released on another thread; `on_keep(nil)` forgets it, and no longer
/// wakes the reader for that.
pub unsafe fn on_keep(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        match lua_type(state, 1) {
            LUA_TFUNCTION | LUA_TNIL => {}
            _ => {
                let got = got(state, 1);
                return Err(Raise::Arg(1, format!("fn must be a function or nil, got {got}")));
            }
        }
        let hooked = lua_type(state, 1) == LUA_TFUNCTION;
        super::instance(state)?.shared().wake_when_unkept(hooked);
        lua_settop(state, 1);
        lua_setfield(state, LUA_REGISTRYINDEX, HOOK_KEY.as_ptr());
    }
    Ok(0)
}

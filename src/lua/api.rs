//! The registry side of the C contract: publishing `bgw_api`, `acquire`,
//! `set_capacity`, the two lifetime guarantees the header makes, and the
//! fork handlers' installation.
//!
//! 1. *bgworker stays loaded.* Handles outlive their state, and their
//!    functions live in this library; `lua_close` would otherwise unload it
//!    under a thread that still delivers. `luaopen` pins it
//!    (`bgworker_ffi::library`).
//! 2. *Pending items are freed while utility libraries are loaded.* The
//!    state closes the instance from a finaliser; finalisers run newest
//!    first (Lua 5.1 and LuaJIT: reverse creation; 5.2+: reverse marking),
//!    and a utility library that acquires a handle was loaded before that
//!    call. So every `acquire` installs a fresh *closer* userdata, newer
//!    than the library, whose finaliser closes the instance. Replaced
//!    closers do nothing when collected: only the current one acts.

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use mlua::ffi::*;

use super::{InstanceCell, INSTANCE_KEY};
use crate::capi::{self, Api, Handle, API_VERSION};
use crate::fork;
use crate::instance::CapacityError;
use crate::status::{self, Status};

/// `BGW_REGISTRY_KEY` of the header.
const API_KEY: &CStr = c"bgworker.api";
const CLOSER_KEY: &CStr = c"bgworker.core.closer";
const CLOSER_METATABLE: &CStr = c"bgworker.core.Closer";

static API: Api = Api {
    version: API_VERSION,
    size: std::mem::size_of::<Api>(),
    acquire,
    release: capi::release,
    deliver: capi::deliver,
    call: capi::call,
    strerror: status::strerror,
    set_capacity,
    token_get: super::token::token_get,
    token_cancelled: capi::token_cancelled,
    token_release: capi::token_release,
    deliver_copy: capi::deliver_copy,
    r#ref: super::keep::ref_,
    unref: super::keep::unref,
};

pub unsafe fn publish(state: *mut lua_State) {
    unsafe {
        lua_pushlightuserdata(state, &API as *const Api as *mut c_void);
        lua_setfield(state, LUA_REGISTRYINDEX, API_KEY.as_ptr());
    }
}

/// The instance cell of `state`, if `bgworker.core` was opened in it.
unsafe fn instance_cell<'a>(state: *mut lua_State) -> Option<&'a mut InstanceCell> {
    unsafe {
        lua_getfield(state, LUA_REGISTRYINDEX, INSTANCE_KEY.as_ptr());
        let cell = lua_touserdata(state, -1) as *mut InstanceCell;
        lua_pop(state, 1);
        cell.as_mut()
    }
}

/// `bgw_api.acquire`.
unsafe extern "C-unwind" fn acquire(state: *mut c_void) -> *mut Handle {
    let state = state as *mut lua_State;
    unsafe {
        let Some(instance) = instance_cell(state).and_then(|cell| cell.instance.as_ref()) else {
            return std::ptr::null_mut();
        };
        if instance.is_closed() {
            return std::ptr::null_mut();
        }
        // First the closer: it may raise (out of memory), and must not leak a handle when it does.
        install_closer(state);
        let (handle, first_keeper) = capi::new_handle(instance.shared());
        if first_keeper {
            super::keep::notify(state);
        }
        handle
    }
}

/// `bgw_api.set_capacity`.
unsafe extern "C-unwind" fn set_capacity(state: *mut c_void, capacity: usize) -> c_int {
    let state = state as *mut lua_State;
    let status = match unsafe { instance_cell(state) }.and_then(|cell| cell.instance.as_mut()) {
        Some(instance) if !instance.is_closed() => match instance.set_capacity((capacity > 0).then_some(capacity)) {
            Ok(()) => Status::Ok,
            Err(CapacityError::TooLarge) => Status::Invalid,
            Err(CapacityError::Inherited(_)) => Status::Closed,
        },
        _ => Status::Closed,
    };
    status.code()
}

unsafe fn install_closer(state: *mut lua_State) {
    unsafe {
        lua_newuserdata(state, 1);
        if luaL_newmetatable(state, CLOSER_METATABLE.as_ptr()) != 0 {
            lua_pushcfunction(state, closer_gc);
            lua_setfield(state, -2, c"__gc".as_ptr());
        }
        lua_setmetatable(state, -2);
        lua_setfield(state, LUA_REGISTRYINDEX, CLOSER_KEY.as_ptr());
    }
}

unsafe extern "C-unwind" fn closer_gc(state: *mut lua_State) -> c_int {
    unsafe {
        lua_getfield(state, LUA_REGISTRYINDEX, CLOSER_KEY.as_ptr());
        let current = lua_touserdata(state, -1) == lua_touserdata(state, 1);
        lua_pop(state, 1);
        if current {
            if let Some(cell) = instance_cell(state) {
                drop(cell.instance.take());
            }
        }
    }
    0
}

/// Start counting forks and install the quiet lock's handlers (`fork.rs`),
/// once per process. A swap rather than a `Once`, as in
/// `bgworker_ffi::fork::watch`.
pub fn watch_forks() {
    bgworker_ffi::fork::watch();
    static WATCHING: AtomicBool = AtomicBool::new(false);
    if !WATCHING.swap(true, Relaxed) {
        // The handlers are in this library, which stays loaded (guarantee 1).
        unsafe { libc::pthread_atfork(Some(fork::prepare), Some(fork::release), Some(fork::release)) };
    }
}

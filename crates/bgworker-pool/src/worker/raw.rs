//! Small tools for the C API paths of this crate (the hot ones: submit,
//! events, a worker's task), where an mlua call per job costs more than the
//! job.
//!
//! PUC Lua raises errors by `longjmp`, which must not cross a Rust frame
//! that owns a value with a destructor. So code that calls something that
//! may raise either owns nothing (it borrows), or runs it through
//! [`protect`]; and functions called by Lua return a `Result` from an
//! inner function, raised by [`raise`] once that frame is gone.

use std::ffi::{c_int, c_void, CStr};
use std::ptr;

use mlua::ffi::*;

/// # Safety
/// `state` is valid and has a free stack slot.
pub unsafe fn push_str(state: *mut lua_State, s: &[u8]) {
    unsafe { lua_pushlstring(state, s.as_ptr().cast(), s.len()) };
}

/// The bytes of the string at `index` (not converted from a number), or
/// `None`.
///
/// # Safety
/// `state` is valid; the bytes live as long as the value stays on the stack.
pub unsafe fn bytes_at<'a>(state: *mut lua_State, index: c_int) -> Option<&'a [u8]> {
    unsafe {
        if lua_type(state, index) != LUA_TSTRING {
            return None;
        }
        let mut len = 0;
        let data = lua_tolstring(state, index, &mut len);
        Some(std::slice::from_raw_parts(data.cast(), len))
    }
}

/// The light userdata stored in the registry under `key` (an address of
/// this library), as a `*const T`: null when there is none.
///
/// # Safety
/// `state` is valid and has a free stack slot.
pub unsafe fn registry_pointer<T>(state: *mut lua_State, key: *const c_void) -> *const T {
    unsafe {
        lua_rawgetp(state, LUA_REGISTRYINDEX, key);
        let pointer = lua_touserdata(state, -1) as *const T;
        lua_pop(state, 1);
        pointer
    }
}

/// The type name of the value at `index`.
///
/// # Safety
/// `state` is valid.
pub unsafe fn type_name(state: *mut lua_State, index: c_int) -> &'static str {
    let name = unsafe { CStr::from_ptr(lua_typename(state, lua_type(state, index))) };
    // Lua's type names are static ASCII strings.
    name.to_str().unwrap_or("?")
}

type Body<'a> = &'a mut dyn FnMut(*mut lua_State) -> c_int;

unsafe extern "C-unwind" fn trampoline(state: *mut lua_State) -> c_int {
    unsafe {
        // SAFETY: `protect` passes a pointer to its body, alive while it waits.
        let body = &mut *(lua_touserdata(state, 1) as *mut Body);
        lua_remove(state, 1);
        body(state)
    }
}

/// Run `body` under `lua_pcall`, with the `nargs` values on top of the
/// stack moved onto its own stack (at 1..=nargs), and the message handler
/// at stack index `handler` (0: none). The values it returns (its count)
/// are left in their place, and `Ok` says how many; if it raises, its
/// error is left there instead (what the handler made of it), and `Err`.
/// `body` may raise, and must own nothing with a destructor when it does.
///
/// # Safety
/// `state` is valid, on its thread, with `nargs` values on its stack
/// above `handler`.
pub unsafe fn protect(
    state: *mut lua_State,
    handler: c_int,
    nargs: c_int,
    mut body: impl FnMut(*mut lua_State) -> c_int,
) -> Result<c_int, ()> {
    unsafe {
        let base = lua_gettop(state) - nargs;
        if lua_checkstack(state, 2) == 0 {
            lua_settop(state, base);
            push_str(state, b"stack overflow");
            return Err(());
        }
        let mut body: Body = &mut body;
        lua_pushcfunction(state, trampoline);
        lua_insert(state, base + 1);
        lua_pushlightuserdata(state, &mut body as *mut Body as *mut c_void);
        lua_insert(state, base + 2);
        match lua_pcall(state, nargs + 1, LUA_MULTRET, handler) {
            LUA_OK => Ok(lua_gettop(state) - base),
            _ => Err(()),
        }
    }
}

/// `tostring(value at index)`, through `__tostring`, which may raise: then
/// a description of its type. Leaves the stack as it was.
///
/// # Safety
/// `state` is valid, on its thread.
pub unsafe fn describe(state: *mut lua_State, index: c_int) -> String {
    unsafe {
        let base = lua_gettop(state);
        let what = type_name(state, index);
        lua_pushvalue(state, index);
        let converted = protect(state, 0, 1, |inner| {
            luaL_tolstring(inner, 1, ptr::null_mut());
            1
        });
        let text = match (converted, bytes_at(state, -1)) {
            (Ok(_), Some(text)) => String::from_utf8_lossy(text).into_owned(),
            _ => format!("(a {what} value that tostring fails on)"),
        };
        lua_settop(state, base);
        text
    }
}

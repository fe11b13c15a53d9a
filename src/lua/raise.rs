//! Raising Lua errors from Rust without skipping Rust destructors.
//!
//! `lua_error` and `luaL_argerror` leave the C function by `longjmp`, which
//! must not cross a Rust frame that still owns a value with a destructor.
//! So binding functions return `Result<_, Raise>` from an inner function,
//! and only the thin `extern` wrapper raises, after everything is dropped:
//! `Raise::raise` moves its message onto the Lua stack and drops its own
//! `String` before it jumps.

use std::ffi::c_int;

use mlua::ffi::*;

use super::args::{string_at, type_name};

pub enum Raise {
    /// `bad argument #n to 'f' (message)`.
    Arg(c_int, String),
    /// A message of our own, raised as a string.
    Message(String),
    /// Raise the value on top of the stack as it is.
    Value,
}

impl Raise {
    /// Only from the `extern` wrapper of a C function that Lua called.
    pub unsafe fn raise(self, state: *mut lua_State) -> ! {
        unsafe {
            match self {
                Raise::Arg(arg, message) => {
                    push_str(state, &message);
                    drop(message);
                    luaL_argerror(state, arg, lua_tostring(state, -1));
                    unreachable!("luaL_argerror returned")
                }
                Raise::Message(message) => {
                    push_str(state, &message);
                    drop(message);
                    lua_error(state)
                }
                Raise::Value => lua_error(state),
            }
        }
    }
}

pub type LuaResult<T> = Result<T, Raise>;

pub unsafe fn push_str(state: *mut lua_State, s: &str) {
    unsafe { lua_pushlstring(state, s.as_ptr().cast(), s.len()) };
}

/// A readable form of an error value, for messages that wrap it: strings
/// and numbers as they are, other values through `__tostring` (mlua's error
/// objects have one), else their type.
///
/// `__tostring` is user code that may raise, and our callers may own values
/// with destructors, so it runs under `lua_pcall`. Needs two free stack
/// slots.
pub unsafe fn error_text(state: *mut lua_State, index: c_int) -> String {
    unsafe {
        let index = lua_absindex(state, index);
        if lua_type(state, index) != LUA_TSTRING && lua_type(state, index) != LUA_TNUMBER {
            lua_pushcfunction(state, to_string);
            lua_pushvalue(state, index);
            let converted = lua_pcall(state, 1, 1, 0) == LUA_OK && lua_type(state, -1) == LUA_TSTRING;
            let text = match converted {
                true => string_at(state, -1).unwrap_or_default(),
                false => format!("(error object is a {} value)", type_name(state, index)),
            };
            lua_pop(state, 1);
            return text;
        }
        let mut len = 0;
        let ptr = lua_tolstring(state, index, &mut len);
        String::from_utf8_lossy(std::slice::from_raw_parts(ptr.cast(), len)).into_owned()
    }
}

unsafe extern "C-unwind" fn to_string(state: *mut lua_State) -> c_int {
    unsafe {
        if luaL_getmetafield(state, 1, c"__tostring".as_ptr()) == LUA_TNIL {
            return 0;
        }
        lua_pop(state, 1);
        luaL_tolstring(state, 1, std::ptr::null_mut());
    }
    1
}

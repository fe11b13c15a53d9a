//! Raising Lua errors from Rust without skipping Rust destructors.
//!
//! `lua_error` and `luaL_argerror` leave the C function by `longjmp`, which
//! must not cross a Rust frame that still owns a value with a destructor.
//! So binding functions return `Result<_, Raise>` from an inner function,
//! and only the thin `extern` wrapper raises, after everything is dropped:
//! `Raise::raise` moves its message onto the Lua stack and drops its own
//! `String` before it jumps.

use std::ffi::{c_int, CStr};

use mlua::ffi::*;

pub enum Raise {
    /// `bad argument #n to 'f' (message)`.
    Arg(c_int, String),
    /// A message of our own, raised as a string.
    Message(String),
    /// Raise the value on top of the stack as it is.
    Value,
}

impl Raise {
    /// # Safety
    /// `state` is the running state, inside a C function called by Lua.
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

/// # Safety
/// `state` is valid and has a free stack slot.
pub unsafe fn push_str(state: *mut lua_State, s: &str) {
    unsafe { lua_pushlstring(state, s.as_ptr().cast(), s.len()) };
}

/// The type name of the value at `index`, for messages.
///
/// # Safety
/// `state` is valid.
pub unsafe fn type_name(state: *mut lua_State, index: c_int) -> String {
    unsafe { CStr::from_ptr(lua_typename(state, lua_type(state, index))) }.to_string_lossy().into_owned()
}

/// A readable form of an error value, for messages that wrap it.
///
/// # Safety
/// `state` is valid.
pub unsafe fn error_text(state: *mut lua_State, index: c_int) -> String {
    unsafe {
        match lua_type(state, index) {
            LUA_TSTRING | LUA_TNUMBER => {
                let mut len = 0;
                let ptr = lua_tolstring(state, index, &mut len);
                String::from_utf8_lossy(std::slice::from_raw_parts(ptr.cast(), len)).into_owned()
            }
            _ => format!("(error object is a {} value)", type_name(state, index)),
        }
    }
}

/// What was passed, for "got ..." in argument errors: numbers and strings
/// by value, anything else by type.
///
/// # Safety
/// `state` is valid.
pub unsafe fn describe(state: *mut lua_State, index: c_int) -> String {
    unsafe {
        match lua_type(state, index) {
            LUA_TNUMBER => format!("{}", lua_tonumber(state, index)),
            LUA_TSTRING => format!("{:?}", string_at(state, index).unwrap_or_default()),
            _ => type_name(state, index),
        }
    }
}

/// An integer argument within `min..=max`. Like `luaL_checkinteger`, it
/// takes floats with an exact integer value and numeric strings (LuaSocket's
/// `getsockname` returns the port as one).
///
/// # Safety
/// `state` is valid.
pub unsafe fn integer_in(state: *mut lua_State, index: c_int, what: &str, min: f64, max: f64) -> Result<f64, String> {
    unsafe {
        let n = lua_tonumber(state, index);
        if lua_isnumber(state, index) != 0 && n.fract() == 0.0 && (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{what} must be an integer in {min}..{max}, got {}", describe(state, index)))
        }
    }
}

/// The string at `index`, if it is one (numbers are not).
///
/// # Safety
/// `state` is valid.
pub unsafe fn string_at(state: *mut lua_State, index: c_int) -> Option<String> {
    unsafe {
        if lua_type(state, index) != LUA_TSTRING {
            return None;
        }
        let mut len = 0;
        let ptr = lua_tolstring(state, index, &mut len);
        Some(String::from_utf8_lossy(std::slice::from_raw_parts(ptr.cast(), len)).into_owned())
    }
}

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

/// A readable form of an error value, for messages that wrap it: strings
/// and numbers as they are, other values through `__tostring` (mlua's error
/// objects have one), else their type.
///
/// `__tostring` is user code that may raise, and our callers may own values
/// with destructors, so it runs under `lua_pcall`.
///
/// # Safety
/// `state` is valid and has two free stack slots.
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

//! Reading the arguments of the module's functions, and describing them
//! in error messages ("got ...").

use std::ffi::{c_int, CStr};

use mlua::ffi::*;

/// The type name of the value at `index`, for messages.
pub unsafe fn type_name(state: *mut lua_State, index: c_int) -> String {
    unsafe { CStr::from_ptr(lua_typename(state, lua_type(state, index))) }.to_string_lossy().into_owned()
}

/// What was passed, for "got ..." in argument errors: numbers and strings
/// by value, anything else by type.
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

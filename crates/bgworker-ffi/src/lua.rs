//! Lua's C API the raw way (`mlua::ffi`), for the C functions of bgworker's
//! libraries that need the stack itself: the core's binding (its hot path,
//! the registry contract), the pool's methods and worker states (an mlua
//! call per job would cost more than the job), and items that a utility
//! library decodes with the C API.
//!
//! # Safety: the rule for these helpers and every caller of Lua's C API
//!
//! Every `unsafe` function here, and every `unsafe` block that calls Lua's
//! C API in the libraries that use them, relies on the same three things,
//! and says more only where it relies on something else:
//!
//! 1. **The state is valid, on its thread.** The `lua_State *` is the one
//!    Lua called the C function with (or one that a utility library passed
//!    on its Lua thread, or a pool worker's own state on its thread), and
//!    stays ours until we return.
//! 2. **The stack has room.** Lua grants a C function `LUA_MINSTACK` free
//!    slots; code that pushes more checks first (`luaL_checkstack`, or
//!    `lua_checkstack` where it must not raise). A helper here needs one
//!    free slot unless it says otherwise.
//! 3. **No Lua error leaves a frame that owns a Rust value with a
//!    destructor.** PUC Lua raises by `longjmp`, which skips destructors.
//!    So a C function returns a [`LuaResult`] from an inner function, and
//!    only its thin `extern` wrapper ([`lua_fn!`](crate::lua_fn),
//!    [`returned`]) raises, through [`Raise::raise`], once everything is
//!    dropped; and code that calls what may raise (user code, a
//!    `__tostring`, a load) either owns nothing meanwhile or runs it under
//!    [`protect`] (or `lua_pcall`). Lua's own memory error is the
//!    exception: it can leave from any push, and what the frame owned is
//!    then leaked, not freed.

// A function's `# Safety` is the rule above; its docs say more where it
// needs more.
#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_int, c_void, CStr};
use std::fmt::Display;
use std::ptr;

pub use mlua::ffi::lua_State;
use mlua::ffi::*;

/// Why a C function raises: returned by its inner function, raised by its
/// wrapper once that frame is gone.
pub enum Raise {
    /// `bad argument #n to 'f' (message)`, as `luaL_argerror` words it.
    Arg(c_int, String),
    /// A message of our own, raised as a string.
    Message(String),
    /// The value on top of the stack, raised as it is.
    Value,
}

pub type LuaResult<T> = Result<T, Raise>;

impl Raise {
    /// Raise it: only from the `extern` wrapper of a C function that Lua
    /// called, whose frame owns nothing else. The message moves onto the
    /// Lua stack, and its `String` is dropped before the jump.
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

/// What a C function returns for its inner function's `result`: the count
/// of values that pushed, or it raises the error.
pub unsafe fn returned(state: *mut lua_State, result: LuaResult<c_int>) -> c_int {
    match result {
        Ok(count) => count,
        Err(raise) => unsafe { raise.raise(state) },
    }
}

/// `lua_fn!(name => inner)`: the `lua_CFunction` `name` that calls the
/// inner function `inner(state) -> LuaResult<c_int>` and raises its error
/// once `inner`'s frame is gone.
#[macro_export]
macro_rules! lua_fn {
    ($name:ident => $inner:path) => {
        unsafe extern "C-unwind" fn $name(state: *mut $crate::lua::lua_State) -> ::std::ffi::c_int {
            unsafe { $crate::lua::returned(state, $inner(state)) }
        }
    };
}

/// The message of a bad argument, as `luaL_argerror` words it, for
/// functions that raise through mlua rather than [`Raise::Arg`].
pub fn bad_argument(position: impl Display, function: &str, message: impl Display) -> String {
    format!("bad argument #{position} to '{function}' ({message})")
}

/// The type name of the value at `index`, for messages.
pub unsafe fn type_name(state: *mut lua_State, index: c_int) -> &'static str {
    let name = unsafe { CStr::from_ptr(lua_typename(state, lua_type(state, index))) };
    // Lua's type names are static ASCII strings.
    name.to_str().unwrap_or("?")
}

/// What was given, for the "got ..." of argument errors: a number or a
/// string by value (the string quoted), anything else by its type.
pub unsafe fn got(state: *mut lua_State, index: c_int) -> String {
    unsafe {
        match lua_type(state, index) {
            LUA_TNUMBER => format!("{}", lua_tonumber(state, index)),
            LUA_TSTRING => format!("{:?}", string_at(state, index).unwrap_or_default()),
            _ => type_name(state, index).to_string(),
        }
    }
}

/// An integer argument within `min..=max`, or the message saying it is
/// not. Like `luaL_checkinteger`, it takes floats with an exact integer
/// value and numeric strings (LuaSocket's `getsockname` returns the port
/// as one).
pub unsafe fn integer_in(state: *mut lua_State, index: c_int, what: &str, min: f64, max: f64) -> Result<f64, String> {
    unsafe {
        let n = lua_tonumber(state, index);
        if lua_isnumber(state, index) != 0 && n.fract() == 0.0 && (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{what} must be an integer in {min}..{max}, got {}", got(state, index)))
        }
    }
}

/// Push `bytes` as a Lua string.
#[inline]
pub unsafe fn push_str(state: *mut lua_State, bytes: impl AsRef<[u8]>) {
    let bytes = bytes.as_ref();
    unsafe { lua_pushlstring(state, bytes.as_ptr().cast(), bytes.len()) };
}

/// The bytes of the string at `index` (not converted from a number), or
/// `None`. They live as long as the value stays on the stack.
#[inline]
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

/// The string at `index` (not converted from a number), made valid UTF-8.
pub unsafe fn string_at(state: *mut lua_State, index: c_int) -> Option<String> {
    unsafe { bytes_at(state, index) }.map(|bytes| String::from_utf8_lossy(bytes).into_owned())
}

/// Whether the value at `index` has the metatable registered under
/// `name`. Needs two free stack slots.
pub unsafe fn has_metatable(state: *mut lua_State, index: c_int, name: &CStr) -> bool {
    unsafe {
        if lua_getmetatable(state, index) == 0 {
            return false;
        }
        luaL_getmetatable(state, name.as_ptr());
        let same = lua_rawequal(state, -1, -2) != 0;
        lua_pop(state, 2);
        same
    }
}

/// The light userdata stored in the registry under `key` (an address of
/// the calling library), as a `*const T`: null when there is none.
#[inline]
pub unsafe fn registry_pointer<T>(state: *mut lua_State, key: *const c_void) -> *const T {
    unsafe {
        lua_rawgetp(state, LUA_REGISTRYINDEX, key);
        let pointer = lua_touserdata(state, -1) as *const T;
        lua_pop(state, 1);
        pointer
    }
}

/// Which variable upvalue `n` of the Lua function at `index` is: two
/// closures that share a local variable share its identity. `None` on Lua
/// 5.1, which cannot tell (LuaJIT can: it has the 5.2 API for it).
pub unsafe fn upvalue_id(state: *mut lua_State, index: c_int, n: c_int) -> Option<*const c_void> {
    #[cfg(feature = "lua51")]
    {
        let _ = (state, index, n);
        None
    }
    #[cfg(not(feature = "lua51"))]
    unsafe {
        Some(lua_upvalueid(state, index, n).cast_const())
    }
}

/// Make upvalue `n` of the Lua function at `index` (absolute) the same
/// variable as upvalue `other_n` of the one at `other`: what
/// [`upvalue_id`] told shared becomes shared again. Lua 5.1 cannot: it
/// gives the value only (it tells no upvalues shared, so this is not
/// asked of it).
pub unsafe fn upvalue_join(state: *mut lua_State, index: c_int, n: c_int, other: c_int, other_n: c_int) {
    #[cfg(feature = "lua51")]
    unsafe {
        if !lua_getupvalue(state, other, other_n).is_null() && lua_setupvalue(state, index, n).is_null() {
            lua_pop(state, 1);
        }
    }
    #[cfg(not(feature = "lua51"))]
    unsafe {
        lua_upvaluejoin(state, index, n, other, other_n)
    }
}

// LuaJIT has the two functions of Lua 5.2, which mlua declares for 5.2 and
// later only.
#[cfg(feature = "luajit")]
extern "C-unwind" {
    fn lua_upvalueid(state: *mut lua_State, index: c_int, n: c_int) -> *mut c_void;
    fn lua_upvaluejoin(state: *mut lua_State, index: c_int, n: c_int, other: c_int, other_n: c_int);
}

/// A protected call raised: its error is on top of the stack.
#[derive(Debug)]
pub struct Raised;

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
/// error is left there instead (what the handler made of it): [`Raised`].
/// `body` may raise, and must own nothing with a destructor when it does.
/// It never raises itself: with no room for the call, the error is "stack
/// overflow".
///
/// # Safety
/// The rule, with `nargs` values on the stack above `handler`.
pub unsafe fn protect(
    state: *mut lua_State,
    handler: c_int,
    nargs: c_int,
    mut body: impl FnMut(*mut lua_State) -> c_int,
) -> Result<c_int, Raised> {
    unsafe {
        let base = lua_gettop(state) - nargs;
        if lua_checkstack(state, 2) == 0 {
            lua_settop(state, base);
            push_str(state, "stack overflow");
            return Err(Raised);
        }
        let mut body: Body = &mut body;
        lua_pushcfunction(state, trampoline);
        lua_insert(state, base + 1);
        lua_pushlightuserdata(state, &mut body as *mut Body as *mut c_void);
        lua_insert(state, base + 2);
        match lua_pcall(state, nargs + 1, LUA_MULTRET, handler) {
            LUA_OK => Ok(lua_gettop(state) - base),
            _ => Err(Raised),
        }
    }
}

/// `tostring(value at index)`, through `__tostring`, which is user code
/// that may raise, so under [`protect`]: `None` when it raised or gave no
/// string. Leaves the stack as it was.
pub unsafe fn tostring(state: *mut lua_State, index: c_int) -> Option<String> {
    unsafe {
        protected_text(state, index, |inner| {
            luaL_tolstring(inner, 1, ptr::null_mut());
            1
        })
    }
}

/// A readable form of an error value, for messages that wrap it, as
/// `lua.c` shows one: strings and numbers as they are, other values
/// through their `__tostring` (mlua's error objects have one, under
/// [`protect`] as in [`tostring`]), else "(error object is a T value)".
pub unsafe fn error_text(state: *mut lua_State, index: c_int) -> String {
    unsafe {
        if matches!(lua_type(state, index), LUA_TSTRING | LUA_TNUMBER) {
            // Converted on a copy: `lua_tolstring` turns a number it
            // converts into a string where it stands.
            lua_pushvalue(state, index);
            let mut len = 0;
            let data = lua_tolstring(state, -1, &mut len);
            let text = String::from_utf8_lossy(std::slice::from_raw_parts(data.cast(), len)).into_owned();
            lua_pop(state, 1);
            return text;
        }
        let text = protected_text(state, index, |inner| {
            if luaL_getmetafield(inner, 1, c"__tostring".as_ptr()) == LUA_TNIL {
                return 0;
            }
            lua_pop(inner, 1);
            luaL_tolstring(inner, 1, ptr::null_mut());
            1
        });
        text.unwrap_or_else(|| format!("(error object is a {} value)", type_name(state, index)))
    }
}

/// The string that `body`, run under [`protect`] with the value at
/// `index` as its argument, returns; `None` when it raised or returned
/// none. Leaves the stack as it was.
unsafe fn protected_text(
    state: *mut lua_State,
    index: c_int,
    body: impl FnMut(*mut lua_State) -> c_int,
) -> Option<String> {
    unsafe {
        let base = lua_gettop(state);
        lua_pushvalue(state, index);
        let text = match protect(state, 0, 1, body) {
            Ok(count) if count > 0 => string_at(state, -1),
            _ => None,
        };
        lua_settop(state, base);
        text
    }
}

#[cfg(all(test, feature = "vendored"))]
mod tests {
    use super::*;
    use mlua::Lua;

    /// Run `f` on the state with the value of `source` on top.
    fn with_value<R>(source: &str, f: impl FnOnce(*mut lua_State) -> R) -> R {
        let lua = Lua::new();
        let value: mlua::Value = lua.load(source).eval().unwrap();
        let mut f = Some(f);
        let mut result = None;
        // SAFETY: the value is on top of the stack, and `f` keeps the rule.
        unsafe { lua.exec_raw::<()>(value, |state| result = f.take().map(|f| f(state))) }.unwrap();
        result.unwrap()
    }

    unsafe fn refuse(state: *mut lua_State) -> LuaResult<c_int> {
        Err(Raise::Arg(1, format!("number expected, got {}", unsafe { got(state, 1) })))
    }
    lua_fn!(refusing => refuse);

    #[test]
    fn a_raise_reads_as_luas_own_argument_errors() {
        let lua = Lua::new();
        // SAFETY: a lua_CFunction made by lua_fn!.
        lua.globals().set("f", unsafe { lua.create_c_function(refusing) }.unwrap()).unwrap();
        let message: String = lua.load("return select(2, pcall(f, 'x'))").eval().unwrap();
        assert_eq!(message, "bad argument #1 to 'f' (number expected, got \"x\")");
        assert_eq!(bad_argument(1, "f", "number expected, got \"x\""), message);
    }

    #[test]
    fn texts_of_values_and_of_those_whose_tostring_raises() {
        let failing = "setmetatable({}, {__tostring = function() error('no') end})";
        let texts = |source: &str| {
            with_value(source, |state| unsafe {
                let top = lua_gettop(state);
                let texts = (tostring(state, -1), error_text(state, -1), got(state, -1));
                assert_eq!(lua_type(state, -1) == LUA_TNUMBER, texts.2 == "1.5", "a number stays a number");
                assert_eq!(lua_gettop(state), top, "the stack is left as it was");
                texts
            })
        };
        assert_eq!(texts("1.5"), (Some("1.5".into()), "1.5".into(), "1.5".into()));
        assert_eq!(texts("'a'"), (Some("a".into()), "a".into(), "\"a\"".into()));
        let (plain, error, given) = texts("{}");
        assert!(plain.unwrap().starts_with("table: "));
        assert_eq!((error.as_str(), given.as_str()), ("(error object is a table value)", "table"));
        assert_eq!(texts(failing), (None, "(error object is a table value)".into(), "table".into()));
        let named = "setmetatable({}, {__tostring = function() return 'named' end})";
        assert_eq!(texts(named).1, "named");
    }
}

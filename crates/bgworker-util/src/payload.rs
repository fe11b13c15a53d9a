//! One item's `data`: the boxed closure (and, for a round trip, where its
//! reply goes), and the C functions the core calls with it.
//!
//! # How a closure gets a `&Lua`
//!
//! The core calls `decode(L, data)` with a raw state. Rather than build Lua
//! values by hand on `L`, decode calls a *runner*: an mlua function, made once
//! per state by [`install`] and kept in the registry under an address of this
//! library. mlua runs it as any callback, on `L` (the coroutine that called
//! `poll`), hands it the state's `&Lua`, and pushes what it returns onto `L`'s
//! stack. So the closure's values land on the caller's stack by mlua's own
//! rules, through public API only.
//!
//! The runner never learns `data` from Lua: decode hands the pointer over
//! in [`HANDOFF`], a thread-local the runner empties on entry. A runner called
//! from Lua (through `debug.getregistry`) finds it empty and refuses, so no
//! Lua code can make it read a forged pointer.
//!
//! # Errors
//!
//! A runner never raises for the closure: it returns `true, values...` or
//! `false, message`, and the C side raises the message as a plain string
//! (mlua would raise an error *object* that the core cannot print). Panics
//! are caught and reported the same way: they must not unwind through Lua.
//!
//! # Ownership
//!
//! `data` is a `Box<Payload>`. The core frees it exactly once through
//! [`free`], whatever happens; decode and result only borrow it, and take
//! the closures out of it as they run them. A closure that never ran is
//! dropped with the box.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::mpsc;

use mlua::ffi::{
    luaL_checkstack, lua_State, lua_error, lua_gettop, lua_pcall, lua_pop, lua_pushvalue, lua_rawgetp, lua_rawsetp,
    lua_remove, lua_toboolean, LUA_MULTRET, LUA_OK, LUA_REGISTRYINDEX, LUA_TFUNCTION,
};
use mlua::{FromLuaMulti, Function, IntoLuaMulti, Lua, MultiValue, Value};

/// Registry keys of the two runners: addresses in this library, so every
/// utility library (each with its own copy of this crate) has its own.
static RUNNER_KEYS: [u8; 2] = [0, 0];

fn decode_runner_key() -> *const c_void {
    &RUNNER_KEYS[0] as *const u8 as *const c_void
}

fn result_runner_key() -> *const c_void {
    &RUNNER_KEYS[1] as *const u8 as *const c_void
}

thread_local! {
    /// The payload the running decode or result hands to its runner.
    static HANDOFF: Cell<*mut Payload> = const { Cell::new(ptr::null_mut()) };
}

type Decode = Box<dyn FnOnce(&Lua) -> mlua::Result<(Function, MultiValue)> + Send>;

/// Where a round trip's outcome goes, whatever the callback's result type.
trait Reply: Send {
    /// The callback returned `values`: convert and hand them over.
    fn values(&self, lua: &Lua, values: MultiValue) -> mlua::Result<()>;
    /// Decode or the conversion failed with `message`.
    fn failed(&self, message: &str);
}

/// Each `call`'s reply: a one-shot channel to the waiting thread, which
/// receives at most one message (decode failed, or the values, or their
/// conversion failed). After a timeout nobody listens; sends are ignored.
struct Channel<T>(mpsc::Sender<Result<T, String>>);

impl<T: FromLuaMulti + Send> Reply for Channel<T> {
    fn values(&self, lua: &Lua, values: MultiValue) -> mlua::Result<()> {
        let _ = self.0.send(Ok(T::from_lua_multi(values, lua)?));
        Ok(())
    }

    fn failed(&self, message: &str) {
        let _ = self.0.send(Err(message.to_string()));
    }
}

pub struct Payload {
    decode: Option<Decode>,
    reply: Option<Box<dyn Reply>>,
}

/// The waiting side of a round trip's reply.
pub type Receiver<T> = mpsc::Receiver<Result<T, String>>;

impl Payload {
    fn boxed<F, A>(decode: F, reply: Option<Box<dyn Reply>>) -> *mut c_void
    where
        F: FnOnce(&Lua) -> mlua::Result<(Function, A)> + Send + 'static,
        A: IntoLuaMulti,
    {
        let decode: Decode = Box::new(move |lua| {
            let (callback, args) = decode(lua)?;
            Ok((callback, args.into_lua_multi(lua)?))
        });
        Box::into_raw(Box::new(Payload { decode: Some(decode), reply })) as *mut c_void
    }

    /// `data` for a plain delivery.
    pub fn deliver<F, A>(decode: F) -> *mut c_void
    where
        F: FnOnce(&Lua) -> mlua::Result<(Function, A)> + Send + 'static,
        A: IntoLuaMulti,
    {
        Self::boxed(decode, None)
    }

    /// `data` for a round trip, and where its reply arrives.
    pub fn call<T, F, A>(decode: F) -> (*mut c_void, Receiver<T>)
    where
        F: FnOnce(&Lua) -> mlua::Result<(Function, A)> + Send + 'static,
        A: IntoLuaMulti,
        T: FromLuaMulti + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        (Self::boxed(decode, Some(Box::new(Channel::<T>(tx)))), rx)
    }
}

/// Run `f`, turning its error or panic into a message for Lua.
fn attempt<T>(f: impl FnOnce() -> mlua::Result<T>) -> Result<T, String> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)");
            Err(format!("panicked: {what}"))
        }
    }
}

/// The payload handed over by decode or result, taken so it is used once.
fn take_handoff<'a>() -> mlua::Result<&'a mut Payload> {
    let payload = HANDOFF.with(|h| h.replace(ptr::null_mut()));
    // SAFETY: non-null only between decode/result setting it and this runner
    // starting, while the core holds the item alive.
    unsafe { payload.as_mut() }
        .ok_or_else(|| mlua::Error::runtime("bgworker-util: this function is only called by bgworker's poll"))
}

fn failure(lua: &Lua, message: String) -> mlua::Result<MultiValue> {
    (false, message).into_lua_multi(lua)
}

/// Decode's runner: `true, callback, args...` or `false, message`.
fn run_decode(lua: &Lua, (): ()) -> mlua::Result<MultiValue> {
    let payload = take_handoff()?;
    // The core decodes each item once, so the closure is still there.
    let decode = payload.decode.take().expect("an item is decoded once");
    match attempt(|| decode(lua)) {
        Ok((callback, mut values)) => {
            values.push_front(Value::Function(callback));
            values.push_front(Value::Boolean(true));
            Ok(values)
        }
        Err(message) => {
            if let Some(reply) = &payload.reply {
                reply.failed(&message);
            }
            failure(lua, message)
        }
    }
}

/// Result's runner: `true` or `false, message`.
fn run_result(lua: &Lua, values: MultiValue) -> mlua::Result<MultiValue> {
    let payload = take_handoff()?;
    // The core calls result only for items delivered with `call`.
    let reply = payload.reply.as_ref().expect("a round trip has a reply");
    match attempt(|| reply.values(lua, values)) {
        Ok(()) => true.into_lua_multi(lua),
        Err(message) => {
            reply.failed(&message);
            failure(lua, message)
        }
    }
}

/// Make the runners of `lua`'s state, once per state. Must run before the
/// first handle of the state is acquired: decode relies on them.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    // SAFETY: the closures only read and write the registry, in balance.
    let installed = unsafe {
        lua.exec_raw::<bool>((), |state| {
            let kind = lua_rawgetp(state, LUA_REGISTRYINDEX, decode_runner_key());
            lua_pop(state, 1);
            mlua::ffi::lua_pushboolean(state, (kind == LUA_TFUNCTION) as c_int);
        })?
    };
    if installed {
        return Ok(());
    }
    let runners = (lua.create_function(run_decode)?, lua.create_function(run_result)?);
    unsafe {
        lua.exec_raw::<()>(runners, |state| {
            lua_rawsetp(state, LUA_REGISTRYINDEX, result_runner_key());
            lua_rawsetp(state, LUA_REGISTRYINDEX, decode_runner_key());
        })
    }
}

/// Call the runner under `key` with the `nargs` values on top of the stack
/// and `data` handed over; leave its results. Raises its error, if any.
///
/// # Safety
/// On the Lua thread, inside a decode or result the core called; `data` is
/// a live `Payload`. Holds nothing that needs dropping when it raises.
unsafe fn run(state: *mut lua_State, key: *const c_void, nargs: c_int, nresults: c_int, data: *mut c_void) {
    unsafe {
        lua_rawgetp(state, LUA_REGISTRYINDEX, key);
        if nargs > 0 {
            mlua::ffi::lua_rotate(state, -(nargs + 1), 1);
        }
        HANDOFF.with(|h| h.set(data as *mut Payload));
        let status = lua_pcall(state, nargs, nresults, 0);
        // Cleared whether or not the runner got as far as taking it.
        HANDOFF.with(|h| h.set(ptr::null_mut()));
        if status != LUA_OK {
            lua_error(state);
        }
    }
}

/// `bgw_decode_fn`.
pub unsafe extern "C-unwind" fn decode(state: *mut lua_State, data: *mut c_void) -> c_int {
    unsafe {
        let base = lua_gettop(state);
        luaL_checkstack(state, 1, ptr::null());
        run(state, decode_runner_key(), 0, LUA_MULTRET, data);
        if lua_toboolean(state, base + 1) == 0 {
            // `false, message`: raise the message.
            lua_error(state);
        }
        lua_remove(state, base + 1);
        lua_gettop(state) - base
    }
}

/// `bgw_result_fn`: the callback's values are the top `nresults` slots; they
/// stay where they are (the contract).
pub unsafe extern "C-unwind" fn result(state: *mut lua_State, data: *mut c_void, nresults: c_int) {
    unsafe {
        luaL_checkstack(state, nresults + 2, ptr::null());
        let first = lua_gettop(state) - nresults + 1;
        for index in first..first + nresults {
            lua_pushvalue(state, index);
        }
        run(state, result_runner_key(), nresults, 2, data);
        if lua_toboolean(state, -2) == 0 {
            lua_error(state);
        }
        lua_pop(state, 2);
    }
}

/// `bgw_free_fn`: the one place a payload is freed.
pub unsafe extern "C" fn free(data: *mut c_void) {
    // SAFETY: `data` came from `Payload::boxed`, and the core frees it once.
    drop(unsafe { Box::from_raw(data as *mut Payload) });
}

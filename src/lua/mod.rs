//! `bgworker.core`: the Lua module over the instance.
//!
//! Every module function is a C closure whose first upvalue is the state's
//! instance userdata (`InstanceCell`), so no call looks anything up. The
//! binding uses mlua's raw C API (`mlua::ffi`, `module` feature): the hot
//! path (`poll`) and the registry contract need the Lua stack itself, and
//! errors must reach Lua as plain strings.
//!
//! # Safety
//!
//! Every `unsafe` here and below keeps the rule of `bgworker_ffi::lua` (a
//! valid state on its thread, room on the stack, no Lua error through a
//! frame that owns a destructor): functions return `LuaResult`, their
//! `lua_fn!` wrappers raise, and user code (decode, result, `__tostring`)
//! runs under `lua_pcall`. The C functions of `api.rs` run on the Lua
//! thread of the utility library that calls them, with the state it
//! passes.

mod api;
mod decode;
mod drain;
mod keep;
mod poll;
mod token;

use std::ffi::{c_int, CStr};
use std::ptr;

use bgworker_ffi::lua::{got, integer_in, push_str, string_at, type_name, LuaResult, Raise};
use bgworker_ffi::lua_fn;
use mlua::ffi::*;

use crate::instance::{CapacityError, Instance};
use crate::room::MAX_CAPACITY;
use crate::signal::{FdKind, Signal};

/// Registry field holding the state's instance userdata.
const INSTANCE_KEY: &CStr = c"bgworker.core.instance";
/// Metatable names live in the registry too: they must differ from the keys.
const INSTANCE_METATABLE: &CStr = c"bgworker.core.Instance";
const GUARD_METATABLE: &CStr = c"bgworker.core.Guard";

/// The instance userdata. `None` once its state has closed it.
struct InstanceCell {
    instance: Option<Instance>,
}

/// The instance of the running function's first upvalue.
unsafe fn instance<'a>(state: *mut lua_State) -> LuaResult<&'a mut Instance> {
    // Upvalue 1 of every function that calls this is an InstanceCell,
    // alive while the function is.
    let cell = unsafe { lua_touserdata(state, lua_upvalueindex(1)) } as *mut InstanceCell;
    unsafe { (*cell).instance.as_mut() }.ok_or_else(|| Raise::Message("bgworker.core: the Lua state is closing".into()))
}

/// The instance, for a function `name` that would touch its run: refused
/// in a forked child while the run inherited from the parent is there.
unsafe fn owned<'a>(state: *mut lua_State, name: &str) -> LuaResult<&'a mut Instance> {
    let instance = unsafe { instance(state) }?;
    match instance.inherited() {
        Some(inherited) => Err(Raise::Message(format!("bgworker.core.{name}: {inherited}"))),
        None => Ok(instance),
    }
}

lua_fn!(core_start => start);
lua_fn!(core_start_fd => start_fd);
lua_fn!(core_start_greeting => start_greeting);
lua_fn!(core_greeted => greeted);
lua_fn!(core_fd => fd);
lua_fn!(core_capacity => capacity);
lua_fn!(core_stop => stop);
lua_fn!(core_pending => pending);
lua_fn!(core_wake => wake);
lua_fn!(core_token => token::token);
lua_fn!(core_alarm => alarm);
lua_fn!(core_now => now);
lua_fn!(core_running => running);
lua_fn!(core_run => run);
lua_fn!(core_guard => guard);
lua_fn!(core_sender => sender);
lua_fn!(core_stats => stats);
lua_fn!(core_poll => poll::poll);
lua_fn!(core_keepers => keep::keepers);
lua_fn!(core_on_keep => keep::on_keep);
lua_fn!(core_complete => poll::complete);

/// The options table at `index`, if any: `capacity`, and (descriptor
/// signal) `kind`.
struct StartOptions {
    capacity: Option<usize>,
    fd_kind: FdKind,
}

unsafe fn start_options(state: *mut lua_State, index: c_int) -> LuaResult<StartOptions> {
    let mut options = StartOptions { capacity: None, fd_kind: FdKind::native() };
    unsafe {
        match lua_type(state, index) {
            LUA_TNONE | LUA_TNIL => return Ok(options),
            LUA_TTABLE => {}
            _ => {
                return Err(Raise::Arg(index, format!("opts must be a table or nil, got {}", type_name(state, index))))
            }
        }
        lua_getfield(state, index, c"capacity".as_ptr());
        if lua_isnil(state, -1) == 0 {
            let capacity =
                integer_in(state, -1, "opts.capacity", 1.0, MAX_CAPACITY as f64).map_err(|m| Raise::Arg(index, m))?;
            options.capacity = Some(capacity as usize);
        }
        lua_getfield(state, index, c"kind".as_ptr());
        options.fd_kind = match string_at(state, -1).as_deref() {
            None if lua_isnil(state, -1) != 0 => options.fd_kind,
            Some("eventfd") => FdKind::EventFd,
            Some("pipe") => FdKind::Pipe,
            _ => {
                let got = got(state, -1);
                return Err(Raise::Arg(index, format!("opts.kind must be \"eventfd\", \"pipe\" or nil, got {got}")));
            }
        };
        lua_pop(state, 2);
    }
    Ok(options)
}

/// Start the instance with the signal `make_signal` builds.
unsafe fn start_with<'a>(
    state: *mut lua_State,
    options: StartOptions,
    make_signal: impl FnOnce(&StartOptions) -> std::io::Result<Signal>,
) -> LuaResult<&'a mut Instance> {
    unsafe {
        let instance = instance(state)?;
        let failed = |e: &dyn std::fmt::Display| Raise::Message(format!("bgworker.core: cannot start: {e}"));
        instance.can_start().map_err(|e| failed(&e))?;
        if instance.inherited().is_some() {
            // A forked child starts its own run: forget the parent's first.
            instance.stop();
        }
        let signal = make_signal(&options).map_err(|e| failed(&e))?;
        if options.capacity.is_some() {
            instance.set_capacity(options.capacity).map_err(|e| capacity_error("start", e))?;
        }
        instance.start(signal).map_err(|e| failed(&e))?;
        Ok(instance)
    }
}

/// `start(port [, opts])`: wake datagrams go to 127.0.0.1:`port`.
unsafe fn start(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let port = integer_in(state, 1, "port", 1.0, 65535.0).map_err(|m| Raise::Arg(1, m))? as u16;
        let options = start_options(state, 2)?;
        start_with(state, options, |_| Signal::udp(port))?;
    }
    Ok(0)
}

/// `start_fd([opts])`: wake-ups make a descriptor readable; returns it.
unsafe fn start_fd(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let options = start_options(state, 1)?;
        let instance = start_with(state, options, |o| Signal::fd(o.fd_kind))?;
        let fd = instance.reader_fd().expect("a descriptor signal has a descriptor");
        lua_pushinteger(state, fd as lua_Integer);
    }
    Ok(1)
}

/// `start_greeting([opts])`: the native side binds; returns `host, port,
/// token`: greet that address with the token, then call `greeted()`.
unsafe fn start_greeting(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let options = start_options(state, 1)?;
        let instance = start_with(state, options, |_| Signal::greeting())?;
        let signal = instance.signal().expect("just started");
        let addr = signal.local_addr().expect("a greeting socket has an address");
        push_str(state, addr.ip().to_string());
        lua_pushinteger(state, addr.port() as lua_Integer);
        push_str(state, signal.token().expect("a greeting signal has a token"));
    }
    Ok(3)
}

/// `greeted()`: true once a greeting with the token has arrived.
unsafe fn greeted(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let greeted = owned(state, "greeted")?.signal().is_some_and(Signal::accept_greeting);
        lua_pushboolean(state, greeted as c_int);
    }
    Ok(1)
}

/// `capacity([n])`: the queue's bound (nil: unbounded); with `n`, set it
/// first (0: unbounded), at once and for later starts.
unsafe fn capacity(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let instance = owned(state, "capacity")?;
        if lua_isnoneornil(state, 1) == 0 {
            let n = integer_in(state, 1, "capacity", 0.0, MAX_CAPACITY as f64).map_err(|m| Raise::Arg(1, m))?;
            instance.set_capacity((n >= 1.0).then_some(n as usize)).map_err(|e| capacity_error("capacity", e))?;
        }
        match instance.capacity() {
            Some(n) => lua_pushinteger(state, n as lua_Integer),
            None => lua_pushnil(state),
        }
    }
    Ok(1)
}

/// `fd()`: the descriptor of a descriptor signal, or nil.
unsafe fn fd(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        match owned(state, "fd")?.reader_fd() {
            Some(fd) => lua_pushinteger(state, fd as lua_Integer),
            None => lua_pushnil(state),
        }
    }
    Ok(1)
}

/// `stop()`: the number of items cancelled. In a forked child, forgets the
/// run inherited from the parent (0 cancelled: its items are the parent's).
unsafe fn stop(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let cancelled = instance(state)?.stop();
        lua_pushinteger(state, cancelled as lua_Integer);
    }
    Ok(1)
}

unsafe fn pending(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let pending = owned(state, "pending")?.pending();
        lua_pushinteger(state, pending as lua_Integer);
    }
    Ok(1)
}

unsafe fn wake(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        if !owned(state, "wake")?.wake() {
            return Err(Raise::Message("bgworker.core.wake: not started".into()));
        }
    }
    Ok(0)
}

/// `alarm(seconds)`: raise the signal after `seconds` even if nothing is
/// delivered, replacing the alarm set before; `alarm(nil)` clears it.
/// Ignored when not started; `stop()` clears it.
unsafe fn alarm(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let instance = instance(state)?;
        let due = match lua_type(state, 1) {
            LUA_TNONE | LUA_TNIL => None,
            LUA_TNUMBER if lua_tonumber(state, 1) >= 0.0 => {
                // Beyond a day the loop has long come round for other reasons: clamp,
                // so no time overflows.
                let seconds = lua_tonumber(state, 1).min(86_400.0);
                Some(std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds))
            }
            _ => {
                let got = got(state, 1);
                return Err(Raise::Arg(1, format!("seconds must be a non-negative number or nil, got {got}")));
            }
        };
        if !instance.set_alarm(due) {
            return Err(Raise::Message("bgworker.core.alarm: cannot start the alarm thread".into()));
        }
    }
    Ok(0)
}

/// `now()`: seconds on a monotonic clock (from an arbitrary start), the
/// clock `alarm` counts in: timeouts measured with it never jump with the
/// wall clock.
unsafe fn now(state: *mut lua_State) -> LuaResult<c_int> {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    unsafe { lua_pushnumber(state, start.elapsed().as_secs_f64()) };
    Ok(1)
}

unsafe fn running(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let running = instance(state)?.is_running();
        lua_pushboolean(state, running as c_int);
    }
    Ok(1)
}

/// `run()`: the id of this process's current run, or nil when not started
/// here.
unsafe fn run(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        match instance(state)?.run_id() {
            Some(id) => lua_pushinteger(state, id as lua_Integer),
            None => lua_pushnil(state),
        }
    }
    Ok(1)
}

/// What `guard()` returns: the run that was current when it was made.
struct Guard {
    run: Option<u64>,
}

/// `guard()`: a userdata that, when collected, stops the run that was
/// current when it was made, if that run is still the current one.
unsafe fn guard(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let run = instance(state)?.run_id();
        let guard = lua_newuserdata(state, std::mem::size_of::<Guard>()) as *mut Guard;
        ptr::write(guard, Guard { run });
        luaL_getmetatable(state, GUARD_METATABLE.as_ptr());
        lua_setmetatable(state, -2);
    }
    Ok(1)
}

/// `__gc` of a guard; upvalue 1 is the instance userdata.
unsafe extern "C-unwind" fn guard_gc(state: *mut lua_State) -> c_int {
    unsafe {
        // Only set as __gc of Guard userdata.
        let run = (*(lua_touserdata(state, 1) as *const Guard)).run;
        let cell = lua_touserdata(state, lua_upvalueindex(1)) as *mut InstanceCell;
        if let Some(instance) = (*cell).instance.as_mut() {
            if run.is_some() && instance.run_id() == run {
                instance.stop();
            }
        }
    }
    0
}

fn capacity_error(function: &str, error: CapacityError) -> Raise {
    Raise::Message(match error {
        CapacityError::TooLarge => format!("bgworker.core.{function}: capacity must be at most {MAX_CAPACITY}"),
        CapacityError::Inherited(inherited) => format!("bgworker.core.{function}: {inherited}"),
    })
}

/// `sender()`: `"127.0.0.1", port`, or nil when not started.
unsafe fn sender(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        match owned(state, "sender")?.sender() {
            Some(addr) => {
                let ip = addr.ip().to_string();
                push_str(state, &ip);
                lua_pushinteger(state, addr.port() as lua_Integer);
                Ok(2)
            }
            None => {
                lua_pushnil(state);
                Ok(1)
            }
        }
    }
}

unsafe fn stats(state: *mut lua_State) -> LuaResult<c_int> {
    unsafe {
        let fields = owned(state, "stats")?.stats().fields();
        lua_createtable(state, 0, fields.len() as c_int);
        for (name, value) in fields {
            lua_pushinteger(state, value as lua_Integer);
            lua_setfield(state, -2, name.as_ptr());
        }
    }
    Ok(1)
}

unsafe extern "C-unwind" fn instance_gc(state: *mut lua_State) -> c_int {
    // Only set as __gc of InstanceCell userdata. Closing frees the pending
    // items now, while the utility libraries are still loaded.
    let cell = unsafe { lua_touserdata(state, 1) } as *mut InstanceCell;
    if let Some(cell) = unsafe { cell.as_mut() } {
        drop(cell.instance.take());
    }
    0
}

/// Push the state's instance userdata, creating it on first open.
unsafe fn push_instance(state: *mut lua_State) {
    unsafe {
        lua_getfield(state, LUA_REGISTRYINDEX, INSTANCE_KEY.as_ptr());
        if !lua_touserdata(state, -1).is_null() {
            return;
        }
        lua_pop(state, 1);
        let cell = lua_newuserdata(state, std::mem::size_of::<InstanceCell>()) as *mut InstanceCell;
        ptr::write(cell, InstanceCell { instance: Some(Instance::default()) });
        luaL_newmetatable(state, INSTANCE_METATABLE.as_ptr());
        lua_pushcfunction(state, instance_gc);
        lua_setfield(state, -2, c"__gc".as_ptr());
        lua_setmetatable(state, -2);
        lua_pushvalue(state, -1);
        lua_setfield(state, LUA_REGISTRYINDEX, INSTANCE_KEY.as_ptr());
    }
}

/// # Safety
/// Called by `require` with a valid state (the rule at the top).
#[no_mangle]
pub unsafe extern "C-unwind" fn luaopen_bgworker_core(state: *mut lua_State) -> c_int {
    unsafe {
        if let Some(refusal) = bgworker_ffi::runtime::check(state, "bgworker.core") {
            // Nothing else is made yet: the message is all this frame owns.
            Raise::Message(refusal).raise(state);
        }
        bgworker_ffi::library::keep_this_library_loaded();
        api::watch_forks();
        push_instance(state);
        let instance_index = lua_gettop(state);
        api::publish(state);
        luaL_newmetatable(state, GUARD_METATABLE.as_ptr());
        lua_pushvalue(state, instance_index);
        lua_pushcclosure(state, guard_gc, 1);
        lua_setfield(state, -2, c"__gc".as_ptr());
        lua_pop(state, 1);
        poll::open(state, instance_index);
        let wrapper_index = instance_index + 1;

        let functions: [(&CStr, lua_CFunction); 19] = [
            (c"alarm", core_alarm),
            (c"now", core_now),
            (c"capacity", core_capacity),
            (c"start", core_start),
            (c"start_fd", core_start_fd),
            (c"start_greeting", core_start_greeting),
            (c"greeted", core_greeted),
            (c"fd", core_fd),
            (c"stop", core_stop),
            (c"pending", core_pending),
            (c"wake", core_wake),
            (c"token", core_token),
            (c"running", core_running),
            (c"run", core_run),
            (c"guard", core_guard),
            (c"sender", core_sender),
            (c"stats", core_stats),
            (c"keepers", core_keepers),
            (c"on_keep", core_on_keep),
        ];
        lua_createtable(state, 0, functions.len() as c_int + 1);
        for (name, function) in functions {
            lua_pushvalue(state, instance_index);
            lua_pushvalue(state, wrapper_index);
            lua_pushcclosure(state, function, 2);
            lua_setfield(state, -2, name.as_ptr());
        }
        poll::push_poll(state, instance_index, wrapper_index);
        lua_setfield(state, -2, c"poll".as_ptr());
        drain::open(state, lua_gettop(state), instance_index, wrapper_index);
        push_str(state, env!("CARGO_PKG_VERSION"));
        lua_setfield(state, -2, c"version".as_ptr());
        lua_pushinteger(state, MAX_CAPACITY as lua_Integer);
        lua_setfield(state, -2, c"MAX_CAPACITY".as_ptr());
    }
    1
}

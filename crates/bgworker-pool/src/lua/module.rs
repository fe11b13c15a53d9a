//! The Lua face of `bgworker.pool_native`: argument checks and
//! conversions around [`Pool`]. lib.rs documents the contract.
//!
//! `new` (once per pool) uses mlua; the pool's methods, called once or
//! more per job, are C functions on a userdata of our own, which keep the
//! rule of `bgworker_ffi::lua` (how they raise, among others).

use std::ffi::{c_int, CStr};
use std::ptr;
use std::thread;
use std::time::Duration;

use bgworker_ffi::lua::{bad_argument, push_str, returned, type_name, LuaResult, Raise};
use mlua::ffi::*;
use mlua::{IntoLua, Lua, LuaString, MultiValue, Table, Value as LuaValue};

use crate::lua::function::{self, Functions};
use crate::lua::pool::{Options, Pool, Refused};
use crate::sync::board::{Cancelled, Id, Status};
use crate::sync::mail::NotSent;
use crate::worker::job::Job;
use crate::worker::state::Setup;
use crate::worker::value::{CrossError, Values};

/// Most threads a pool may have.
pub const MAX_THREADS: usize = 1024;
/// `init_timeout` when none is given, in seconds.
pub const INIT_TIMEOUT: f64 = 30.0;

const METATABLE: &CStr = c"bgworker.pool_native.Pool";

/// A number of seconds >= 0 as a timeout (`math.huge`: `None`, no limit).
fn seconds(value: f64) -> Option<Option<Duration>> {
    match Duration::try_from_secs_f64(value) {
        Ok(duration) => Some(Some(duration)),
        Err(_) if value == f64::INFINITY => Some(None),
        Err(_) => None,
    }
}

// ---------------------------------------------------------------------------
// new(opts)

/// An option of `opts`: `Ok(None)` when absent; an error naming it when
/// it is not what `expected` says.
fn option<T: mlua::FromLua>(opts: &Table, name: &str, expected: &str) -> mlua::Result<Option<T>> {
    let value: LuaValue = opts.raw_get(name)?;
    if value.is_nil() {
        return Ok(None);
    }
    let got = value.type_name();
    opts.raw_get::<T>(name)
        .map(Some)
        .map_err(|_| mlua::Error::runtime(bad_argument(1, "new", format!("opts.{name} must be {expected}, got {got}"))))
}

fn required<T: mlua::FromLua>(opts: &Table, name: &str, expected: &str) -> mlua::Result<T> {
    option(opts, name, expected)?
        .ok_or_else(|| mlua::Error::runtime(bad_argument(1, "new", format!("opts.{name} must be {expected}"))))
}

const KNOWN_OPTIONS: [&str; 7] = ["threads", "path", "cpath", "init", "on_events", "init_timeout", "jit"];

fn options(lua: &Lua, opts: Table) -> mlua::Result<Options> {
    let refuse = |message: String| mlua::Error::runtime(bad_argument(1, "new", message));
    for pair in opts.pairs::<LuaValue, LuaValue>() {
        let (key, _) = pair?;
        let known = matches!(&key, LuaValue::String(s) if KNOWN_OPTIONS.iter().any(|k| s.as_bytes() == k.as_bytes()));
        if !known {
            return Err(refuse(format!("unknown option {}", key.to_string()?)));
        }
    }
    let threads: i64 = required(&opts, "threads", "an integer")?;
    if !(1..=MAX_THREADS as i64).contains(&threads) {
        return Err(refuse(format!("opts.threads must be in 1..{MAX_THREADS}, got {threads}")));
    }
    let init: LuaValue = opts.raw_get("init")?;
    let init = if init.is_nil() {
        None
    } else {
        let mut job = None;
        let mut functions = Functions::default();
        // SAFETY: init is argument 1 of the protected call.
        unsafe {
            lua.exec_raw::<()>(init, |state| {
                job = Some(job_at(state, &mut functions, 1, 0));
                functions.release(state);
            })
        }?;
        let job = job.ok_or_else(|| mlua::Error::runtime("bgworker.pool_native.new: init was not read"))?;
        Some(job.map_err(|(_, why)| refuse(format!("opts.init: {why}")))?)
    };
    let timeout = option(&opts, "init_timeout", "a number")?.unwrap_or(INIT_TIMEOUT);
    let init_timeout =
        seconds(timeout).ok_or_else(|| refuse(format!("opts.init_timeout must be >= 0, got {timeout}")))?;
    let setup = Setup {
        path: required::<LuaString>(&opts, "path", "a string")?.as_bytes().to_vec(),
        cpath: required::<LuaString>(&opts, "cpath", "a string")?.as_bytes().to_vec(),
        jit: option(&opts, "jit", "a boolean")?.unwrap_or(true),
        init,
    };
    let on_events = required(&opts, "on_events", "a function")?;
    Ok(Options { threads: threads as usize, setup, on_events, init_timeout })
}

/// `new(opts)`: a pool, or `nil, error, traceback`.
fn new(lua: &Lua, opts: LuaValue) -> mlua::Result<MultiValue> {
    let LuaValue::Table(opts) = opts else {
        return Err(mlua::Error::runtime(bad_argument(1, "new", format!("table expected, got {}", opts.type_name()))));
    };
    let mut pool = match Pool::new(lua, options(lua, opts)?)? {
        Ok(pool) => Some(pool),
        Err(Refused::Failed(failure)) => {
            let (error, traceback) = (failure.error, failure.traceback);
            // SAFETY: push leaves one value for exec_raw to collect.
            let error: LuaValue = unsafe { lua.exec_raw((), |state| error.push(state)) }?;
            return Ok(MultiValue::from_vec(vec![LuaValue::Nil, error, traceback.into_lua(lua)?]));
        }
        Err(Refused::TimedOut) => {
            return Ok(MultiValue::from_vec(vec![LuaValue::Nil, "init timed out".into_lua(lua)?]))
        }
        Err(Refused::NoThread(message)) => {
            return Ok(MultiValue::from_vec(vec![LuaValue::Nil, message.into_lua(lua)?]))
        }
    };
    // SAFETY: push_pool leaves the userdata for exec_raw to collect. If Lua
    // raises before the pool moved in, `pool` still owns it here.
    let userdata: LuaValue = unsafe { lua.exec_raw((), |state| push_pool(state, &mut pool)) }?;
    Ok(MultiValue::from_vec(vec![userdata]))
}

// ---------------------------------------------------------------------------
// The pool userdata

/// The userdata's block.
struct PoolCell {
    /// `None` once collected.
    pool: Option<Pool>,
    /// The job functions it was given lately.
    functions: Functions,
}

/// Push a new pool userdata owning the pool in `slot`. Its methods have
/// the metatable as their upvalue, which is how they recognise a pool
/// (cheaper than a registry lookup by name, once per job).
///
/// # Safety
/// `state` is valid, on its thread; may raise before it takes the pool.
unsafe fn push_pool(state: *mut lua_State, slot: &mut Option<Pool>) {
    unsafe {
        if luaL_newmetatable(state, METATABLE.as_ptr()) != 0 {
            let methods: [(&CStr, lua_CFunction); 8] = [
                (c"queue", pool_queue),
                (c"send", pool_send),
                (c"cancel", pool_cancel),
                (c"status", pool_status),
                (c"stats", pool_stats),
                (c"close", pool_close),
                (c"notify_lost", pool_notify_lost),
                (c"retire_stuck", pool_retire_stuck),
            ];
            lua_createtable(state, 0, methods.len() as c_int);
            for (name, method) in methods {
                lua_pushvalue(state, -2);
                lua_pushcclosure(state, method, 1);
                lua_setfield(state, -2, name.as_ptr());
            }
            lua_setfield(state, -2, c"__index".as_ptr());
            lua_pushcfunction(state, pool_gc);
            lua_setfield(state, -2, c"__gc".as_ptr());
        }
        let cell = lua_newuserdata(state, std::mem::size_of::<PoolCell>()) as *mut PoolCell;
        // From here on nothing raises: the userdata owns the pool at once.
        ptr::write(cell, PoolCell { pool: slot.take(), functions: Functions::default() });
        lua_insert(state, -2);
        lua_setmetatable(state, -2);
    }
}

/// A method: the state and the pool.
type Method = unsafe fn(*mut lua_State, &mut Pool) -> LuaResult<c_int>;

/// Call `method` on the pool that is argument 1, raising its error, and
/// refusing a pool made by the process this one was forked from.
///
/// # Safety
/// In a C function called by Lua.
unsafe fn call(state: *mut lua_State, name: &str, method: Method) -> c_int {
    let result = unsafe {
        pool_at(state, name).and_then(|(pool, _)| {
            if pool.is_inherited() {
                return Err(Raise::Message(format!("{name}: {INHERITED}")));
            }
            method(state, pool)
        })
    };
    unsafe { returned(state, result) }
}

/// Why a pool made before a fork refuses in the child.
const INHERITED: &str = "this pool belongs to the process that made it, and this one is a fork of it";

/// The pool that is argument 1 of method `name` (not collected), and the
/// job functions it was given lately.
///
/// # Safety
/// In a method made by `push_pool`, called by Lua.
unsafe fn pool_at<'a>(state: *mut lua_State, name: &str) -> LuaResult<(&'a mut Pool, &'a mut Functions)> {
    unsafe {
        let cell = lua_touserdata(state, 1) as *mut PoolCell;
        let ours = !cell.is_null() && lua_getmetatable(state, 1) != 0 && {
            let same = lua_rawequal(state, -1, lua_upvalueindex(1)) != 0;
            lua_pop(state, 1);
            same
        };
        if !ours {
            let got = type_name(state, 1);
            return Err(Raise::Arg(1, format!("pool expected, got {got}; call it as pool:{name}()")));
        }
        // SAFETY: a userdata with our metatable holds a PoolCell.
        let PoolCell { pool, functions } = &mut *cell;
        let pool = pool.as_mut().ok_or_else(|| Raise::Message(format!("{name}: the pool was collected")))?;
        Ok((pool, functions))
    }
}

/// A job id argument (2): ids are integers from 1, so any other number
/// names no job (`None`); a non-number is refused.
///
/// # Safety
/// In a C function called by Lua.
unsafe fn id_at(state: *mut lua_State) -> LuaResult<Option<Id>> {
    unsafe {
        if lua_type(state, 2) != LUA_TNUMBER {
            let got = type_name(state, 2);
            return Err(Raise::Arg(2, format!("job id expected, got {got}")));
        }
        if lua_isinteger(state, 2) != 0 {
            return Ok(u64::try_from(lua_tointeger(state, 2)).ok());
        }
        let n = lua_tonumber(state, 2);
        Ok((n.fract() == 0.0 && n >= 0.0 && n < u64::MAX as f64).then_some(n as u64))
    }
}

/// Not through `call`: a pool made before a fork is refused with return
/// values, so that the Lua layer raises that under the name of its own
/// method (`submit`, `run`), at its caller's line.
unsafe extern "C-unwind" fn pool_queue(state: *mut lua_State) -> c_int {
    unsafe { returned(state, pool_at(state, "queue").and_then(|(pool, functions)| queue(state, pool, functions))) }
}

/// `queue(fn, args...)`: queue a job running `fn` (a Lua function, or a
/// "module.function" name) with the arguments after it: `id` | `nil,
/// position, message` | `nil, false, message` (made before a fork: this
/// process may not use it).
unsafe fn queue(state: *mut lua_State, pool: &mut Pool, functions: &mut Functions) -> LuaResult<c_int> {
    unsafe {
        if pool.is_inherited() {
            lua_pushnil(state);
            lua_pushboolean(state, 0);
            push_str(state, INHERITED);
            return Ok(3);
        }
        let top = lua_gettop(state).max(2);
        lua_settop(state, top);
        let job = match job_at(state, functions, 2, top - 2) {
            Ok(job) => job,
            Err((position, why)) => return Ok(refused(state, position, &why)),
        };
        let id = pool.submit(job).ok_or_else(|| Raise::Message("bgworker.pool_native: the pool is closed".into()))?;
        lua_pushinteger(state, id as lua_Integer);
    }
    Ok(1)
}

/// The job of the function at `index` with the `count` values after it as
/// its arguments; or why one of those cannot go to a worker: its position
/// (0 the function, from 1 an argument) and the message.
///
/// # Safety
/// In a C function called by Lua, with those values on the stack.
unsafe fn job_at(
    state: *mut lua_State,
    functions: &mut Functions,
    index: c_int,
    count: c_int,
) -> Result<Job, (usize, String)> {
    unsafe {
        let func = functions.at(state, index).map_err(|why| (0, why))?;
        match Values::copy_call(state, index, index + 1, count) {
            Ok(args) => Ok(Job { func, args }),
            Err((0, e)) => Err((0, uncopyable_upvalue(e))),
            Err((position, e)) => Err((position, uncopyable(e))),
        }
    }
}

/// Push `nil, position, message`: what `queue` and `send` return for a
/// value they refuse (`position` 0: the job's function; from 1, a value
/// after it).
///
/// # Safety
/// In a C function called by Lua.
unsafe fn refused(state: *mut lua_State, position: usize, message: &str) -> c_int {
    unsafe {
        lua_pushnil(state);
        lua_pushinteger(state, position as lua_Integer);
        push_str(state, message);
    }
    3
}

/// The message for a value that `Values` could not copy, and why.
fn uncopyable(why: CrossError) -> String {
    format!("{why} cannot be copied to a worker")
}

/// `uncopyable` for an upvalue of a job's function, with what to do.
fn uncopyable_upvalue(why: CrossError) -> String {
    uncopyable(why) + " (upvalues are copied: require modules inside the function)"
}

unsafe extern "C-unwind" fn pool_send(state: *mut lua_State) -> c_int {
    unsafe { call(state, "send", send) }
}

/// `send(id, values...)`: queue a message for job `id`: `true` | `false,
/// "ended"` | `false, "full"` | `nil, position, message` (a value that
/// cannot be copied, counted from the first of `values`).
unsafe fn send(state: *mut lua_State, pool: &mut Pool) -> LuaResult<c_int> {
    unsafe {
        let id = id_at(state)?;
        let top = lua_gettop(state);
        let message = match Values::copy(state, 3, top - 2) {
            Ok(message) => message,
            Err((position, e)) => return Ok(refused(state, position + 1, &uncopyable(e))),
        };
        let sent = match id {
            Some(id) => pool.send(id, message),
            None => Err(NotSent::Ended(message)),
        };
        let refusal = match sent {
            Ok(()) => {
                lua_pushboolean(state, 1);
                return Ok(1);
            }
            Err(NotSent::Ended(_)) => c"ended",
            Err(NotSent::Full(_)) => c"full",
        };
        lua_pushboolean(state, 0);
        lua_pushstring(state, refusal.as_ptr());
    }
    Ok(2)
}

unsafe extern "C-unwind" fn pool_cancel(state: *mut lua_State) -> c_int {
    unsafe { call(state, "cancel", cancel) }
}

unsafe fn cancel(state: *mut lua_State, pool: &mut Pool) -> LuaResult<c_int> {
    unsafe {
        match id_at(state)?.map_or(Cancelled::No, |id| pool.cancel(id)) {
            Cancelled::Queued => lua_pushstring(state, c"queued".as_ptr()),
            Cancelled::Running { .. } => lua_pushstring(state, c"running".as_ptr()),
            Cancelled::No => {
                lua_pushboolean(state, 0);
                return Ok(1);
            }
        };
    }
    Ok(1)
}

unsafe extern "C-unwind" fn pool_status(state: *mut lua_State) -> c_int {
    unsafe { call(state, "status", status) }
}

unsafe fn status(state: *mut lua_State, pool: &mut Pool) -> LuaResult<c_int> {
    unsafe {
        let name = match id_at(state)?.and_then(|id| pool.status(id)) {
            Some(Status::Queued) => c"queued",
            Some(Status::Running) => c"running",
            Some(Status::Finished) => c"finished",
            None => {
                lua_pushnil(state);
                return Ok(1);
            }
        };
        lua_pushstring(state, name.as_ptr());
    }
    Ok(1)
}

unsafe extern "C-unwind" fn pool_stats(state: *mut lua_State) -> c_int {
    unsafe { call(state, "stats", stats) }
}

unsafe fn stats(state: *mut lua_State, pool: &mut Pool) -> LuaResult<c_int> {
    let snapshot = pool.snapshot();
    let counts = snapshot.counts;
    let integers: [(&CStr, u64); 8] = [
        (c"threads", pool.threads() as u64),
        (c"abandoned", snapshot.abandoned),
        (c"submitted", counts.submitted),
        (c"queued", counts.queued),
        (c"running", counts.running),
        (c"done", counts.done),
        (c"failed", counts.failed),
        (c"cancelled", counts.cancelled),
    ];
    let seconds: [(&CStr, f64); 4] = [
        (c"wait_mean", snapshot.wait_mean),
        (c"wait_max", snapshot.wait_max),
        (c"run_mean", snapshot.run_mean),
        (c"run_max", snapshot.run_max),
    ];
    unsafe {
        lua_createtable(state, 0, (integers.len() + seconds.len()) as c_int);
        for (name, value) in integers {
            lua_pushinteger(state, value as lua_Integer);
            lua_setfield(state, -2, name.as_ptr());
        }
        for (name, value) in seconds {
            lua_pushnumber(state, value);
            lua_setfield(state, -2, name.as_ptr());
        }
    }
    Ok(1)
}

/// `notify_lost()`: when a dispatcher starts (events.rs). Unlike the other
/// methods it does nothing, rather than raise, for a pool inherited
/// through fork(): a dispatcher may start in a child that has no use for
/// the parent's pools.
unsafe extern "C-unwind" fn pool_notify_lost(state: *mut lua_State) -> c_int {
    match unsafe { pool_at(state, "notify_lost") } {
        Ok((pool, _)) if !pool.is_inherited() => pool.notify_lost(),
        Ok(_) => {}
        Err(e) => unsafe { e.raise(state) },
    }
    0
}

unsafe extern "C-unwind" fn pool_retire_stuck(state: *mut lua_State) -> c_int {
    unsafe { call(state, "retire_stuck", retire_stuck) }
}

/// `retire_stuck()`: how many workers were retired and replaced.
unsafe fn retire_stuck(state: *mut lua_State, pool: &mut Pool) -> LuaResult<c_int> {
    unsafe { lua_pushinteger(state, pool.retire_stuck() as lua_Integer) };
    Ok(1)
}

unsafe extern "C-unwind" fn pool_close(state: *mut lua_State) -> c_int {
    unsafe { call(state, "close", close) }
}

/// `close(timeout)`: true, or false and "timeout".
unsafe fn close(state: *mut lua_State, pool: &mut Pool) -> LuaResult<c_int> {
    unsafe {
        if lua_type(state, 2) != LUA_TNUMBER {
            let got = type_name(state, 2);
            return Err(Raise::Arg(2, format!("number expected, got {got}")));
        }
        let value = lua_tonumber(state, 2);
        let timeout = seconds(value).ok_or_else(|| Raise::Arg(2, format!("timeout must be >= 0, got {value}")))?;
        // Duration::MAX is out of any deadline's reach: no deadline.
        if pool.close(timeout.unwrap_or(Duration::MAX)) {
            lua_pushboolean(state, 1);
            return Ok(1);
        }
        lua_pushboolean(state, 0);
        lua_pushstring(state, c"timeout".as_ptr());
    }
    Ok(2)
}

/// `__gc`: close without waiting (pool.rs), whatever the state.
unsafe extern "C-unwind" fn pool_gc(state: *mut lua_State) -> c_int {
    // SAFETY: only set as __gc of our userdata, which holds a PoolCell.
    let cell = unsafe { lua_touserdata(state, 1) } as *mut PoolCell;
    if let Some(cell) = unsafe { cell.as_mut() } {
        // Lua frees the block itself, without dropping it: what it owns
        // goes here (and a second __gc finds nothing).
        drop(cell.pool.take());
        unsafe { cell.functions.release(state) };
        drop(std::mem::take(&mut cell.functions));
    }
    0
}

/// `refusal(value)`: why `value` cannot be a job's function (itself, or an
/// upvalue that cannot be copied), or nil when it can.
unsafe extern "C-unwind" fn refusal(state: *mut lua_State) -> c_int {
    let why = unsafe {
        lua_settop(state, 1);
        function::refusal(state, 1)
            .or_else(|| Values::copy_call(state, 1, 2, 0).err().map(|(_, e)| uncopyable_upvalue(e)))
    };
    unsafe {
        match why {
            Some(why) => push_str(state, &why),
            None => lua_pushnil(state),
        }
    }
    1
}

/// The module table: `new`, `cpus` (the threads the system can run at
/// once, the Lua layer's default pool size) and the documented constants.
/// Forks are counted from here on, before any pool records its generation.
pub fn exports(lua: &Lua) -> mlua::Result<Table> {
    bgworker_ffi::fork::watch();
    let exports = lua.create_table()?;
    exports.set("new", lua.create_function(new)?)?;
    exports.set("refusal", unsafe { lua.create_c_function(refusal) }?)?;
    exports.set("cpus", thread::available_parallelism().map_or(1, |n| n.get()))?;
    exports.set("MAX_THREADS", MAX_THREADS)?;
    exports.set("CLOSE_TIMEOUT", crate::lua::pool::CLOSE_TIMEOUT.as_secs_f64())?;
    exports.set("RETIRE_GRACE", crate::lua::pool::RETIRE_GRACE.as_secs_f64())?;
    exports.set("PROGRESS_IN_FLIGHT", crate::sync::control::PROGRESS_IN_FLIGHT)?;
    exports.set("MESSAGES_QUEUED", crate::sync::mail::MESSAGES_QUEUED)?;
    exports.set("MAX_VALUES", crate::worker::value::MAX_VALUES)?;
    Ok(exports)
}

//! The Lua face of `bgworker.pool_native`: argument checks and
//! conversions around [`Pool`]. lib.rs documents the contract.

use std::thread;
use std::time::Duration;

use mlua::{IntoLua, IntoLuaMulti, Lua, LuaString, MultiValue, Table, UserData, UserDataMethods, Value as LuaValue};

use crate::board::{Cancelled, Id, Status};
use crate::job::{Func, Job};
use crate::pool::{Options, Pool, Refused};
use crate::value::Values;
use crate::worker_state::Setup;

/// Most threads a pool may have.
pub const MAX_THREADS: usize = 1024;
/// `init_timeout` when none is given, in seconds.
pub const INIT_TIMEOUT: f64 = 30.0;

fn bad_argument(position: usize, function: &str, message: impl std::fmt::Display) -> mlua::Error {
    mlua::Error::runtime(format!("bad argument #{position} to '{function}' ({message})"))
}

/// A number of seconds >= 0 (`math.huge`: no limit) as a timeout.
fn seconds(value: f64) -> Option<Option<Duration>> {
    match Duration::try_from_secs_f64(value) {
        Ok(duration) => Some(Some(duration)),
        Err(_) if value == f64::INFINITY => Some(None),
        Err(_) => None,
    }
}

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
        .map_err(|_| bad_argument(1, "new", format!("opts.{name} must be {expected}, got {got}")))
}

fn required<T: mlua::FromLua>(opts: &Table, name: &str, expected: &str) -> mlua::Result<T> {
    option(opts, name, expected)?.ok_or_else(|| bad_argument(1, "new", format!("opts.{name} must be {expected}")))
}

const KNOWN_OPTIONS: [&str; 8] = ["threads", "path", "cpath", "init", "init_named", "on_event", "init_timeout", "jit"];

fn options(opts: Table) -> mlua::Result<Options> {
    for pair in opts.pairs::<LuaValue, LuaValue>() {
        let (key, _) = pair?;
        let known = matches!(&key, LuaValue::String(s) if KNOWN_OPTIONS.iter().any(|k| s.as_bytes() == k.as_bytes()));
        if !known {
            return Err(bad_argument(1, "new", format!("unknown option {}", key.to_string()?)));
        }
    }
    let threads: i64 = required(&opts, "threads", "an integer")?;
    if !(1..=MAX_THREADS as i64).contains(&threads) {
        return Err(bad_argument(1, "new", format!("opts.threads must be in 1..{MAX_THREADS}, got {threads}")));
    }
    let init: Option<LuaString> = option(&opts, "init", "a string (a function's dump or 'module.function')")?;
    let named = option(&opts, "init_named", "a boolean")?.unwrap_or(false);
    let timeout = option(&opts, "init_timeout", "a number")?.unwrap_or(INIT_TIMEOUT);
    let init_timeout = seconds(timeout)
        .ok_or_else(|| bad_argument(1, "new", format!("opts.init_timeout must be >= 0, got {timeout}")))?;
    let setup = Setup {
        path: required::<LuaString>(&opts, "path", "a string")?.as_bytes().to_vec(),
        cpath: required::<LuaString>(&opts, "cpath", "a string")?.as_bytes().to_vec(),
        jit: option(&opts, "jit", "a boolean")?.unwrap_or(true),
        init: init.map(|code| Func::new(&code.as_bytes(), named)),
    };
    let on_event = required(&opts, "on_event", "a function")?;
    Ok(Options { threads: threads as usize, setup, on_event, init_timeout })
}

/// `new(opts)`: a pool, or `nil, error, traceback`.
fn new(lua: &Lua, opts: LuaValue) -> mlua::Result<MultiValue> {
    let LuaValue::Table(opts) = opts else {
        return Err(bad_argument(1, "new", format!("table expected, got {}", opts.type_name())));
    };
    match Pool::new(lua, options(opts)?)? {
        Ok(pool) => lua.create_userdata(pool)?.into_lua_multi(lua),
        Err(Refused::Failed(failure)) => {
            (LuaValue::Nil, failure.error.rebuild(lua)?, failure.traceback).into_lua_multi(lua)
        }
        Err(Refused::TimedOut) => (LuaValue::Nil, "init timed out").into_lua_multi(lua),
        Err(Refused::NoThread(message)) => (LuaValue::Nil, message).into_lua_multi(lua),
    }
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Queued => "queued",
        Status::Running => "running",
        Status::Finished => "finished",
    }
}

/// A job id argument: ids are integers from 1, so anything else names no
/// job (`None`), and a non-number is refused.
fn job_id(value: &LuaValue, function: &str) -> mlua::Result<Option<Id>> {
    match value {
        LuaValue::Integer(id) => Ok(u64::try_from(*id).ok()),
        LuaValue::Number(n) if n.fract() == 0.0 && *n >= 0.0 && *n < u64::MAX as f64 => Ok(Some(*n as u64)),
        LuaValue::Number(_) => Ok(None),
        other => Err(bad_argument(2, function, format!("job id expected, got {}", other.type_name()))),
    }
}

impl UserData for Pool {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // submit(code, named, n, args...): the first n args are the job's.
        methods.add_method("submit", |lua, this, (code, named, count, args): (LuaString, bool, usize, MultiValue)| {
            let mut args: Vec<LuaValue> = args.into_iter().take(count).collect();
            args.resize(count, LuaValue::Nil);
            let args = match Values::copy(&args) {
                Ok(args) => args,
                Err((position, e)) => {
                    let message = format!("{e} cannot be copied to a worker");
                    return (LuaValue::Nil, position + 1, message).into_lua_multi(lua);
                }
            };
            let job = Job { func: Func::new(&code.as_bytes(), named), args };
            let id =
                this.submit(job).ok_or_else(|| mlua::Error::runtime("bgworker.pool_native: the pool is closed"))?;
            id.into_lua_multi(lua)
        });
        methods.add_method("cancel", |lua, this, id: LuaValue| {
            let cancelled = job_id(&id, "cancel")?.map_or(Cancelled::No, |id| this.cancel(id));
            match cancelled {
                Cancelled::Queued => "queued".into_lua(lua),
                Cancelled::Running { .. } => "running".into_lua(lua),
                Cancelled::No => Ok(LuaValue::Boolean(false)),
            }
        });
        methods.add_method("status", |_, this, id: LuaValue| {
            Ok(job_id(&id, "status")?.and_then(|id| this.status(id)).map(status_name))
        });
        methods.add_method("stats", |lua, this, ()| {
            let snapshot = this.snapshot();
            let counts = snapshot.counts;
            let stats = lua.create_table()?;
            stats.set("threads", this.threads())?;
            for (name, count) in [
                ("submitted", counts.submitted),
                ("queued", counts.queued),
                ("running", counts.running),
                ("done", counts.done),
                ("failed", counts.failed),
                ("cancelled", counts.cancelled),
            ] {
                stats.set(name, count)?;
            }
            for (name, seconds) in [
                ("wait_mean", snapshot.wait_mean),
                ("wait_max", snapshot.wait_max),
                ("run_mean", snapshot.run_mean),
                ("run_max", snapshot.run_max),
            ] {
                stats.set(name, seconds)?;
            }
            Ok(stats)
        });
        methods.add_method_mut("close", |lua, this, timeout: LuaValue| {
            let seconds = match timeout {
                LuaValue::Integer(n) => n as f64,
                LuaValue::Number(n) => n,
                other => return Err(bad_argument(2, "close", format!("number expected, got {}", other.type_name()))),
            };
            let timeout = self::seconds(seconds)
                .ok_or_else(|| bad_argument(2, "close", format!("timeout must be >= 0, got {seconds}")))?;
            // Duration::MAX is out of any deadline's reach: no deadline.
            if this.close(timeout.unwrap_or(Duration::MAX)) {
                true.into_lua_multi(lua)
            } else {
                (false, "timeout").into_lua_multi(lua)
            }
        });
    }
}

/// The module table: `new`, and `cpus` (the threads the system can run at
/// once, the Lua layer's default pool size).
pub fn exports(lua: &Lua) -> mlua::Result<Table> {
    let exports = lua.create_table()?;
    exports.set("new", lua.create_function(new)?)?;
    exports.set("cpus", thread::available_parallelism().map_or(1, |n| n.get()))?;
    exports.set("MAX_THREADS", MAX_THREADS)?;
    exports.set("GRACE", crate::pool::GRACE.as_secs_f64())?;
    exports.set("PROGRESS_IN_FLIGHT", crate::control::PROGRESS_IN_FLIGHT)?;
    Ok(exports)
}

//! `bgworker_pool`: the native half of `bgworker.pool`.
//!
//! A pool is a set of OS threads, each with a Lua state of its own, made by
//! the interpreter that loaded this module (so of the caller's Lua version).
//! The Lua thread queues jobs; a worker copies a job's arguments into its
//! state, runs the function, copies the results out, and delivers them
//! through bgworker, so the callback runs on the Lua thread when the
//! dispatcher polls. The Lua layer (`lua/bgworker/pool.lua`) checks and
//! dumps the job's function and documents the API.

mod job;
mod queue;
mod value;
mod worker;

use std::sync::Arc;
use std::thread::{self, JoinHandle};

use mlua::{Function, IntoLuaMulti, Lua, LuaString, MultiValue, Table, UserData, UserDataMethods, Value as LuaValue};

use job::{Func, Job, Outcome, Results};
use queue::Queue;
use value::Values;
use worker::Setup;

/// Stack of a worker thread: that of a usual main thread, since the jobs
/// are ordinary Lua code that may recurse through C functions and modules.
const WORKER_STACK: usize = 8 << 20;

struct Pool {
    queue: Arc<Queue<Job>>,
    /// Empty once closed.
    threads: Vec<JoinHandle<()>>,
    results: Results,
}

impl Pool {
    fn new(lua: &Lua, threads: usize, setup: Setup) -> Result<Pool, String> {
        let mut pool =
            Pool { queue: Arc::new(Queue::new()), threads: Vec::with_capacity(threads), results: Results::new(lua)? };
        let setup = Arc::new(setup);
        for index in 1..=threads {
            let (queue, results, setup) = (Arc::clone(&pool.queue), pool.results.clone(), Arc::clone(&setup));
            let thread = thread::Builder::new()
                .name(format!("bgworker-pool-{index}"))
                .stack_size(WORKER_STACK)
                .spawn(move || worker::work(queue, results, setup))
                // Dropping `pool` joins the threads already started.
                .map_err(|e| format!("cannot start worker thread {index} of {threads}: {e}"))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    /// Queue a job. A job argument that cannot cross gives its position
    /// (from 0) and why; a closed pool raises.
    fn submit(
        &self,
        lua: &Lua,
        callback: Function,
        func: Func,
        args: &[LuaValue],
    ) -> mlua::Result<Option<(usize, String)>> {
        let args = match Values::copy(args) {
            Ok(args) => args,
            Err((position, e)) => return Ok(Some((position, format!("{e} cannot be copied to a worker")))),
        };
        let job = Job { func, args, callback: lua.create_registry_value(callback)? };
        self.queue.push(job).map_err(|_| mlua::Error::runtime("bgworker.pool: the pool is closed"))?;
        Ok(None)
    }

    /// Cancel the queued jobs (their callbacks get `false, "cancelled"`),
    /// let the running ones finish, and join the threads. Returns the number
    /// cancelled. Closing a closed pool does nothing.
    fn close(&mut self) -> usize {
        let cancelled = self.queue.close();
        let count = cancelled.len();
        for job in cancelled {
            self.results.send_now(job.callback, Outcome::Cancelled);
        }
        for thread in self.threads.drain(..) {
            // A worker that panicked has no job left to deliver: nothing to do.
            let _ = thread.join();
        }
        count
    }
}

/// Collected, or its Lua state closed: close, so no worker outlives the
/// state, nor this library's code.
impl Drop for Pool {
    fn drop(&mut self) {
        self.close();
    }
}

impl UserData for Pool {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // submit(callback, code, named, n, args...): the Lua layer has
        // checked the callback and made `code` (a function's dump, or a
        // "module.function" name when `named`). Only the first n args are
        // the job's. Returns nothing, or the position (from 1) of a job
        // argument that cannot cross and why.
        methods.add_method(
            "submit",
            |lua, this, (callback, code, named, count, args): (Function, LuaString, bool, usize, MultiValue)| {
                let code = code.as_bytes().to_vec().into_boxed_slice();
                let func = if named { Func::Named(code) } else { Func::Code(code) };
                let mut args: Vec<LuaValue> = args.into_iter().take(count).collect();
                args.resize(count, LuaValue::Nil);
                Ok(this.submit(lua, callback, func, &args)?.map(|(position, message)| (position + 1, message)).unzip())
            },
        );
        methods.add_method_mut("close", |_, this, ()| Ok(this.close()));
    }
}

/// `new(threads, path, cpath)`: a pool, or nil and a message.
fn new(lua: &Lua, (threads, path, cpath): (usize, LuaString, LuaString)) -> mlua::Result<MultiValue> {
    let setup = Setup { path: path.as_bytes().to_vec(), cpath: cpath.as_bytes().to_vec() };
    match Pool::new(lua, threads, setup) {
        Ok(pool) => (lua.create_userdata(pool)?,).into_lua_multi(lua),
        Err(message) => (LuaValue::Nil, message).into_lua_multi(lua),
    }
}

/// The module table: `new`, and `cpus` (the threads the system can run at
/// once, the default pool size). Public for builds that embed Lua
/// (`vendored`), which register it themselves.
pub fn exports(lua: &Lua) -> mlua::Result<Table> {
    let exports = lua.create_table()?;
    exports.set("new", lua.create_function(new)?)?;
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    exports.set("cpus", cpus)?;
    Ok(exports)
}

#[cfg(feature = "module")]
#[mlua::lua_module(name = "bgworker_pool")]
fn open(lua: &Lua) -> mlua::Result<Table> {
    exports(lua)
}

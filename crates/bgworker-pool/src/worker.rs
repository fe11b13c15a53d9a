//! A worker thread: its own Lua state, running one job after another.

use std::sync::Arc;

use mlua::{Function, Lua, MultiValue, Table, Value as LuaValue};

use crate::job::{Func, Job, Outcome, Results};
use crate::queue::Queue;
use crate::value::Values;

/// What every worker's state starts from: the creator's `package.path` and
/// `package.cpath` when the pool was made.
pub struct Setup {
    pub path: Vec<u8>,
    pub cpath: Vec<u8>,
}

/// The thread's body: runs jobs until the queue is closed and empty, and
/// hands each outcome to `results`. The Lua state is made and closed on
/// this thread, so it never crosses threads.
pub fn work(queue: Arc<Queue<Job>>, results: Results, setup: Arc<Setup>) {
    let state = State::new(&setup);
    while let Some(job) = queue.pop() {
        let outcome = match &state {
            Ok(state) => state.run(&job),
            Err(e) => Outcome::Failed(format!("the worker's Lua state could not be set up: {e}").into_bytes()),
        };
        results.send(job.callback, outcome, || queue.is_closed());
    }
}

struct State {
    lua: Lua,
    /// The function of `worker.lua`.
    run: Function,
}

impl State {
    fn new(setup: &Setup) -> mlua::Result<State> {
        // SAFETY: "unsafe" in mlua's sense only: the state gets every
        // standard library (debug, ffi on LuaJIT) and may load C modules,
        // as the caller's own state can.
        let lua = unsafe { Lua::unsafe_new() };
        let package: Table = lua.globals().get("package")?;
        package.set("path", lua.create_string(&setup.path)?)?;
        package.set("cpath", lua.create_string(&setup.cpath)?)?;
        let run = lua.load(include_str!("worker.lua")).set_name("=bgworker.pool.worker").eval()?;
        Ok(State { lua, run })
    }

    fn run(&self, job: &Job) -> Outcome {
        self.call(job).unwrap_or_else(|e| Outcome::Failed(e.to_string().into_bytes()))
    }

    fn call(&self, job: &Job) -> mlua::Result<Outcome> {
        let lua = &self.lua;
        let (code, named) = match &job.func {
            Func::Code(code) => (code, false),
            Func::Named(name) => (name, true),
        };
        let mut values = vec![LuaValue::String(lua.create_string(code)?), LuaValue::Boolean(named)];
        values.extend(job.args.rebuild(lua)?);
        let mut results = self.run.call::<MultiValue>(MultiValue::from_vec(values))?.into_iter();
        if !matches!(results.next(), Some(LuaValue::Boolean(true))) {
            // worker.lua's handler makes every error a string.
            let message = match results.next() {
                Some(LuaValue::String(s)) => s.as_bytes().to_vec(),
                _ => b"the job failed without a message".to_vec(),
            };
            return Ok(Outcome::Failed(message));
        }
        let results: Vec<LuaValue> = results.collect();
        Ok(match Values::copy(&results) {
            Ok(values) => Outcome::Done(values),
            Err((position, e)) => Outcome::Failed(
                format!("result #{}: {e} cannot be copied back from the worker", position + 1).into_bytes(),
            ),
        })
    }
}

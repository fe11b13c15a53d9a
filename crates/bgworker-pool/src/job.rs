//! A job, its outcome, and how outcomes reach their callbacks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgworker_util::{Error, Sender};
use mlua::{Function, Lua, MultiValue, RegistryKey, Value as LuaValue};

use crate::value::Values;

/// The function a job runs.
pub enum Func {
    /// A function's `string.dump`.
    Code(Box<[u8]>),
    /// `"module.function"`, required in the worker.
    Named(Box<[u8]>),
}

pub struct Job {
    pub func: Func,
    pub args: Values,
    /// The callback, in the registry of the pool's Lua state.
    pub callback: RegistryKey,
}

pub enum Outcome {
    /// The function returned these values.
    Done(Values),
    /// It raised (the message has a traceback), or its results cannot
    /// cross: the message, in bytes, since Lua's may be any.
    Failed(Vec<u8>),
    /// Closed before a worker took it.
    Cancelled,
}

impl Outcome {
    /// The callback's arguments: `true, results...` or `false, message`.
    fn into_args(self, lua: &Lua) -> mlua::Result<MultiValue> {
        let (ok, rest) = match self {
            Outcome::Done(values) => (true, values.rebuild(lua)?),
            Outcome::Failed(message) => (false, vec![LuaValue::String(lua.create_string(message)?)]),
            Outcome::Cancelled => (false, vec![LuaValue::String(lua.create_string("cancelled")?)]),
        };
        Ok(std::iter::once(LuaValue::Boolean(ok)).chain(rest).collect())
    }
}

/// How long a worker waits for room in a bounded dispatcher queue before it
/// checks whether its pool is closing.
const ROOM_RETRY: Duration = Duration::from_millis(50);

/// Delivers outcomes to their callbacks on the Lua thread, through
/// bgworker: each callback runs when the dispatcher polls.
#[derive(Clone)]
pub struct Results {
    sender: Sender,
}

impl Results {
    /// For the pool's Lua state, where bgworker.core must be loaded.
    pub fn new(lua: &Lua) -> Result<Results, String> {
        Sender::new(lua).map(|sender| Results { sender }).map_err(|e| format!("bgworker.pool: {e}"))
    }

    /// From the Lua thread (cancellations): never waits, since only that
    /// thread makes room in a bounded queue. An outcome that finds no room,
    /// or no dispatcher, is dropped with its callback.
    pub fn send_now(&self, callback: RegistryKey, outcome: Outcome) {
        let _ = self.sender.deliver(move |lua| call(lua, callback, outcome));
    }

    /// From a worker: waits for room in a bounded dispatcher queue, but
    /// gives up once `closing()` says the pool is closing, since the Lua
    /// thread then waits for this worker in `close` and makes no room. The
    /// outcome is then dropped with its callback, as is one that finds no
    /// dispatcher.
    pub fn send(&self, callback: RegistryKey, outcome: Outcome, closing: impl Fn() -> bool) {
        // A delivery that times out is freed unrun, so each attempt carries
        // a handle to the one outcome; the attempt that runs takes it.
        let slot = Arc::new(Mutex::new(Some((callback, outcome))));
        loop {
            let attempt = Arc::clone(&slot);
            let delivered = self.sender.deliver_timeout(
                move |lua| {
                    let taken = attempt.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
                    // Only one attempt is ever accepted (the others timed out), so it finds the outcome.
                    let (callback, outcome) =
                        taken.ok_or_else(|| mlua::Error::runtime("bgworker.pool: outcome already delivered"))?;
                    call(lua, callback, outcome)
                },
                Some(ROOM_RETRY),
            );
            if !matches!(delivered, Err(Error::Timeout)) || closing() {
                return;
            }
        }
    }
}

/// On the Lua thread: the callback and its arguments.
fn call(lua: &Lua, callback: RegistryKey, outcome: Outcome) -> mlua::Result<(Function, MultiValue)> {
    let function: Function = lua.registry_value(&callback)?;
    lua.remove_registry_value(callback)?;
    Ok((function, outcome.into_args(lua)?))
}

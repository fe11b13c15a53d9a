//! A worker's Lua state: made, used and closed on the worker's thread.
//! Set up once (paths, the JIT, the interrupt, `bgworker.worker`,
//! worker.lua's wrappers), then it runs tasks: the pool's init, then jobs.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{Function, Lua, MultiValue, Table, Value as LuaValue};

use crate::board::Id;
use crate::control::Control;
use crate::events::Events;
use crate::interrupt::{self, Interrupt};
use crate::job::{Func, Outcome};
use crate::value::{ErrorValue, Values};

/// What every worker's state starts from.
pub struct Setup {
    /// The creator's `package.path` and `package.cpath` when the pool was made.
    pub path: Vec<u8>,
    pub cpath: Vec<u8>,
    /// False: turn LuaJIT's JIT off (`jit.off()`), so that every job can be
    /// cancelled (interrupt.rs). No effect on other Lua versions.
    pub jit: bool,
    /// Run once, before any job.
    pub init: Option<Func>,
}

/// The running job, for `bgworker.worker`.
type Current = Rc<RefCell<Option<(Id, Arc<Control>)>>>;

pub struct WorkerState {
    lua: Lua,
    /// The function worker.lua returns.
    run: Function,
    interrupt: Arc<Interrupt>,
    current: Current,
}

const CANCELLED: &str = "bgworker.pool: the job was cancelled";
/// worker.lua's chunk name, which its tracebacks leave out.
const CHUNK: &str = "bgworker.pool.worker";

impl WorkerState {
    pub fn new(setup: &Setup, interrupt: &Arc<Interrupt>, events: Events) -> mlua::Result<WorkerState> {
        // SAFETY: "unsafe" in mlua's sense only: the state gets every
        // standard library (debug, ffi on LuaJIT) and may load C modules,
        // as the caller's own state can.
        let lua = unsafe { Lua::unsafe_new() };
        let package: Table = lua.globals().get("package")?;
        package.set("path", lua.create_string(&setup.path)?)?;
        package.set("cpath", lua.create_string(&setup.cpath)?)?;
        if !setup.jit {
            lua.load("if jit then jit.off() end").exec()?;
        }
        let cancel = lua.create_table()?;
        let describe = lua.create_function(|_, _: LuaValue| Ok(CANCELLED))?;
        cancel.set_metatable(Some(lua.create_table_from([("__tostring", describe)])?))?;
        // SAFETY: the main state, on this thread, with `cancel` on top;
        // `Drop` detaches before the state closes.
        unsafe { lua.exec_raw::<()>(cancel.clone(), |state| interrupt.attach(state)) }?;

        let current = Current::default();
        let native = lua.create_table()?;
        native.set("CANCEL", cancel)?;
        // SAFETY: lua_CFunctions of interrupt.rs, for this attached state.
        unsafe {
            native.set("interrupted", lua.create_c_function(interrupt::interrupted)?)?;
            native.set("enter", lua.create_c_function(interrupt::enter)?)?;
            native.set("leave", lua.create_c_function(interrupt::leave)?)?;
        }
        native.set("progress", lua.create_function(progress(Rc::clone(&current), events))?)?;
        let watched = Rc::clone(&current);
        let cancelled = move |_: &Lua, ()| Ok(watched.borrow().as_ref().is_some_and(|(_, task)| task.is_cancelled()));
        native.set("cancelled", lua.create_function(cancelled)?)?;
        let run = lua.load(include_str!("worker.lua")).set_name(format!("={CHUNK}")).call((native, CHUNK))?;
        Ok(WorkerState { lua, run, interrupt: Arc::clone(interrupt), current })
    }

    /// Run `func(args...)` as `task`: the pool's init (`job` is `None`) or
    /// job `job`.
    pub fn run(&self, task: &Arc<Control>, job: Option<Id>, func: &Func, args: &Values) -> Outcome {
        self.interrupt.begin(Arc::clone(task));
        *self.current.borrow_mut() = job.map(|id| (id, Arc::clone(task)));
        let outcome = self.call(func, args).unwrap_or_else(|e| Outcome::Failed {
            error: ErrorValue::Described(e.to_string()),
            traceback: String::new(),
        });
        *self.current.borrow_mut() = None;
        if self.interrupt.end() {
            // SAFETY: the attached main state, on this thread. It only
            // fails when Lua cannot allocate the fresh anchor table: the old
            // one then stays, which only keeps its coroutines alive longer.
            let _ = unsafe { self.lua.exec_raw::<()>((), |state| interrupt::drop_anchors(state)) };
        }
        outcome
    }

    fn call(&self, func: &Func, args: &Values) -> mlua::Result<Outcome> {
        let lua = &self.lua;
        let (code, named) = match func {
            Func::Code(code) => (code, false),
            Func::Named(name) => (name, true),
        };
        let mut values = vec![LuaValue::String(lua.create_string(code)?), LuaValue::Boolean(named)];
        values.extend(args.rebuild(lua)?);
        let mut results = self.run.call::<MultiValue>(MultiValue::from_vec(values))?.into_iter();
        if !matches!(results.next(), Some(LuaValue::Boolean(true))) {
            let error = ErrorValue::of(&results.next().unwrap_or(LuaValue::Nil));
            let traceback = match results.next() {
                Some(LuaValue::String(traceback)) => traceback.to_string_lossy(),
                _ => String::new(),
            };
            return Ok(Outcome::Failed { error, traceback });
        }
        let results: Vec<LuaValue> = results.collect();
        Ok(match Values::copy(&results) {
            Ok(values) => Outcome::Done(values),
            Err((position, e)) => Outcome::Failed {
                error: ErrorValue::Described(format!(
                    "result #{}: {e} cannot be copied back from the worker",
                    position + 1
                )),
                traceback: String::new(),
            },
        })
    }
}

impl Drop for WorkerState {
    fn drop(&mut self) {
        // Before `lua` closes: the signal handler must not reach it.
        self.interrupt.detach();
    }
}

/// `progress(...)` of worker.lua: nothing when delivered, else
/// `"cancelled"`, or `"error", message` for the caller to raise.
fn progress(
    current: Current,
    events: Events,
) -> impl Fn(&Lua, MultiValue) -> mlua::Result<(Option<&'static str>, Option<String>)> {
    move |_, values| {
        let Some((id, task)) = current.borrow().clone() else {
            let message = "bgworker.worker.progress: not in a job (a pool's init cannot report progress)";
            return Ok((Some("error"), Some(message.into())));
        };
        if task.is_cancelled() {
            return Ok((Some("cancelled"), None));
        }
        let values = match Values::copy(&values) {
            Ok(values) => values,
            Err((position, e)) => {
                let message =
                    format!("bad argument #{} to 'progress' ({e} cannot cross to the Lua thread)", position + 1);
                return Ok((Some("error"), Some(message)));
            }
        };
        Ok(if events.progress(id, &task, values) { (None, None) } else { (Some("cancelled"), None) })
    }
}

//! A worker's Lua state: made, used and closed on the worker's thread.
//! Set up once with mlua (paths, the JIT, the interrupt, `bgworker.worker`,
//! worker.lua's wrappers), then it runs tasks through Lua's C API (the
//! pool's init, then jobs: an mlua call per job would cost more than an
//! empty job). A task is one protected call, with worker.lua's message
//! handler, of the task's function: loaded from its code once (then found
//! by its [`Func`]'s address), or required by name.

use std::cell::RefCell;
use std::ffi::CStr;
use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bgworker_ffi::lua::{error_text, protect, push_str, registry_pointer, string_at, Raised};
use mlua::ffi::*;
use mlua::{Lua, RegistryKey, Table};

use crate::lua::events::Events;
use crate::sync::board::Id;
use crate::sync::control::Control;
use crate::sync::mail::Received;
use crate::worker::interrupt::{self, Interrupt};
use crate::worker::job::{Func, Job, Outcome};
use crate::worker::value::{ErrorValue, Values, MAX_VALUES};

/// What every worker's state starts from.
pub struct Setup {
    /// The creator's `package.path` and `package.cpath` when the pool was made.
    pub path: Vec<u8>,
    pub cpath: Vec<u8>,
    /// False: turn LuaJIT's JIT off (`jit.off()`), so that every job can be
    /// cancelled (interrupt.rs). No effect on other Lua versions.
    pub jit: bool,
    /// Run once, before any job: a job without arguments.
    pub init: Option<Job>,
}

/// What `bgworker.worker`'s functions need: the running job, and where
/// its progress goes. Reached through the registry.
struct Context {
    current: RefCell<Option<(Id, Arc<Control>)>>,
    events: Events,
}

/// Registry key of the context: an address in this library.
static CONTEXT_KEY: u8 = 0;

fn context_key() -> *const c_void {
    &CONTEXT_KEY as *const u8 as *const c_void
}

/// Most functions a worker keeps loaded; when full, it forgets them all.
const LOADED_MAX: usize = 256;

/// The functions a worker loaded from code, and their registry references.
#[derive(Default)]
struct Loaded {
    functions: Vec<(Arc<Func>, c_int)>,
}

impl Loaded {
    /// The reference of `func`, found by address (a function submitted
    /// again is the same `Func`, module.rs), else by its code.
    fn find(&self, func: &Arc<Func>) -> Option<c_int> {
        let same = |(loaded, _): &&(Arc<Func>, c_int)| Arc::ptr_eq(loaded, func);
        let equal = |(loaded, _): &&(Arc<Func>, c_int)| **loaded == **func;
        let functions = &self.functions;
        functions.iter().rev().find(same).or_else(|| functions.iter().rev().find(equal)).map(|(_, r)| *r)
    }
}

/// worker.lua's functions, by their registry keys.
struct Driver {
    /// The message handler of a task's call: keeps the traceback aside.
    handler: RegistryKey,
    /// `traceback()`: the traceback the handler kept last, forgotten.
    traceback: RegistryKey,
    /// `resolve(name)`: the function "module.function", required.
    resolve: RegistryKey,
}

pub struct WorkerState {
    // Dropped first: `context` must outlive the state, whose finalisers
    // may still call `progress`.
    lua: Lua,
    driver: Driver,
    loaded: RefCell<Loaded>,
    /// The main state: tasks run on it.
    main: *mut lua_State,
    interrupt: Arc<Interrupt>,
    context: Box<Context>,
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
        let tostring = lua.create_function(|_, _: mlua::Value| Ok(CANCELLED))?;
        cancel.set_metatable(Some(lua.create_table_from([("__tostring", tostring)])?))?;
        let context = Box::new(Context { current: RefCell::new(None), events });
        let mut main = std::ptr::null_mut();
        // SAFETY: the main state, on this thread, with `cancel` on top;
        // `Drop` detaches before the state closes, and the context outlives it.
        unsafe {
            lua.exec_raw::<()>(cancel.clone(), |state| {
                main = state;
                interrupt.attach(state);
                lua_pushlightuserdata(state, &*context as *const Context as *mut c_void);
                lua_rawsetp(state, LUA_REGISTRYINDEX, context_key());
            })
        }?;
        match Self::load_driver(&lua, cancel) {
            Ok(driver) => Ok(WorkerState {
                lua,
                driver,
                loaded: RefCell::default(),
                main,
                interrupt: Arc::clone(interrupt),
                context,
            }),
            Err(e) => {
                // As `Drop` does: detach, then close the state while the
                // context is still there.
                interrupt.detach();
                drop(lua);
                drop(context);
                Err(e)
            }
        }
    }

    /// Run worker.lua with the native helpers: the functions it returns.
    fn load_driver(lua: &Lua, cancel: Table) -> mlua::Result<Driver> {
        let native = lua.create_table()?;
        native.set("CANCEL", cancel)?;
        // SAFETY: lua_CFunctions for this state, attached and with its context.
        unsafe {
            native.set("interrupted", lua.create_c_function(interrupt::interrupted)?)?;
            native.set("enter", lua.create_c_function(interrupt::enter)?)?;
            native.set("leave", lua.create_c_function(interrupt::leave)?)?;
            native.set("progress", lua.create_c_function(progress)?)?;
            native.set("cancelled", lua.create_c_function(cancelled)?)?;
            native.set("in_job", lua.create_c_function(in_job)?)?;
            native.set("receive", lua.create_c_function(receive)?)?;
        }
        let (handler, traceback, resolve): (mlua::Function, mlua::Function, mlua::Function) =
            lua.load(include_str!("worker.lua")).set_name(format!("={CHUNK}")).call((native, CHUNK))?;
        Ok(Driver {
            handler: lua.create_registry_value(handler)?,
            traceback: lua.create_registry_value(traceback)?,
            resolve: lua.create_registry_value(resolve)?,
        })
    }

    /// Run `func(args...)` as `task`: the pool's init (`job` is `None`) or
    /// job `job`.
    pub fn run(&self, task: &Arc<Control>, job: Option<Id>, func: &Arc<Func>, args: &Values) -> Outcome {
        self.interrupt.begin(Arc::clone(task));
        *self.context.current.borrow_mut() = job.map(|id| (id, Arc::clone(task)));
        // SAFETY: the main state, on its thread, between mlua calls.
        let outcome = unsafe { self.call(func, args) };
        *self.context.current.borrow_mut() = None;
        if self.interrupt.end() {
            // SAFETY: the attached main state, on this thread. It only
            // fails when Lua cannot allocate the fresh anchor table: the old
            // one then stays, which only keeps its coroutines alive longer.
            let _ = unsafe { self.lua.exec_raw::<()>((), |state| interrupt::drop_anchors(state)) };
        }
        outcome
    }

    /// # Safety
    /// On the worker thread, outside any mlua call.
    unsafe fn call(&self, func: &Arc<Func>, args: &Values) -> Outcome {
        let state = self.main;
        unsafe {
            let base = lua_gettop(state);
            if lua_checkstack(state, 1) == 0 {
                let error = ErrorValue::Described("stack overflow".into());
                return Outcome::Failed { error, traceback: None };
            }
            lua_rawgeti(state, LUA_REGISTRYINDEX, registry_id(&self.driver.handler));
            // Pushing the function and the arguments may raise (memory, a
            // load or require that fails): inside the protected call, and
            // the body only borrows.
            let called = protect(state, base + 1, 0, |inner| {
                let count = args.push_call(inner, |inner| self.push_function(inner, func, args.sets_upvalues()));
                lua_call(inner, count, LUA_MULTRET);
                lua_gettop(inner)
            });
            let outcome = match called {
                // The error, as the handler returned it: raised by the
                // function, by its loading, or by the cancellation.
                Err(Raised) => Outcome::Failed { error: ErrorValue::of(state, -1), traceback: self.take_traceback() },
                Ok(count) if count as usize > MAX_VALUES => Outcome::Failed {
                    error: ErrorValue::Described(format!(
                        "{count} results cannot be copied back from the worker: at most {MAX_VALUES} can \
                         (return them in a table)"
                    )),
                    traceback: None,
                },
                Ok(count) => match Values::copy(state, base + 2, count) {
                    Ok(values) => Outcome::Done(values),
                    Err((position, e)) => Outcome::Failed {
                        error: ErrorValue::Described(format!(
                            "result #{}: {e} cannot be copied back from the worker",
                            position + 1
                        )),
                        traceback: None,
                    },
                },
            };
            lua_settop(state, base);
            outcome
        }
    }

    /// Push the task's function: `fresh`, a closure of its own (its
    /// upvalues are then set), else one loaded before if there is one. It
    /// may raise; it owns nothing meanwhile.
    ///
    /// # Safety
    /// On the worker thread, in a protected call.
    unsafe fn push_function(&self, state: *mut lua_State, func: &Arc<Func>, fresh: bool) {
        const CHUNKNAME: &CStr = c"=job";
        unsafe {
            luaL_checkstack(state, 2, std::ptr::null());
            match &**func {
                Func::Named(name) => {
                    lua_rawgeti(state, LUA_REGISTRYINDEX, registry_id(&self.driver.resolve));
                    push_str(state, name);
                    lua_call(state, 1, 1);
                }
                Func::Code(code) => {
                    let found = if fresh { None } else { self.loaded.borrow().find(func) };
                    if let Some(reference) = found {
                        lua_rawgeti(state, LUA_REGISTRYINDEX, lua_Integer::from(reference));
                        return;
                    }
                    let status =
                        luaL_loadbufferx(state, code.as_ptr().cast(), code.len(), CHUNKNAME.as_ptr(), std::ptr::null());
                    if status != LUA_OK {
                        lua_error(state);
                    }
                    if fresh {
                        return;
                    }
                    lua_pushvalue(state, -1);
                    let reference = luaL_ref(state, LUA_REGISTRYINDEX);
                    self.remember(state, func, reference);
                }
            }
        }
    }

    /// Keep `reference`, the loaded `func`; when full, forget the others.
    ///
    /// # Safety
    /// On the worker thread.
    unsafe fn remember(&self, state: *mut lua_State, func: &Arc<Func>, reference: c_int) {
        let mut loaded = self.loaded.borrow_mut();
        if loaded.functions.len() == LOADED_MAX {
            for (_, old) in loaded.functions.drain(..) {
                // Frees a slot of the registry: it never raises.
                unsafe { luaL_unref(state, LUA_REGISTRYINDEX, old) };
            }
        }
        loaded.functions.push((Arc::clone(func), reference));
    }

    /// The traceback the message handler kept for the last failure, if
    /// it ran (a memory error runs none).
    ///
    /// # Safety
    /// On the worker thread, outside any mlua call.
    unsafe fn take_traceback(&self) -> Option<String> {
        let state = self.main;
        unsafe {
            let base = lua_gettop(state);
            let taken = protect(state, 0, 0, |inner| {
                lua_rawgeti(inner, LUA_REGISTRYINDEX, registry_id(&self.driver.traceback));
                lua_call(inner, 0, 1);
                1
            });
            let traceback = match taken {
                Ok(_) => string_at(state, -1),
                Err(Raised) => None,
            };
            lua_settop(state, base);
            traceback
        }
    }
}

/// A registry key's index, for `lua_rawgeti`.
fn registry_id(key: &RegistryKey) -> lua_Integer {
    lua_Integer::from(key.id())
}

impl Drop for WorkerState {
    fn drop(&mut self) {
        // Before `lua` closes: the signal handler must not reach it.
        self.interrupt.detach();
    }
}

/// The context of the state of the running C function.
///
/// # Safety
/// `state` is a worker's state, on its thread.
unsafe fn context<'a>(state: *mut lua_State) -> &'a Context {
    // SAFETY: set by `new`; the context outlives the state.
    unsafe { &*registry_pointer::<Context>(state, context_key()) }
}

/// `progress(...)` of worker.lua: nothing when delivered, else
/// `"cancelled"`, or `"error", message` for the caller to raise. It never
/// raises itself (it owns values while it works).
unsafe extern "C-unwind" fn progress(state: *mut lua_State) -> c_int {
    unsafe {
        let context = context(state);
        let current = context.current.borrow().clone();
        let problem = match current {
            None => Err("bgworker.worker.progress: not in a job (a pool's init cannot report progress)".to_string()),
            Some((_, task)) if task.is_cancelled() => Ok(false),
            Some(_) if lua_gettop(state) as usize > MAX_VALUES => Err(format!(
                "'progress' got {} values: at most {MAX_VALUES} can cross to the Lua thread (send them in a table)",
                lua_gettop(state)
            )),
            Some((id, task)) => match Values::copy(state, 1, lua_gettop(state)) {
                Ok(values) => Ok(context.events.progress(id, &task, values)),
                Err((position, e)) => {
                    Err(format!("bad argument #{} to 'progress' ({e} cannot cross to the Lua thread)", position + 1))
                }
            },
        };
        lua_settop(state, 0);
        match problem {
            Ok(true) => 0,
            Ok(false) => {
                push_str(state, "cancelled");
                1
            }
            Err(message) => {
                push_str(state, "error");
                push_str(state, &message);
                2
            }
        }
    }
}

/// `cancelled()`: true once the running job was cancelled.
unsafe extern "C-unwind" fn cancelled(state: *mut lua_State) -> c_int {
    unsafe {
        let cancelled = context(state).current.borrow().as_ref().is_some_and(|(_, task)| task.is_cancelled());
        lua_pushboolean(state, cancelled as c_int);
    }
    1
}

/// `in_job()`: true while a job runs (false in a pool's init).
unsafe extern "C-unwind" fn in_job(state: *mut lua_State) -> c_int {
    unsafe {
        let in_job = context(state).current.borrow().is_some();
        lua_pushboolean(state, in_job as c_int);
    }
    1
}

/// `receive(timeout)` of worker.lua, in a job, with `timeout` nil or a
/// number >= 0 (checked there): `true, values...` for the next message,
/// `false, "timeout"`, `false, "cancelled"`, or `false, "error", message`.
/// It never raises itself (it owns the message while it pushes it).
unsafe extern "C-unwind" fn receive(state: *mut lua_State) -> c_int {
    unsafe {
        let context = context(state);
        let timeout = (lua_type(state, 1) == LUA_TNUMBER).then(|| lua_tonumber(state, 1));
        lua_settop(state, 0);
        let Some((id, task)) = context.current.borrow().clone() else {
            return not_received(state, "error", Some("bgworker.worker.receive: not in a job"));
        };
        // A timeout too long for the clock waits as long as there is none.
        let deadline = timeout
            .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
            .and_then(|timeout| Instant::now().checked_add(timeout));
        match context.events.mail().receive(id, &task, deadline) {
            Received::Message(values) => {
                let pushed = protect(state, 0, 0, |inner| {
                    lua_pushboolean(inner, 1);
                    values.push(inner) + 1
                });
                match pushed {
                    Ok(count) => count,
                    Err(Raised) => {
                        // Dropped before the pushes below, which may raise.
                        drop(values);
                        let message = format!("bgworker.worker.receive: {}", error_text(state, -1));
                        lua_settop(state, 0);
                        not_received(state, "error", Some(&message))
                    }
                }
            }
            Received::TimedOut => not_received(state, "timeout", None),
            Received::Cancelled => not_received(state, "cancelled", None),
        }
    }
}

/// Push what `receive` returns when it has no message: `false, problem`
/// and the message, if any.
///
/// # Safety
/// In a C function of a worker's state.
unsafe fn not_received(state: *mut lua_State, problem: &str, message: Option<&str>) -> c_int {
    unsafe {
        lua_pushboolean(state, 0);
        push_str(state, problem);
        match message {
            Some(message) => {
                push_str(state, message);
                3
            }
            None => 2,
        }
    }
}

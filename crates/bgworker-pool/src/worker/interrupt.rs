//! How a cancellation stops Lua code that a worker runs, at no cost while
//! nobody cancels.
//!
//! # The mechanism
//!
//! The Lua thread cancels a task (its [`Control`]) and then sends the
//! worker's thread the signal [`SIGNAL`] with `pthread_sigqueue`, carrying
//! the address of the worker's [`Interrupt`]. The handler runs *on the
//! worker's thread*, interrupting whatever it does, and sets a count hook
//! on each Lua state that thread is running: the main state and the
//! coroutines being resumed. That is what `lua.c` and `luajit.c` do from
//! their SIGINT handler; doing it from the thread itself, not from the Lua
//! thread, keeps it free of data races on the state. The hook fires at the
//! next instruction the interpreter runs (Lua 5.4 picks it up at the next
//! jump at the latest), and raises the cancellation error if the current
//! task is cancelled; otherwise (a late or stray signal) it removes itself.
//!
//! The cancellation error must end the job, so it must not be swallowed:
//! the worker state's `pcall`, `xpcall` and `coroutine.resume`/`wrap`
//! (worker.lua) raise it again when the call they protect failed while the
//! task is cancelled, and the hook, after it raised once, stays on with a
//! long period ([`REPEAT_COUNT`] instructions) for code that swallows errors
//! in C. On Lua 5.4, `__close` variables run as the error unwinds (and a
//! cancelled coroutine is closed), within that period.
//!
//! Coroutines: PUC Lua keeps hooks per coroutine, so the resume wrapper
//! records the coroutines being resumed (and anchors them in the registry
//! until the task ends, so the handler never touches a collected one). A
//! coroutine resumed from C, bypassing the wrapper, is not reached; its
//! resumer is, when control comes back to it.
//!
//! # When the application takes the signal
//!
//! SIGURG is also the kernel's "out-of-band data on a socket" signal, and
//! an application (or a library: the Go runtime uses SIGURG too) may
//! install a handler of its own, or `SIG_IGN`, after a pool installed ours:
//! the pools' signals would then be lost, and a cancelled job would run on.
//! So before each signal it sends, a pool checks that ours is still
//! installed ([`ensure_handler`]) and puts it back if not, warning once on
//! stderr. Ours passes every signal no pool sent on to the handler it
//! replaced, as it did from the start, so the application still gets its
//! own. That handler may pass them back to ours (if it kept ours as its
//! previous one): ours then knows the signal it is passing on, and lets it
//! go.
//!
//! # Why not an always-on count hook
//!
//! It is what effil does, and it needs neither signals nor bookkeeping. But
//! on Lua 5.3 and 5.4 the interpreter calls into the hook machinery at every
//! instruction while a count hook is set, whatever its period: a CPU-bound
//! loop then runs 1.5x (5.3) to 2.5x (5.4) slower (bench/pool.lua). Setting
//! the hook from the Lua thread directly (as Lanes does) costs nothing
//! either, but races with the worker: on 5.4, `lua_sethook` walks the
//! state's call frames while the worker frees and reuses them.
//!
//! # LuaJIT
//!
//! Code the JIT compiled never calls hooks, set by any means (measured:
//! a compiled `while true do end`, an arithmetic loop, a loop calling
//! `math.sin` or `string.format`, all keep running after a hook is set
//! from a signal handler, from another thread, or before the loop
//! started). Cancellation reaches LuaJIT code only while it runs in the
//! interpreter: a compiled loop stops when it leaves compiled code, and a
//! compiled `while true do end` never does. A pool made with `jit = false`
//! turns the JIT off in its workers (`jit.off()`): every job can then be
//! cancelled, at the interpreter's speed. See lib.rs for the choice.
//!
//! # Invariants
//! - `states[..depth]` is written by the worker thread only, and read by
//!   the handler, which runs on that same thread: entries are stored
//!   before `depth` covers them, so the handler sees only complete ones.
//!   Each is the main state or a coroutine anchored in the registry.
//! - A signal is sent only to a thread whose `JoinHandle` the pool holds
//!   (not joined, not detached), so the thread id is valid. The worker
//!   blocks the signal and empties `states` before it closes its state, so
//!   a late signal stays pending and dies with the thread.
//! - The hook is the only place the worker itself sets or clears hooks,
//!   and it checks the task again after clearing: an arming that raced
//!   with the clearing is not lost.
//! - `PREVIOUS` is null or points into `REPLACED`, which never frees: the
//!   handler may read it at any moment. Ours is installed only under
//!   `REPLACED`'s lock, and only when it is not the installed one, so it
//!   never replaces (and passes signals on to) itself.

use std::ffi::{c_int, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bgworker_ffi::lua::registry_pointer;
use mlua::ffi::{
    luaL_argerror, lua_Debug, lua_State, lua_createtable, lua_error, lua_gettop, lua_pop, lua_pushboolean,
    lua_pushlightuserdata, lua_pushvalue, lua_rawgetp, lua_rawseti, lua_rawsetp, lua_sethook, lua_tointeger,
    lua_tothread, LUA_MASKCOUNT, LUA_REGISTRYINDEX,
};

use crate::sync::control::Control;

/// The signal that interrupts a worker: SIGURG, as the Go runtime uses for
/// the same purpose, since its default action is to ignore it and almost
/// no program handles it. Signals of this kind not sent by a pool go to
/// the handler that ours replaced, if any (module docs).
pub const SIGNAL: c_int = libc::SIGURG;

/// The hook's period when the signal arms it: the next instruction.
const FIRST_COUNT: c_int = 1;

/// The hook's period after it raised the cancellation error once: long
/// enough for `__close` handlers and error handlers to finish, short
/// enough to stop code that swallows the error in C within milliseconds.
pub const REPEAT_COUNT: c_int = 1_000_000;

/// Coroutines nested deeper than this are not armed (the C stack limits
/// nesting to about 200 anyway); their resumers are.
const TRACKED: usize = 256;

/// Registry keys: addresses in this library.
static KEYS: [u8; 3] = [0; 3];

fn interrupt_key() -> *const c_void {
    &KEYS[0] as *const u8 as *const c_void
}

fn cancel_key() -> *const c_void {
    &KEYS[1] as *const u8 as *const c_void
}

fn anchors_key() -> *const c_void {
    &KEYS[2] as *const u8 as *const c_void
}

/// One worker's interrupt: shared by the worker, its signal handler and
/// the pool (which sends the signal).
pub struct Interrupt {
    /// The Lua states the worker's thread is running: `[0]` its main
    /// state, then the coroutines being resumed, innermost last.
    states: [AtomicPtr<lua_State>; TRACKED],
    depth: AtomicUsize,
    /// Set by `enter` when a coroutine was anchored during the task.
    anchored: AtomicBool,
    /// The task the worker runs, if any.
    task: Mutex<Option<Arc<Control>>>,
}

impl Default for Interrupt {
    fn default() -> Self {
        Interrupt {
            states: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            depth: AtomicUsize::new(0),
            anchored: AtomicBool::new(false),
            task: Mutex::new(None),
        }
    }
}

/// Make our handler [`SIGNAL`]'s: install it the first time, and put it
/// back if the application (or a library) installed another since, which
/// ours then passes the signals not meant for a worker on to; warn once on
/// stderr when it had to. Called on the Lua thread before a pool starts
/// its workers, and before each signal it sends: a cancel then always
/// reaches its worker (one system call, on cancels only).
pub fn ensure_handler() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let mut replaced_so_far = REPLACED.lock().unwrap_or_else(PoisonError::into_inner);
    // SAFETY: plain libc calls on local structs.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        let ours = on_signal as *const () as usize;
        if libc::sigaction(SIGNAL, ptr::null(), &mut current) != 0 || current.sa_sigaction == ours {
            return;
        }
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ours;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        let mut replaced: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(SIGNAL, &action, &mut replaced) != 0 {
            return;
        }
        // A signal not meant for a worker that comes in between goes to
        // the handler before (or nowhere, the first time).
        let replaced: &'static libc::sigaction = Box::leak(Box::new(replaced));
        PREVIOUS.store(ptr::from_ref(replaced).cast_mut(), Ordering::Release);
        replaced_so_far.push(replaced);
    }
    if replaced_so_far.len() > 1 && !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "bgworker.pool: SIGURG's handler was replaced; bgworker.pool put its own back (it cancels jobs with \
             SIGURG), which passes the other SIGURGs on to the replacing one"
        );
    }
}

/// The handlers ours replaced, the last one last: one per time ours was
/// installed, never freed (a signal handler may still be reading one).
/// Its lock makes one install at a time (pools of several Lua states), so
/// that ours never replaces itself, which would make it pass signals on to
/// itself.
static REPLACED: Mutex<Vec<&'static libc::sigaction>> = Mutex::new(Vec::new());

/// The last of [`REPLACED`], which gets the signals not meant for a
/// worker; null before the first install.
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(ptr::null_mut());

/// The signals (by their siginfo, unique to each delivery) that handlers
/// are passing on to the handler ours replaced. That one may pass them
/// back to ours (it kept ours as its own previous handler, and ours was
/// put back since): passing them on again would recurse without end.
static PASSING_ON: [AtomicPtr<libc::siginfo_t>; 64] = [const { AtomicPtr::new(ptr::null_mut()) }; 64];

/// Async-signal-safe: atomics, `getpid`, and `lua_sethook` on the states
/// of the thread it interrupts (module docs).
extern "C" fn on_signal(signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo (SA_SIGINFO); a handler
    // that passes a signal on to ours passes the one it got. A SI_QUEUE
    // signal from this process was sent by `send`, whose value is the
    // address of an Interrupt whose worker is this thread, alive while it is.
    unsafe {
        if info.is_null() {
            return;
        }
        if (*info).si_code == libc::SI_QUEUE && (*info).si_pid() == libc::getpid() {
            let target = (*info).si_value().sival_ptr as *const Interrupt;
            if let Some(target) = target.as_ref() {
                target.arm(FIRST_COUNT);
                return;
            }
        }
        if let Some(previous) = PREVIOUS.load(Ordering::Acquire).as_ref() {
            pass_on(previous, signal, info, context);
        }
    }
}

/// Call `previous`, the handler ours replaced, with a signal that is not
/// ours, unless this is that signal coming back from it ([`PASSING_ON`]).
///
/// # Safety
/// In the signal handler, with its arguments; `info` is not null.
unsafe fn pass_on(previous: &libc::sigaction, signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    let handler = previous.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        return;
    }
    if PASSING_ON.iter().any(|slot| slot.load(Ordering::Acquire) == info) {
        return;
    }
    // No free slot (64 signals passed on at once): dropped, rather than
    // risk the recursion.
    let null = ptr::null_mut();
    let free = |slot: &&AtomicPtr<libc::siginfo_t>| {
        slot.compare_exchange(null, info, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    };
    let Some(slot) = PASSING_ON.iter().find(free) else { return };
    // SAFETY: the address of a handler the kernel accepted, of the kind
    // its flags say.
    unsafe {
        if previous.sa_flags & libc::SA_SIGINFO != 0 {
            let handler: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) = std::mem::transmute(handler);
            handler(signal, info, context);
        } else {
            let handler: extern "C" fn(c_int) = std::mem::transmute(handler);
            handler(signal);
        }
    }
    slot.store(null, Ordering::Release);
}

/// Block or unblock [`SIGNAL`] for the calling thread.
fn mask_signal(how: c_int) {
    // SAFETY: plain libc calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, SIGNAL);
        libc::pthread_sigmask(how, &set, ptr::null_mut());
    }
}

impl Interrupt {
    fn task(&self) -> std::sync::MutexGuard<'_, Option<Arc<Control>>> {
        self.task.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True when the running task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.task().as_ref().is_some_and(|task| task.is_cancelled())
    }

    /// On the Lua thread: make the worker running on `thread` look at its
    /// task now. `thread` must be the worker's, not joined nor detached.
    pub fn send(self: &Arc<Self>, thread: libc::pthread_t) {
        let value = libc::sigval { sival_ptr: Arc::as_ptr(self) as *mut c_void };
        // SAFETY: a valid thread (the caller's promise). ESRCH or EAGAIN
        // leave the task cancelled but running on: close then abandons it.
        unsafe { libc::pthread_sigqueue(thread, SIGNAL, value) };
    }

    /// Set the hook on every state of `states`, with period `count`.
    fn arm(&self, count: c_int) {
        let depth = self.depth.load(Ordering::Acquire).min(TRACKED);
        for slot in &self.states[..depth] {
            let state = slot.load(Ordering::Relaxed);
            // SAFETY: a live state of this thread (invariants).
            unsafe { lua_sethook(state, Some(hook), LUA_MASKCOUNT, count) };
        }
    }

    /// On the worker thread, once: take the signal, and serve `state`,
    /// its main state, whose registry gets the interrupt's address, the
    /// cancellation error `cancel` (on top of the stack, popped) and the
    /// table that anchors coroutines.
    ///
    /// # Safety
    /// `state` is the worker's main state, on its thread, with `cancel`
    /// on top; `self` outlives it (the worker detaches before closing it).
    pub unsafe fn attach(&self, state: *mut lua_State) {
        unsafe {
            lua_rawsetp(state, LUA_REGISTRYINDEX, cancel_key());
            lua_pushlightuserdata(state, self as *const Interrupt as *mut c_void);
            lua_rawsetp(state, LUA_REGISTRYINDEX, interrupt_key());
            lua_createtable(state, 0, 0);
            lua_rawsetp(state, LUA_REGISTRYINDEX, anchors_key());
        }
        self.states[0].store(state, Ordering::Relaxed);
        self.depth.store(1, Ordering::Release);
        mask_signal(libc::SIG_UNBLOCK);
    }

    /// On the worker thread, before it closes its state: no signal is
    /// handled any more, and no state is left to arm.
    pub fn detach(&self) {
        mask_signal(libc::SIG_BLOCK);
        self.depth.store(0, Ordering::Release);
    }

    /// The worker starts running `task`.
    pub fn begin(&self, task: Arc<Control>) {
        *self.task() = Some(task);
    }

    /// The worker's task ended: forget it and the coroutines it resumed.
    /// True when it anchored some: then call [`drop_anchors`].
    pub fn end(&self) -> bool {
        *self.task() = None;
        self.depth.store(1, Ordering::Release);
        self.anchored.swap(false, Ordering::Relaxed)
    }
}

/// Let the coroutines anchored during the last task be collected.
///
/// # Safety
/// `state` is an attached main state, on its worker thread, between tasks.
pub unsafe fn drop_anchors(state: *mut lua_State) {
    unsafe {
        lua_createtable(state, 0, 0);
        lua_rawsetp(state, LUA_REGISTRYINDEX, anchors_key());
    }
}

/// The interrupt of the worker whose state is `state`.
///
/// # Safety
/// `state` is a state of an attached worker, on its thread.
unsafe fn interrupt_of<'a>(state: *mut lua_State) -> &'a Interrupt {
    // SAFETY: set by `attach`; the interrupt outlives the state.
    unsafe { &*registry_pointer::<Interrupt>(state, interrupt_key()) }
}

/// Push the cancellation error and raise it.
///
/// # Safety
/// As for `interrupt_of`; nothing with a destructor may be live in the caller.
unsafe fn raise_cancel(state: *mut lua_State) -> ! {
    unsafe {
        lua_rawgetp(state, LUA_REGISTRYINDEX, cancel_key());
        lua_error(state)
    }
}

unsafe extern "C-unwind" fn hook(state: *mut lua_State, _: *mut lua_Debug) {
    // SAFETY: the hook is only set on states of attached workers.
    let interrupt = unsafe { interrupt_of(state) };
    if interrupt.is_cancelled() {
        interrupt.arm(REPEAT_COUNT);
        unsafe { raise_cancel(state) }
    }
    // SAFETY: on this state's own thread.
    unsafe { lua_sethook(state, None, 0, 0) };
    if interrupt.is_cancelled() {
        // Cancelled while we cleared: an arming may have been undone.
        interrupt.arm(FIRST_COUNT);
    }
}

/// `interrupted()`: true when the running task was cancelled.
pub unsafe extern "C-unwind" fn interrupted(state: *mut lua_State) -> c_int {
    unsafe {
        let cancelled = interrupt_of(state).is_cancelled();
        lua_pushboolean(state, cancelled as c_int);
    }
    1
}

/// `enter(co)`: `co` is about to be resumed; returns the depth to hand to
/// `leave` when the resume returns.
pub unsafe extern "C-unwind" fn enter(state: *mut lua_State) -> c_int {
    unsafe {
        let coroutine = lua_tothread(state, 1);
        if coroutine.is_null() {
            const EXPECTED: &CStr = c"coroutine expected";
            luaL_argerror(state, 1, EXPECTED.as_ptr());
            unreachable!("luaL_argerror raises");
        }
        let interrupt = interrupt_of(state);
        let depth = interrupt.depth.load(Ordering::Relaxed);
        if depth < TRACKED {
            lua_rawgetp(state, LUA_REGISTRYINDEX, anchors_key());
            lua_pushvalue(state, 1);
            lua_rawseti(state, -2, depth as mlua::ffi::lua_Integer);
            lua_pop(state, 1);
            interrupt.anchored.store(true, Ordering::Relaxed);
            interrupt.states[depth].store(coroutine, Ordering::Relaxed);
        }
        interrupt.depth.store(depth + 1, Ordering::Release);
        mlua::ffi::lua_pushinteger(state, (depth + 1) as mlua::ffi::lua_Integer);
    }
    1
}

/// `leave(depth)`: the resume that `enter` returned `depth` for returned.
pub unsafe extern "C-unwind" fn leave(state: *mut lua_State) -> c_int {
    unsafe {
        if lua_gettop(state) >= 1 {
            let depth = lua_tointeger(state, 1).max(1) as usize;
            interrupt_of(state).depth.store(depth - 1, Ordering::Release);
        }
    }
    0
}

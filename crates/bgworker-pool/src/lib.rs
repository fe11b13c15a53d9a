//! `bgworker.pool_native`: the native half of `bgworker.pool`.
//!
//! A pool is a set of OS threads, each with a Lua state of its own, made by
//! the interpreter that loaded this module (so of the caller's Lua version).
//! The Lua thread queues jobs; a worker copies a job's arguments into its
//! state, runs the function, copies the results out, and delivers them
//! through bgworker as events, which the dispatcher hands to the pool's
//! `on_events` on the Lua thread. The Lua layer (`lua/bgworker/pool.lua`)
//! keeps job handles, runs callbacks and documents the API.
//!
//! # Map
//!
//! Three layers, a folder each; a layer uses the ones above it, and the
//! workers also post their events through `lua::events`.
//!
//! - `sync/`: the concurrency the workers and the Lua thread share, free
//!   of Lua and of `unsafe`, checked by loom models.
//!   - `board`: the queue and every live job's state; `stats`' counts.
//!   - `outbox`: events on their way out, and when a carrier is needed.
//!   - `control`: one task's cancel flag and its progress items in flight.
//!   - `mail`: messages on their way to jobs.
//!   - `crew`: the workers as a group: which started, failed, ended.
//!   - `locks`: std's locks, or loom's under `--cfg loom`.
//! - `worker/`: a worker thread and its Lua state.
//!   - `thread`: a worker's body: state, init, then jobs until closed.
//!   - `state`: its Lua state, made and used on its thread only.
//!   - `worker.lua`: the state's setup: error handler, `pcall` and resume wrappers.
//!   - `interrupt`: how a cancel stops running Lua code (SIGURG, a hook).
//!   - `job`: what a worker runs (a function, its arguments) and its outcome.
//!   - `value`: values copied between Lua states.
//! - `lua/`: the binding, on the Lua thread.
//!   - `module`: the module table and the pool's methods (the contract below).
//!   - `pool`: a pool: starts, cancels, closes and joins its workers.
//!   - `function`: a job's function checked and dumped, or recognised.
//!   - `events`: progress and outcomes carried to `on_events` through the core.
//!
//! The raw Lua C API helpers that `worker/` and `lua/` use (raising,
//! strings, a protected call, type names), and their safety rule, are
//! `bgworker_ffi::lua`'s, shared with the core; a pool tells it was
//! inherited by a fork with `bgworker_ffi::fork`.
//!
//! # The contract with the Lua layer
//!
//! ```lua
//! local native = require "bgworker.pool_native"
//! native.cpus, native.MAX_THREADS, native.CLOSE_TIMEOUT, native.RETIRE_GRACE,
//! native.PROGRESS_IN_FLIGHT, native.MESSAGES_QUEUED, native.MAX_VALUES
//! native.new(opts) -> pool | nil, err_value, traceback
//! native.refusal(fn) -> nil | message
//! ```
//! A job's function (and an init) is a Lua function (moved by its dump:
//! lua/function.rs, with copies of its upvalues: worker/value), or a
//! "module.function" string, required in the worker. `refusal` says why a
//! value cannot be one (nil when it can; its upvalues are checked as they
//! are copied, by `queue` and `new`).
//!
//! `opts`: `threads` (1..MAX_THREADS), `path` and `cpath` (the workers'
//! `package.path` and `package.cpath`), `init` (a job's function; optional), `on_events`
//! (function, below), `init_timeout` (seconds, default 30, `math.huge`: none),
//! `jit` (LuaJIT only: false turns the JIT off in the workers, see
//! "Cancelling"). Unknown options are refused.
//!
//! `new` starts the workers; each makes its state and runs `init` once,
//! before any job, and `new` returns when all did. If an init raises, the
//! workers are stopped and joined (within what is left of `init_timeout`)
//! and `new` returns `nil`, the error value (copied as a job's error, below)
//! and the traceback (nil when the worker's state could not be made). After `init_timeout`, the workers are cancelled and
//! abandoned as by `close(0)` and `new` returns `nil, "init timed out"`.
//!
//! - `pool:queue(fn, args...)` -> `id` | `nil, position, message` |
//!   `nil, false, message`: queue a job running `fn` with `args` as its
//!   arguments (a function among them is refused, as any value that cannot
//!   cross). `position` 0 is `fn` itself (`message`: its `refusal`, or an
//!   upvalue that cannot be copied), from 1
//!   an argument that cannot be copied (counted from the first of `args`); `false`, a pool that
//!   this process may not use (below), so that the Lua layer raises under
//!   its own method's name. Ids are integers, from 1, unique within the
//!   pool. Raises on a closed pool.
//! - `pool:send(id, values...)` -> `true` | `false, "ended"` | `false,
//!   "full"` | `nil, position, message`: queue a message for job `id`,
//!   queued or running and not yet returned (else `"ended"`), unless
//!   [`MESSAGES_QUEUED`](sync::mail::MESSAGES_QUEUED) (64) wait for it
//!   already (`"full"`: it never waits). `position` (from 1) is a value
//!   that cannot be copied. The job takes them in order with `receive`
//!   (below); those it has not taken when it ends are dropped.
//! - `pool:cancel(id)` -> `"queued"` (taken out of the queue: it will never
//!   run) | `"running"` (its worker is interrupted, and its outcome will
//!   never be delivered) | `false` (its outcome is on its way, or it ended,
//!   or the id is unknown). After `"queued"` or `"running"`, no event of
//!   that job ever reaches `on_events`: its progress events already in the
//!   core are left out when they are decoded.
//! - `pool:status(id)` -> `"queued"` | `"running"` (from the moment a
//!   worker takes it until the Lua thread decodes its outcome) |
//!   `"finished"` (done, failed or cancelled) | `nil` (unknown id).
//! - `pool:stats()` -> `{threads, abandoned, submitted, queued, running,
//!   done, failed, cancelled, wait_mean, wait_max, run_mean, run_max}`: one snapshot
//!   under one lock, so `queued + running + done + failed + cancelled ==
//!   submitted`. `threads` is 0 once closed. Times are seconds: wait =
//!   submit to start (jobs started), run = start to the end of the function
//!   (jobs that produced an outcome). An outcome that is dropped unread
//!   (no dispatcher, or the pool closed while it waited for room in a
//!   bounded queue) counts its job as cancelled, and reaches `on_events`
//!   later as `id, false` (see `notify_lost`).
//! - `pool:retire_stuck()` -> count: retire each worker that has run a
//!   cancelled job for `RETIRE_GRACE` (0.25 s) or more (code the hook
//!   cannot reach: compiled by LuaJIT, blocked in C, a finaliser), and
//!   start a worker in its place; returns how many. A retired worker takes
//!   no other job and ends when its code returns; `stats().abandoned`
//!   counts those still running. The Lua layer calls it `RETIRE_GRACE`
//!   after each cancel that returned `"running"`. A replacement whose init
//!   raises, or runs for `init_timeout`, is given up when the pool next
//!   retires workers or takes stats: retired in its init if it runs on,
//!   and not replaced; `stats().threads` is one less for each.
//! - `pool:notify_lost()`: call it when a dispatcher starts: the jobs whose
//!   outcomes were dropped unread while none ran reach `on_events` through
//!   it, as pairs `id, false` (they also do, without this call, when a
//!   dispatcher was running by the time they were dropped).
//! - `pool:close(timeout)` -> `true` | `false, "timeout"`: cancel the queued
//!   jobs, interrupt the running ones, wait at most `timeout` seconds (>= 0,
//!   `math.huge`: no limit) for the workers to end, join those that ended
//!   and abandon the others. Closing a closed pool returns true. A pool
//!   that is collected, or whose state closes, closes without waiting
//!   (`close(0)`); `CLOSE_TIMEOUT` (1 s) is the Lua layer's default.
//!
//! Events reach the Lua thread in the order the workers posted them (so in
//! order per job, progress first) as calls `on_events(list, n)`: `list`
//! holds `n` values (up to 64: 32 events), pairs `id, value`: `-id, {n =
//! count, values...}` for a progress of job `id`; `id, true` for a job done
//! without results; `id, {n = count, true, results...}` for one done with
//! results; and `id, {n = 3, false, err, traceback}` for one that failed,
//! where `err` is the error value itself when it can be copied (which
//! values can: docs/jobs.md, "A job's function and its values") and its
//! `tostring` otherwise, and `traceback` a string, or nil when the job did
//! not raise: its results could not be copied back, which fails it with a
//! message as `err`;
//! `id, false` for a job whose outcome was dropped unread (it ended as
//! cancelled; a notice, not an outcome, so it may follow the job's
//! progress events by any distance, and it comes once).
//! A job's results, and a progress event's values, are at most
//! [`MAX_VALUES`](worker::value::MAX_VALUES) (7900 on Lua 5.1 and LuaJIT, 100,000
//! on later versions): as many as the Lua thread can unpack. A job that
//! returns more fails with a message.
//!
//! In a worker, `require "bgworker.worker"` gives `progress(...)` (values
//! cross as results do; raises at the caller for one that cannot, for more
//! than `MAX_VALUES` of them, outside a job, and once the job is cancelled;
//! waits while
//! [`PROGRESS_IN_FLIGHT`](sync::control::PROGRESS_IN_FLIGHT) (64) of the job's
//! events are delivered but not yet decoded, so a job that emits faster than
//! the loop drains is slowed, not buffered), `cancelled()` (true once
//! the running job is cancelled; false in init) and `receive([timeout])`
//! (the values of the job's next message, waiting up to `timeout` seconds
//! (nil: no limit), or `nil, "timeout"`; raises outside a job; a cancel
//! ends the job there at once, as a cancellation point).
//!
//! # Cancelling
//!
//! A running job is stopped by raising an error in its Lua code from a
//! hook: interrupt.rs says how (a signal makes the worker's thread set the
//! hook on itself), why (an always-on count hook costs 1.5x to 2.5x on
//! CPU-bound Lua 5.3 and 5.4 code; this costs nothing until a cancel), and
//! how the error gets past the job's own `pcall`s. A job blocked in C
//! (`socket.sleep`, `os.execute`) stops when that call returns. The signal
//! is SIGURG: if the application installs a handler of its own for it (or
//! ignores it) after a pool started, the next cancel puts ours back, which
//! passes the other SIGURGs on to the application's, and warns once on
//! stderr.
//!
//! LuaJIT: compiled code never runs hooks, set by any means (interrupt.rs
//! lists what was tried), so a JIT-compiled loop cannot be stopped until it
//! leaves compiled code (a `while true do end` never does); close then
//! abandons its worker, which keeps a core busy until the process exits.
//! `jit = false` turns the JIT off in the workers (`jit.off()` before
//! `init`): every job can then be cancelled, at the interpreter's speed
//! (bench/pool.lua: a CPU-bound arithmetic job takes 2.5x the time it takes
//! with the JIT, still a little less than on PUC Lua 5.4; code that calls
//! many small functions loses more, up to 12x).
//! This module keeps the JIT on unless asked; `bgworker.pool` asks for it
//! off unless its user asks for it on, since a job that cannot be cancelled
//! breaks what the pool promises.
//!
//! # Threads and Lua states
//!
//! A pool's threads serve that pool only, so one Lua state's pools never
//! wait on another state's queue: a worker waits for room only in its own
//! state's bounded queue, and gives up once its job is cancelled or its
//! pool closes (the Lua thread, then busy closing, makes no room).
//!
//! A pool belongs to the process that made it: in a child forked after
//! that, its methods raise (`queue` returns `nil, false, message`), and
//! closing or collecting it does nothing (its threads are the parent's,
//! and a lock one of them held at the fork stays held in the child).

// Under `--cfg loom`, only the Lua-free layer is built: its models need no
// Lua, and Cargo.toml leaves mlua out. Most of its functions then lack
// their callers.
#[cfg_attr(loom, allow(dead_code))]
mod sync;

#[cfg(not(loom))]
mod lua;
#[cfg(not(loom))]
mod worker;

// They embed a Lua: `vendored` builds only.
#[cfg(all(test, feature = "vendored", not(loom)))]
mod tests;

#[cfg(not(loom))]
pub use lua::module::exports;

#[cfg(all(feature = "module", not(loom)))]
#[mlua::lua_module(name = "bgworker_pool_native")]
fn open(lua: &mlua::Lua) -> mlua::Result<mlua::Table> {
    bgworker_ffi::runtime::check_lua(lua, "bgworker.pool_native")?;
    exports(lua)
}

-- The dispatcher base: what every event loop's dispatcher shares (internal).
--
-- A dispatcher starts the core with a wake-up signal its loop can wait on,
-- and when woken drains: takes items with `core.poll()` and calls their
-- callbacks in protected mode, handing each error to its error handler.
-- Each loop (bgworker.select, .copas, .luv, .cqueues, .ngx) is a module
-- whose `class`, made by `class` below, is the loop's adapter: what the
-- base needs of that loop (bgworker.adapter). The base owns the rest: options,
-- start, stop, errors, stats, and the compatibility between Lua versions.
-- The drain engine (bgworker.drain: slices, budgets, deferred calls) adds
-- its methods to the base; runners (bgworker.runner: the coroutines drains
-- run in, so that a callback may wait), waiters (bgworker.waiter: how
-- `await` and `job:get` suspend their caller) and wake-up signals
-- (bgworker.signal) are modules of their own.
--
-- Invariants:
--   * At most one dispatcher runs in a Lua state, and "running" is the
--     core's own state (`core.run()`), never a flag of a Lua object that may
--     be lost: a dispatcher owns the core's run it started, and only while
--     `core.run() == self.run`.
--   * A dispatcher that nobody references is stopped when it is collected:
--     it holds `core.guard()`, and this module refers to it weakly only.
--   * Stopping resumes every waiter of the dispatcher, which then returns
--     "stopped" (bgworker.waiter).
--   * A dispatcher keeps its loop alive exactly while `keeps_loop()` says so
--     (see "Keeping the loop alive"): each change of what it reads (holds,
--     `ref`, the core's keepers, items pending or due) ends in
--     `check_alive()`, at once or after the drain in progress, which the
--     loop's adapter calls when it ends.

--- What every dispatcher has, whatever its event loop.
--
-- `bgworker.new(opts)` makes the dispatcher of `opts.loop`, and at most one
-- runs in a Lua state at a time. Each loop's page (bgworker.select,
-- bgworker.copas, bgworker.luv, bgworker.cqueues, bgworker.ngx) tells how it
-- runs callbacks in its loop, and the methods and fields of its own:
--
-- | | select | copas | luv | cqueues | ngx |
-- |---|---|---|---|---|---|
-- | `stop()`, `stats()` | yes | yes | yes | yes | yes |
-- | `ref()`, `unref()`, `has_ref()` | no effect | Copas 4 | yes | no effect | no effect |
-- | `dispatch([max])` | yes | raises | yes | yes | raises |
-- | own methods | `wait`, `getfd`, `dirty` | | | `loop`, `pollfd`, `events`, `timeout` | |
-- | fields | `socket` (or `fd`) | `reader` | `fd`, `handle` | `fd` | |
--
-- A dispatcher that nobody references any more is stopped when it is
-- garbage-collected.
--
-- @classmod Dispatcher

local adapter = require "bgworker.adapter"
local args = require "bgworker.args"
local core = require "bgworker.core"
local protect = require "bgworker.protect"
local runner = require "bgworker.runner"
local timers = require "bgworker.timers"

local error, getmetatable, pairs, pcall, require, setmetatable = error, getmetatable, pairs, pcall,
  require, setmetatable
local tostring, type = tostring, type

local M = {}

-- ------------------------------------------------------------------------
-- Lua versions: what differs between 5.1, LuaJIT and 5.2+, settled here
-- once for every module of bgworker's Lua layer. (Protected calls that may
-- yield are bgworker.protect's.)

-- `unpack`: a global in 5.1 and LuaJIT, `table.unpack` since 5.2.
M.unpack = table.unpack or unpack

-- Is the caller a coroutine (not the main thread)? Also returns it: the
-- caller's own, not a helper coroutine of bgworker.protect on Lua 5.1.
function M.in_coroutine()
  local co = protect.running()
  return co ~= nil, co
end

-- ------------------------------------------------------------------------
-- Defaults

-- Callbacks a drain runs before it lets the loop run, by default.
M.DEFAULT_BUDGET = 1000

-- Seconds a drain runs callbacks before it lets the loop run (checked
-- between callbacks: see bgworker.drain, "Slices").
M.SLICE = 0.005

-- The default error handler: writes the traceback (which starts with the
-- message) to stderr.
function M.default_errorhandler(err, tb)
  io.stderr:write("bgworker: ", tb or tostring(err), "\n")
end

-- The dispatcher that started the core's current run, if any. Weak, so that
-- a dispatcher nobody references can be collected (and so stopped). Kept in
-- the registry, as the core's run is: a second copy of this module (loaded
-- after `package.loaded` was reset, as busted does between spec files)
-- finds the dispatcher that the first one started, so that there is always
-- a dispatcher to stop when one is running.
local CURRENT_KEY = "bgworker.dispatcher.current"
local registry = debug.getregistry()
local current = registry[CURRENT_KEY]
if not current then
  current = setmetatable({}, { __mode = "v" })
  registry[CURRENT_KEY] = current
end

local Dispatcher = {}
M.Dispatcher = Dispatcher

-- ------------------------------------------------------------------------
-- Loops: the defaults of the adapter's fields (bgworker.adapter), and the
-- class of each loop's dispatchers.

Dispatcher.gettime = core.now
Dispatcher.default_errorhandler = M.default_errorhandler
function Dispatcher.before_stop() end
function Dispatcher.after_stop() end
function Dispatcher.before_dispatch() end
Dispatcher.run_in_runner = runner.run
function Dispatcher.adopt() return false end
function Dispatcher.retire_runner() end
-- (A loop that never ends by itself: what keeps it alive is not looked at.)
local function keep_nothing() end
Dispatcher.keep_alive = keep_nothing

function Dispatcher:timer(seconds, fn)
  local heap = self.timers
  if not heap then
    heap = timers.new()
    self.timers = heap
  end
  return heap:add(seconds, fn)
end

-- Options every loop accepts.
local COMMON_OPTIONS = {
  capacity = function(fname, n, name, v)
    if v ~= nil and not (args.is_count(v) and v <= core.MAX_CAPACITY) then
      return args.bad(fname, n, ("%s must be an integer in 1..%d, got %s"):format(name,
        core.MAX_CAPACITY, args.describe(v)))
    end
  end,
  budget = args.option.count,
  errorhandler = args.option.func,
  loop = args.option.one_of(adapter.LOOPS),
}

-- Make the class of a loop's dispatchers: `name` ("select", "copas", ...)
-- and the options it takes beyond the common ones. The class inherits the
-- base's methods (the drain's among them); the loop module adds the fields
-- of its adapter.
function M.class(name, options)
  -- The drain engine adds its methods to the base (it requires this
  -- module, so it is not required at the top).
  require "bgworker.drain"
  local class = setmetatable({}, { __index = Dispatcher })
  class.__index = class
  class.loop_name = name
  class.options = {}
  for k, v in pairs(COMMON_OPTIONS) do class.options[k] = v end
  for k, v in pairs(options or {}) do class.options[k] = v end
  adapter.made(class)
  return class
end

-- The dispatcher of the core's current run, if a dispatcher started it.
function M.current()
  local d = current[1]
  if d and d:owns_run() then
    return d
  end
  return nil
end

-- The running dispatcher, or nil and the message of an error for `fname`
-- to raise, for what needs one.
function M.current_for(fname)
  local d = M.current()
  if d then
    return d
  end
  return nil, fname .. ": no bgworker dispatcher is running in this Lua state; start one" ..
    " with bgworker.new() first"
end

-- Nothing, or why `self` is not a dispatcher: the message of a bad self
-- error of `method`.
function M.check_self(self, method)
  if type(self) ~= "table" or not adapter.is_class(getmetatable(self)) then
    return args.bad_self(method, ("dispatcher expected, got %s; call it as dispatcher:%s()"):format(
      type(self), method))
  end
end

-- ------------------------------------------------------------------------
-- Starting

-- Nothing, or why no dispatcher can start now (for `fname`'s message).
-- This is the one "already running" check of every loop.
local function refuse_second(fname)
  local d = M.current()
  if d then
    return ("%s: a dispatcher is already running in this Lua state (loop %q); stop it first"):format(
      fname, d.loop_name)
  end
  if core.running() then
    return fname .. ": bgworker.core is already started in this Lua state; stop it first"
  end
end

-- A new dispatcher of `class`, started: the options checked (as argument
-- #1 of `fname`), the core started by `class.start`. Returns it, or nil and
-- the message of the error that the public function raises.
function M.open(class, fname, opts)
  local msg
  opts, msg = args.options(fname, 1, opts, class.options)
  if not opts then
    return nil, msg
  end
  msg = refuse_second(fname)
  if msg then
    return nil, msg
  end
  local self = setmetatable({
    -- Callbacks per drain (see bgworker.drain, "Slices").
    budget = opts.budget or M.DEFAULT_BUDGET,
    errorhandler = opts.errorhandler or class.default_errorhandler,
    call = protect.call,
    stopped = false,
    -- Seconds per callback in the last slice (if any), and a slice to
    -- reuse (bgworker.drain).
    pace = nil,
    spare_slice = nil,
    -- Callbacks run, errors reported, and callbacks suspended in a wait
    -- (their runners displaced: bgworker.runner) by this dispatcher.
    dispatched = 0,
    errors = 0,
    suspended = 0,
    -- Deferred calls, as packed argument lists in a queue from `head` to
    -- `tail`, run at the next drain (bgworker.drain).
    due = { head = 1, tail = 0 },
    -- Waiters suspended in this dispatcher's loop: ended by stop.
    waiters = setmetatable({}, { __mode = "k" }),
    -- What the program waits for (jobs, lookups, waits: `hold`), and
    -- whether `ref` keeps the loop alive whatever is outstanding.
    holds = 0,
    refd = false,
  }, class)
  local ok, err = class.start(self, opts)
  if not ok then
    return nil, fname .. ": cannot start: " .. tostring(err)
  end
  self:adopt_run()
  self:check_alive()
  return self
end

-- A new dispatcher of the loop `opts.loop` ("select" by default) for the
-- public function `fname`: it, or nil and the message of its error.
function M.new(fname, opts)
  local name = type(opts) == "table" and opts.loop or "select"
  local msg = COMMON_OPTIONS.loop(fname, 1, "opts.loop", name)
  if msg then
    return nil, msg
  end
  return M.open(adapter.load(name), fname, opts)
end

-- A loop module's constructor for `class`, `bgworker.<loop>.new(opts)`:
-- raises its errors at the caller's line.
function M.constructor(class)
  local fname = "bgworker." .. class.loop_name .. ".new"
  return function(opts)
    local d, err = M.open(class, fname, opts)
    if not d then error(err, 2) end
    return d
  end
end

-- The core says that the handles of utility libraries that keep the loop
-- alive went from none to some or back (bgworker.h, bgw_api.ref).
local function on_keep()
  local d = M.current()
  if d then
    d:check_alive()
  end
end

-- What to call, by name, each time a dispatcher takes a run of the core.
local start_hooks = {}

-- Call `fn()` each time a dispatcher takes a run of the core (in protected
-- mode: an error goes to its error handler), for the modules that must
-- redeliver what was left while none ran. `name` (the module's) replaces
-- the hook of that name.
function M.on_start(name, fn)
  start_hooks[name] = fn
end

-- What to call, by name, when a dispatcher stops.
local stop_hooks = {}

-- Call `fn(d)` when dispatcher `d` stops (in protected mode: an error is
-- reported by the default handler), for the modules that end what belongs
-- to its run. `name` (the module's) replaces the hook of that name.
function M.on_stop(name, fn)
  stop_hooks[name] = fn
end

-- Take the core's current run as this dispatcher's (after `open`'s start,
-- or a loop's restart of the core).
function Dispatcher:adopt_run()
  local run = core.run()
  if self.run == run then
    return
  end
  self.run = run
  -- Stops the run when the dispatcher is collected without stop().
  self.guard = core.guard()
  self.baseline = core.stats()
  current[1] = self
  if self.keep_alive ~= keep_nothing then
    -- A loop that ends when its work is done: hear when utility libraries'
    -- handles start or stop keeping it alive.
    core.on_keep(on_keep)
  end
  for _, hook in pairs(start_hooks) do
    self:call_reporting(hook)
  end
end

-- ------------------------------------------------------------------------
-- Stopping

-- Does this dispatcher still own the core's current run?
function Dispatcher:owns_run()
  return not self.stopped and self.run ~= nil and core.run() == self.run
end

-- Nothing, or why `method` cannot use this dispatcher although it was not
-- stopped: the core's run is no longer its own (the core was stopped or
-- restarted directly, or this process was forked after the dispatcher
-- started: then the core's own message names fork()).
function Dispatcher:lost_run(method)
  if self.stopped or self:owns_run() then
    return nil
  end
  local ok, err = pcall(core.pending)
  if not ok then
    return method .. ": " .. tostring(err)
  end
  return method .. ": this dispatcher no longer runs the core (it was stopped or started again" ..
    " through bgworker.core); make a new one"
end

--- Stop dispatching. The core refuses further items and frees the pending
-- ones without running them; the loop lets go of the wake-up socket or
-- descriptor (so Copas 4's `copas.loop()` and luv's `uv.run()` can
-- return); the processes of `bgworker.process` started under it that still
-- run are killed; and every caller waiting in `bgworker.await`, `job:get`,
-- `pool:run`, `dns.toip` or on a process returns `nil, "stopped"`.
-- Stopping a stopped dispatcher does nothing. It may be called from a
-- callback.
-- @treturn int the number of pending items cancelled
function Dispatcher:stop()
  local msg = M.check_self(self, "stop")
  if msg then error(msg, 2) end
  if self.stopped then
    return 0
  end
  local owned = self:owns_run()
  self.final_stats = owned and self:stats() or nil
  self.stopped = true
  if current[1] == self then
    current[1] = nil
  end
  self:before_stop(owned)
  local cancelled = 0
  if owned then
    core.on_keep(nil)
    cancelled = core.stop()
  end
  self:after_stop()
  for _, hook in pairs(stop_hooks) do
    local ok, err = pcall(hook, self)
    if not ok then
      M.default_errorhandler(err)
    end
  end
  for waiter in pairs(self.waiters) do
    waiter.resume()
  end
  return cancelled
end

-- ------------------------------------------------------------------------
-- Keeping the loop alive
--
-- Loops that end when their work is done (Copas 4's `copas.loop()`, luv's
-- `uv.run()`) end with a dispatcher in them too, once nothing is
-- outstanding: as libuv's handles and Node-API's thread-safe functions do,
-- the dispatcher keeps its loop alive only while the program waits for
-- something from it. That is a hold (a job, a lookup, a wait: `hold`), a
-- handle of a utility library that keeps the loop alive (`bgw_api.ref`),
-- items pending or calls due, or the program's own `ref()`. The loop's
-- adapter hears of each change (`keep_alive`), and the loops that never
-- end by themselves ignore it.

-- The program waits for something this dispatcher will bring (a job's
-- outcome, an answer, the end of a wait): keep the loop alive until
-- `unhold`. Each hold is given back exactly once.
function Dispatcher:hold()
  local holds = self.holds + 1
  self.holds = holds
  if holds == 1 then
    self:check_alive()
  end
end

function Dispatcher:unhold()
  local holds = self.holds - 1
  self.holds = holds
  if holds == 0 then
    self:check_alive()
  end
end

-- Does the dispatcher keep its loop alive now?
function Dispatcher:keeps_loop()
  if self.stopped then
    return false
  elseif self.refd or self.holds > 0 or self.due.head <= self.due.tail then
    return true
  elseif not self:owns_run() then
    -- Its run was lost (a fork, a stop through bgworker.core): the loop's
    -- side must see that and stop the dispatcher, saying why.
    return true
  end
  return core.keepers() > 0 or core.pending() > 0
end

-- Tell the loop's adapter whether the dispatcher keeps the loop alive now.
function Dispatcher:check_alive()
  local keep_alive = self.keep_alive
  if keep_alive ~= keep_nothing then
    keep_alive(self, self:keeps_loop())
  end
end

--- Keep the loop alive while this dispatcher runs, even when nothing is
-- outstanding: for a program whose utility library delivers without
-- keeping the loop alive itself. By default a dispatcher keeps the loop
-- alive only while something is outstanding (a job, a lookup, a wait, a
-- utility library's handle: see the topic @{jobs.md}), as a libuv handle
-- after `uv_unref`. Matters in Copas 4 and luv, whose loops end when
-- their work is done; the other loops never end by themselves.
-- @return the dispatcher
function Dispatcher:ref()
  local msg = M.check_self(self, "ref")
  if msg then error(msg, 2) end
  self.refd = true
  self:check_alive()
  return self
end

--- Keep the loop alive only while something is outstanding again (the
-- default): undoes `ref`.
-- @return the dispatcher
function Dispatcher:unref()
  local msg = M.check_self(self, "unref")
  if msg then error(msg, 2) end
  self.refd = false
  self:check_alive()
  return self
end

--- Did `ref` say to keep the loop alive (and no `unref` since)?
-- @treturn boolean
function Dispatcher:has_ref()
  local msg = M.check_self(self, "has_ref")
  if msg then error(msg, 2) end
  return self.refd
end

-- ------------------------------------------------------------------------
-- Dispatching and errors

--- Run the callbacks of waiting items now, without waiting: one slice. If
-- it ends first (after `max` callbacks, or 5 ms of them), the loop is woken
-- again, so the rest is not forgotten. A Copas or an OpenResty dispatcher
-- raises: its loop drives it.
-- @tparam[opt] int max run at most this many callbacks (default: the
-- dispatcher's budget)
-- @treturn int the number handled: callbacks run (including those that
-- raised), items whose decode failed, timers and resumed waits
function Dispatcher:dispatch(max)
  local msg = M.check_self(self, "dispatch") or args.count("dispatch", 1, "max", max, true) or
    self:lost_run("dispatch")
  if msg then error(msg, 2) end
  if self.stopped then
    return 0
  end
  self:before_dispatch()
  return (self:drain_and_rewake(max or self.budget))
end

-- Hand one error to the error handler. An error handler that raises is
-- reported, with the original error, by the default handler.
function Dispatcher:report(err, tb)
  self.errors = self.errors + 1
  local ok, herr = pcall(self.errorhandler, err, tb)
  if not ok then
    M.default_errorhandler("error in errorhandler: " .. tostring(herr))
    M.default_errorhandler(err, tb)
  end
end

-- Call `fn()` in protected mode; an error goes to the error handler. For
-- the loops' timers and the start hooks.
function Dispatcher:call_reporting(fn)
  local ok, err, tb = self.call(fn)
  if not ok then
    self:report(err, tb)
  end
end

-- ------------------------------------------------------------------------
-- Stats

--- Counters of this dispatcher's run, to see a stalled loop or a queue
-- that grows.
-- @treturn table `loop` (its name), `running`; `delivered` (items the core
-- accepted in this run), `dispatched` (callbacks run, errors included),
-- `errors` (callbacks and decodes that raised), `suspended` (callbacks that
-- waited, each suspended on its own while the others went on), `holds`
-- (jobs, lookups and waits outstanding) and `keepers` (utility libraries'
-- handles that keep the loop alive): while either is above 0 or `ref` was
-- called, the dispatcher keeps its loop alive; `pending` (items queued
-- now), `cancelled`, `rejected` (deliveries refused: full, closed, timed
-- out), `wakeups`; `lag_last` and `lag_max`: seconds from a wake-up signal
-- to the first item the loop took after it, the last one and the worst (a
-- loop that stalls shows here first). Once stopped: the counters at the
-- stop, with `running = false` and `pending = 0`.
function Dispatcher:stats()
  local msg = M.check_self(self, "stats")
  if msg then error(msg, 2) end
  if not self:owns_run() then
    local final = self.final_stats or {}
    final.running = false
    final.pending = 0
    return final
  end
  local now, base = core.stats(), self.baseline
  local function delta(name)
    return (now[name] or 0) - (base[name] or 0)
  end
  return {
    loop = self.loop_name,
    running = true,
    delivered = delta("delivered"),
    dispatched = self.dispatched,
    errors = self.errors,
    suspended = self.suspended,
    holds = self.holds,
    keepers = core.keepers(),
    pending = core.pending(),
    cancelled = delta("cancelled"),
    rejected = delta("rejected"),
    wakeups = delta("wakeups"),
    lag_last = now.lag_last_ns / 1e9,
    lag_max = now.lag_max_ns / 1e9,
  }
end

return M

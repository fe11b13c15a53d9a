-- The dispatcher base: what every event loop's dispatcher shares (internal).
--
-- A dispatcher starts the core with a wake-up signal its loop can wait on,
-- and when woken takes items with `core.poll()` until the queue is empty or
-- its budget is spent, calling each callback in protected mode and handing
-- each error to its error handler. Each loop (bgworker.select, .copas, .luv,
-- .cqueues, .ngx) is a class made by `class`; it adds how its loop waits and
-- how a coroutine is suspended there. The base owns the rest: options,
-- start, stop, the drain, stats, calls deferred to the next drain, and
-- waiters (how `bgworker.await` and `job:get` suspend their caller).
--
-- Invariants:
--   * At most one dispatcher runs in a Lua state, and "running" is the
--     core's own state (`core.run()`), never a flag of a Lua object that may
--     be lost: a dispatcher owns the core's run it started, and only while
--     `core.run() == self.run`.
--   * A dispatcher that nobody references is stopped when it is collected:
--     it holds `core.guard()`, and this module refers to it weakly only.
--   * Every waiter of a dispatcher ends: woken, timed out, or, when the
--     dispatcher stops, with "stopped".

local core = require "bgworker.core"
local args = require "bgworker.args"
local protect = require "bgworker.protect"

local poll, wake, drain = core.poll, core.wake, core.drain
local drain_yieldable = core.drain_yieldable
local error, getmetatable, next, pairs, pcall, select, setmetatable = error, getmetatable, next,
  pairs, pcall, select, setmetatable
local tostring, type = tostring, type
local floor = math.floor
local unpack = table.unpack or unpack
local running = coroutine.running

local M = {}

--- Items a dispatcher handles before it lets others run, by default.
M.DEFAULT_BUDGET = 1000

--- The default error handler: writes the traceback (which starts with the
-- message) to stderr.
function M.default_errorhandler(err, tb)
  io.stderr:write("bgworker: ", tb or tostring(err), "\n")
end

-- The dispatcher that started the core's current run, if any. Weak, so that
-- a dispatcher nobody references can be collected (and so stopped).
local current = setmetatable({}, { __mode = "v" })

local Dispatcher = {}
M.Dispatcher = Dispatcher

-- Every class made by `class`, to tell dispatchers apart from other tables.
local classes = setmetatable({}, { __mode = "k" })

--- Options every loop accepts.
local COMMON_OPTIONS = {
  capacity = function(fname, n, name, v)
    if v ~= nil and not (args.is_count(v) and v <= core.MAX_CAPACITY) then
      return args.bad(fname, n, ("%s must be an integer in 1..%d, got %s"):format(name,
        core.MAX_CAPACITY, args.describe(v)))
    end
  end,
  budget = args.option.count,
  errorhandler = args.option.func,
  -- Read by bgworker.new to choose the loop.
  loop = args.option.any,
}

--- Make the class of a loop's dispatchers: `name` ("select", "copas", ...)
-- and the options it takes beyond the common ones. The class inherits the
-- base methods; the loop module adds `start(self, opts)` (start the core
-- and its side of the loop: true, or nil and a message, with the core left
-- stopped), `suspender()` (see `Dispatcher:waiter`) and `timer(seconds, fn)`,
-- and may override `before_stop` and `after_stop`.
function M.class(name, options)
  local class = setmetatable({}, { __index = Dispatcher })
  class.__index = class
  class.loop_name = name
  class.options = {}
  for k, v in pairs(COMMON_OPTIONS) do class.options[k] = v end
  for k, v in pairs(options or {}) do class.options[k] = v end
  classes[class] = true
  return class
end

--- The dispatcher of the core's current run, if a dispatcher started it.
function M.current()
  local d = current[1]
  if d and d:owns_run() then
    return d
  end
  return nil
end

--- Nothing, or why `self` is not a dispatcher: the message of an argument
-- error of `method`.
function M.check_self(self, method)
  if type(self) ~= "table" or not classes[getmetatable(self)] then
    return args.bad(method, 1, ("dispatcher expected, got %s; call it as dispatcher:%s()"):format(
      type(self), method))
  end
end


--------------------------------------------------------------------------
-- Starting

--- Nothing, or why no dispatcher can start now (for `fname`'s message).
-- This is the one "already running" check of every loop.
function M.refuse_second(fname)
  local d = M.current()
  if d then
    return ("%s: a dispatcher is already running in this Lua state (loop %q); stop it first"):format(
      fname, d.loop_name)
  end
  if core.running() then
    return fname .. ": bgworker.core is already started in this Lua state; stop it first"
  end
end

--- A new dispatcher of `class`, started: the options checked (as argument
-- #1 of `fname`), the core started by `class.start`. Returns it, or nil and
-- the message of the error that the public function raises.
function M.open(class, fname, opts)
  local msg
  opts, msg = args.options(fname, 1, opts, class.options)
  if not opts then
    return nil, msg
  end
  msg = M.refuse_second(fname)
  if msg then
    return nil, msg
  end
  local self = setmetatable({
    budget = opts.budget or M.DEFAULT_BUDGET,
    errorhandler = opts.errorhandler or M.default_errorhandler,
    call = protect.call,
    stopped = false,
    -- The drain's item count (see `handle_items`).
    count = 0,
    -- Callbacks run and errors reported by this dispatcher.
    dispatched = 0,
    errors = 0,
    -- Deferred calls, as packed argument lists, run at the next drain.
    due = {},
    -- Waiters suspended in this dispatcher's loop: ended by stop.
    waiters = setmetatable({}, { __mode = "k" }),
  }, class)
  local ok, err = class.start(self, opts)
  if not ok then
    return nil, fname .. ": cannot start: " .. tostring(err)
  end
  self:adopt_run()
  return self
end

--- A loop module's public constructor for `class`: `new(opts)` raises its
-- errors at the caller's line, naming `fname`.
function M.constructor(class, fname)
  return function(opts)
    local d, err = M.open(class, fname, opts)
    if not d then error(err, 2) end
    return d
  end
end

-- What to call, by name, each time a dispatcher takes a run of the core.
local start_hooks = {}

--- Call `fn()` each time a dispatcher takes a run of the core
-- (in protected mode: an error goes to its error handler), for the
-- utility modules that must redeliver what was dropped while none ran.
-- `name` (the module's) replaces the hook of that name.
function M.on_start(name, fn)
  start_hooks[name] = fn
end

--- Take the core's current run as this dispatcher's (after `open`'s start,
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
  for _, hook in pairs(start_hooks) do
    self:call_reporting(hook)
  end
end

-- The core's capacity option, from the checked options.
local function capacity(opts)
  return opts.capacity and { capacity = floor(opts.capacity) } or nil
end

--- Start the core with wake-up datagrams to a new UDP socket on 127.0.0.1,
-- connected back to the core's sender so that nobody else's datagrams reach
-- it. Returns the socket, or nil and a message.
function M.start_udp(opts)
  local socket = require "socket"
  local sock, err = (socket.udp4 or socket.udp)()
  if not sock then
    return nil, err
  end
  sock:settimeout(0)
  local ok
  ok, err = sock:setsockname("127.0.0.1", 0)
  if ok then
    local _, port = sock:getsockname()
    ok, err = pcall(core.start, tonumber(port), capacity(opts))
    if ok then
      ok, err = sock:setpeername(core.sender())
      if not ok then
        core.stop()
      end
    end
  end
  if not ok then
    sock:close()
    return nil, err
  end
  return sock
end

--- Read every wake-up datagram waiting on `sock`, without blocking: they
-- carry no information. (LuaSocket 3.0's receive on a closed UDP socket
-- returns "": stop there.)
function M.discard_datagrams(sock)
  while sock:receive(16) and sock:getfd() >= 0 do
  end
end

--- Start the core with a descriptor signal (`opts.kind`: "eventfd" or
-- "pipe"; by default the system's). Returns the descriptor, or nil and a
-- message.
function M.start_fd(opts)
  local kind = opts.kind
  if kind == "udp" then
    kind = nil
  end
  local ok, fd = pcall(core.start_fd, { capacity = capacity(opts) and floor(opts.capacity), kind = kind })
  if not ok then
    return nil, fd
  end
  return fd
end

--------------------------------------------------------------------------
-- Stopping

--- Does this dispatcher still own the core's current run?
function Dispatcher:owns_run()
  return not self.stopped and self.run ~= nil and core.run() == self.run
end

--- Nothing, or why `method` cannot use this dispatcher although it was not
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

-- Loop hooks around core.stop(); the base does nothing.
function Dispatcher.before_stop() end
function Dispatcher.after_stop() end

--- Stop dispatching: the core refuses further items and frees the pending
-- ones without running them; the loop lets go of the wake-up socket or
-- descriptor, and every waiter of this dispatcher returns "stopped".
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
    cancelled = core.stop()
  end
  self:after_stop()
  for waiter in pairs(self.waiters) do
    waiter.resume()
  end
  return cancelled
end

--------------------------------------------------------------------------
-- Errors

--- Hand one error to the error handler. An error handler that raises is
-- reported, with the original error, by the default handler.
function Dispatcher:report(err, tb)
  self.errors = self.errors + 1
  local ok, herr = pcall(self.errorhandler, err, tb)
  if not ok then
    M.default_errorhandler("error in errorhandler: " .. tostring(herr))
    M.default_errorhandler(err, tb)
  end
end

--------------------------------------------------------------------------
-- Draining
--
-- Hot path. Items go through the core's drain (`core.drain`: decode and
-- callback in one protected call per batch, in C) wherever a callback's
-- yield can go through it: everywhere on Lua 5.2+, outside coroutines on
-- 5.1 and LuaJIT. Elsewhere, and with a handler of the loop's own, a Lua
-- loop over `poll()`: no tables, no closures, and one protected call per
-- batch rather than per item. Either way, after an error a new batch goes
-- on where the failed one stopped.

-- The default way to handle an item: call its callback with its arguments.
-- `poll` returned nothing when `f` is nil: the queue is empty.
local function call_item(_, f, ...)
  if f == nil then
    return false
  end
  f(...)
  return true
end

-- Handle items until the queue is empty or self.count reaches limit. Counts
-- each item in self.count before handling it, so an item that raised counts
-- too. True when the queue was found empty (or the dispatcher stopped).
local function batch(self, limit, handle)
  local n = self.count
  while n < limit do
    n = n + 1
    self.count = n
    if not handle(self, poll()) then
      self.count = n - 1
      return true
    end
    if self.stopped then
      return true
    end
  end
  return false
end

-- Up to `limit` items through `handle`, in batches under self.call; report
-- errors. Returns the items handled and whether the queue was found empty.
local function handle_items(self, limit, handle)
  -- Saved and restored, for a callback that dispatches.
  local saved = self.count
  self.count = 0
  local empty
  repeat
    local ok, res, tb = self.call(batch, self, limit, handle)
    if ok then
      empty = res
    else
      self:report(res, tb)
      if self.stopped then
        empty = true
      elseif self.count >= limit then
        empty = false
      end
    end
  until empty ~= nil
  local n = self.count
  self.count = saved
  return n, empty
end

-- The same through the core's drain, which counts the item that raised in
-- its `n` (a failure that took no item is not tried again).
local function drain_items(self, limit)
  local total = 0
  while true do
    local n, empty, err, tb = drain(limit - total)
    total = total + n
    if empty ~= nil then
      return total, empty
    end
    self:report(err, tb)
    if self.stopped or n == 0 then
      return total, true
    elseif total >= limit then
      return total, false
    end
  end
end

-- Handle up to `limit` items; `handle` nil: call each callback.
local function run_items(self, limit, handle)
  local n, empty
  if handle == nil and (drain_yieldable or not M.in_coroutine()) then
    n, empty = drain_items(self, limit)
  else
    n, empty = handle_items(self, limit, handle or call_item)
  end
  self.dispatched = self.dispatched + n
  return n, empty
end

--- Run what is due: deferred calls first (in order), then the timers that
-- are due (loops with `self.timers`, see bgworker.timers), then up to
-- `limit` items, each with `handle(self, f, ...)` (by default `f(...)`, see
-- `call_item`), then what those deferred.
-- @return the number handled (calls and items, errors included)
-- @return true when the queue was found empty (or the dispatcher stopped),
-- so no wake-up is owed; false when `limit` ran out first
function Dispatcher:drain(limit, handle)
  -- Calls deferred meanwhile run at the end of this drain: a wake-up sent
  -- for them now could be consumed by this drain's own empty poll.
  local outer = self.draining
  self.draining = true
  local n = 0
  if next(self.due) ~= nil then
    n = self:run_due()
  end
  -- Timers before items: a timeout that is due wins over a result that
  -- arrived after it.
  local timers = self.timers
  if timers and timers.n > 0 and not self.stopped then
    n = n + timers:expire(self)
  end
  local empty = true
  if not self.stopped then
    local items
    items, empty = run_items(self, limit, handle)
    n = n + items
    if next(self.due) ~= nil then
      n = n + self:run_due()
    end
  end
  self.draining = outer
  if not outer and next(self.due) ~= nil and self:owns_run() then
    -- Deferred by the last deferred calls: the next drain runs them.
    wake()
  end
  return n, empty
end

--- `drain`, then, if `limit` ran out first, `core.wake()`: the instance
-- stays armed, so no deliver would signal again; the wake keeps the signal
-- up so that the loop comes back for the rest after the others had a turn.
function Dispatcher:drain_and_rewake(limit, handle)
  local n, empty = self:drain(limit, handle)
  if not empty and self:owns_run() then
    wake()
  end
  return n, empty
end

--- Loop hook before a drain of `dispatch` (the select loop reads its
-- datagrams there); the base does nothing.
function Dispatcher.before_dispatch() end

--- Run the callbacks of waiting items now, without waiting. If `max` runs
-- out first, the loop is woken again, so the rest is not forgotten.
-- @tparam[opt] int max handle at most this many items (default: the budget)
-- @treturn int the number handled: callbacks run (including those that
-- raised), items whose decode failed, timers and resumed waits
function Dispatcher:dispatch(limit)
  local msg = M.check_self(self, "dispatch") or args.count("dispatch", 2, "max", limit, true) or
    self:lost_run("dispatch")
  if msg then error(msg, 2) end
  if self.stopped then
    return 0
  end
  self:before_dispatch()
  return (self:drain_and_rewake(limit or self.budget))
end

--- Call `fn()` in protected mode; an error goes to the error handler. For
-- the loops' timers and the start hooks.
function Dispatcher:call_reporting(fn)
  local ok, err, tb = self.call(fn)
  if not ok then
    self:report(err, tb)
  end
end

--------------------------------------------------------------------------
-- Deferred calls

local function pack(...)
  return { n = select("#", ...), ... }
end

--- Call `f(...)` at the end of the running drain, or else at the next one
-- (waking the loop for it), in protected mode: an error goes to the error
-- handler. Calls run in the order deferred.
function Dispatcher:defer(f, ...)
  local due = self.due
  due[#due + 1] = pack(f, ...)
  if #due == 1 and not self.draining and self:owns_run() then
    wake()
  end
end

local function call_packed(call)
  return call[1](unpack(call, 2, call.n))
end

--- Run the deferred calls that are due now (not those they defer in turn).
function Dispatcher:run_due()
  local due = self.due
  self.due = {}
  for i = 1, #due do
    local ok, err, tb = self.call(call_packed, due[i])
    if not ok then
      self:report(err, tb)
    end
  end
  return #due
end

--------------------------------------------------------------------------
-- Stats

--- Counters of this dispatcher's run.
-- @treturn table `loop`, `running`; `delivered` (items accepted by the core
-- in this run), `dispatched` (callbacks run, errors included), `errors`
-- (callbacks and decodes that raised), `pending` (items queued now),
-- `cancelled`, `rejected`, `wakeups`; `lag_last` and `lag_max`: seconds from
-- a wake-up signal to the drain that answered it, for the last drain and the
-- worst one (a loop that stalls shows here first)
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
    pending = core.pending(),
    cancelled = delta("cancelled"),
    rejected = delta("rejected"),
    wakeups = delta("wakeups"),
    lag_last = now.lag_last_ns / 1e9,
    lag_max = now.lag_max_ns / 1e9,
  }
end

--------------------------------------------------------------------------
-- Waiters
--
-- A waiter suspends its caller until `wake()` or a timeout. Each loop gives
-- a suspender for the caller's context: `suspend(left)` returns after
-- `resume()` was called, or (when the suspender has `timed`) after `left`
-- seconds; it may also return early. The waiter loops until its condition
-- holds. Loops whose suspenders cannot time out get a timer instead.

local Waiter = {}
Waiter.__index = Waiter

--- A waiter for the caller, or nil and why this dispatcher cannot suspend
-- it here (a message for the public function to raise).
function Dispatcher:waiter()
  local suspender, msg = self:suspender()
  if not suspender then
    return nil, msg
  end
  local waiter = setmetatable({ dispatcher = self, woken = false, timed_out = false }, Waiter)
  waiter.resume = suspender.resume
  waiter.suspend = suspender.suspend
  waiter.timed = suspender.timed
  waiter.done = suspender.done
  return waiter
end

--- Wait until `wake()` was called, or `timeout` seconds passed.
-- @return true when woken; nil, "timeout"; or nil, "stopped" when the
-- dispatcher stopped first
function Waiter:wait(timeout)
  local d = self.dispatcher
  if self.woken then
    return true
  end
  if d.stopped then
    return nil, "stopped"
  end
  local gettime = d.gettime
  local deadline = timeout and gettime() + timeout
  local timer
  if timeout and not self.timed then
    timer = d:timer(timeout, function()
      self.timed_out = true
      self.resume()
    end)
  end
  d.waiters[self] = true
  while not (self.woken or self.timed_out or d.stopped) do
    local left
    if deadline then
      left = deadline - gettime()
      if left <= 0 then
        self.timed_out = true
        break
      end
    end
    self.suspend(left)
  end
  d.waiters[self] = nil
  if timer then
    timer:cancel()
  end
  if self.done then
    self.done()
  end
  if self.woken then
    return true
  elseif self.timed_out then
    return nil, "timeout"
  end
  return nil, "stopped"
end

--- End the wait (now, or before it starts). Only the first call counts.
function Waiter:wake()
  if not self.woken then
    self.woken = true
    self.resume()
  end
end

--- A suspender for a coroutine that the dispatcher itself resumes (loops
-- with no scheduler of their own: select, luv): `suspend` yields, `resume`
-- resumes the coroutine at the next drain (at once once stopped), and only
-- if it is still suspended in this wait: a coroutine that something else
-- resumed meanwhile, and that now waits for something else, is left alone.
function Dispatcher:resuming_suspender(co)
  local d = self
  local waiting = false
  local function resume_now()
    if waiting then
      local ok, err = coroutine.resume(co)
      if not ok then
        d:report(err, debug.traceback(co, tostring(err)))
      end
    end
  end
  return {
    suspend = function()
      waiting = true
      coroutine.yield()
      waiting = false
    end,
    resume = function()
      if d.stopped then
        resume_now()
      else
        d:defer(resume_now)
      end
    end,
  }
end

--- The running dispatcher's waiter for the caller, or nil and why the
-- caller cannot wait now (the message of an error for `fname` to raise).
function M.waiter_for(fname)
  local d = M.current()
  if not d then
    return nil, fname .. ": no bgworker dispatcher is running in this Lua state; start one" ..
      " with bgworker.new() first"
  end
  local waiter, why = d:waiter()
  if not waiter then
    return nil, fname .. ": " .. why
  end
  return waiter
end

--- Is the caller a coroutine (not the main thread)?
function M.in_coroutine()
  local co, main = running()
  return co ~= nil and not main, co
end

return M

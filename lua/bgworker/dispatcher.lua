-- The dispatcher base: what every event loop's dispatcher shares (internal).
--
-- A dispatcher starts the core with a wake-up signal its loop can wait on,
-- and when woken takes items with `core.poll()` until the queue is empty or
-- its slice is spent (its budget of callbacks, or `SLICE` seconds), calling
-- each callback in protected mode and handing each error to its error
-- handler. Each loop (bgworker.select, .copas, .luv, .cqueues, .ngx) is a
-- class made by `class`; it adds how its loop waits and how a coroutine is
-- suspended there. The base owns the rest: options,
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
--   * A drain returns to its loop after one slice: `budget` callbacks or
--     `SLICE` seconds, whichever ends first (the time overrun by about one
--     callback when they cost alike: see "Slices"). A wait's deadline is
--     looked at between drains, so it holds within about that much.

local core = require "bgworker.core"
local args = require "bgworker.args"
local protect = require "bgworker.protect"

local poll, wake, drain = core.poll, core.wake, core.drain
local drain_cut, drain_yieldable = core.drain_cut, core.drain_yieldable
local error, getmetatable, next, pairs, pcall, select, setmetatable = error, getmetatable, next,
  pairs, pcall, select, setmetatable
local tostring, type = tostring, type
local floor = math.floor
local clock = core.now
local unpack = table.unpack or unpack
local running = coroutine.running

local M = {}

--- Callbacks a drain runs before it lets the loop run, by default.
M.DEFAULT_BUDGET = 1000

--- Seconds a drain runs callbacks before it lets the loop run (checked
-- between callbacks: see "Slices").
M.SLICE = 0.005

--- The default error handler: writes the traceback (which starts with the
-- message) to stderr.
function M.default_errorhandler(err, tb)
  io.stderr:write("bgworker: ", tb or tostring(err), "\n")
end

-- The dispatcher that started the core's current run, if any. Weak, so that
-- a dispatcher nobody references can be collected (and so stopped).
local current = setmetatable({}, { __mode = "v" })

-- Calls carried over to the next slice, `f(x)` as `carried[x] = f` (see
-- "Slices"), and whether there may be any (a flag: cheaper than `next` on
-- every drain). `x` is held weakly, so that a pool nobody references is
-- still collected. Not a dispatcher's own: what a dispatcher that stops
-- leaves, the next one runs.
local WEAK_KEYS = { __mode = "k" }
local carried, any_carried = setmetatable({}, WEAK_KEYS), false

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
    -- Callbacks per drain (see "Slices").
    budget = opts.budget or M.DEFAULT_BUDGET,
    errorhandler = opts.errorhandler or M.default_errorhandler,
    call = protect.call,
    stopped = false,
    -- The drain's item count (see `handle_items`).
    count = 0,
    -- Seconds per callback in the last slice, if any, and a slice to
    -- reuse (see "Slices").
    pace = nil,
    spare_slice = nil,
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
  if any_carried then
    -- Left by a dispatcher that stopped: this one's first drain runs it.
    wake()
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

-- Handle items until the queue is empty, self.count reaches limit or the
-- slice is over. Counts each item in self.count before handling it, so an
-- item that raised counts too. True when the queue was found empty (or the
-- dispatcher stopped).
local function batch(self, limit, handle, slice)
  local n = self.count
  while n < limit and not slice.over do
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
local function handle_items(self, limit, handle, slice)
  -- Saved and restored, for a callback that dispatches.
  local saved = self.count
  self.count = 0
  local empty
  repeat
    local ok, res, tb = self.call(batch, self, limit, handle, slice)
    if ok then
      empty = res
    else
      self:report(res, tb)
      if self.stopped then
        empty = true
      elseif self.count >= limit or slice.over then
        empty = false
      end
    end
  until empty ~= nil
  local n = self.count
  self.count = saved
  return n, empty
end

-- The same through the core's drain, which counts the item that raised in
-- its `n` (a failure that took no item is not tried again), and ends after
-- a callback that cut it (`Slice:carry_over`).
local function drain_items(self, limit, slice)
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
    elseif total >= limit or slice.over then
      return total, false
    end
  end
end

-- Handle up to `limit` items in `slice`; `handle` nil: call each callback.
local function take_items(self, limit, handle, slice)
  if handle == nil and (drain_yieldable or not M.in_coroutine()) then
    return drain_items(self, limit, slice)
  end
  return handle_items(self, limit, handle or call_item, slice)
end

--------------------------------------------------------------------------
-- Slices
--
-- A drain runs callbacks for one slice: until the queue is empty, `limit`
-- callbacks ran (the budget) or `SLICE` seconds passed. A callback's cost
-- is unknown, so counting items bounds nothing: one item of a pool carries
-- up to 32 events, each a handler of the job's. So whoever calls a
-- callback counts it in `slice.calls`: the drain one per item when its
-- batch returns, and a callback that calls several of its own (a pool's
-- carrier) each of them at once (so a batch of carriers may end a slice
-- as many callbacks past the budget).
--
-- The clock is read between callbacks, not after each: a reading costs as
-- much as a fast callback, and the core's drain takes its items in one C
-- call that cannot look at it. `Slice:room()` reads it and says how many
-- callbacks may run before the next reading: those of the budget left that
-- fit in the time left at the pace so far (of this slice; at first, of the
-- dispatcher's last one). The drain takes that many items in one go; a
-- caller of several callbacks per item looks again at `slice.checkpoint`,
-- at most CHECK_EVERY callbacks later. Once callbacks take READ_EACH or
-- more, the clock is read after each of them, since a reading then costs
-- them little: a slice of slow callbacks overruns by at most one, however
-- much slower it is than those before (a busy machine makes a 1 ms
-- callback take 50). Only a run of fast callbacks is batched, and can
-- overrun by one batch of items (at most the budget), or by CHECK_EVERY
-- events of a pool, when the callbacks after it turn slow.
--
-- A caller of several callbacks that finds the slice over keeps the ones
-- it did not run, and has itself called again at the start of the next
-- slice (`Slice:carry_over`), which also ends the core's drain after it: no
-- item is taken once the slice is over. The drain then reports that the
-- queue was not found empty, so the loop comes back, as for the rest of a
-- spent budget.

-- Most callbacks between two readings of the clock by a caller of several
-- callbacks per item.
local CHECK_EVERY = 32

-- Seconds per callback from which the clock is read after each one: a
-- reading costs well under a microsecond, under 1% of such a callback.
local READ_EACH = 1e-4

local Slice = {}
Slice.__index = Slice

-- The running drain's slice, if any.
local running_slice = nil

--- The slice of the running drain, or nil outside a drain.
function M.slice()
  return running_slice
end

--- Callbacks that may run now (see above), at least one in a new slice;
-- 0 once the slice is over, which it then stays. Sets the next checkpoint.
-- (Comparisons rather than math.min and max: this runs once per carrier.)
function Slice:room()
  local calls = self.calls
  local room = self.limit - calls
  if self.over then
    room = 0
  elseif room > 0 then
    -- Before the first callback, the slice's start will do.
    local now = calls > 0 and clock() or self.started
    local left = self.ends - now
    local pace = calls > 0 and (now - self.started) / calls or self.pace
    if left <= 0 then
      room = 0
    elseif not pace or pace >= READ_EACH then
      room = 1
    elseif left < room * pace then
      room = floor(left / pace)
    end
    if room == 0 and calls == 0 then
      room = 1
    end
  end
  if room <= 0 then
    self.over = true
    return 0
  end
  self.checkpoint = calls + (room < CHECK_EVERY and room or CHECK_EVERY)
  return room
end

--- For a caller of several callbacks that found the slice over (`room()`
-- returned 0): call `f(x)` at the start of the next slice (of this
-- dispatcher, or of the next one if it stops first), in protected mode,
-- unless `x` (a table) was collected first; and end the core's drain after
-- the callback that is running.
function Slice.carry_over(_, f, x)
  carried[x], any_carried = f, true
  drain_cut()
end

-- Run the calls carried over to this slice (not those they carry over in
-- turn).
local function run_carried(self)
  local calls = carried
  carried, any_carried = setmetatable({}, WEAK_KEYS), false
  for x, f in pairs(calls) do
    local ok, err, tb = self.call(f, x)
    if not ok then
      self:report(err, tb)
    end
  end
end

-- Run one slice of at most `limit` callbacks: what was carried over, then
-- items, in batches that fit the room left. Returns the callbacks run, and
-- whether no wake-up is owed: the queue was found empty with nothing
-- carried over, or the dispatcher stopped (what it carried over waits for
-- the next one).
local function run_slice(self, limit, handle)
  -- The dispatcher's spare slice, unless a drain of it is running (a
  -- callback's nested drain, or one suspended in a callback that yielded).
  local slice = self.spare_slice or setmetatable({}, Slice)
  self.spare_slice = nil
  local started = clock()
  slice.calls, slice.checkpoint, slice.limit, slice.over = 0, 0, limit, false
  slice.started, slice.ends, slice.pace = started, started + M.SLICE, self.pace
  local outer = running_slice
  running_slice = slice
  if any_carried then
    run_carried(self)
  end
  local empty = false
  while not (empty or self.stopped) do
    local room = slice:room()
    if room == 0 then
      break
    end
    local n
    n, empty = take_items(self, room, handle, slice)
    slice.calls = slice.calls + n
    self.dispatched = self.dispatched + n
  end
  running_slice = outer
  self.spare_slice = slice
  local calls = slice.calls
  if calls > 0 then
    -- Seconds per callback, for the first batch of the next slice.
    self.pace = (clock() - started) / calls
  end
  return calls, self.stopped or (empty and not any_carried)
end

--- Run what is due: deferred calls first (in order), then the timers that
-- are due (loops with `self.timers`, see bgworker.timers), then one slice
-- of at most `limit` callbacks: those carried over from the last slice,
-- then items, each with `handle(self, f, ...)` (by default `f(...)`, see
-- `call_item`); then what those deferred.
-- @return the number handled (deferred calls, timers and callbacks, errors
-- included)
-- @return true when the queue was found empty (or the dispatcher stopped),
-- so no wake-up is owed; false when the slice ended first
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
    local calls
    calls, empty = run_slice(self, limit, handle)
    n = n + calls
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

--- `drain`, then, if the slice ended first, `core.wake()`: the instance
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

--- Run the callbacks of waiting items now, without waiting: one slice. If
-- it ends first (after `max` callbacks, or `SLICE` seconds), the loop is
-- woken again, so the rest is not forgotten.
-- @tparam[opt] int max run at most this many callbacks (default: the
-- budget)
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

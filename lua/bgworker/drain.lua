-- The drain engine: how a dispatcher runs the callbacks of queued items
-- (internal). It gives every dispatcher (the base class of
-- bgworker.dispatcher, which loads this module with the first loop's
-- class) `drain`, `drain_and_rewake`, `defer` and `run_due`; `slice()` is
-- the running drain's slice, for callers of several callbacks per item.
--
-- A loop drains when its wake-up signal is up: the calls deferred to this
-- drain first, then the timers that are due, then one slice of callbacks,
-- then what those deferred. All of it runs in a runner (bgworker.runner),
-- so that any callback may wait: a callback that waits suspends its runner,
-- which is displaced, and the drain goes on in a fresh one (see
-- "Displacement").
--
-- Invariants:
--   * A drain returns to its loop after one slice: `budget` callbacks or
--     `dispatcher.SLICE` seconds, whichever ends first (the time overrun by
--     about one callback when they cost alike: see "Slices"). A wait's
--     deadline is looked at between drains, so it holds within about that
--     much. Callbacks that wait count as they start, whoever runs the rest
--     of them.
--   * A drain that ends before the queue was found empty says so (`drain`
--     returns false as its second value): its loop keeps the signal up and
--     comes back for the rest.
--   * A call carried over to the next slice runs once (unless what it is
--     for was collected), at the start of the next slice: of this
--     dispatcher, or of the next one if it stops first.
--     Deferred calls run in the order deferred, at the end of the running
--     drain or else at the next one, which a wake-up asks for.
--   * A displaced runner does no more of its drain once its callback
--     returns: every loop that runs callbacks looks at `slice.displaced`
--     after each one (the core's drain ends by itself after a callback
--     that yielded), and what the runner had in hand (the rest of a
--     pool's carrier, calls carried over) is handed to the next runner.

local core = require "bgworker.core"
local dispatcher = require "bgworker.dispatcher"

local poll, wake, drain = core.poll, core.wake, core.drain
local drain_cut, drain_yieldable = core.drain_cut, core.drain_yieldable
local next, pairs, select, setmetatable = next, pairs, select, setmetatable
local floor = math.floor
local clock = core.now
local unpack = dispatcher.unpack
local running = require("bgworker.protect").running
local Dispatcher = dispatcher.Dispatcher

local M = {}

-- Calls carried over to the next slice, `f(x)` as `carried[x] = f` (see
-- "Slices"), and whether there may be any (a flag: cheaper than `next` on
-- every drain). `x` is held weakly, so that a pool nobody references is
-- still collected. Not a dispatcher's own: what a dispatcher that stops
-- leaves, the next one runs.
local WEAK_KEYS = { __mode = "k" }
local carried, any_carried = setmetatable({}, WEAK_KEYS), false

local function carry(f, x)
  carried[x], any_carried = f, true
end

dispatcher.on_start("bgworker.drain", function()
  if any_carried then
    -- Left by a dispatcher that stopped: this one's first drain runs it.
    wake()
  end
end)

-- ------------------------------------------------------------------------
-- Draining
--
-- Hot path. Items go through the core's drain (`core.drain`: decode and
-- callback in one protected call per batch, in C) where a callback's yield
-- can go through it: on Lua 5.2+. On Lua 5.1 and LuaJIT a C function cannot
-- be yielded across, and a drain runs in a runner that a callback may want
-- to suspend: there a Lua loop over `poll()`, with no tables, no closures,
-- and one protected call per batch rather than per item. Either
-- way, after an error a new batch goes on where the failed one stopped.

-- Call an item's callback with its arguments. `poll` returned nothing when
-- `f` is nil: the queue is empty.
local function call_item(f, ...)
  if f == nil then
    return false
  end
  f(...)
  return true
end

-- Handle items until the queue is empty, slice.count reaches limit, or the
-- slice is over (or displaced). Counts each item in slice.count before
-- handling it, so an item that raised counts too. True when the queue was
-- found empty (or the dispatcher stopped).
local function batch(self, limit, slice)
  local n = slice.count
  while n < limit and not slice.over do
    n = n + 1
    slice.count = n
    if not call_item(poll()) then
      slice.count = n - 1
      return true
    end
    if self.stopped then
      return true
    end
  end
  return false
end

-- Up to `limit` items, in batches under self.call; report errors. Returns
-- the items handled and whether the queue was found empty.
local function handle_items(self, limit, slice)
  slice.count = 0
  local empty
  repeat
    local ok, res, tb = self.call(batch, self, limit, slice)
    if ok then
      empty = res
    else
      self:report(res, tb)
      if self.stopped then
        empty = true
      elseif slice.count >= limit or slice.over then
        empty = false
      end
    end
  until empty ~= nil
  return slice.count, empty
end

-- The same through the core's drain, which counts the item that raised in
-- its `n` (a failure that took no item is not tried again), and ends after
-- a callback that cut it (`Slice:carry_over`) or yielded.
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

-- Handle up to `limit` items in `slice`: through the core's drain where a
-- callback's yield can pass it, or where none can succeed anyway (outside
-- any coroutine: a drain run in place, as the bench's baseline does).
local function take_items(self, limit, slice)
  if drain_yieldable or running() == nil then
    return drain_items(self, limit, slice)
  end
  return handle_items(self, limit, slice)
end

-- ------------------------------------------------------------------------
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
-- spent budget. While it runs callbacks, such a caller is listed in the
-- slice's `open` (`Slice:enter`, `Slice:leave`), so that a displacement
-- hands its rest to the next runner.
--
-- Displacement: a callback that waits suspends the runner of the slice.
-- The old slice is then over and `displaced`; a new one carries on its
-- counts in a fresh runner, and starts with what the old one had in hand:
-- the calls it had still to run from those carried over, and the callers
-- it had open (`carry`). The displaced runner, once its callback returns,
-- sees `displaced` and unwinds without running anything more.

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
  carry(f, x)
  drain_cut()
end

--- A caller of several callbacks, `x`, starts running them in this slice:
-- if the slice is displaced meanwhile, `f(x)` runs the rest in the next.
function Slice:enter(f, x)
  self.open[x] = f
end

--- `x` ran its callbacks (or carried the rest over).
function Slice:leave(x)
  self.open[x] = nil
end

-- A slice of `limit` callbacks for `self` (its spare one, unless a drain of
-- it is running: a callback's nested drain). Its time starts with its
-- first callback (`start`), not with the drain's deferred calls and timers
-- nor with the runner it runs in.
local function new_slice(self, limit)
  local slice = self.spare_slice
  if slice then
    self.spare_slice = nil
  else
    slice = setmetatable({ open = setmetatable({}, WEAK_KEYS) }, Slice)
  end
  slice.calls, slice.checkpoint, slice.limit, slice.over = 0, 0, limit, false
  slice.started, slice.ends, slice.pace = nil, nil, self.pace
  slice.count, slice.handled, slice.empty, slice.displaced = 0, 0, true, false
  slice.pending = nil
  return slice
end

-- `old`'s runner was displaced: the slice that carries on in the next one.
local function displace(self, old)
  old.over, old.displaced = true, true
  local slice = setmetatable({ open = setmetatable({}, WEAK_KEYS) }, Slice)
  slice.calls, slice.checkpoint, slice.limit, slice.over = old.calls, old.calls, old.limit, false
  slice.started, slice.ends, slice.pace = old.started, old.ends, old.pace
  slice.count, slice.handled, slice.empty, slice.displaced = 0, old.handled, true, false
  for x, f in pairs(old.open) do
    carry(f, x)
  end
  if old.pending then
    for x, f in pairs(old.pending) do
      carry(f, x)
    end
  end
  self.suspended = self.suspended + 1
  return slice
end

-- Run the calls carried over to this slice (not those they carry over in
-- turn). The calls to run wait in `slice.pending`, each taken before it
-- runs, so a displacement hands the rest to the next runner. Each counts as
-- handled, as the item it continues did: a drain that runs only these
-- still handled something (`Select:wait` returns on that).
local function run_carried(self, slice)
  local calls = carried
  carried, any_carried = setmetatable({}, WEAK_KEYS), false
  slice.pending = calls
  local x, f = next(calls)
  while x ~= nil and not slice.displaced do
    calls[x] = nil
    slice.handled = slice.handled + 1
    local ok, err, tb = self.call(f, x)
    if not ok then
      self:report(err, tb)
    end
    x, f = next(calls)
  end
  slice.pending = nil
end

-- Run one slice: what was carried over, then items, in batches that fit
-- the room left. Counts the callbacks run in `slice.handled`, and sets
-- `slice.empty`: true when no wake-up is owed (the queue was found empty
-- with nothing carried over, or the dispatcher stopped).
local function run_slice(self, slice)
  if not slice.started then
    local now = clock()
    slice.started, slice.ends = now, now + dispatcher.SLICE
  end
  if any_carried then
    run_carried(self, slice)
  end
  local empty = false
  while not (empty or self.stopped or slice.displaced) do
    local room = slice:room()
    if room == 0 then
      break
    end
    local n
    n, empty = take_items(self, room, slice)
    slice.calls = slice.calls + n
    slice.handled = slice.handled + n
    self.dispatched = self.dispatched + n
  end
  slice.empty = self.stopped or (empty and not any_carried)
end

-- A drain's work, in a runner: the deferred calls, the timers that are due,
-- one slice, then what those deferred. True when it ran in place, false
-- when its runner was displaced.
local function drain_body(self, slice)
  if self.due.head <= self.due.tail then
    slice.handled = slice.handled + self:run_due(slice)
  end
  -- Timers before items: a timeout that is due wins over a result that
  -- arrived after it.
  local timers = self.timers
  if timers and timers.n > 0 and not (self.stopped or slice.displaced) then
    slice.handled = slice.handled + timers:expire(self, slice)
  end
  if not (self.stopped or slice.displaced) then
    run_slice(self, slice)
    if self.due.head <= self.due.tail and not slice.displaced then
      slice.handled = slice.handled + self:run_due(slice)
    end
  end
  return not slice.displaced
end

--- Run what is due: deferred calls first (in order), then the timers that
-- are due (the base's default timers, see bgworker.timers), then one slice
-- of at most `limit` callbacks: those carried over from the last slice,
-- then items; then what those deferred. In runners: a callback that waits
-- is left to its wait, and the rest goes on without it.
-- @return the number handled (deferred calls, timers and callbacks, errors
-- included)
-- @return true when the queue was found empty (or the dispatcher stopped),
-- so no wake-up is owed; false when the slice ended first
function Dispatcher:drain(limit)
  -- Calls deferred meanwhile run at the end of this drain: a wake-up sent
  -- for them now could be consumed by this drain's own empty poll.
  local outer_draining, outer_slice = self.draining, running_slice
  self.draining = true
  local slice = new_slice(self, limit)
  running_slice = slice
  while not self:run_in_runner(drain_body, slice) do
    slice = displace(self, slice)
    running_slice = slice
  end
  running_slice = outer_slice
  self.draining = outer_draining
  self.spare_slice = slice
  local calls = slice.calls
  if calls > 0 and slice.started then
    -- Seconds per callback, for the first batch of the next slice.
    self.pace = (clock() - slice.started) / calls
  end
  if not outer_draining and self.due.head <= self.due.tail and self:owns_run() then
    -- Deferred by the last deferred calls: the next drain runs them.
    wake()
  end
  if not outer_draining and self.holds == 0 then
    -- What ended in the drain (a job's outcome, the last pending item) may
    -- let the loop end (bgworker.dispatcher, "Keeping the loop alive").
    self:check_alive()
  end
  return slice.handled, slice.empty
end

--- `drain`, then, if the slice ended first, `core.wake()`: the instance
-- stays armed, so no deliver would signal again; the wake keeps the signal
-- up so that the loop comes back for the rest after the others had a turn.
function Dispatcher:drain_and_rewake(limit)
  local n, empty = self:drain(limit)
  if not empty and self:owns_run() then
    wake()
  end
  return n, empty
end

-- ------------------------------------------------------------------------
-- Deferred calls: a queue of packed argument lists, `due[head..tail]`.

local function pack(...)
  return { n = select("#", ...), ... }
end

--- Call `f(...)` at the end of the running drain, or else at the next one
-- (waking the loop for it), in protected mode: an error goes to the error
-- handler. Calls run in the order deferred.
function Dispatcher:defer(f, ...)
  local due = self.due
  local tail = due.tail + 1
  due[tail], due.tail = pack(f, ...), tail
  if tail == due.head and not self.draining and self:owns_run() then
    wake()
  end
end

local function call_packed(call)
  return call[1](unpack(call, 2, call.n))
end

--- Run the deferred calls that are due now (not those they defer in turn),
-- each taken from the queue before it runs; in a drain, until its runner is
-- displaced (the next runner runs the rest).
-- @return how many ran
function Dispatcher:run_due(slice)
  local due = self.due
  local last, ran = due.tail, 0
  -- (`due.tail` too: a nested drain may have run them and emptied it.)
  while due.head <= last and due.head <= due.tail and not (slice and slice.displaced) do
    local head = due.head
    local call = due[head]
    due[head], due.head = nil, head + 1
    ran = ran + 1
    local ok, err, tb = self.call(call_packed, call)
    if not ok then
      self:report(err, tb)
    end
  end
  if due.head > due.tail then
    due.head, due.tail = 1, 0
  end
  return ran
end

return M

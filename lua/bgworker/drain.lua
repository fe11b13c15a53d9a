-- The drain engine: how a dispatcher runs the callbacks of queued items
-- (internal). It gives every dispatcher (the base class of
-- bgworker.dispatcher, which loads this module with the first loop's
-- class) `drain`, `drain_and_rewake`, `defer` and `run_due`; `slice()` is
-- the running drain's slice, for callers of several callbacks per item.
--
-- A loop drains when its wake-up signal is up: the calls deferred to this
-- drain first, then the timers that are due, then one slice of callbacks,
-- then what those deferred.
--
-- Invariants:
--   * A drain returns to its loop after one slice: `budget` callbacks or
--     `dispatcher.SLICE` seconds, whichever ends first (the time overrun by
--     about one callback when they cost alike: see "Slices"). A wait's
--     deadline is looked at between drains, so it holds within about that
--     much.
--   * A drain that ends before the queue was found empty says so (`drain`
--     returns false as its second value): its loop keeps the signal up and
--     comes back for the rest.
--   * A call carried over to the next slice runs once (unless what it is
--     for was collected), at the start of the next slice: of this
--     dispatcher, or of the next one if it stops first.
--     Deferred calls run in the order deferred, at the end of the running
--     drain or else at the next one, which a wake-up asks for.

local core = require "bgworker.core"
local dispatcher = require "bgworker.dispatcher"

local poll, wake, drain = core.poll, core.wake, core.drain
local drain_cut, drain_yieldable = core.drain_cut, core.drain_yieldable
local next, pairs, select, setmetatable = next, pairs, select, setmetatable
local floor = math.floor
local clock = core.now
local unpack, in_coroutine = dispatcher.unpack, dispatcher.in_coroutine
local Dispatcher = dispatcher.Dispatcher

local M = {}

-- Calls carried over to the next slice, `f(x)` as `carried[x] = f` (see
-- "Slices"), and whether there may be any (a flag: cheaper than `next` on
-- every drain). `x` is held weakly, so that a pool nobody references is
-- still collected. Not a dispatcher's own: what a dispatcher that stops
-- leaves, the next one runs.
local WEAK_KEYS = { __mode = "k" }
local carried, any_carried = setmetatable({}, WEAK_KEYS), false

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
  if handle == nil and (drain_yieldable or not in_coroutine()) then
    return drain_items(self, limit, slice)
  end
  return handle_items(self, limit, handle or call_item, slice)
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
  slice.started, slice.ends, slice.pace = started, started + dispatcher.SLICE, self.pace
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
-- are due (the base's default timers, see bgworker.timers), then one slice
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

-- ------------------------------------------------------------------------
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

return M

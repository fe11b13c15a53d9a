-- Timers for loops that have none of their own (internal): the default
-- `timer` of a loop's adapter (bgworker.dispatcher), which the
-- `socket.select` loop and Copas use.
--
-- The deadlines live in a binary min-heap; the core holds one alarm, set
-- to the earliest of them (`core.alarm`), which raises the dispatcher's
-- wake-up signal when it is due even if nothing was delivered. Each drain
-- of the dispatcher then runs the timers that are due.
--
-- Invariant: whenever the heap is not empty, the core's alarm is set for
-- its first deadline (or earlier); when it is empty, no alarm is set.

local core = require "bgworker.core"

local setmetatable = setmetatable
local floor = math.floor

local Timers = {}
Timers.__index = Timers

local Timer = {}
Timer.__index = Timer

local timers = {}

--- Timers on the core's monotonic clock (`core.now`), which its alarm
-- counts in too: an alarm never rings before its timer is due.
function timers.new()
  return setmetatable({ gettime = core.now, n = 0, alarm = nil }, Timers)
end

local function swap(heap, i, j)
  heap[i], heap[j] = heap[j], heap[i]
  heap[i].index, heap[j].index = i, j
end

local function up(heap, i)
  while i > 1 do
    local parent = floor(i / 2)
    if heap[parent].due <= heap[i].due then
      return
    end
    swap(heap, i, parent)
    i = parent
  end
end

local function down(heap, i)
  local n = heap.n
  while true do
    local least, left = i, 2 * i
    if left <= n and heap[left].due < heap[least].due then
      least = left
    end
    if left + 1 <= n and heap[left + 1].due < heap[least].due then
      least = left + 1
    end
    if least == i then
      return
    end
    swap(heap, i, least)
    i = least
  end
end

-- Keep the invariant after the first deadline may have changed.
local function set_alarm(heap)
  local first = heap[1]
  local due = first and first.due
  if due ~= heap.alarm and core.running() then
    heap.alarm = due
    if due then
      local left = due - heap.gettime()
      core.alarm(left > 0 and left or 0)
    else
      core.alarm(nil)
    end
  end
end

--- Call `fn()` after `seconds`, at a drain of the dispatcher.
-- @return a timer with `cancel()`
function Timers:add(seconds, fn)
  local n = self.n + 1
  local timer = setmetatable({ heap = self, due = self.gettime() + seconds, fn = fn, index = n }, Timer)
  self.n = n
  self[n] = timer
  up(self, n)
  set_alarm(self)
  return timer
end

-- Take timer i out of the heap.
local function remove(heap, i)
  local n = heap.n
  local timer = heap[i]
  if i ~= n then
    swap(heap, i, n)
  end
  heap[n] = nil
  heap.n = n - 1
  if i < n then
    up(heap, i)
    down(heap, i)
  end
  timer.index = nil
end

--- Forget the timer if it has not run yet.
function Timer:cancel()
  local heap, i = self.heap, self.index
  if i then
    remove(heap, i)
    set_alarm(heap)
  end
end

--- Run the timers that are due, each in protected mode with the
-- dispatcher's `call`; an error goes to its error handler. Stops early
-- once `slice` (the drain's) is displaced: the next runner runs the rest.
-- @treturn int how many ran
function Timers:expire(dispatcher, slice)
  local ran = 0
  local now = self.gettime()
  while self.n > 0 and self[1].due <= now and not slice.displaced do
    local timer = self[1]
    remove(self, 1)
    ran = ran + 1
    local ok, err, tb = dispatcher.call(timer.fn)
    if not ok then
      dispatcher:report(err, tb)
    end
  end
  if ran > 0 then
    set_alarm(self)
  end
  return ran
end

return timers

--- Dispatch inside a cqueues controller.
--
-- `bgworker.cqueues.start([opts])` starts the core with a descriptor signal
-- (an eventfd on Linux, or a pipe) and returns a dispatcher that follows
-- cqueues' polling protocol (`pollfd`, `events`, `timeout`): a coroutine of
-- a controller can wait for it with `cqueues.poll(d)`, then run the
-- callbacks with `d:dispatch()`. Or it runs `d:loop()`, which does both
-- until the dispatcher is stopped:
--
--     local cqueues = require "cqueues"
--     local cq = cqueues.new()
--     local d = require("bgworker.cqueues").start()
--     cq:wrap(function() d:loop() end)
--     -- start utility libraries; their callbacks run inside cq:loop()
--     assert(cq:loop())
--
-- Callbacks run one after the other in the coroutine that dispatches, each
-- in protected mode: an error goes to the error handler, and the others
-- still run. They may yield to the controller (`cqueues.sleep`, cqueues
-- sockets) on every Lua version. After `budget` items `loop` lets the
-- controller run its other coroutines before it goes on. `d:stop()` wakes
-- the coroutine that waits in `loop`, which then returns, so `cq:loop()`
-- can end. One dispatcher runs in a Lua state at a time.
--
-- @module bgworker.cqueues

local core = require "bgworker.core"
local cqueues = require "cqueues"
local drain = require "bgworker.drain"

local error, getmetatable, setmetatable, tostring, type = error, getmetatable, setmetatable,
  tostring, type
local cpoll, cancel = cqueues.poll, cqueues.cancel

local M = {}

local Dispatcher = {}
Dispatcher.__index = Dispatcher

local function check_self(self, method)
  if getmetatable(self) ~= Dispatcher then
    error(("bad argument #1 to '%s' (cqueues dispatcher expected, got %s; call it as" ..
      " dispatcher:%s())"):format(method, type(self), method), 3)
  end
end

--- Start the core and make a dispatcher.
-- @tparam[opt] table opts
--   `budget` (positive integer): items `loop` handles before it lets the
--   controller's other coroutines run, and the default `max` of
--   `dispatch`; 1000 by default.
--   `errorhandler` (function): called as `errorhandler(err, traceback)` for
--   each callback that raised an error and each item whose decode failed;
--   by default writes the traceback to stderr.
--   `capacity` (positive integer): bound the queue; by default unbounded.
--   `kind` ("eventfd" or "pipe"): the descriptor; an eventfd by default on
--   Linux.
-- @return a dispatcher; `fd` is the descriptor
function M.start(opts)
  local self = setmetatable({}, Dispatcher)
  drain.start_fd(self, "bgworker.cqueues.start", opts)
  return self
end

--- Polling protocol: the descriptor, readable while callbacks are due;
-- nil once stopped.
function Dispatcher:pollfd()
  if self.stopped then
    return nil
  end
  return self.fd
end

--- Polling protocol: wait for the descriptor to be readable.
function Dispatcher.events(_)
  return "r"
end

--- Polling protocol: no timeout while running; once stopped, 0, so that a
-- poll on a stopped dispatcher returns at once.
function Dispatcher:timeout()
  if self.stopped then
    return 0
  end
  return nil
end

--- Run the callbacks of waiting items now, without waiting. If `max` runs
-- out first, the descriptor stays readable, so the next poll returns at
-- once and the rest is not forgotten.
-- @tparam[opt] int max handle at most this many items (default: the budget)
-- @treturn int the number of items handled: callbacks run, including those
-- that raised, and items whose decode failed
function Dispatcher:dispatch(limit)
  check_self(self, "dispatch")
  if limit ~= nil and not drain.is_count(limit) then
    error("bad argument #2 to 'dispatch' (max must be a positive integer, got " ..
      tostring(limit) .. ")", 2)
  end
  if self.stopped then
    return 0
  end
  return (drain.batch(self, limit or self.budget))
end

--- Wait and dispatch until the dispatcher is stopped. Run it in a coroutine
-- of a cqueues controller (`cq:wrap(function() d:loop() end)`).
-- @treturn int the number of items handled in all
function Dispatcher:loop()
  check_self(self, "loop")
  local total, budget = 0, self.budget
  while not self.stopped do
    -- After a batch that spent the budget the descriptor is still readable:
    -- this poll lets the controller run the others, then returns.
    cpoll(self)
    if self.stopped then
      break
    end
    total = total + drain.batch(self, budget)
  end
  return total
end

--- Stop: wake the coroutines waiting on this dispatcher (`loop` returns),
-- and stop the core, which refuses further items and frees the pending
-- ones without running them. Safe inside a callback; stopping a stopped
-- dispatcher does nothing.
-- @treturn int the number of pending items cancelled
function Dispatcher:stop()
  check_self(self, "stop")
  if self.stopped then
    return 0
  end
  self.stopped = true
  -- The descriptor is closed by core.stop(): the controllers must forget
  -- it first. cancel also puts the coroutines polling it back to work.
  cancel(self.fd)
  if core.running() and core.fd() == self.fd then
    return core.stop()
  end
  return 0
end

return M

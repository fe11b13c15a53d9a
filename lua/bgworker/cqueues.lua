--- Dispatch inside a cqueues controller.
--
-- `bgworker.new { loop = "cqueues" }` starts the core with a descriptor
-- signal (an eventfd on Linux, or a pipe) and returns a dispatcher that
-- follows cqueues' polling protocol (`pollfd`, `events`, `timeout`): a
-- coroutine of a controller can wait for it with `cqueues.poll(d)`, then run
-- the callbacks with `d:dispatch()`. Or it runs `d:loop()`, which does both
-- until the dispatcher is stopped:
--
--     local cqueues = require "cqueues"
--     local cq = cqueues.new()
--     local d = require("bgworker").new { loop = "cqueues" }
--     cq:wrap(function() d:loop() end)
--     -- start utility libraries; their callbacks run inside cq:loop()
--     assert(cq:loop())
--
-- Callbacks run one after the other in the coroutine that dispatches, each
-- in protected mode: an error goes to the error handler, and the others
-- still run. They may yield to the controller (`cqueues.sleep`, cqueues
-- sockets) on every Lua version. After `budget` callbacks, or 5 ms of them,
-- `loop` lets the controller run its other coroutines before it goes on. `d:stop()` wakes
-- the coroutine that waits in `loop`, which then returns, so `cq:loop()`
-- can end.
--
-- Waiting (`bgworker.await`, `job:get`) works in any coroutine of a
-- controller: it waits on a `cqueues.condition`, with the timeout given to
-- `cqueues.poll`.
--
-- A dispatcher here has what every @{Dispatcher} has, and `loop` and the
-- polling protocol (below: `Cqueues` is the class of these dispatchers).
--
-- @module bgworker.cqueues

local args = require "bgworker.args"
local cqueues = require "cqueues"
local condition = require "cqueues.condition"
local dispatcher = require "bgworker.dispatcher"
local protect = require "bgworker.protect"
local runner = require "bgworker.runner"
local signal = require "bgworker.signal"

local error, tostring = error, tostring
local resume, status, yield = coroutine.resume, coroutine.status, coroutine.yield
local traceback = debug.traceback
local cpoll, cancel = cqueues.poll, cqueues.cancel
local check_self = dispatcher.check_self

local M = {}

local Cqueues = dispatcher.class("cqueues", { kind = args.option.one_of { "eventfd", "pipe" } })
-- The class of these dispatchers: the loop's adapter (bgworker.dispatcher).
M.class = Cqueues
Cqueues.gettime = cqueues.monotime

function Cqueues.start(self, opts)
  local fd, err = signal.start_fd(opts)
  if not fd then
    return nil, err
  end
  self.fd = fd
  return true
end

--- Start the core and make a dispatcher: `bgworker.new { loop = "cqueues" }`.
-- @tparam[opt] table opts the common options (see `bgworker.new`), and
--   `kind` ("eventfd" or "pipe"): the descriptor; an eventfd by default on
--   Linux
-- @return a dispatcher; `fd` is the descriptor
-- @function new
M.new = dispatcher.constructor(Cqueues)

-- The controllers must forget the descriptor before core.stop() closes it;
-- cancel also puts the coroutines polling it back to work.
function Cqueues.before_stop(self)
  cancel(self.fd)
end

--- Polling protocol: the descriptor, readable while callbacks are due;
-- nil once stopped.
function Cqueues:pollfd()
  if self.stopped then
    return nil
  end
  return self.fd
end

--- Polling protocol: wait for the descriptor to be readable.
function Cqueues.events()
  return "r"
end

--- Polling protocol: no timeout while running; once stopped, 0, so that a
-- poll on a stopped dispatcher returns at once.
function Cqueues:timeout()
  if self.stopped then
    return 0
  end
  return nil
end

--- Wait and dispatch until the dispatcher is stopped. Run it in a coroutine
-- of a cqueues controller (`cq:wrap(function() d:loop() end)`).
-- @treturn int the number handled in all
function Cqueues:loop()
  local msg = check_self(self, "loop")
  if msg then error(msg, 2) end
  self.controller = cqueues.running()
  local total, budget = 0, self.budget
  while not self.stopped do
    -- After a drain that spent its slice the descriptor is still readable:
    -- this poll lets the controller run the others, then returns.
    cpoll(self)
    if self.stopped then
      break
    end
    total = total + self:drain_and_rewake(budget)
  end
  return total
end

function Cqueues.suspender()
  if not cqueues.running() then
    return nil, "with a cqueues dispatcher, wait in a coroutine of a cqueues controller"
  elseif runner.resuming() and not runner.owns(protect.running()) then
    -- A callback resumes this coroutine itself, and would get the
    -- controller's values.
    return nil, "this coroutine is a callback's own (coroutine.wrap or coroutine.create): the" ..
      " controller cannot resume it; wait in the callback itself, or in cq:wrap"
  end
  -- A pollable that stays ready once resumed (its timeout turns 0), as a
  -- cqueues promise does: a condition's signal reaches only those polling
  -- it, and a callback's runner may be left to a controller's coroutine
  -- that polls only from its next step (see `adopt`).
  local wake = { pollfd = condition.new(), timeout = nil }
  return {
    timed = true,
    suspend = function(left)
      if left then cpoll(wake, left) else cpoll(wake) end
    end,
    resume = function()
      wake.timeout = 0
      wake.pollfd:signal()
    end,
  }
end

-- A callback in runner `co` (bgworker.runner) yielded to the controller
-- (`cqueues.poll`, a socket, `cqueues.sleep`): a coroutine of the
-- controller takes the runner over, and passes its yields to the
-- controller and the answers back until it ends.
local follow

local function followed(self, co, ok, ...)
  if not ok then
    self:report((...), traceback(co, tostring((...))))
  elseif status(co) ~= "dead" then
    return follow(self, co, ...)
  end
end

function follow(self, co, ...)
  return followed(self, co, resume(co, yield(...)))
end

function Cqueues:adopt(co, ...)
  local cq = cqueues.running() or self.controller
  if not cq then
    return false
  end
  cq:wrap(follow, self, co, ...)
  return true
end

-- A timer in the controller of the caller (or of `d:loop()`): `fn()` runs
-- in protected mode after `seconds`.
function Cqueues:timer(seconds, fn)
  local cq = cqueues.running() or self.controller
  if not cq then
    error("bgworker.cqueues: a timer needs a controller: call it in one, or run d:loop()", 0)
  end
  local cond, cancelled = condition.new(), false
  cq:wrap(function()
    cpoll(cond, seconds)
    if not cancelled then
      self:call_reporting(fn)
    end
  end)
  return {
    cancel = function()
      cancelled = true
      cond:signal()
    end,
  }
end

return M

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

local cqueues = require "cqueues"
local drain = require "bgworker.drain"

local setmetatable = setmetatable
local cpoll, cancel = cqueues.poll, cqueues.cancel

local M = {}

-- Stop (see bgworker.drain.fd_class): the controllers must forget the
-- descriptor before core.stop() closes it. cancel also puts the coroutines
-- polling it back to work.
local function cancel_polls(self)
  cancel(self.fd)
end

-- The methods `dispatch` and `stop` come from bgworker.drain.fd_class;
-- `loop` checks its `self` with check_self.
local Dispatcher, check_self = drain.fd_class("cqueues", cancel_polls)

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
-- @function Dispatcher:dispatch
-- @tparam[opt] int max handle at most this many items (default: the budget)
-- @treturn int the number of items handled: callbacks run, including those
-- that raised, and items whose decode failed

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
-- @function Dispatcher:stop
-- @treturn int the number of pending items cancelled

return M

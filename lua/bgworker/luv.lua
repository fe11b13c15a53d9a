--- Dispatch inside a luv (libuv) loop.
--
-- `bgworker.luv.start([opts])` starts the core with a descriptor signal
-- (an eventfd on Linux, or a pipe) and watches it with a `uv.new_poll`
-- handle in luv's default loop. When it turns readable, the callbacks of the
-- waiting items run in that loop, one after the other, each in protected
-- mode: an error goes to the error handler, and the others still run.
--
--     local uv = require "luv"
--     local d = require("bgworker.luv").start()
--     -- start utility libraries; their callbacks run inside uv.run()
--     uv.run()
--
-- After `budget` items the dispatcher leaves the descriptor readable and
-- returns to the loop, so timers and other handles get their turn; the loop
-- comes back for the rest at its next iteration. `d:stop()` closes the poll
-- handle and stops the core, so `uv.run()` returns once nothing else is
-- active. One dispatcher runs in a Lua state at a time.
--
-- Callbacks run on the thread that called `uv.run()` and cannot yield.
--
-- @module bgworker.luv

local core = require "bgworker.core"
local drain = require "bgworker.drain"
local uv = require "luv"

local error, pcall, setmetatable, tostring = error, pcall, setmetatable, tostring

local M = {}

-- Stop (see bgworker.drain.fd_class): close the poll handle, so that
-- `uv.run()` returns once nothing else is active; libuv must forget the
-- descriptor before core.stop() closes it.
local function close_handle(self)
  local handle = self.handle
  if handle and not handle:is_closing() then
    handle:stop()
    handle:close()
  end
end

-- The methods `dispatch` and `stop` come from bgworker.drain.fd_class.
local Dispatcher = drain.fd_class("luv", close_handle)

-- The poll handle's callback: one batch per loop iteration.
local function on_readable(self, err)
  if self.stopped then
    return
  end
  if err then
    drain.report(self, "bgworker.luv: polling the wake-up descriptor failed: " .. tostring(err))
    self:stop()
    return
  end
  drain.batch(self, self.budget)
end

--- Start dispatching in luv's default loop.
-- @tparam[opt] table opts
--   `budget` (positive integer): items handled per loop iteration, 1000 by
--   default.
--   `errorhandler` (function): called as `errorhandler(err, traceback)` for
--   each callback that raised an error and each item whose decode failed;
--   by default writes the traceback to stderr.
--   `capacity` (positive integer): bound the queue; by default unbounded.
--   `kind` ("eventfd" or "pipe"): the descriptor; an eventfd by default on
--   Linux.
-- @return a dispatcher: `fd` is the descriptor, `handle` the `uv_poll_t`
function M.start(opts)
  local self = setmetatable({}, Dispatcher)
  drain.start_fd(self, "bgworker.luv.start", opts)
  local ok, handle, err = pcall(uv.new_poll, self.fd)
  if ok and handle then
    ok, err = pcall(handle.start, handle, "r", function(perr)
      on_readable(self, perr)
    end)
    if not ok then
      handle:close()
    end
  else
    ok, err = false, ok and err or handle
  end
  if not ok then
    core.stop()
    error("bgworker.luv.start: cannot poll the wake-up descriptor: " .. tostring(err), 2)
  end
  self.handle = handle
  return self
end

--- Run the callbacks of waiting items now, without waiting: for a caller
-- that wants to drain outside the poll handle's turn.
-- @function Dispatcher:dispatch
-- @tparam[opt] int max handle at most this many items (default: the budget)
-- @treturn int the number of items handled

--- Stop: close the poll handle, so that `uv.run()` returns once nothing else
-- is active, and stop the core, which refuses further items and frees the
-- pending ones without running them. Safe inside a callback; stopping a
-- stopped dispatcher does nothing.
-- @function Dispatcher:stop
-- @treturn int the number of pending items cancelled

return M

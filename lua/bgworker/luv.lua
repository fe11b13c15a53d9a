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

local error, getmetatable, pcall, setmetatable, tostring, type = error, getmetatable, pcall,
  setmetatable, tostring, type

local M = {}

local Dispatcher = {}
Dispatcher.__index = Dispatcher

local function check_self(self, method)
  if getmetatable(self) ~= Dispatcher then
    error(("bad argument #1 to '%s' (luv dispatcher expected, got %s; call it as" ..
      " dispatcher:%s())"):format(method, type(self), method), 3)
  end
end

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
-- @tparam[opt] int max handle at most this many items (default: the budget)
-- @treturn int the number of items handled
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

--- Stop: close the poll handle, so that `uv.run()` returns once nothing else
-- is active, and stop the core, which refuses further items and frees the
-- pending ones without running them. Safe inside a callback; stopping a
-- stopped dispatcher does nothing.
-- @treturn int the number of pending items cancelled
function Dispatcher:stop()
  check_self(self, "stop")
  if self.stopped then
    return 0
  end
  self.stopped = true
  -- The descriptor is closed by core.stop(): libuv must forget it first.
  local handle = self.handle
  if handle and not handle:is_closing() then
    handle:stop()
    handle:close()
  end
  if core.running() and core.fd() == self.fd then
    return core.stop()
  end
  return 0
end

return M

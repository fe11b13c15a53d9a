--- Dispatch in a LuaSocket `socket.select` loop (or any loop that can wait
-- for a socket to be readable).
--
--     local d = require("bgworker").new()          -- { loop = "select" }
--     while true do
--         local readable = socket.select({ d.socket, other }, nil)
--         if readable[d.socket] then d:dispatch() end
--         ...
--     end
--
-- With `kind = "eventfd"` (or `"pipe"`) it wakes through a descriptor
-- instead of a UDP socket, and the dispatcher itself goes into the read set
-- (it has `getfd` and `dirty`, which `socket.select` asks of any object).
--
-- Waiting (`bgworker.await`, `job:get`): outside any coroutine it blocks
-- while running this dispatcher (as `d:wait` does); in a coroutine it
-- suspends the coroutine, and `dispatch` resumes it when the result (or
-- the timeout) comes. Timeouts fire through the core's alarm, so a loop
-- blocked in `socket.select` wakes for them.
--
-- A dispatcher here has what every @{Dispatcher} has, and `wait`, `getfd`
-- and `dirty` (below: `Select` is the class of these dispatchers).
--
-- @module bgworker.select

local args = require "bgworker.args"
local core = require "bgworker.core"
local dispatcher = require "bgworker.dispatcher"
local signal = require "bgworker.signal"
local waiting = require "bgworker.waiter"
local socket = require "socket"

local error, type = error, type
local max, min = math.max, math.min
local check_self = dispatcher.check_self

local M = {}

-- socket.select refuses timeouts of 2^31 ms and more: wait longer in parts.
local LONGEST_SELECT = 86400

local Select = dispatcher.class("select", {
  kind = args.option.one_of { "udp", "eventfd", "pipe" },
})
-- The class of these dispatchers: the loop's adapter (bgworker.dispatcher).
M.class = Select

function Select.start(self, opts)
  local err
  if opts.kind == nil or opts.kind == "udp" then
    self.socket, err = signal.start_udp(opts)
    self.waitable = self.socket
  else
    self.fd, err = signal.start_fd(opts)
    self.waitable = self
  end
  if err then
    return nil, err
  end
  self.readset = { self.waitable }
  return true
end

--- Make a dispatcher for a `socket.select` loop: `bgworker.new(opts)`.
-- @function new
-- @tparam[opt] table opts the common options (see `bgworker.new`), and
--   `kind` ("udp", the default; "eventfd" or "pipe"): how it wakes
-- @return a dispatcher; its field `socket` is the LuaSocket UDP socket to
-- wait on (for "udp")
M.new = dispatcher.constructor(Select)

function Select.after_stop(self)
  if self.socket then
    self.socket:close()
  end
end

--- The descriptor to wait on, for `socket.select` (with `kind`; a UDP
-- dispatcher's socket has its own).
-- @treturn int the descriptor, or -1 once stopped
function Select:getfd()
  local msg = check_self(self, "getfd")
  if msg then error(msg, 2) end
  return self.stopped and -1 or self.fd or self.socket:getfd()
end

--- For `socket.select`: nothing is buffered on the Lua side.
-- @treturn boolean false
function Select.dirty()
  return false
end

local discard = signal.discard_datagrams

-- `dispatch` (the base's) reads the waiting wake-up datagrams first.
function Select:before_dispatch()
  if self.socket then
    discard(self.socket)
  end
end

--- Wait until at least one item was handled, or the timeout passed. For
-- scripts and tests with no event loop: blocks in `socket.select`.
-- @tparam[opt] number timeout seconds (non-negative); by default no limit
-- @treturn int the number handled, 0 when the time ran out (or the
-- dispatcher is stopped)
function Select:wait(timeout)
  local msg = check_self(self, "wait") or args.seconds("wait", 1, "timeout", timeout, true) or
    self:lost_run("wait")
  if msg then error(msg, 2) end
  local gettime = core.now
  local deadline = timeout and gettime() + timeout
  while not self.stopped do
    local left = deadline and min(max(deadline - gettime(), 0), LONGEST_SELECT)
    local readable = socket.select(self.readset, nil, left or LONGEST_SELECT)
    if readable[self.waitable] then
      local n = self:dispatch()
      if n > 0 then
        return n
      end
    end
    if deadline and gettime() >= deadline then
      break
    end
  end
  return 0
end

-- ------------------------------------------------------------------------
-- Waiting

-- Outside any coroutine: block, running this dispatcher.
local function blocking_suspender(self)
  return {
    timed = true,
    suspend = function(left)
      self:wait(left)
    end,
    resume = function() end,
  }
end

function Select:suspender()
  local in_co, co = dispatcher.in_coroutine()
  if not in_co then
    return blocking_suspender(self)
  end
  local copas = package.loaded.copas
  if type(copas) == "table" and copas.running then
    return nil, "this is a Copas thread, but the running dispatcher is a select one that" ..
      " Copas does not run: start it with bgworker.new{ loop = \"copas\" }"
  end
  return waiting.resuming_suspender(self, co)
end

return M

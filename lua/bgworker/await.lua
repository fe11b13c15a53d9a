--- Wait for a callback: suspend the caller until the callback fires (or the
-- time is up), with whatever dispatcher runs, and return what it was called
-- with.
--
--     local await = require "bgworker.await"
--     local ok, addresses, name = await(function(callback, token)
--         native.resolve(host, callback, token)
--     end, 5)
--
-- `await(start [, timeout])` calls `start(callback, token)`, waits until
-- `callback(...)` is called (typically by the dispatcher, when a utility
-- library delivers), and returns `true` and those values. Calls of the
-- callback after the first are ignored. `token` is a `bgworker.core.token()`
-- that `await` cancels when it stops waiting without a result, so a utility
-- library that takes it can give up the work (see include/bgworker.h).
--
-- How it waits depends on the running dispatcher (see `bgworker.new`): in
-- a Copas thread, a coroutine of a select or luv loop, a cqueues coroutine,
-- or an OpenResty request, and in any callback the dispatcher runs, only
-- the caller is suspended; outside any coroutine, with a select dispatcher,
-- it blocks while running that dispatcher (as `d:wait` does). Where the
-- running dispatcher cannot resume the caller, it raises an error, before
-- calling `start`.
--
-- @module bgworker.await

local args = require "bgworker.args"
local core = require "bgworker.core"
local dispatcher = require "bgworker.dispatcher"
local waiting = require "bgworker.waiter"

local error, select = error, select
local unpack = dispatcher.unpack

--- Call `start(callback, token)` and wait for the callback.
-- @function await
-- @tparam function start starts the work
-- @tparam[opt] number timeout seconds (non-negative); by default no limit
-- @return `true` and the values the callback got; or `nil, "timeout"`, or
-- `nil, "stopped"` (the dispatcher stopped first), then what `start`
-- returned
local function await(start, timeout)
  local msg = args.typed("await", 1, "start", start, "function") or
    args.seconds("await", 2, "timeout", timeout, true)
  if msg then error(msg, 2) end
  local waiter, why = waiting.for_caller("await")
  if not waiter then error(why, 2) end
  local n, values
  local token = core.token()
  local started = start(function(...)
    if not values then
      n, values = select("#", ...), { ... }
      waiter:wake()
    end
  end, token)
  local ok, reason = waiter:wait(timeout)
  if not ok then
    token:cancel()
    return nil, reason, started
  end
  return true, unpack(values, 1, n)
end

return await

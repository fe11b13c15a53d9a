--- Dispatch inside a luv (libuv) loop.
--
-- `bgworker.new { loop = "luv" }` starts the core with a descriptor signal
-- (an eventfd on Linux, or a pipe) and watches it with a `uv.new_poll`
-- handle in luv's default loop. When it turns readable, the callbacks of the
-- waiting items run in that loop, one after the other, each in protected
-- mode: an error goes to the error handler, and the others still run.
--
--     local uv = require "luv"
--     local d = require("bgworker").new { loop = "luv" }
--     -- start utility libraries; their callbacks run inside uv.run()
--     uv.run()
--
-- After `budget` callbacks, or 5 ms of them, the dispatcher leaves the
-- descriptor readable and returns to the loop, so timers and other handles
-- get their turn; the loop comes back for the rest at its next iteration.
--
-- As a libuv handle after `uv_unref`, the dispatcher keeps `uv.run()`
-- running only while something is outstanding: a job, a lookup, a wait,
-- a utility library's handle that keeps the loop alive, or pending items
-- (`d:ref()` keeps it running regardless). So `uv.run()` returns once the
-- program's work is done, with no `d:stop()`; `d:stop()` closes the poll
-- handle and stops the core.
--
-- Callbacks run on the thread that called `uv.run()` and cannot yield.
-- Waiting (`bgworker.await`, `job:get`) works in a coroutine: it is
-- suspended, and the dispatcher resumes it when the result (or a luv timer,
-- for the timeout) comes.
--
-- A dispatcher here has what every @{Dispatcher} has; `dispatch` runs the
-- waiting callbacks outside luv's turn too.
--
-- @module bgworker.luv

local args = require "bgworker.args"
local core = require "bgworker.core"
local dispatcher = require "bgworker.dispatcher"
local signal = require "bgworker.signal"
local waiting = require "bgworker.waiter"
local uv = require "luv"

local pcall, tostring = pcall, tostring

-- luv cannot be loaded anew in a Lua state once an earlier luv of that
-- state was collected: the new one's uv.walk then crashes (luv 1.44, on
-- every Lua version). A test runner that unloads modules between spec
-- files (busted's insulation) does just that. So every luv this module
-- gets lives as long as the state, held by the registry.
do
  local registry = debug.getregistry()
  local held = registry["bgworker.luv: luv modules"] or {}
  held[uv] = true
  registry["bgworker.luv: luv modules"] = held
end

local M = {}

local Luv = dispatcher.class("luv", { kind = args.option.one_of { "eventfd", "pipe" } })
-- The class of these dispatchers: the loop's adapter (bgworker.dispatcher).
M.class = Luv

function Luv.gettime()
  return uv.hrtime() / 1e9
end

-- The poll handle's callback: one batch per loop iteration.
local function on_readable(self, err)
  if self.stopped then
    return
  end
  if err then
    self:report("bgworker.luv: polling the wake-up descriptor failed: " .. tostring(err))
    self:stop()
    return
  end
  self:drain_and_rewake(self.budget)
end

-- Close the poll handles still open on descriptor number `fd`, which is
-- ours from now on: they are stale, left by a dispatcher whose run was
-- stopped through bgworker.core (core.stop() closed its descriptor under
-- them). libuv refuses a second handle on a number it lists (EEXIST).
local function close_stale_polls(fd)
  uv.walk(function(handle)
    if handle:get_type() == "poll" and not handle:is_closing() and handle:fileno() == fd then
      handle:close()
    end
  end)
end

function Luv.start(self, opts)
  local fd, err = signal.start_fd(opts)
  if not fd then
    return nil, err
  end
  self.fd = fd
  close_stale_polls(fd)
  local ok, handle
  ok, handle, err = pcall(uv.new_poll, fd)
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
    return nil, "cannot poll the wake-up descriptor: " .. tostring(err)
  end
  self.handle = handle
  return true
end

--- Start dispatching in luv's default loop: `bgworker.new { loop = "luv" }`.
-- @tparam[opt] table opts the common options (see `bgworker.new`), and
--   `kind` ("eventfd" or "pipe"): the descriptor; an eventfd by default on
--   Linux
-- @return a dispatcher: `fd` is the descriptor, `handle` the `uv_poll_t`
-- @function new
M.new = dispatcher.constructor(Luv)

-- libuv must forget the descriptor before core.stop() closes it; a closed
-- poll handle also lets `uv.run()` return once nothing else is active.
-- Outside `uv.run()` (a loop that ended, or never ran), one turn of the
-- loop finishes the close: luv would otherwise free the handle at exit
-- while libuv still lists it, and crash.
function Luv.before_stop(self)
  local handle = self.handle
  if handle and not handle:is_closing() then
    handle:stop()
    handle:close()
    if uv.loop_mode() == nil then
      uv.run("nowait")
    end
  end
end

-- The poll handle keeps `uv.run()` running only while the dispatcher keeps
-- the loop alive; unref'd, it still polls while the loop runs for others.
function Luv:keep_alive(alive)
  local handle = self.handle
  if handle and not handle:is_closing() then
    if alive then
      handle:ref()
    else
      handle:unref()
    end
  end
end

function Luv:suspender()
  local in_co, co = dispatcher.in_coroutine()
  if not in_co then
    return nil, "with a luv dispatcher, wait in a coroutine: the main program runs uv.run()"
  end
  return waiting.resuming_suspender(self, co)
end

-- A luv timer: `fn()` runs in protected mode after `seconds`, never before.
-- libuv counts from the time it cached at the loop's last turn (stale when
-- callbacks or the program were slow since), in whole milliseconds: so the
-- time is refreshed first, and the delay rounded up with a millisecond more.
function Luv:timer(seconds, fn)
  local timer = uv.new_timer()
  uv.update_time()
  timer:start(math.ceil(seconds * 1000) + 1, 0, function()
    timer:close()
    self:call_reporting(fn)
  end)
  return {
    cancel = function()
      if not timer:is_closing() then
        timer:close()
      end
    end,
  }
end

return M

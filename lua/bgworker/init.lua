--- Deliver results from background threads of native libraries into this
-- Lua state.
--
-- Utility libraries queue items from any thread through `bgworker.core`. A
-- dispatcher collects them on the Lua thread, at a safe point of the event
-- loop it belongs to, and calls their callbacks under an error handler: one
-- failing callback never stops the others.
--
--     local copas = require "copas"
--     local bgworker = require "bgworker"
--     copas.addthread(function()
--         bgworker.new { loop = "copas" }
--         -- start utility libraries; their callbacks run in this loop
--     end)
--     copas.loop()
--
-- Every loop's dispatcher is made the same way, `bgworker.new(opts)`, with
-- `opts.loop` naming the loop; one runs in a Lua state at a time. What
-- every dispatcher has is on the page @{Dispatcher}.
--
-- The fields `pool`, `dns`, `process`, `await`, `select`, `copas`, `luv`,
-- `cqueues` and `ngx` are the modules @{bgworker.pool}, @{bgworker.dns},
-- ..., loaded on first use.
--
-- @module bgworker

local core = require "bgworker.core"
local adapter = require "bgworker.adapter"
local dispatcher = require "bgworker.dispatcher"

local error, ipairs, rawset, require, setmetatable = error, ipairs, rawset, require, setmetatable

local bgworker = {
  --- The version of this module, "MAJOR.MINOR.PATCH".
  version = "0.1.0",
  --- The native core this layer is built on: the topic @{core.md} lists its
  -- functions, `core.stats()` (the core's counters) among them.
  core = core,
  --- Callbacks a drain runs before it lets others run, by default.
  DEFAULT_BUDGET = dispatcher.DEFAULT_BUDGET,
  --- Seconds of callbacks after which a drain lets others run.
  SLICE = dispatcher.SLICE,
}
bgworker._VERSION = "bgworker " .. bgworker.version

--- The error handler used when `opts.errorhandler` is not given: it writes
-- the traceback (which starts with the message) to stderr.
-- @function default_errorhandler
-- @param err the error value
-- @param tb a traceback string, or nil
bgworker.default_errorhandler = dispatcher.default_errorhandler

--- Make and start a dispatcher.
--
-- @tparam[opt] table opts
--   `loop`: the event loop it dispatches in: "select" (the default: a
--   `socket.select` loop, see bgworker.select), "copas" (bgworker.copas),
--   "luv" (bgworker.luv), "cqueues" (bgworker.cqueues) or "ngx" (OpenResty,
--   bgworker.ngx).
--   `capacity` (positive integer): bound the queue; by default unbounded.
--   `budget` (positive integer): callbacks run before the loop's other work
--   gets a turn; 1000 by default. Each item's callback counts, and so does
--   each event of a pool's job (a progress, an outcome), many of which
--   come in one item. A turn also ends once `SLICE` (5 ms) passed, so the
--   loop's other work, and the timeout of a wait, are late by about that
--   much (plus one callback) whatever the callbacks cost.
--   `errorhandler` (function): called as `errorhandler(err, traceback)` for
--   each callback that raised an error and each item whose decode failed
--   (`traceback` is a string or nil); by default writes the traceback to
--   stderr.
--   Each loop's page lists the options of its own (`kind`, `timeout`).
-- @return the dispatcher: every @{Dispatcher} has `stop()`, `stats()` and
-- `dispatch()`; the loop's page tells the rest.
function bgworker.new(opts)
  local d, err = dispatcher.new("bgworker.new", opts)
  if not d then error(err, 2) end
  return d
end

--- The dispatcher running in this Lua state, or nil.
function bgworker.current()
  return dispatcher.current()
end

-- The utilities and the loops load on first use: `bgworker.pool`,
-- `bgworker.luv`, ... are `require "bgworker.pool"`, ... (each needs its
-- native library, or its loop's, which a program that only dispatches in
-- another loop should not have to load).
local SUBMODULES = { pool = true, dns = true, process = true, await = true }
for _, loop in ipairs(adapter.LOOPS) do
  SUBMODULES[loop] = true
end

return setmetatable(bgworker, {
  __index = function(t, name)
    if SUBMODULES[name] then
      local module = require("bgworker." .. name)
      rawset(t, name, module)
      return module
    end
  end,
})

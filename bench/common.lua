-- Shared pieces of bench/run.lua and bench/fd_signal.lua: sizes from the
-- environment, the clock, progress lines, stats deltas, medians and
-- percentiles, runs that give up when they stall, and the select loop of a
-- bgworker.new() dispatcher. Found through bench/?.lua on LUA_PATH.

local bench = require "bgworker_bench"
local core = require "bgworker.core"
local socket = require "socket"

local common = {}

function common.env_number(name, default)
  return tonumber(os.getenv(name)) or default
end

-- A run that sees no progress for this long has lost items: give up.
common.STALL = 10

common.now = bench.now -- microseconds, CLOCK_MONOTONIC

function common.seconds()
  return bench.now() / 1e6
end

--- A progress function: progress(format, ...) writes a line to stderr,
-- tagged with the Lua version, then `prefix`.
function common.progress(prefix)
  return function(...)
    io.stderr:write("[", _VERSION, jit and " (LuaJIT)" or "", "] ", prefix, string.format(...), "\n")
  end
end

function common.stats_delta(before)
  local after, d = core.stats(), {}
  for k, v in pairs(after) do d[k] = v - before[k] end
  return d
end

--- The median of runs of { t = seconds, ... }: sorts them by t.
function common.median(runs)
  table.sort(runs, function(a, b) return a.t < b.t end)
  return runs[math.ceil(#runs / 2)]
end

--- p50, p99 and max of the first `n` latencies of `lat` (sorted in place).
function common.percentiles(lat, n)
  table.sort(lat)
  local function at(p) return lat[math.max(1, math.ceil(p * n))] end
  return { n = n, p50_us = at(0.5), p99_us = at(0.99), max_us = lat[n] }
end

--- A watch on a run whose `done()` returns true once it is over, or else
-- the items so far: watch() returns true once done() does, false while the
-- items move, and false and a message when they have not moved for STALL
-- seconds.
function common.watch(done)
  local last, seen = common.seconds(), nil
  return function()
    local c = done()
    if c == true then return true end
    if c ~= seen then
      last, seen = common.seconds(), c
    elseif common.seconds() - last > common.STALL then
      return false, ("stalled at %s items"):format(tostring(c))
    end
    return false
  end
end

--- Run `step` until `done()` (as for `watch`); raise if it stalls.
function common.until_done(done, step)
  local watch = common.watch(done)
  while true do
    local over, stalled = watch()
    if over then return end
    if stalled then error(stalled, 2) end
    step()
  end
end

--- A step of a socket.select loop around a bgworker.new() dispatcher `d`:
-- wait up to a second, and dispatch if woken.
function common.select_step(d)
  local set = { d.socket }
  return function()
    local readable = socket.select(set, nil, 1)
    if readable[d.socket] then d:dispatch() end
  end
end

return common

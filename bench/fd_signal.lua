-- The descriptor signal (core.start_fd: an eventfd, or a pipe) against the
-- UDP datagram signal, measured in one process so that the ratio compares
-- like with like. Section "fd" of bench/run.lua; also runs on its own:
--
--   LUA_PATH="lua/?.lua;lua/?/init.lua;bench/?.lua;;" LUA_CPATH="build/5.4/?.so;;" \
--     lua5.4 bench/fd_signal.lua
--
-- The producer is bgworker_bench (bench/native/bench.c): one thread that
-- delivers small items stamped with CLOCK_MONOTONIC. Rows:
--   udp_select    bgworker.new(): a UDP socket in socket.select, dispatch()
--   fd_select     bgworker.new { kind = "eventfd" }: the dispatcher itself
--                 (it has getfd) in socket.select, dispatch()
--   pipe_select   the same with a pipe
--   luv           bgworker.luv: the eventfd in a uv_poll_t, inside uv.run()
--   cqueues       bgworker.cqueues: the eventfd polled by a cqueues controller
-- Throughput: BENCH_ITEMS items as fast as the producer can (median of
-- BENCH_REPS runs); latency: BENCH_LATENCY_ITEMS items, one per ms.

local bgworker = require "bgworker"
local core = require "bgworker.core"
local bench = require "bgworker_bench"
local common = require "common"
local socket = require "socket"
local has_luv, uv = pcall(require, "luv")
local has_cqueues, cqueues = pcall(require, "cqueues")

local M = {}

local env_number, now, seconds = common.env_number, common.now, common.seconds
local stats_delta, until_done = common.stats_delta, common.until_done

local ITEMS = env_number("BENCH_ITEMS", 2000000)
local REPS = env_number("BENCH_REPS", 3)
local LATENCY_ITEMS = env_number("BENCH_LATENCY_ITEMS", 2000)

local progress = common.progress("fd: ")

-- Each mode: mode(done, produce) starts its dispatcher, starts the producer
-- (produce()), runs until `done()` (as for common.watch) and stops. Returns
-- the stats delta.
local modes = {}

function modes.udp_select(done, produce)
  local d = bgworker.new()
  local before = core.stats()
  local job = produce()
  until_done(done, common.select_step(d))
  job:join()
  local delta = stats_delta(before)
  d:stop()
  return delta
end

local function fd_select(kind)
  return function(done, produce)
    local d = bgworker.new { kind = kind }
    local before, set = core.stats(), { d }
    local job = produce()
    until_done(done, function()
      if socket.select(set, nil, 1)[d] then d:dispatch() end
    end)
    job:join()
    local delta = stats_delta(before)
    d:stop()
    return delta
  end
end
modes.fd_select = fd_select("eventfd")
modes.pipe_select = fd_select("pipe")

if has_luv then
  function modes.luv(done, produce)
    local d = bgworker.new { loop = "luv" }
    local before = core.stats()
    -- A timer checks for the end (and for stalls) without touching the drain.
    local timer = uv.new_timer()
    local watch, failed = common.watch(done), nil
    timer:start(1, 1, function()
      local over, stalled = watch()
      if over or stalled then
        failed = stalled
        timer:close()
        d:stop()
      end
    end)
    local job = produce()
    uv.run()
    job:join()
    if failed then error(failed) end
    return stats_delta(before)
  end
end

if has_cqueues then
  function modes.cqueues(done, produce)
    local cq = cqueues.new()
    local d = bgworker.new { loop = "cqueues" }
    local before = core.stats()
    local failed
    cq:wrap(function() d:loop() end)
    cq:wrap(function()
      local watch = common.watch(done)
      repeat
        cqueues.sleep(0.001)
        local over
        over, failed = watch()
      until over or failed
      d:stop()
    end)
    local job = produce()
    assert(cq:loop())
    job:join()
    if failed then error(failed) end
    return stats_delta(before)
  end
end

local ORDER = { "udp_select", "fd_select", "pipe_select", "luv", "cqueues" }

--------------------------------------------------------------------------
-- Throughput: seconds from the producer's start to the last callback.

local function throughput_once(mode, n)
  local count, t1 = 0, nil
  local function callback()
    count = count + 1
    if count == n then t1 = seconds() end
  end
  collectgarbage()
  local t0
  local delta = modes[mode](function() return count >= n or count end, function()
    local job = bench.produce { items = n, callback = callback }
    t0 = job:started() / 1e6
    return job
  end)
  assert(count == n, "items lost")
  return t1 - t0, delta
end

local function throughput(n, reps)
  local out = { items = n, reps = reps }
  for _, mode in ipairs(ORDER) do
    if modes[mode] then
      progress("throughput: %s, %d items", mode, n)
      local runs = {}
      for i = 1, reps do
        local t, delta = throughput_once(mode, n)
        runs[i] = { t = t, delta = delta }
      end
      local median = common.median(runs)
      out[mode] = { seconds = median.t, per_second = n / median.t,
        wakeups_per_item = median.delta.wakeups / median.delta.delivered }
    else
      out[mode] = "not available"
    end
  end
  return out
end

--------------------------------------------------------------------------
-- Latency: one item per ms, stamped at the deliver, read in the callback.

local function latency(n)
  local out = { items = n, interval_us = 1000 }
  for _, mode in ipairs(ORDER) do
    if modes[mode] then
      progress("latency: %s, %d items, one per ms", mode, n)
      local lat, count = {}, 0
      local function record(_, _, stamp)
        count = count + 1
        lat[count] = now() - stamp
      end
      collectgarbage()
      local delta = modes[mode](function() return count >= n or count end, function()
        return bench.produce { items = n, interval_us = 1000, callback = record }
      end)
      local r = common.percentiles(lat, count)
      r.wakeups_per_item = delta.wakeups / delta.delivered
      out[mode] = r
    else
      out[mode] = "not available"
    end
  end
  return out
end

--------------------------------------------------------------------------

local function ratio(a, b)
  if type(a) == "number" and type(b) == "number" and b ~= 0 then return a / b end
end

--- Run both measurements. Returns { throughput = ..., latency = ...,
-- ratio = { throughput, p50, p99 } } where each ratio is eventfd (select)
-- over UDP (select): above 1 is more callbacks/s, or more latency.
function M.run()
  if core.running() then core.stop() end
  local out = {
    throughput = throughput(ITEMS, REPS),
    latency = latency(LATENCY_ITEMS),
  }
  local t, l = out.throughput, out.latency
  out.ratio = {
    throughput = ratio(t.fd_select.per_second, t.udp_select.per_second),
    p50 = ratio(l.fd_select.p50_us, l.udp_select.p50_us),
    p99 = ratio(l.fd_select.p99_us, l.udp_select.p99_us),
  }
  return out
end

M.ORDER = ORDER

--- The table: one row per mode, with the ratio to UDP (select).
function M.format(out)
  local function si(x)
    if x >= 1e6 then return ("%.2f M"):format(x / 1e6) end
    if x >= 1e3 then return ("%.1f k"):format(x / 1e3) end
    return ("%.0f"):format(x)
  end
  local t, l = out.throughput, out.latency
  local base_t, base_l = t.udp_select, l.udp_select
  local lines = {
    ("%-12s %14s %8s %10s %10s %10s %8s %8s"):format("signal/loop", "callbacks/s", "x UDP",
      "p50 us", "p99 us", "max us", "x UDP50", "x UDP99"),
  }
  for _, mode in ipairs(ORDER) do
    local a, b = t[mode], l[mode]
    if type(a) == "table" and type(b) == "table" then
      lines[#lines + 1] = ("%-12s %12s/s %8.2f %10.1f %10.1f %10.0f %8.2f %8.2f"):format(mode,
        si(a.per_second), a.per_second / base_t.per_second, b.p50_us, b.p99_us, b.max_us,
        b.p50_us / base_l.p50_us, b.p99_us / base_l.p99_us)
    else
      lines[#lines + 1] = ("%-12s not available"):format(mode)
    end
  end
  lines[#lines + 1] = ("(%d items per throughput run, median of %d; latency: %d items, one per ms)")
    :format(t.items, t.reps, l.items)
  return table.concat(lines, "\n")
end

if arg and arg[0] and arg[0]:match("fd_signal%.lua$") then
  print(("%s%s"):format(_VERSION, jit and (" (" .. jit.version .. ")") or ""))
  print(M.format(M.run()))
end

return M

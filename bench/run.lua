-- The benchmarks of one Lua version. bench/bench.lua runs this once per Lua
-- version, with LUA_PATH and LUA_CPATH set for it:
--
--   lua bench/run.lua SECTION...
--
-- Sections: throughput, latency, memory, luv, idle, and fd (the
-- descriptor signal against UDP: bench/fd_signal.lua). Copas is measured
-- when `require "copas"` finds it (bench.lua puts Copas 4's tree, from
-- `make copas-<ver>`, on LUA_PATH). It prints progress on
-- stderr and its figures on stdout as a Lua chunk, `return { ... }`. Every
-- figure comes with the baseline it is compared to, measured in this same
-- run; bench.lua makes the ratios. Sizes come from the environment:
--   BENCH_ITEMS          items per throughput run (default 2000000)
--   BENCH_REPS           runs per throughput figure; the median counts (3)
--   BENCH_LATENCY_ITEMS  items of a latency run, one per ms (2000)
--   BENCH_PENDING        items pending for the memory figure (1000000)
--   BENCH_IDLE_SECONDS   length of the idle loop (2)

local bgworker = require "bgworker"
local core = require "bgworker.core"
local bench = require "bgworker_bench"
local common = require "common"
local socket = require "socket"
local has_copas, copas = pcall(require, "copas")

local env_number, now, seconds = common.env_number, common.now, common.seconds
local stats_delta, select_step = common.stats_delta, common.select_step

-- A multiple of 4, so that 1, 2 and 4 producers share it evenly.
local ITEMS = math.ceil(env_number("BENCH_ITEMS", 2000000) / 4) * 4
local REPS = env_number("BENCH_REPS", 3)
local LATENCY_ITEMS = env_number("BENCH_LATENCY_ITEMS", 2000)
local PENDING = env_number("BENCH_PENDING", 1000000)
local IDLE_SECONDS = env_number("BENCH_IDLE_SECONDS", 2)
local PRODUCERS = { 1, 2, 4 }

local progress = common.progress("")

--------------------------------------------------------------------------
-- The callback of every throughput figure, and the drain loops.

local count = 0
local function callback(_, _, _)
  count = count + 1
end

-- The same callback 64 times over, each a function of its own prototype
-- (sharing `count`): called in turn, no compiler can inline them, which
-- LuaJIT does with `callback` in a plain loop. Lua 5.1 has no upvaluejoin,
-- and no compiler either: the same function there.
local CALLBACKS = {}
for i = 1, 64 do
  local f = callback
  if debug.upvaluejoin then
    f = load(string.dump(callback))
    debug.upvaluejoin(f, 1, callback, 1)
  end
  CALLBACKS[i] = f
end

local poll = core.poll

-- The tightest drain: poll until empty, calling each callback.
local function drain()
  local f, a, b, c = poll()
  while f do
    f(a, b, c)
    f, a, b, c = poll()
  end
end

local function discard(sock)
  while sock:receive(16) do end
end

-- The core started on a socket of our own, as a plain select loop would.
local function start_core()
  local reader = assert(socket.udp())
  assert(reader:setsockname("127.0.0.1", 0))
  local _, port = reader:getsockname()
  core.start(tonumber(port))
  assert(reader:setpeername(core.sender()))
  reader:settimeout(0)
  return reader
end

local function stop_core(reader)
  core.stop()
  reader:close()
end

-- Run `step` until `count` reaches `n`; raise if it stalls (common.STALL
-- seconds without progress).
local function run_until(n, step)
  common.until_done(function() return count >= n or count end, step)
end

-- `total` items split among `producers` threads (PRODUCERS divide ITEMS).
local function produce(total, producers, extra)
  local opts = { producers = producers, items = total / producers, callback = callback }
  for k, v in pairs(extra or {}) do opts[k] = v end
  return bench.produce(opts)
end

--------------------------------------------------------------------------
-- Throughput

-- End-to-end runs: `total` items from `producers` threads into a loop,
-- `extra` the producers' other options. Each returns the seconds from the
-- start of the producers to the last callback, and the stats delta.
local loops = {}

-- One such run, its loop started: `step` until the last callback, timed
-- from the start of the producer threads (their items made).
local function timed(total, producers, extra, step)
  local before = core.stats()
  count = 0
  local job = produce(total, producers, extra)
  run_until(total, step)
  local t = seconds() - job:started() / 1e6
  job:join()
  return t, stats_delta(before)
end

function loops.select_tight(total, producers, extra)
  local reader = start_core()
  local set = { reader }
  local t, delta = timed(total, producers, extra, function()
    socket.select(set, nil, 1)
    discard(reader)
    drain()
  end)
  stop_core(reader)
  return t, delta
end

function loops.select_dispatcher(total, producers, extra)
  local d = bgworker.new()
  local t, delta = timed(total, producers, extra, select_step(d))
  d:stop()
  return t, delta
end

local function stop_copas(d)
  d:stop()
  -- Let the reader see the stop and end.
  for _ = 1, 10 do copas.step(0) end
end

function loops.copas(total, producers, extra)
  local d = bgworker.new { loop = "copas" }
  local t, delta = timed(total, producers, extra, function() copas.step(1) end)
  stop_copas(d)
  return t, delta
end

-- Drain ceilings: the same items queued first, then drained with no
-- wake-up and no producer running. Besides the tight loop and
-- dispatcher:dispatch(), loops that add one at a time what a drain that
-- protects every item would pay: the vararg call layers, a pcall, and
-- bgworker.protect's traceback handler. (dispatch() protects a batch.)
local protect = require "bgworker.protect"

local function run_item(f, ...)
  if f == nil then return false end
  f(...)
  return true
end

local function step()
  return run_item(poll())
end

local function prequeued(drain_loop)
  return function(total)
    local reader = start_core()
    local job = produce(total, 1)
    job:join()
    count = 0
    local t0 = seconds()
    drain_loop()
    local t = seconds() - t0
    assert(count == total, "the drain missed items")
    stop_core(reader)
    return t
  end
end

local CEILINGS = {
  { "tight", prequeued(drain) },
  { "step", prequeued(function()
    while step() do end
  end) },
  { "pcall_step", prequeued(function()
    while select(2, pcall(step)) do end
  end) },
  { "protect_call_step", prequeued(function()
    local call = protect.call
    while select(2, call(step)) do end
  end) },
}

-- A drain body run in place, on the calling thread, with no runner: how
-- drains ran before any callback could wait (bgworker.runner), for the
-- baseline of what runners cost callbacks that do not wait.
local function in_place(self, body, slice)
  return body(self, slice)
end

-- dispatcher:dispatch() draining items queued first, static or malloc'd;
-- `place`: drains run in place (the baseline) rather than in runners.
local function dispatch_ceiling(alloc, place)
  return function(total)
    local d = bgworker.new()
    if place then d.run_in_runner = in_place end
    local job = produce(total, 1, { alloc = alloc })
    job:join()
    count = 0
    local t0 = seconds()
    while count < total do d:dispatch() end
    local t = seconds() - t0
    d:stop()
    return t
  end
end
CEILINGS[#CEILINGS + 1] = { "dispatcher", dispatch_ceiling("static") }
CEILINGS[#CEILINGS + 1] = { "dispatcher_malloc", dispatch_ceiling("malloc") }
CEILINGS[#CEILINGS + 1] = { "dispatcher_copy", dispatch_ceiling("copy") }
CEILINGS[#CEILINGS + 1] = { "dispatcher_in_place", dispatch_ceiling("static", true) }

-- The breakdown's other half: producers alone, delivering `total` items
-- into an unbounded queue that nobody drains (stop cancels them after).
local function producers_alone(producers, alloc)
  return function(total)
    local reader = start_core()
    local job = produce(total, producers, { alloc = alloc })
    job:join()
    local t = seconds() - job:started() / 1e6
    stop_core(reader)
    return t
  end
end

-- The same callback with the same arguments, from a Lua loop: called
-- directly, and through the table of callbacks (not inlined).
local function pure_lua(total)
  count = 0
  local t0 = seconds()
  for i = 1, total do callback(1, i, 0.5) end
  return seconds() - t0
end

local function pure_lua_table(total)
  local callbacks = CALLBACKS
  count = 0
  local t0 = seconds()
  for i = 1, total do callbacks[i % 64 + 1](1, i, 0.5) end
  assert(count == total)
  return seconds() - t0
end

-- Every figure is the median of REPS runs. The runs are interleaved (one
-- of each, REPS times over) so that a busy moment of the machine falls on
-- several figures, not on one figure's every run: the ratios between
-- figures of one round stay fair.
local function throughput()
  local out = { items = ITEMS, reps = REPS, ceiling = {}, runs = {} }
  local measures = {
    { name = "pure Lua", f = pure_lua, put = function(r) out.pure_lua = r end },
    { name = "pure Lua, table of callbacks", f = pure_lua_table, put = function(r) out.pure_lua_table = r end },
  }
  for _, ceiling in ipairs(CEILINGS) do
    measures[#measures + 1] = { name = "drain ceiling, " .. ceiling[1], f = ceiling[2], put = function(r)
      r.ns_per_item = r.seconds / ITEMS * 1e9
      out.ceiling[ceiling[1]] = r
    end }
  end
  local function run(loop, producers, alloc)
    measures[#measures + 1] = {
      name = ("%s, %d producer(s), %s items"):format(loop, producers, alloc),
      f = function(total) return loops[loop](total, producers, { alloc = alloc }) end,
      put = function(r, delta)
        r.loop, r.producers, r.alloc = loop, producers, alloc
        r.wakeups, r.delivered = delta.wakeups, delta.delivered
        out.runs[#out.runs + 1] = r
      end,
    }
  end
  for _, producers in ipairs(PRODUCERS) do run("select_tight", producers, "static") end
  run("select_tight", 1, "malloc")
  for _, producers in ipairs(PRODUCERS) do run("select_dispatcher", producers, "static") end
  for _, producers in ipairs(PRODUCERS) do run("select_dispatcher", producers, "malloc") end
  for _, producers in ipairs(PRODUCERS) do run("select_dispatcher", producers, "copy") end
  for _, alloc in ipairs { "malloc", "copy" } do
    measures[#measures + 1] = { name = "producer alone, " .. alloc, f = producers_alone(1, alloc),
      put = function(r) out.producer_alone = out.producer_alone or {}; out.producer_alone[alloc] = r end }
  end
  if has_copas then
    out.copas_version = copas._VERSION
    for _, producers in ipairs(PRODUCERS) do run("copas", producers, "static") end
  else
    out.copas = "not available: no Copas for " .. _VERSION .. " on this system"
  end
  for rep = 1, REPS do
    for _, m in ipairs(measures) do
      progress("throughput %d/%d: %s", rep, REPS, m.name)
      collectgarbage()
      local t, delta = m.f(ITEMS)
      m.runs = m.runs or {}
      m.runs[rep] = { t = t, delta = delta }
    end
  end
  for _, m in ipairs(measures) do
    local median = common.median(m.runs)
    m.put({ seconds = median.t, per_second = ITEMS / median.t }, median.delta)
  end
  return out
end

--------------------------------------------------------------------------
-- Latency: one item per ms, stamped by the producer with CLOCK_MONOTONIC,
-- read again by the callback. The baseline is a raw datagram carrying the
-- stamp from a C thread to a select loop: the wake-up cost of the kernel.

-- common.percentiles, the mean, and the quantiles 1%, 2%, ... 100% (the
-- max), for the distribution's picture.
local function percentiles(lat, n)
  local r = common.percentiles(lat, n)
  local sum = 0
  for i = 1, n do sum = sum + lat[i] end
  r.mean_us = sum / n
  r.quantiles = {}
  for q = 1, 100 do r.quantiles[q] = lat[math.max(1, math.ceil(q / 100 * n))] end
  return r
end

local latency_loops = {}

-- Datagrams can be lost (a full socket buffer): the loop ends when one
-- second passes without any, and the figures say how many arrived.
function latency_loops.raw_udp(n, record)
  local s = assert(socket.udp())
  assert(s:setsockname("127.0.0.1", 0))
  s:settimeout(0)
  local _, port = s:getsockname()
  local job = bench.produce { items = n, interval_us = 1000, udp_port = tonumber(port) }
  while count < n and socket.select({ s }, nil, 1)[s] do
    local stamp = s:receive()
    while stamp do
      record(nil, nil, tonumber(stamp))
      stamp = s:receive()
    end
  end
  job:join()
  s:close()
end

-- bgworker.new() in a select loop, woken by a UDP datagram or, with
-- `kind`, a descriptor.
local function select_loop(kind)
  return function(n, record)
    local d = bgworker.new(kind and { kind = kind })
    local job = bench.produce { items = n, interval_us = 1000, callback = record }
    local set, waitable = { d.socket or d }, d.socket or d
    run_until(n, function()
      if socket.select(set, nil, 1)[waitable] then d:dispatch() end
    end)
    job:join()
    d:stop()
  end
end
latency_loops.select = select_loop(nil)
latency_loops.eventfd = select_loop("eventfd")

function latency_loops.copas(n, record)
  local d = bgworker.new { loop = "copas" }
  local job = bench.produce { items = n, interval_us = 1000, callback = record }
  run_until(n, function() copas.step(1) end)
  job:join()
  stop_copas(d)
end

-- bgworker's luv loop: the eventfd in a uv_poll_t, inside uv.run(); a
-- timer stops it when the items are in, or when they stall.
local has_luv, uv = pcall(require, "luv")
if has_luv then
  function latency_loops.luv(n, record)
    local d = bgworker.new { loop = "luv" }
    local job = bench.produce { items = n, interval_us = 1000, callback = record }
    local watch, stalled = common.watch(function() return count >= n or count end), nil
    local timer = uv.new_timer()
    timer:start(10, 10, function()
      local over
      over, stalled = watch()
      if over or stalled then
        timer:close()
        d:stop()
      end
    end)
    uv.run()
    job:join()
    if stalled then error(stalled) end
  end
end

local LATENCY_LOOPS = { "raw_udp", "select", "eventfd", "luv", "copas" }

-- The loops' runs are interleaved, REPS rounds of a share of the items
-- each, as the throughput runs are: a busy moment of the machine lands on
-- every loop's figures a little, not on one loop's whole run.
local function latency()
  local out, measured, samples, sent, woken = {}, {}, {}, {}, {}
  for _, loop in ipairs(LATENCY_LOOPS) do
    if loop == "copas" and not has_copas then
      out.copas = "not available: no Copas for " .. _VERSION .. " on this system"
    elseif not latency_loops[loop] then
      out[loop] = "not available: no luv for " .. _VERSION .. " on this system"
    else
      measured[#measured + 1] = loop
      samples[loop], sent[loop], woken[loop] = {}, 0, { wakeups = 0, delivered = 0 }
    end
  end
  local share = math.ceil(LATENCY_ITEMS / REPS)
  for round = 1, REPS do
    for _, loop in ipairs(measured) do
      progress("latency %d/%d: %s, %d items, one per ms", round, REPS, loop, share)
      local lat = samples[loop]
      local offset = #lat
      local function record(_, _, stamp)
        count = count + 1
        lat[offset + count] = now() - stamp
      end
      count = 0
      collectgarbage()
      local before = core.stats()
      latency_loops[loop](share, record)
      sent[loop] = sent[loop] + share
      local d = stats_delta(before)
      woken[loop].wakeups = woken[loop].wakeups + d.wakeups
      woken[loop].delivered = woken[loop].delivered + d.delivered
    end
  end
  for _, loop in ipairs(measured) do
    local r = percentiles(samples[loop], #samples[loop])
    r.sent = sent[loop]
    if loop ~= "raw_udp" then
      r.wakeups, r.delivered = woken[loop].wakeups, woken[loop].delivered
    end
    out[loop] = r
  end
  return out
end

--------------------------------------------------------------------------
-- Memory: RSS with PENDING items queued, and after draining them.

local function rss_bytes()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmRSS:%s+(%d+)")
    if kb then return tonumber(kb) * 1024 end
  end
end

local function settled_rss()
  collectgarbage()
  collectgarbage()
  bench.trim()
  return rss_bytes()
end

-- RSS before, with PENDING items queued, and after draining them. The job
-- is kept until the end: its static items live in arrays it owns.
local function queue_and_drain(alloc)
  local reader = start_core()
  local base = settled_rss()
  local job = produce(PENDING, 1, { alloc = alloc })
  job:join()
  assert(core.pending() == PENDING)
  local pending = settled_rss()
  count = 0
  drain()
  local drained = settled_rss()
  stop_core(reader)
  job:join()
  return base, pending, drained
end

local function memory_run(alloc)
  progress("memory: %d pending items (%s)", PENDING, alloc)
  local base, pending, drained = queue_and_drain(alloc)
  return {
    alloc = alloc,
    items = PENDING,
    payload_bytes = bench.ITEM_SIZE,
    rss_base = base,
    rss_pending = pending,
    rss_drained = drained,
    -- Stopped, and the static items' arrays collected.
    rss_stopped = settled_rss(),
    bytes_per_item = (pending - base) / PENDING,
  }
end

local function memory()
  return { static = memory_run("static"), malloc = memory_run("malloc") }
end

--------------------------------------------------------------------------
-- luv, a peer: a uv.new_thread producer sends into a uv.new_async consumer.
-- async:send coalesces into one payload slot, so most sends are lost.

local function luv()
  if not has_luv then
    return "not available: " .. tostring(uv)
  end
  local n = ITEMS
  progress("luv: %d async:send from a uv.new_thread", n)
  local received, t1 = 0, nil
  local async
  local t0 = seconds()
  async = uv.new_async(function(v)
    received = received + 1
    -- The last send is never overwritten, so it always arrives.
    if v == n then
      t1 = seconds()
      async:close()
    end
  end)
  local thread = uv.new_thread(function(a, items)
    for i = 1, items do a:send(i) end
  end, async, n)
  uv.run()
  thread:join()
  return { sends = n, callbacks = received, seconds = t1 - t0, per_second = received / (t1 - t0),
    sends_per_second = n / (t1 - t0), arrived = received / n }
end

--------------------------------------------------------------------------
-- Idle: a started helper in an idle select loop. bench.lua runs this
-- section under `strace -f` and counts the system calls between the
-- markers: failed opens of paths that name the phase.

local function marker(name)
  io.open("/nonexistent/bgworker-bench-" .. name)
end

local function idle_phase(name, sock)
  collectgarbage()
  local c0 = os.clock()
  marker(name .. "-begin")
  socket.select({ sock }, nil, IDLE_SECONDS)
  marker(name .. "-end")
  return { seconds = IDLE_SECONDS, cpu_seconds = os.clock() - c0 }
end

local function idle()
  progress("idle: %g s with a started helper, %g s without", IDLE_SECONDS, IDLE_SECONDS)
  local d = bgworker.new()
  local helper = idle_phase("helper", d.socket)
  d:stop()
  local plain = assert(socket.udp())
  assert(plain:setsockname("127.0.0.1", 0))
  local baseline = idle_phase("baseline", plain)
  plain:close()
  return { helper = helper, baseline = baseline }
end

--------------------------------------------------------------------------

local sections = { throughput = throughput, latency = latency, memory = memory, luv = luv, idle = idle }
-- Section "fd": the descriptor signal (eventfd, pipe; select, luv, cqueues)
-- next to UDP, in one process: bench/fd_signal.lua.
sections.fd = function() return require("fd_signal").run() end

local function serialize(v, indent)
  local t = type(v)
  if t == "number" then
    if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return ("%d"):format(v) end
    return ("%.17g"):format(v)
  elseif t == "string" then
    return ("%q"):format(v)
  elseif t == "boolean" then
    return tostring(v)
  end
  assert(t == "table", "cannot serialize a " .. t)
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local inner = indent .. "  "
  local parts = {}
  for _, k in ipairs(keys) do
    local key = type(k) == "number" and ("[%d]"):format(k) or ("[%q]"):format(k)
    parts[#parts + 1] = inner .. key .. " = " .. serialize(v[k], inner)
  end
  return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
end

local result = {
  lua = jit and jit.version or _VERSION,
  bgworker = bgworker.version,
  core = core.version,
}
for _, name in ipairs(arg) do
  local section = assert(sections[name], "no such section: " .. name)
  result[name] = section()
end
io.write("return ", serialize(result, ""), "\n")

--- bgworker's pool (its native half, bgworker.pool_native) against luv's
-- uv.new_work on the same Lua, in one run:
--
-- 1. Wall time of CPU-bound jobs: inline, on the pool, with uv.new_work
--    (on LuaJIT also on a pool with the JIT off in its workers).
-- 2. Empty jobs per second: the per-job overhead, bgworker.pool (as a
--    program uses it: job handles and callbacks, the function written
--    inline, made once, or a closure with an upvalue) vs uv.new_work, in
--    interleaved rounds (medians);
--    the native half alone, as a breakdown; then the CPU of the idle pool.
-- 3. Cancel latency of a CPU-bound job: from `cancel` until its worker
--    starts the next job (target: p99 <= 50 ms).
-- 4. Close time of a pool whose workers run `while true do end`.
-- 5. What the cancellation mechanism saves: a CPU-bound loop with an
--    always-on count hook (effil's way) against without.
--
--     LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/5.4/?.so;;" \
--         lua5.4 bench/pool.lua [jobs [threads]]
--     make bench-pool          # every Lua version
--
-- Every figure is the best of three runs (latency: percentiles of many).
-- luv's thread pool has UV_THREADPOOL_SIZE threads (libuv's default: 4).
-- "CPU / wall" is the process's CPU time (all threads) over the wall time:
-- how many cores the run kept busy, which stays telling when other
-- processes compete for the cores and the wall times do not.

package.path = "bench/?.lua;" .. package.path
local bgworker = require "bgworker"
local native = require "bgworker.pool_native"
local socket = require "socket"

local gettime = socket.gettime
local floor, huge = math.floor, math.huge

local JOBS = tonumber(arg and arg[1]) or 8
local THREADS = tonumber(arg and arg[2]) or 2
local ROUNDS = 3
-- Seconds a CPU-bound job takes inline.
local JOB_TIME = 0.1
local EMPTY_JOBS = 20000
local EMPTY_ROUNDS = 5
local CANCELS = 100
local VERSION = _VERSION .. (jit and " (" .. jit.version .. ")" or "")

-- The CPU-bound job (bench/jobs.lua, which bench/openresty.lua runs too).
local work = require("jobs").work

-- Loop count for a job of JOB_TIME seconds.
local function calibrate()
  local n = 1e5
  while true do
    local start = gettime()
    work(n)
    local took = gettime() - start
    if took > 0.02 then
      return floor(n * JOB_TIME / took)
    end
    n = n * 4
  end
end

local N = calibrate()
local EXPECTED = work(N)

local function check(result)
  assert(result == EXPECTED, "wrong result: " .. tostring(result))
end

-- Best wall time of ROUNDS runs of f, and that run's CPU time / wall time.
local function best(f)
  local wall, cores = huge, nil
  for _ = 1, ROUNDS do
    local start, cpu = gettime(), os.clock()
    f()
    local took = gettime() - start
    if took < wall then
      wall, cores = took, (os.clock() - cpu) / took
    end
  end
  return wall, cores
end

local dispatcher = bgworker.new()

-- Outcomes of the pools' jobs, by job id: handlers[id]("done", results...)
-- or handlers[id]("failed", err), called from the pools' `on_events(list,
-- n)`, whose pairs `id, value` are bgworker.pool_native's (its lib.rs).
local handlers = {}
local unpack = table.unpack or unpack
local function on_events(list, n)
  for i = 1, n, 2 do
    local id, value = list[i], list[i + 1]
    local handler = handlers[id]
    if handler then
      handlers[id] = nil
      if value == true then
        handler("done")
      elseif value[1] then
        handler("done", unpack(value, 2, value.n))
      else
        handler("failed", value[2])
      end
    end
  end
end

-- A pool of `threads` workers (JIT on unless `jit` is false).
local function new_pool(threads, jit_on)
  local p = assert(native.new {
    threads = threads, path = package.path, cpath = package.cpath, on_events = on_events, jit = jit_on ~= false,
  })
  return p
end

-- Run the jobs on `p`, waiting for every result.
local function on_pool(p)
  return function()
    local done = 0
    local function handler(event, result)
      assert(event == "done", result)
      check(result)
      done = done + 1
    end
    for _ = 1, JOBS do
      handlers[p:queue(work, N)] = handler
    end
    while done < JOBS do
      dispatcher:wait()
    end
  end
end

local has_luv, uv = pcall(require, "luv")
local LUV_THREADS = os.getenv("UV_THREADPOOL_SIZE") or "4"

local function on_luv()
  local done = 0
  local job = uv.new_work(work, function(result)
    check(result)
    done = done + 1
  end)
  for _ = 1, JOBS do
    job:queue(N)
  end
  while done < JOBS do
    uv.run("once")
  end
end

-- 1. CPU-bound jobs.
local pool = new_pool(THREADS)
local rows = {
  { "inline", best(function() for _ = 1, JOBS do check(work(N)) end end) },
  { ("bgworker.pool, %d threads"):format(THREADS), best(on_pool(pool)) },
}
if has_luv then
  rows[#rows + 1] = { ("luv uv.new_work, %s threads"):format(LUV_THREADS), best(on_luv) }
end
if jit then
  local interpreted = new_pool(THREADS, false)
  rows[#rows + 1] = { ("bgworker.pool, %d threads, jit = false"):format(THREADS), best(on_pool(interpreted)) }
  assert(interpreted:close(5))
end

print(("%s: %d jobs of %.2f s inline, best of %d runs"):format(VERSION, JOBS, rows[1][2] / JOBS, ROUNDS))
print(("%-36s %8s %10s %10s"):format("", "wall s", "vs inline", "CPU / wall"))
for _, row in ipairs(rows) do
  print(("%-36s %8.3f %9.2fx %10.2f"):format(row[1], row[2], rows[1][2] / row[2], row[3]))
end
if not has_luv then
  print("luv: not installed for this Lua")
end

-- 2. Empty jobs per second.
local function empty() end

-- Through bgworker.pool, as a program uses it: a job handle and a callback
-- per job, and the job's function written inline (a new closure each job,
-- as the README writes jobs), made once, or a closure with an upvalue
-- (copied with each job, and loaded anew in the worker).
local lua_pool = require("bgworker.pool").new { threads = THREADS }

local JOB_FUNCTIONS = {
  closure = function() return function() end end,
  ["function"] = function() return empty end,
  upvalue = function(n) return function() return n end end,
}

local function empty_on_lua_pool(kind)
  local job_function = JOB_FUNCTIONS[kind]
  return function()
    local done = 0
    local function callback()
      done = done + 1
    end
    for i = 1, EMPTY_JOBS do
      lua_pool:submit(job_function(i)):on_done(callback)
    end
    while done < EMPTY_JOBS do
      dispatcher:wait()
    end
  end
end

-- The native half alone, for the breakdown.
local function empty_on_pool()
  local done = 0
  local function handler()
    done = done + 1
  end
  for _ = 1, EMPTY_JOBS do
    handlers[pool:queue(empty)] = handler
  end
  while done < EMPTY_JOBS do
    dispatcher:wait()
  end
end

local function empty_on_luv()
  local done = 0
  local job = uv.new_work(function() end, function()
    done = done + 1
  end)
  for _ = 1, EMPTY_JOBS do
    job:queue()
  end
  while done < EMPTY_JOBS do
    uv.run("once")
  end
end

-- The median wall time of each of `runs` over EMPTY_ROUNDS rounds, which
-- run each in turn: a slow spell of the machine weighs on all alike.
local function medians(runs)
  local times = {}
  for i = 1, #runs do
    times[i] = {}
  end
  for _ = 1, EMPTY_ROUNDS do
    for i, run in ipairs(runs) do
      local start = gettime()
      run()
      times[i][#times[i] + 1] = gettime() - start
    end
  end
  for i = 1, #runs do
    table.sort(times[i])
    times[i] = times[i][floor((EMPTY_ROUNDS + 1) / 2)]
  end
  return times
end

print()
print(("Empty jobs, %d per run, medians of %d interleaved rounds"):format(EMPTY_JOBS, EMPTY_ROUNDS))
print(("%-44s %8s %10s"):format("", "jobs/s", "vs luv"))
local runs = { empty_on_lua_pool("closure"), empty_on_lua_pool("function"), empty_on_pool,
  empty_on_lua_pool("upvalue") }
if has_luv then
  runs[#runs + 1] = empty_on_luv
end
local times = medians(runs)
local luv_rate = has_luv and EMPTY_JOBS / times[5]
local function row(name, rate)
  if luv_rate then
    print(("%-44s %8.0f %9.2fx"):format(name, rate, rate / luv_rate))
  else
    print(("%-44s %8.0f"):format(name, rate))
  end
end
row(("bgworker.pool, %d threads, new closure per job"):format(THREADS), EMPTY_JOBS / times[1])
row(("bgworker.pool, %d threads, one function"):format(THREADS), EMPTY_JOBS / times[2])
row(("bgworker.pool, %d threads, closure with an upvalue"):format(THREADS), EMPTY_JOBS / times[4])
if luv_rate then
  row(("luv uv.new_work, %s threads"):format(LUV_THREADS), luv_rate)
end
row(("bgworker.pool_native alone, %d threads"):format(THREADS), EMPTY_JOBS / times[3])

-- Idle: the pool that just ran all those jobs, and the dispatcher, spend
-- no CPU while nothing comes (the workers sleep on a condition variable).
local IDLE_SECONDS = 1
local idle_cpu = os.clock()
socket.sleep(IDLE_SECONDS)
idle_cpu = os.clock() - idle_cpu
print(("%-44s %8.4f CPU s over %d s"):format(("idle, %d threads"):format(THREADS), idle_cpu, IDLE_SECONDS))
assert(lua_pool:close(5))
assert(pool:close(5))

-- 3. Cancel latency: a pool of one worker runs `while true do end`; after
-- `cancel`, the time until that worker starts the next job (which reads
-- the same clock).
local function spin() while true do end end
local function stamp() return require("socket").gettime() end

local function percentile(sorted, p)
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

local function cancel_latencies(p)
  local latencies = {}
  for i = 1, CANCELS do
    local loop = p:queue(spin)
    while p:status(loop) ~= "running" do
      socket.sleep(0.001)
    end
    socket.sleep(0.002)
    local cancelled = gettime()
    assert(p:cancel(loop) == "running")
    local started
    handlers[p:queue(stamp)] = function(event, at)
      assert(event == "done", at)
      started = at
    end
    while not started do
      dispatcher:wait()
    end
    latencies[i] = (started - cancelled) * 1000
  end
  table.sort(latencies)
  return latencies
end

print()
print(("Cancelling a job running `while true do end`, %d times"):format(CANCELS))
print(("%-36s %8s %8s %8s"):format("", "p50 ms", "p99 ms", "max ms"))
local latency_pool = new_pool(1, false)
local latencies = cancel_latencies(latency_pool)
print(("%-36s %8.3f %8.3f %8.3f"):format(jit and "jit = false" or "until the next job starts",
  percentile(latencies, 0.5), percentile(latencies, 0.99), latencies[#latencies]))
assert(latency_pool:close(5))

-- 4. Close time with runaway jobs.
local function close_time(jit_on)
  local p = new_pool(THREADS, jit_on)
  for _ = 1, THREADS do
    p:queue(spin)
  end
  while p:stats().running < THREADS do
    socket.sleep(0.001)
  end
  socket.sleep(0.05)
  local start = gettime()
  local joined = p:close(native.CLOSE_TIMEOUT)
  return (gettime() - start) * 1000, joined
end

print()
print(("Closing a pool of %d threads, each running `while true do end` (close(%g))"):format(THREADS,
  native.CLOSE_TIMEOUT))
local took, joined = close_time(false)
print(("%-36s %8.3f ms, %s"):format(jit and "jit = false" or "", took, joined and "all joined" or "abandoned"))

-- 5. The option not taken: an always-on count hook makes the interpreter
-- check at every instruction (Lua 5.3, 5.4), whatever the hook's period.
local function hooked()
  debug.sethook(function() end, "", 1000)
  check(work(N))
  debug.sethook()
end
local plain = best(function() check(work(N)) end)
print()
print(("A CPU-bound job with an always-on count hook: x%.2f the time without"):format(best(hooked) / plain))

-- Last, since it leaves a worker spinning: with the JIT on, a compiled
-- loop never sees the cancellation.
if jit then
  took, joined = close_time(true)
  print(("%-36s %8.3f ms, %s"):format("(closing) jit on", took, joined and "all joined" or "abandoned"))
end
dispatcher:stop()

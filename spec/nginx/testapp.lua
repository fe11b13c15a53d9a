-- The request handlers of the nginx integration test (nginx_test.lua), run
-- inside nginx workers. Each answer comes from a background thread through
-- bgworker.ngx. The shared dict "counters" adds up, across workers and
-- reloads, what the callbacks received, so the test can tell that no item
-- was lost.

-- luacheck: globals ngx

local await = require "bgworker.await"
local bgworker = require "bgworker"
local core = require "bgworker.core"
local ticker = require "bgworker_ticker"

local ngx = ngx
local counters = ngx.shared.counters

local app = {}

local function int_arg(name, default)
  return tonumber(ngx.var["arg_" .. name]) or default
end

local function reply(status, body)
  ngx.status = status
  ngx.say(body)
  return ngx.exit(status)
end

-- Start a ticker of n values and collect them; done(values) after the last.
-- `yield`: each callback sleeps first, as callbacks that use cosockets do.
local function collect(n, interval, yield, fail_at)
  return function(done)
    local values = {}
    return ticker.start(n, interval, function(v)
      counters:incr("ticks", 1, 0)
      if yield then
        ngx.sleep(0.001)
      end
      if v == fail_at then
        error("deliberate failure in a callback")
      end
      values[#values + 1] = v
      if v == n then
        done(values)
      end
    end)
  end
end

-- GET /ticker?n=5&interval=10[&yield=1][&timeout=10]: "1,2,3,4,5".
function app.ticker()
  local n = int_arg("n", 5)
  local ok, values, job = await(collect(n, int_arg("interval", 10), ngx.var.arg_yield),
    int_arg("timeout", 10))
  if not ok then
    if job then job:stop() end
    return reply(504, values)
  end
  counters:incr("requests", 1, 0)
  return reply(200, table.concat(values, ","))
end

-- GET /timeout: a ticker slower than the wait; "timeout" and a stopped job.
function app.timeout()
  local ok, err, job = await(collect(1, 2000), 0.05)
  if ok or not job then
    return reply(500, "expected a timeout and the job, got " .. tostring(ok))
  end
  job:stop()
  return reply(200, err)
end

-- GET /error: the callback of value 1 raises; the reader goes on, and value
-- 2 completes the request: "2".
function app.error()
  local ok, values = await(collect(2, 1, false, 1), 10)
  return reply(ok and 200 or 504, ok and table.concat(values, ",") or values)
end

-- GET /twice: a second start in the same worker is refused.
function app.twice()
  local ok, err = pcall(bgworker.new, { loop = "ngx" })
  return reply(ok and 500 or 200, tostring(err))
end

-- The utility libraries other than the ticker load on first use, so that
-- the ticker's endpoints work without them.

-- A pool job: moved to a worker thread by string.dump.
local function sum_to(n)
  local s = 0
  for i = 1, n do
    s = s + i
  end
  return s
end

local pool -- this worker's bgworker.pool, made by the first /pool request

-- GET /pool?n=1000: the sum 1 + ... + n, computed on a pool thread.
function app.pool()
  pool = pool or require("bgworker.pool").new { threads = 2 }
  local waited, ok, sum = await(function(done)
    pool:submit(sum_to, int_arg("n", 1000)):on_done(done)
  end, 10)
  return reply(waited and ok and 200 or 504, tostring(sum))
end

-- GET /job_sleep?ms=500: a pool job that sleeps, waited for with job:get:
-- "500".
function app.job_sleep()
  pool = pool or require("bgworker.pool").new { threads = 2 }
  local job = pool:submit(function(ms)
    require("socket").sleep(ms / 1000)
    return ms
  end, int_arg("ms", 500))
  local ok, ms = job:get(10)
  return reply(ok and 200 or 504, tostring(ms))
end

-- GET /chain: a job's callback waits for the next job (job:get in the
-- callback, as chained steps are written), then sleeps: "true 2".
function app.chain()
  pool = pool or require("bgworker.pool").new { threads = 2 }
  local waited, answer = await(function(done)
    pool:submit(function() return 1 end):on_done(function(_, v)
      local ok, w = pool:submit(function(x) return x + 1 end, v):get(5)
      ngx.sleep(0.01)
      done(tostring(ok) .. " " .. tostring(w))
    end)
  end, 10)
  return reply(waited and 200 or 504, tostring(answer))
end

-- GET /overlap?n=5: n job callbacks that each sleep; each is suspended on
-- its own, so all start before any ends: "sssss eeeee" for n = 5.
function app.overlap()
  pool = pool or require("bgworker.pool").new { threads = 2 }
  local n = int_arg("n", 5)
  local waited, log = await(function(done)
    local log, ended = {}, 0
    for i = 1, n do
      pool:submit(function(x) return x end, i):on_done(function()
        log[#log + 1] = "s"
        ngx.sleep(0.05)
        log[#log + 1] = "e"
        ended = ended + 1
        if ended == n then done(log) end
      end)
    end
  end, 10)
  if not waited then
    return reply(504, tostring(log))
  end
  local text = table.concat(log)
  return reply(200, text:sub(1, n) .. " " .. text:sub(n + 1))
end

-- GET /job_timeout: a job slower than the request's patience: get times
-- out, and the request cancels it: "timeout cancelled".
function app.job_timeout()
  pool = pool or require("bgworker.pool").new { threads = 2 }
  local job = pool:submit(function() require("socket").sleep(2) end)
  local ok, err = job:get(0.05)
  if ok ~= nil then
    return reply(500, "expected a timeout, got " .. tostring(ok))
  end
  return reply(200, err .. " " .. (job:cancel() and job:status() or "not cancelled"))
end

-- GET /job_cancel: a CPU-bound job, cancelled while it runs: its get
-- returns false, "cancelled", and the worker is free for the next job.
function app.job_cancel()
  pool = pool or require("bgworker.pool").new { threads = 2 }
  local started = false
  local job = pool:submit(function()
    require("bgworker.worker").progress("started")
    while true do end
  end)
  job:on_progress(function() started = true end)
  local deadline = ngx.now() + 5
  while not started and ngx.now() < deadline do
    ngx.sleep(0.01)
    ngx.update_time()
  end
  if not started then
    return reply(500, "the job did not start")
  end
  local cancelled = job:cancel()
  local _, err = job:get(1)
  local next_ok, value = pool:submit(function(x) return x end, "next"):get(5)
  return reply(200, ("%s %s %s"):format(tostring(cancelled), tostring(err), tostring(next_ok and value)))
end

-- GET /dns?host=localhost: the addresses getaddrinfo found, comma-separated.
function app.dns()
  local dns = require "bgworker.dns"
  local ip, info = dns.toip(ngx.var.arg_host or "localhost", 10)
  return reply(ip and 200 or 504, ip and table.concat(info.ip, ",") or info)
end

-- GET /process?ms=200: a program run by bgworker.process, with its output
-- and status: "exit 3 out err"; a spawned one's two lines, the second
-- written ms later: "a b".
function app.process()
  local process = require "bgworker.process"
  local ms = int_arg("ms", 200)
  local _, how, code, out, err = process.run({ "sh", "-c", "sleep " .. ms / 1000 ..
    "; echo out; echo err >&2; exit 3" }, { timeout = 10 })
  local p = process.spawn { "sh", "-c", "echo a; sleep " .. ms / 1000 .. "; echo b" }
  local a, b = p:read_line(10), p:read_line(10)
  return reply(200, ("%s %s %s %s %s %s"):format(how, code, out:gsub("\n", ""), err:gsub("\n", ""), a, b))
end

-- GET /stats: this worker's core counters and the shared counters, one
-- "name value" a line.
function app.stats()
  local lines = { "pid " .. ngx.worker.pid() }
  for k, v in pairs(core.stats()) do
    lines[#lines + 1] = "core." .. k .. " " .. v
  end
  for _, k in ipairs(counters:get_keys()) do
    lines[#lines + 1] = k .. " " .. counters:get(k)
  end
  table.sort(lines)
  return reply(200, table.concat(lines, "\n"))
end

return app

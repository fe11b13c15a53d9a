-- The request handlers of examples/openresty/nginx.conf. Each waits for
-- work done on background threads without blocking its nginx worker: the
-- request's light thread is suspended, the worker serves others meanwhile.

-- luacheck: globals ngx

local dns = require "bgworker.dns"
local pool = require "bgworker.pool"

local app = {}

local workers -- this nginx worker's pool

--- From init_worker_by_lua*, after the dispatcher: a pool per worker (a
-- pool belongs to the process that made it, so not in init_by_lua*).
function app.start()
  workers = pool.new { threads = 2 }
end

-- CPU work for a pool thread (it runs in the thread's own Lua state): the
-- start up to `limit` with the longest Collatz sequence, and its length,
-- with progress at each hundredth.
local function longest_collatz(limit)
  local progress = require("bgworker.worker").progress
  local every = math.max(1, math.floor(limit / 100))
  local best, best_steps = 1, 0
  for start = 1, limit do
    local n, steps = start, 0
    while n ~= 1 do
      n = n % 2 == 0 and n / 2 or 3 * n + 1
      steps = steps + 1
    end
    if steps > best_steps then
      best, best_steps = start, steps
    end
    if start % every == 0 then progress(start / limit) end
  end
  return best, best_steps
end

local function reply(status, body)
  ngx.status = status
  ngx.say(body)
end

--- GET /collatz?limit=N[&timeout=S]: "longest up to N: <start> (<steps>
-- steps)", worked out on a pool thread; after S seconds (5) a 504, and the
-- job is cancelled.
function app.collatz()
  local limit = tonumber(ngx.var.arg_limit) or 100000
  local job = workers:submit(longest_collatz, limit)
  local reached = 0
  job:on_progress(function(done) reached = done end)
  local ok, start, steps = job:get(tonumber(ngx.var.arg_timeout) or 5)
  if ok == nil then -- "timeout": the job still runs, and nobody will want it
    job:cancel()
    return reply(504, ("gave up at %d%%, job %s"):format(reached * 100, job:status()))
  elseif not ok then -- the job raised: start is its error
    return reply(500, tostring(start))
  end
  return reply(200, ("longest up to %d: %d (%d steps)"):format(limit, start, steps))
end

--- GET /resolve?host=NAME: its addresses, looked up on a background thread.
function app.resolve()
  local ip, info = dns.toip(ngx.var.arg_host or "localhost", 5)
  if not ip then -- info is the message: "host not found", "timeout", ...
    return reply(502, info)
  end
  return reply(200, table.concat(info.ip, " "))
end

return app

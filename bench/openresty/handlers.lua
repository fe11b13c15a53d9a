-- The request handlers of bench/openresty.lua's nginx: the same job run on
-- bgworker.pool (default options, the documented idiom: `pool:submit(fn,
-- n)` then `job:get(timeout)`) and on OpenResty's own thread pool
-- (`ngx.run_worker_thread`). GET /<runner>/<job>?n=N answers the result.

-- luacheck: globals ngx

local jobs = require "jobs"
local pool = require "bgworker.pool"

local handlers = {}

local workers -- this nginx worker's pool

--- From init_worker_by_lua*, after the dispatcher.
function handlers.start(threads)
  workers = pool.new { threads = threads }
end

local function answer(ok, result)
  if not ok then
    ngx.status = 500
    return ngx.say(tostring(result))
  end
  ngx.say(result)
end

function handlers.pool(name)
  local job = workers:submit(jobs[name], tonumber(ngx.var.arg_n))
  answer(job:get(30))
end

function handlers.worker_thread(name)
  answer(ngx.run_worker_thread("default", "jobs", name, tonumber(ngx.var.arg_n)))
end

return handlers

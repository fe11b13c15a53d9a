-- The jobs of bench/openresty.lua, required both by the request handlers
-- (handlers.lua, for bgworker.pool) and by the Lua states of nginx's
-- thread pool (`ngx.run_worker_thread(pool, "jobs", name, ...)`), so that
-- both run the same code. No ngx API here: the thread pool's states have
-- little of it.

local jobs = {}

-- CPU work: `n` rounds of arithmetic (the bench calibrates n for ~6 ms).
function jobs.work(n)
  local s = 0
  for i = 1, n do
    s = s + (i % 7) * 0.5
  end
  return s
end

-- Next to nothing: the cost of the trip itself.
function jobs.tiny(n)
  return n + 1
end

return jobs

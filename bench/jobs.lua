-- The jobs of the pool's benchmarks, found as "jobs" through bench/?.lua:
-- bench/pool.lua runs `work` inline, on a pool and on luv; in
-- bench/openresty.lua both the request handlers (openresty/handlers.lua,
-- for bgworker.pool) and the Lua states of nginx's thread pool
-- (`ngx.run_worker_thread(pool, "jobs", name, ...)`) require it, so that
-- both run the same code. No upvalues (they move to workers by their
-- dump), and no ngx API: the thread pool's states have little of it.

local jobs = {}

-- CPU work: `n` rounds of arithmetic (each bench calibrates n for the
-- time it wants).
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

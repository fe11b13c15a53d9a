local copas = require "copas"
local bgworker = require "bgworker"
local pool = require "bgworker.pool"

-- CPU work for a worker thread. It runs in the worker's own Lua state:
-- it requires what it uses (local variables from outside would be copied).
local function count_primes(limit)
  local progress = require("bgworker.worker").progress
  local count = 0
  for n = 2, limit do
    local prime = true
    for d = 2, math.floor(math.sqrt(n)) do
      if n % d == 0 then
        prime = false
        break
      end
    end
    if prime then count = count + 1 end
    if n % (limit / 4) == 0 then progress(n / limit) end
  end
  return count
end

bgworker.new { loop = "copas" } -- results come back in this loop, while it runs
local workers = pool.new { threads = 2 }
local finished = false

copas.addthread(function()
  local job = workers:submit(count_primes, 100000)
  job:on_progress(function(done) print(("progress %d%%"):format(done * 100)) end)
  local ok, count = job:get(10) -- suspends this Copas thread only
  print("primes up to 100000:", ok, count)

  local endless = workers:submit(function() while true do end end)
  print("endless job:", endless:get(0.2)) -- nil, "timeout": it still runs
  print("cancel:", endless:cancel(), endless:status())

  workers:close()
  finished = true
end)

local ticks = 0
copas.addthread(function() -- meanwhile the loop is free for other work
  while not finished do
    ticks = ticks + 1
    copas.pause(0.01)
  end
end)

copas.loop() -- returns once the work is done: no thread left, nothing outstanding
print("loop ticks meanwhile:", ticks)

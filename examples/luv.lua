-- bgworker in a luv (libuv) loop: the dispatcher watches its descriptor
-- with a poll handle, so results come back inside uv.run(), beside the
-- loop's timers and sockets.
--
-- job:get and dns.toip wait in a coroutine, which the dispatcher resumes
-- when the answer (or the timeout) comes; a timer ticks meanwhile.

local uv = require "luv"
local bgworker = require "bgworker"
local dns = require "bgworker.dns"
local pool = require "bgworker.pool"

local d = bgworker.new { loop = "luv" }
local workers = pool.new { threads = 2 }

local ticks = 0
local timer = uv.new_timer()
timer:start(10, 10, function() ticks = ticks + 1 end)

coroutine.wrap(function()
  -- Sum 1..n on a worker, reporting progress at each quarter.
  local job = workers:submit(function(n)
    local progress = require("bgworker.worker").progress
    local sum = 0
    for i = 1, n do
      sum = sum + i
      if i % (n / 4) == 0 then progress(i / n) end
    end
    return sum
  end, 4000000)
  job:on_progress(function(done) print(("progress %d%%"):format(done * 100)) end)
  print("sum:", job:get(5))
  print("localhost:", (dns.toip("localhost", 5)))

  -- A job that takes longer than we wait: cancelled after the timeout.
  -- (Cancelling stops any Lua loop; a job may also check for it.)
  local slow = workers:submit(function()
    local worker = require "bgworker.worker"
    while not worker.cancelled() do end
  end)
  print("slow:", slow:get(0.1))
  print("cancel:", slow:cancel(), slow:get())

  workers:close()
  timer:close()
  d:stop() -- closes the poll handle: uv.run() returns, nothing else is active
end)()

uv.run()
print("timer ticks meanwhile:", ticks)

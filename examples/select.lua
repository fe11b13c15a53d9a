-- bgworker in a plain LuaSocket loop: the program waits in socket.select
-- for the dispatcher's socket (beside its own sockets, were there any) and
-- calls d:dispatch() when it is readable; the callbacks run there.
--
-- A callback gets a pool job's outcome; a coroutine waits for a job and a
-- name lookup, suspended (d:dispatch() resumes it). Outside a coroutine,
-- job:get and dns.toip would block while running the dispatcher instead,
-- which suits scripts.

local socket = require "socket"
local bgworker = require "bgworker"
local dns = require "bgworker.dns"
local pool = require "bgworker.pool"

local d = bgworker.new() -- { loop = "select" }
local workers = pool.new { threads = 2 }
local waiting = 2

-- The callback runs in d:dispatch(), with what job:get would return.
workers:submit(function(n) return n * n end, 12):on_done(function(ok, square)
  print("callback:", ok, square)
  waiting = waiting - 1
end)

coroutine.wrap(function()
  local job = workers:submit(function(a, b) return a .. b end, "bg", "worker")
  print("get:", job:get(5))
  print("toip:", (dns.toip("localhost", 5)))
  waiting = waiting - 1
end)()

while waiting > 0 do
  local readable = socket.select({ d.socket }, nil, 1)
  if readable[d.socket] then d:dispatch() end
end
print("jobs done:", workers:stats().done, "callback errors:", d:stats().errors)

workers:close()
d:stop()

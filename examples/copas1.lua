-- bgworker in Copas 1.x (Debian's lua-copas 1.2), whose copas.loop() never
-- returns and which has no copas.pause: the program steps the loop itself
-- until its work is done. It runs unchanged with Copas 4.
--
-- Two Copas threads wait at once, each suspended alone: one for a job on
-- a worker thread (`pool:run`, which returns like pcall), one for a name
-- lookup (`dns.toip`, which returns like LuaSocket's).

local copas = require "copas"
local bgworker = require "bgworker"
local dns = require "bgworker.dns"
local pool = require "bgworker.pool"

local dispatcher = bgworker.new { loop = "copas" }
local workers = pool.new { threads = 1 }
local waiting = 2

copas.addthread(function()
  -- The function moves to the worker's own Lua state (its upvalues would
  -- be copied).
  local ok, digest = workers:run(function(text, times)
    local sum = 0
    for i = 1, times do
      sum = (sum * 31 + text:byte(i % #text + 1)) % 2147483647
    end
    return sum
  end, "bgworker", 1000000)
  print("job:", ok, digest)
  waiting = waiting - 1
end)

copas.addthread(function()
  local ip, info = dns.toip("localhost", 5)
  print("localhost:", ip, info and info.name)
  waiting = waiting - 1
end)

local turns = 0
repeat -- instead of copas.loop()
  copas.step(0.01)
  turns = turns + 1
until waiting == 0
print("loop turns meanwhile:", turns)

workers:close()
dispatcher:stop()

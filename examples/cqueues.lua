-- bgworker in a cqueues controller: the dispatcher is a pollable object,
-- and d:loop() in a coroutine of the controller waits on it and runs the
-- callbacks. job:get and dns.toip wait in any coroutine of the controller.
--
-- The pool's workers load what their jobs need once, with `init`; the
-- jobs then call it by name ("module.function").

local cqueues = require "cqueues"
local bgworker = require "bgworker"
local dns = require "bgworker.dns"
local pool = require "bgworker.pool"

local cq = cqueues.new()
local d = bgworker.new { loop = "cqueues" }
local workers = pool.new {
  threads = 2,
  -- Runs once in each worker, before any job: here it defines a module.
  init = function()
    package.loaded.textutil = {
      words = function(text)
        local n = 0
        for _ in text:gmatch("%S+") do n = n + 1 end
        return n
      end,
    }
  end,
}
local finished = false

cq:wrap(function() d:loop() end) -- returns once d is stopped

cq:wrap(function()
  local job = workers:submit("textutil.words", "results come back to the loop")
  print("words:", job:get(5))
  -- A blocking call, off the loop: LuaSocket's sleep, by name.
  print("slept:", workers:submit("socket.sleep", 0.2):get(5))
  print("localhost:", (dns.toip("localhost", 5)))
  local failing = workers:submit(function() error({ code = 42 }) end)
  local ok, err = failing:get(5) -- false, the error value, a traceback
  print("error:", ok, type(err) == "table" and err.code)
  workers:close()
  d:stop()
  finished = true
end)

local ticks = 0
cq:wrap(function() -- meanwhile the controller runs its other coroutines
  while not finished do
    ticks = ticks + 1
    cqueues.sleep(0.01)
  end
end)

assert(cq:loop())
print("ticks meanwhile:", ticks)

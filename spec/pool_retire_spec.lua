-- A cancel always gives the worker back: a job that does not stop within
-- the grace (bgworker.pool_native's RETIRE_GRACE, 0.25 s) has its worker
-- retired and replaced, so the next job on a 1-thread pool runs within a
-- second, and `stats().abandoned` counts the old thread. Each case that
-- leaves a thread spinning runs in a process of its own, which must exit
-- soon with that thread still in its code: in this one, it would burn a
-- core for the rest of the run.

local support = require "support"

-- A program: a 1-thread pool runs `job` (Lua source of a function); once
-- it is running and `settle` seconds later, the program cancels it and
-- times the next job. Prints what the cancel, the next job and the stats
-- say, and "exiting" last.
local function program(job, settle)
  return ([[
    local bgworker = require "bgworker"
    local pool = require "bgworker.pool"
    local socket = require "socket"
    local d = bgworker.new() -- referenced: a collected dispatcher stops
    local p = pool.new { threads = 1 }
    local job = p:submit(%s)
    local deadline = socket.gettime() + 10
    while p:stats().running == 0 and socket.gettime() < deadline do socket.sleep(0.01) end
    socket.sleep(%s)
    local t0 = socket.gettime()
    local cancelled = job:cancel()
    local ok, value = p:submit(function() return "next" end):get(10)
    local took = socket.gettime() - t0
    local s = p:stats()
    print("cancelled", cancelled, job:status())
    print("next job", ok, value, took < 1 and "within 1 s" or ("after " .. took .. " s"))
    print("threads", s.threads, "abandoned", s.abandoned, "running", s.running)
    print("exiting")
    io.stdout:flush()
    d:stop()
  ]]):format(job, settle or 0.1)
end

-- Run the program of `job`; assert what a retired worker promises, and that
-- the process exited soon after "exiting". Returns its output.
local function assert_retired(job, settle)
  local t0 = os.time()
  local status, output = support.run_lua(program(job, settle), 60)
  assert.equals(0, status, output)
  assert.matches("cancelled\ttrue\tcancelled", output)
  assert.matches("next job\ttrue\tnext\twithin 1 s", output)
  assert.matches("threads\t1\tabandoned\t1\trunning\t0", output)
  assert.matches("exiting\n$", output)
  -- Whole seconds: the start, the cancel's grace and the exit, which must
  -- not wait for the thread still in its code.
  assert.is_true(os.time() - t0 <= 4 * support.size(1, 3), "the process took " .. os.time() - t0 .. " s")
  return output
end

-- Code that a cancel's hook cannot stop, and how it stops that hook.
local STUCK = {
  { "a call blocked in C", [[function() require("socket").sleep(30) end]] },
  { "an xpcall message handler that loops (it runs with hooks off)",
    [[function() xpcall(function() while true do end end, function() while true do end end) end]] },
  { "a finaliser that loops", [[function()
      local loop = function() while true do end end
      if newproxy then
        getmetatable(newproxy(true)).__gc = loop
      else
        setmetatable({}, { __gc = loop })
      end
      collectgarbage()
      collectgarbage()
      while true do end
    end]] },
  { "load swallowing the cancel's error in its reader",
    [[function() while true do load(function() while true do end end) end end]] },
  { "a loop that turns the hook off", [[function() while true do debug.sethook() end end]] },
}
if _VERSION == "Lua 5.4" then
  STUCK[#STUCK + 1] = { "coroutine.close running a __close that loops", [[load([=[return function()
      local co = coroutine.create(function()
        local x <close> = setmetatable({}, { __close = function() while true do end end })
        coroutine.yield()
      end)
      coroutine.resume(co)
      coroutine.close(co)
    end]=])()]] }
end
if rawget(_G, "jit") then
  STUCK[#STUCK + 1] = { "a loop LuaJIT compiled (the JIT is on by default)",
    [[function() local n = 0 while true do n = n + 1 end end]] }
end

describe("a cancelled job that does not stop", function()
  for _, case in ipairs(STUCK) do
    it("in " .. case[1] .. " has its worker retired and replaced", function()
      assert_retired(case[2])
    end)
  end

  it("stays counted as abandoned only until its code returns", function()
    local script = program([[function() require("socket").sleep(1) end]]) .. [[
      local socket = require "socket"
      local deadline = socket.gettime() + 10
      while p:stats().abandoned > 0 and socket.gettime() < deadline do socket.sleep(0.02) end
      print("then abandoned", p:stats().abandoned, "threads", p:stats().threads)
      print("and the pool runs", p:run(function() return "on" end))
    ]]
    local status, output = support.run_lua(script:gsub("d:stop%(%)", ""), 60)
    assert.equals(0, status, output)
    assert.matches("abandoned\t1", output)
    assert.matches("then abandoned\t0\tthreads\t1", output)
    assert.matches("and the pool runs\ttrue\ton", output)
  end)

  it("that stopped within the grace keeps its worker", function()
    local script = [[
      local bgworker = require "bgworker"
      local pool = require "bgworker.pool"
      local socket = require "socket"
      local d = bgworker.new()
      local p = pool.new { threads = 1, jit = false }
      local job = p:submit(function() while true do end end)
      while p:stats().running == 0 do socket.sleep(0.01) end
      print("cancelled", job:cancel())
      print("next", p:submit(function() return 1 end):get(5))
      socket.sleep(0.4) -- past the grace: its timer ran
      print("next", p:run(function() return 2 end))
      print("abandoned", p:stats().abandoned)
      d:stop()
    ]]
    local status, output = support.run_lua(script, 60)
    assert.equals(0, status, output)
    assert.matches("next\ttrue\t1\nnext\ttrue\t2\nabandoned\t0", output)
  end)
end)

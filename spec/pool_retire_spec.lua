-- A cancel always gives the worker back: a job that does not stop within
-- the grace (bgworker.pool_native's RETIRE_GRACE, 0.25 s) has its worker
-- retired and replaced, so the next job on a 1-thread pool runs within a
-- second, and `stats().abandoned` counts the old thread. Each case that
-- leaves a thread spinning runs in a process of its own, which must exit
-- soon with that thread still in its code: in this one, it would burn a
-- core for the rest of the run.

local socket = require "socket"
local support = require "support"

-- A program: a 1-thread pool runs `job` (Lua source of a function); once
-- it is running and 0.1 s later, the program cancels it and times the next
-- job. Prints what the cancel, the next job and the stats
-- say, and "exiting" last.
local function program(job)
  return ([[
    local bgworker = require "bgworker"
    local pool = require "bgworker.pool"
    local socket = require "socket"
    local d = bgworker.new() -- referenced: a collected dispatcher stops
    local p = pool.new { threads = 1 }
    local job = p:submit(%s)
    local deadline = socket.gettime() + 10
    while p:stats().running == 0 and socket.gettime() < deadline do socket.sleep(0.01) end
    socket.sleep(0.1)
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
  ]]):format(job)
end

-- Run the program of `job`; assert what a cancel promises: the next job
-- runs within a second on the pool's one thread, and the process exits
-- soon after "exiting", not waiting for a thread still in its code. A job
-- that the hook cannot reach at all has its worker retired (`abandoned`
-- 1); one that fights the hook (`may_stop`) may lose that fight before the
-- grace ends, and then keeps its worker.
local function assert_capacity(job, may_stop)
  local t0 = socket.gettime()
  local status, output = support.run_lua(program(job), 60)
  local took = socket.gettime() - t0
  assert.equals(0, status, output)
  assert.matches("cancelled\ttrue\tcancelled", output)
  assert.matches("next job\ttrue\tnext\twithin 1 s", output)
  local abandoned = tonumber(output:match("threads\t1\tabandoned\t(%d)\trunning\t0"))
  assert(abandoned, output)
  if may_stop then
    assert.is_true(abandoned <= 1, output)
  else
    assert.equals(1, abandoned, output)
  end
  assert.matches("exiting\n$", output)
  -- The interpreter's start, the settling, the grace, and the exit.
  assert.is_true(took < support.size(2.5, 10), ("the process took %.2f s"):format(took))
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
    [[function() while true do load(function() while true do end end) end end]], may_stop = true },
  { "a loop that turns the hook off", [[function() while true do debug.sethook() end end]], may_stop = true },
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
    local promise = case.may_stop and " keeps the pool at full capacity" or " has its worker retired and replaced"
    it("in " .. case[1] .. promise, function()
      assert_capacity(case[2], case.may_stop)
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

describe("an init that does not return in time", function()
  -- Code an init's cancel cannot stop, on every version; on LuaJIT also a
  -- compiled loop (the JIT is on by default).
  local HANGS = { { "a call blocked in C", [[function() require("socket").sleep(30) end]] } }
  if rawget(_G, "jit") then
    HANGS[#HANGS + 1] = { "a loop LuaJIT compiled", [[function() local n = 0 while true do n = n + 1 end end]] }
  end

  for _, case in ipairs(HANGS) do
    it("in " .. case[1] .. " makes pool.new raise at its init_timeout, and the process still exits", function()
      local script = ([[
        local bgworker = require "bgworker"
        local pool = require "bgworker.pool"
        local socket = require "socket"
        local d = bgworker.new()
        local t0 = socket.gettime()
        local ok, err = pcall(pool.new, { threads = 2, init = %s, init_timeout = 0.3 })
        local took = socket.gettime() - t0
        print("made", ok, err, took < 1 and "within 1 s" or ("after " .. took .. " s"))
        print("exiting")
        io.stdout:flush()
        d:stop()
      ]]):format(case[2])
      local t0 = socket.gettime()
      local status, output = support.run_lua(script, 60)
      local took = socket.gettime() - t0
      assert.equals(0, status, output)
      assert.matches("made\tfalse\t[^\n]*init timed out\twithin 1 s\nexiting\n$", output)
      assert.is_true(took < support.size(2.5, 10), ("the process took %.2f s"):format(took))
    end)
  end
end)

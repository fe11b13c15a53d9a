-- bgworker.await: waiting for a callback with whatever dispatcher runs.
-- Callbacks come from real deliveries (bgworker_testutil producers) through
-- a real dispatcher. What every loop promises for waiting (a coroutine
-- suspended and resumed, timeouts, "stopped") is in loop_contract_spec.lua;
-- here: the arguments, the results, the token, waiting outside any
-- coroutine with a select dispatcher, and Copas specifics. The Copas specs
-- run against Copas 4 on every Lua version and against Debian's Copas 1.x on
-- 5.1, 5.2 and LuaJIT (see spec/copas_spec.lua).

local await = require "bgworker.await"
local unpack = table.unpack or unpack
local bgworker = require "bgworker"
local core = require "bgworker.core"
local support = require "support"

-- Deliver one item whose decode calls `callback(1, 1, true)`; the job is
-- joined after the test.
local function deliver_to(callback)
  support.produce { callback = callback }
end

local function pack(...)
  return { n = select("#", ...), ... }
end

setup(support.stop_core)

describe("bgworker.await", function()
  local d

  after_each(function()
    support.finish(d)
    d = nil
  end)

  it("checks its arguments at the caller's line", function()
    local function refuses(msg, ...)
      local args = pack(...)
      local ok, err = pcall(function() local _ = await(unpack(args, 1, args.n)) end)
      assert.is_false(ok)
      assert.matches("await_spec.lua:%d+: " .. msg:gsub("[%(%)%.%-]", "%%%0"), err)
    end
    refuses("bad argument #1 to 'await' (start must be a function, got nil)", nil)
    refuses("bad argument #2 to 'await' (timeout must be a non-negative number of seconds, got -1)",
      print, -1)
    refuses('bad argument #2 to \'await\' (timeout must be a non-negative number of seconds, got "1")',
      print, "1")
  end)

  it("refuses to wait with no dispatcher, before starting anything", function()
    local started = false
    local ok, err = pcall(function() local _ = await(function() started = true end) end)
    assert.is_false(ok)
    assert.matches("await_spec.lua:%d+: await: no bgworker dispatcher is running in this Lua state", err)
    assert.is_false(started)
  end)

  it("blocks while running a select dispatcher outside any coroutine", function()
    d = bgworker.new()
    assert.same({ n = 4, true, 1, 1, true }, pack(await(deliver_to)))
  end)

  it("returns at once when the callback fires during start, keeping nils", function()
    d = bgworker.new()
    local got = pack(await(function(callback) callback(nil, 2, nil) end))
    assert.same({ n = 4, true, nil, 2, nil }, got)
  end)

  it("keeps the first call of the callback only", function()
    d = bgworker.new()
    local got = pack(await(function(callback)
      callback("first")
      callback("second")
    end))
    assert.same({ n = 2, true, "first" }, got)
  end)

  it("times out with nil, \"timeout\" and what start returned, and cancels the token", function()
    d = bgworker.new()
    local token
    local t0 = core.now()
    local got = pack(await(function(_, t)
      token = t
      return "job"
    end, 0.05))
    assert.same({ n = 3, nil, "timeout", "job" }, got)
    assert.is_true(core.now() - t0 >= 0.045)
    assert.is_true(token:cancelled())
  end)

  it("leaves the token alone when the callback came", function()
    d = bgworker.new()
    local token
    assert.is_true((await(function(callback, t)
      token = t
      deliver_to(callback)
    end, 5)))
    assert.is_false(token:cancelled())
  end)

  it("returns nil, \"stopped\" when the dispatcher stops first", function()
    d = bgworker.new()
    assert.same({ n = 3, nil, "stopped", "job" }, pack(await(function()
      d:stop()
      return "job"
    end)))
  end)
end)

-- Each test but the first is a Copas thread of bgworker.busted's, with a
-- Copas dispatcher of its own.
describe("bgworker.await in Copas", function()
  local copas = support.needs_copas()
  if not copas then return end
  local helper = require "bgworker.busted"
  local eventually = helper.eventually

  local function in_copas(body)
    return helper.async(body, { loop = "copas" })
  end

  it("raises at the caller's line in the main program", function()
    local d = bgworker.new { loop = "copas" }
    local ok, err = pcall(function() local _ = await(deliver_to) end)
    d:stop()
    assert.is_false(ok)
    assert.matches("await_spec.lua:%d+: await: with a Copas dispatcher, wait in a Copas thread", err)
  end)

  it("keeps working after threads that waited have ended", in_copas(function()
    -- Copas 1.x closes the socket that last resumed a thread when the thread
    -- ends; the wait's socket must survive that for the next wait.
    for round = 1, 3 do
      local got
      copas.addthread(function()
        got = select(2, await(function(callback)
          deliver_to(function() callback(round) end)
        end))
      end)
      eventually(function() return got ~= nil end, 5)
      assert.equals(round, got, "round " .. round)
    end
  end))

  it("lets other threads run while one waits", in_copas(function()
    local release -- the waiting thread's callback
    local got, ticks_seen, ticker = nil, nil, nil
    copas.addthread(function()
      got = select(2, await(function(callback) release = callback end))
      ticks_seen = ticker.ticks
    end)
    -- A thread that ticks once a loop step, until the waiter got its value.
    ticker = support.copas_ticker(function() return got ~= nil end, function(ticks)
      if ticks == 3 then release("done") end
    end)
    eventually(function() return ticker.ended end, 5)
    assert.equals("done", got)
    -- Released at the third tick; the ticker may tick once more in the step
    -- that resumes the waiter.
    assert.is_true(ticks_seen == 3 or ticks_seen == 4, "resumed after tick " .. tostring(ticks_seen))
  end))

  it("times out in a Copas thread while the loop has nothing else to do", in_copas(function()
    assert.same({ n = 3, nil, "timeout", nil }, pack(await(function() end, 0.05)))
  end))
end)

describe("bgworker.await with a select dispatcher, in a Copas loop", function()
  local copas = support.needs_copas()
  if not copas then return end

  it("raises at the caller's line where Copas 4 runs the thread, instead of waiting for ever", function()
    if support.is_copas1(copas) then
      pending(copas._VERSION .. " does not say whether its loop runs")
      return
    end
    local d = bgworker.new()
    local ok, err
    copas.addthread(function()
      ok, err = pcall(function() local _ = await(deliver_to) end)
    end)
    copas.loop()
    d:stop()
    assert.is_false(ok)
    assert.matches("await_spec.lua:%d+: await: this is a Copas thread, but the running dispatcher is a" ..
      " select one", err)
  end)
end)

-- bgworker.await: waiting for a callback in a Copas thread, or through a
-- dispatcher outside one. Callbacks come from real deliveries
-- (bgworker_testutil producers) through a real dispatcher.
--
-- The Copas specs run against Copas 4 on every Lua version and against
-- Debian's Copas 1.x on 5.1, 5.2 and LuaJIT (see spec/copas_spec.lua). The
-- Copas 2+ path (pauseforever/wakeup) is also checked against a stand-in
-- scheduler.

local await = require "bgworker.await"
local bgworker = require "bgworker"
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

  it("checks its arguments", function()
    assert.has_error(function() await(nil) end, "bad argument #1 to 'await' (function expected, got nil)")
    assert.has_error(function() await(print, 42) end, "bad argument #2 to 'await' (dispatcher expected, got number)")
  end)

  it("refuses to wait outside a Copas thread with no dispatcher, before starting anything", function()
    local started = false
    local ok, err = pcall(await, function() started = true end)
    assert.is_false(ok)
    assert.matches("not in a Copas thread, and no dispatcher to wait with", err, 1, true)
    assert.is_false(started)
  end)

  it("waits through a dispatcher outside any coroutine", function()
    d = bgworker.new()
    assert.same({ n = 3, 1, 1, true }, pack(await(deliver_to, d)))
  end)

  it("returns at once when the callback fires during start, keeping nils", function()
    d = bgworker.new()
    local got = pack(await(function(callback) callback(nil, 2, nil) end, d))
    assert.same({ n = 3, nil, 2, nil }, got)
  end)

  it("keeps the first call of the callback only", function()
    d = bgworker.new()
    local got = pack(await(function(callback)
      callback("first")
      callback("second")
    end, d))
    assert.same({ n = 1, "first" }, got)
  end)

  it("fails when the dispatcher stops before the callback fires", function()
    d = bgworker.new()
    local ok, err = pcall(await, function() d:stop() end, d)
    assert.is_false(ok)
    assert.matches("the dispatcher stopped before the callback was called", err, 1, true)
  end)

  describe("with a Copas 2+ scheduler (pauseforever, wakeup)", function()
    -- A stand-in for Copas: pausing yields to the test, which plays the loop.
    local real
    local woken

    before_each(function()
      real = package.loaded.copas
      woken = {}
    end)

    after_each(function()
      package.loaded.copas = real
    end)

    local function scheduler(fields)
      local fake = {
        wakeup = function(co) woken[#woken + 1] = co end,
      }
      for k, v in pairs(fields) do fake[k] = v end
      package.loaded.copas = fake
    end

    local function check_sleeping_wait()
      local callback
      local co = coroutine.create(function()
        return await(function(cb) callback = cb end)
      end)
      assert.same({ true, "paused" }, { coroutine.resume(co) })
      -- Woken by someone else: it goes back to sleep.
      assert.same({ true, "paused" }, { coroutine.resume(co) })
      callback("a", nil)
      callback("ignored")
      assert.same({ co }, woken)
      assert.same({ n = 3, true, "a", nil }, pack(coroutine.resume(co)))
      assert.equals("dead", coroutine.status(co))
    end

    it("sleeps with pauseforever until the callback wakes it", function()
      scheduler { pauseforever = function() coroutine.yield("paused") end }
      check_sleeping_wait()
    end)

    it("sleeps with sleep(-1) on Copas 2 and 3", function()
      scheduler { sleep = function(t)
        assert.equals(-1, t)
        coroutine.yield("paused")
      end }
      check_sleeping_wait()
    end)
  end)
end)

describe("bgworker.await in Copas", function()
  local copas = support.needs_copas()
  if not copas then return end

  support.copas_dispatcher_each()
  local run_until = support.copas_until

  it("suspends the thread until the callback fires, and returns its values", function()
    local got
    copas.addthread(function()
      got = pack(await(deliver_to))
    end)
    assert.is_true(run_until(function() return got ~= nil end))
    assert.same({ n = 3, 1, 1, true }, got)
  end)

  it("serves many waiting threads at once, each with its own values", function()
    local n, got, done = 20, {}, 0
    for i = 1, n do
      copas.addthread(function()
        got[i] = await(function(callback)
          deliver_to(function() callback(i) end)
        end)
        done = done + 1
      end)
    end
    assert.is_true(run_until(function() return done == n end))
    for i = 1, n do assert.equals(i, got[i]) end
  end)

  it("keeps working after threads that waited have ended", function()
    -- Copas 1.x closes the socket that last resumed a thread when the thread
    -- ends; the wait's socket must survive that for the next wait.
    for round = 1, 3 do
      local got
      copas.addthread(function()
        got = await(function(callback)
          deliver_to(function() callback(round) end)
        end)
      end)
      assert.is_true(run_until(function() return got ~= nil end), "round " .. round)
      assert.equals(round, got)
    end
  end)

  it("lets other threads run while one waits", function()
    local release -- the waiting thread's callback
    local got, ticks_seen, ticker = nil, nil, nil
    copas.addthread(function()
      got = await(function(callback) release = callback end)
      ticks_seen = ticker.ticks
    end)
    -- A thread that ticks once a loop step, until the waiter got its value.
    ticker = support.copas_ticker(function() return got ~= nil end, function(ticks)
      if ticks == 3 then release("done") end
    end)
    assert.is_true(ticker.run())
    assert.equals("done", got)
    -- Released at the third tick; the ticker may tick once more in the step
    -- that resumes the waiter.
    assert.is_true(ticks_seen == 3 or ticks_seen == 4, "resumed after tick " .. tostring(ticks_seen))
  end)
end)

-- Faults at scale: the Lua state closing under load, stop() in the middle
-- of a burst, stop and start cycles under load, callbacks and decodes that
-- fail in a stream of good items, and round trips whose callback fails or
-- never comes back. core_spec.lua
-- checks each promise once with a few items; these check that they hold
-- while many threads deliver. Every case ends with every item freed once.

local bgworker = require "bgworker"
local core = require "bgworker.core"
local socket = require "socket"
local testutil = require "bgworker_testutil"
local support = require "support"

local produce, join, codes, collector = support.produce, support.join, support.codes, support.collector

-- A callback that checks order per producer; `state.received` counts.
local function ordered(state)
  state.next_seq, state.received = {}, 0
  return function(p, seq, ok)
    local expected = state.next_seq[p] or 1
    if seq ~= expected or not ok then
      state.bad = state.bad or ("producer %d: seq %d, expected %d (checksum ok: %s)"):format(p, seq, expected,
        tostring(ok))
    end
    state.next_seq[p] = seq + 1
    state.received = state.received + 1
  end
end

describe("faults", function()
  local d

  before_each(support.reset)

  after_each(function()
    support.finish(d)
    d = nil
    testutil.reset()
  end)

  describe("closing the Lua state", function()
    it("with 100000 items pending while producers still deliver", function()
      local pending = support.size(100000, 2000)
      local ok, job = support.fresh_state(([[
        core.start(port)
        local job = testutil.produce { producers = 4, items = %d, until_closed = 5, payload = 16,
          callback = function() end }
        eventually(function() return core.pending() >= %d end)
        return job
      ]]):format(pending / 4, pending))
      assert.is_true(ok, job)
      local counts = join(support.adopt(job))
      -- Each producer went on until five delivers in a row were refused.
      -- (The state may close before a slow producer delivered all its
      -- items: those who finished first linger, and their items count in
      -- `pending` too. Its items left are refused as well.)
      assert.is_true(counts.BGW_OK >= pending)
      assert.is_true(counts.BGW_CLOSED >= 20, counts.BGW_CLOSED)
      assert.same(codes { BGW_OK = counts.BGW_OK, BGW_CLOSED = counts.BGW_CLOSED }, counts)
      local c = testutil.counters()
      assert.equal(counts.BGW_OK + counts.BGW_CLOSED, c.allocated)
      assert.equal(0, c.decodes, "an item decoded after the state closed")
      support.assert_all_freed()
    end)

    it("while utility threads of every kind wait on it", function()
      -- A full bounded queue: producers blocked for room, a round trip
      -- blocked for room or waiting for its reply, and a ticker.
      local ok, producers, round_trip = support.fresh_state [[
        core.start(port, { capacity = 64 })
        local producers = testutil.produce { producers = 3, items = 1000, callback = function() end }
        local round_trip = testutil.call { callback = function() end }
        local t = ticker.start(1000000, 1, function() end)
        eventually(function() return core.pending() == 64 end)
        socket.sleep(0.05)
        assert(not testutil.done(producers), "the producers should be waiting for room")
        assert(not testutil.done(round_trip), "the round trip should be waiting")
        return producers, round_trip
      ]]
      assert.is_true(ok, producers)
      local counts = join(support.adopt(producers))
      local call = join(support.adopt(round_trip))
      assert.same(codes { BGW_OK = counts.BGW_OK, BGW_CLOSED = 3000 - counts.BGW_OK }, counts)
      assert.is_true(counts.BGW_OK <= 64)
      -- Queued (and cancelled at close) or still waiting for room (closed).
      assert.is_truthy(({ BGW_CANCELLED = true, BGW_CLOSED = true })[call.code], call.code)
      assert.equal(0, testutil.counters().decodes)
      support.assert_all_freed()
    end)
  end)

  describe("stop() during a burst", function()
    -- Producers deliver N items each, then one per ms until refused three
    -- times: they are still delivering when stop() comes.
    local N = support.size(100000, 1000)

    local function burst(stop_inside)
      local state = {}
      local check = ordered(state)
      local cancelled
      d = bgworker.new { budget = 100 }
      local before = core.stats()
      local job = produce { producers = 4, items = N, until_closed = 3, callback = function(...)
        check(...)
        if stop_inside and state.received == N then cancelled = d:stop() end
      end }
      assert.is_true(support.pump(d, function() return state.received >= N end))
      if not stop_inside then cancelled = d:stop() end
      local received = state.received
      local counts = join(job)
      socket.sleep(0.01)
      assert.equal(0, d:dispatch())
      assert.equal(received, state.received, "a callback ran after stop()")
      assert.is_nil(state.bad)
      assert.is_true(counts.BGW_CLOSED >= 12)
      assert.same(codes { BGW_OK = counts.BGW_OK, BGW_CLOSED = counts.BGW_CLOSED }, counts)
      assert.equal(counts.BGW_OK, received + cancelled)
      local delta = support.stats_delta(before)
      assert.equal(received, delta.polled)
      assert.equal(cancelled, delta.cancelled)
      assert.equal(counts.BGW_OK, delta.delivered)
      assert.equal(counts.BGW_CLOSED, delta.rejected)
      local c = testutil.counters()
      assert.equal(received, c.decodes)
      assert.equal(counts.BGW_OK + counts.BGW_CLOSED, c.allocated)
      support.assert_all_freed()

      -- And a new dispatcher works.
      d = bgworker.new()
      local got = 0
      join(produce { items = 10, callback = function() got = got + 1 end })
      assert.is_true(support.pump(d, function() return got == 10 end))
    end

    it("from the loop", function() burst(false) end)
    it("from a callback", function() burst(true) end)
  end)

  it("stops and starts again, bounded and unbounded, while producers deliver", function()
    local P, N, CYCLES = 4, support.size(50000, 2000), support.size(200, 20)
    local last, received, bad = {}, 0, nil
    local before = core.stats()
    -- Handles acquired before the first start: delivers between two runs
    -- are refused with BGW_CLOSED, and the next run takes them again.
    -- Refused and cancelled items leave gaps: the order must still hold.
    local job = produce { producers = P, items = N, payload = 8, callback = function(p, seq, ok)
      if seq <= (last[p] or 0) or not ok then
        bad = bad or ("producer %d: seq %d after %d (checksum ok: %s)"):format(p, seq, last[p] or 0, tostring(ok))
      end
      last[p] = seq
      received = received + 1
    end }
    local cancelled, cycle = 0, 0
    while not testutil.done(job) or cycle < CYCLES do
      cycle = cycle + 1
      d = bgworker.new { capacity = cycle % 2 == 1 and 16 or nil, budget = 50 }
      d:wait(0.002)
      cancelled = cancelled + d:stop()
    end
    local counts = join(job)
    d = nil
    assert.is_nil(bad)
    assert.same(codes { BGW_OK = counts.BGW_OK, BGW_CLOSED = P * N - counts.BGW_OK }, counts)
    assert.equal(counts.BGW_OK, received + cancelled)
    local delta = support.stats_delta(before)
    assert.equal(received, delta.polled)
    assert.equal(cancelled, delta.cancelled)
    assert.equal(received, testutil.counters().decodes)
    support.assert_all_freed()
  end)

  it("goes on after a callback that errors on every 10th item", function()
    local P, N = 4, support.size(10000, 500)
    local errors, handler = collector()
    d = bgworker.new { errorhandler = handler }
    local state = {}
    local check = ordered(state)
    local job = produce { producers = P, items = N, callback = function(p, seq, ok)
      check(p, seq, ok)
      if seq % 10 == 0 then error(("tenth %d:%d"):format(p, seq)) end
    end }
    assert.is_true(support.pump(d, function() return state.received == P * N end))
    assert.same(codes { BGW_OK = P * N }, join(job))
    assert.is_nil(state.bad)
    assert.equal(P * N / 10, #errors)
    for _, e in ipairs(errors) do assert.matches("tenth %d:%d+0$", tostring(e.err)) end
    support.assert_all_freed()
  end)

  it("goes on after decodes that raise or push no function, mixed into good items", function()
    local N, M = support.size(20000, 500), support.size(1000, 50)
    local errors, handler = collector()
    d = bgworker.new { errorhandler = handler }
    local before = core.stats()
    local state = {}
    local good = produce { producers = 2, items = N, callback = ordered(state) }
    local bad = {}
    for _, decode in ipairs { "raise", "nofunc", "nothing" } do
      bad[#bad + 1] = produce { items = M, decode = decode }
    end
    assert.is_true(support.pump(d, function() return state.received == 2 * N and #errors == 3 * M end))
    assert.same(codes { BGW_OK = 2 * N }, join(good))
    for _, job in ipairs(bad) do assert.same(codes { BGW_OK = M }, join(job)) end
    assert.is_nil(state.bad)
    local raised = 0
    for _, e in ipairs(errors) do
      local err = tostring(e.err)
      if err:find("testutil decode raised", 1, true) then
        raised = raised + 1
      else
        assert.matches("decode must push a function first", err)
      end
    end
    assert.equal(M, raised)
    assert.equal(3 * M, support.stats_delta(before).errors)
    assert.equal(2 * N + 3 * M, testutil.counters().decodes)
    support.assert_all_freed()
  end)

  describe("round trips", function()
    it("whose callbacks raise, return, or outlive their caller's timeout, side by side", function()
      local K = 5
      local errors, handler = collector()
      d = bgworker.new { errorhandler = handler }
      local raising, returning, slow = {}, {}, {}
      for i = 1, K do
        raising[i] = support.call { callback = function() error("round trip " .. i) end }
        returning[i] = support.call { callback = function() return i, "x" end }
        slow[i] = support.call { timeout = 100, callback = function()
          socket.sleep(0.15)
          return i
        end }
      end
      for i = 1, K do
        -- Joining in turn: each call is answered while we pump.
        for _, job in ipairs { raising[i], returning[i], slow[i] } do
          assert.is_true(support.pump(d, function() return testutil.done(job) end))
        end
      end
      for i = 1, K do
        assert.same({ code = "BGW_ERROR", n = 0 }, join(raising[i]))
        assert.same({ code = "BGW_OK", n = 2, i, "x" }, join(returning[i]))
        -- Timed out while queued (decode skipped) or during its callback.
        assert.same({ code = "BGW_TIMEOUT", n = 0 }, join(slow[i]))
      end
      d:dispatch()
      assert.equal(K, #errors)
      for _, e in ipairs(errors) do assert.matches("round trip %d", tostring(e.err)) end
      assert.equal(K, testutil.counters().results)
      support.assert_all_freed()
    end)

    it("whose callback never returns: the caller times out, the data is freed when collected", function()
      local reader = support.start_core()
      local job = support.call { timeout = 100, callback = function() coroutine.yield("parked") end }
      assert.is_true(#socket.select({ reader }, nil, 5) == 1)
      local co = coroutine.create(function(f, ...) return f(...) end)
      assert.same({ true, "parked" }, { coroutine.resume(co, core.poll()) })
      assert.same({ code = "BGW_TIMEOUT", n = 0 }, join(job))
      assert.equal(0, testutil.counters().freed, "freed while its callback is suspended")
      co = nil -- luacheck: ignore 311 (dropped so that the round trip is collected)
      collectgarbage()
      collectgarbage()
      assert.equal(1, testutil.counters().freed)
      assert.equal(0, testutil.counters().results)
      support.assert_all_freed()
      core.stop()
      reader:close()
    end)
  end)
end)

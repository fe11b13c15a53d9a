-- core.drain(limit), the dispatchers' hot path (src/lua/drain.rs): a whole
-- batch of decodes and callbacks in one protected call. Its promises: the
-- budget counts every item taken, the one that raised included; each error
-- comes back with a traceback and the next call goes on after it; decode
-- errors read as poll()'s; every item is freed exactly once (testutil's
-- counters); round trips work; a callback that stops the run ends the
-- drain; a callback that cuts it ends it; callbacks may yield through it
-- on Lua 5.2+.

local core = require "bgworker.core"
local support = require "support"
local testutil = require "bgworker_testutil"

local produce, call, join = support.produce, support.call, support.join
local stats_delta, assert_all_freed = support.stats_delta, support.assert_all_freed

local reader -- the Lua side's socket of the current test

local function start()
  if reader then reader:close() end
  reader = support.start_core()
end

-- Wait for the wake-up of what was delivered, and read the datagrams.
local function woken()
  assert.is_true(support.readable(reader, 5), "no wake-up")
  support.discard(reader)
end

local pack = table.pack or function(...) return { n = select("#", ...), ... } end

-- The results of drain(limit) as a table, `n` their count.
local function drained(limit)
  return pack(core.drain(limit))
end

describe("core.drain", function()
  before_each(support.reset)

  after_each(function()
    support.finish()
    if reader then reader:close() end
    reader = nil
  end)

  teardown(testutil.reset)

  it("runs the callbacks in order, frees each item, and says whether it emptied the queue", function()
    start()
    local got = {}
    join(produce { items = 10, callback = function(_, seq) got[#got + 1] = seq end })
    woken()
    local before = core.stats()
    assert.same({ 4, false, n = 2 }, drained(4))
    assert.same({ 1, 2, 3, 4 }, got)
    assert.same({ 6, true, n = 2 }, drained(100))
    assert.same({ 0, true, n = 2 }, drained(5))
    assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, got)
    assert.equal(10, stats_delta(before).polled)
    assert.equal(0, core.pending())
    assert_all_freed()
  end)

  it("takes nothing with a limit of 0, and takes limits beyond any count", function()
    start()
    join(produce { items = 2, callback = function() end })
    woken()
    assert.same({ 0, false, n = 2 }, drained(0))
    assert.same({ 2, true, n = 2 }, drained(2 ^ 63))
    assert.same({ 0, true, n = 2 }, drained(math.huge))
  end)

  it("rejects a bad limit, naming it", function()
    start()
    for _, bad in ipairs { -1, "x", 0 / 0 } do
      local ok, err = pcall(function() core.drain(bad) end)
      assert.is_false(ok)
      assert.matches("bad argument #1 to '[%w.]*drain' %(limit must be a non%-negative number, got", err)
    end
    assert.is_false(pcall(core.drain))
  end)

  it("stops at a callback's error, counting that item, and goes on after it", function()
    start()
    local got = {}
    join(produce { items = 5, callback = function(_, seq)
      got[#got + 1] = seq
      if seq == 2 then error("callback 2 failed") end
    end })
    woken()
    local r = drained(10)
    assert.equal(4, r.n)
    assert.equal(2, r[1])
    assert.is_nil(r[2])
    assert.matches("callback 2 failed", r[3])
    assert.equal(1, r[4]:find(r[3], 1, true), "the traceback starts with the error")
    assert.matches("stack traceback:", r[4], 1, true)
    -- The budget goes on where the failed batch stopped.
    assert.same({ 3, true, n = 2 }, drained(10 - 2))
    assert.same({ 1, 2, 3, 4, 5 }, got)
    assert_all_freed()
  end)

  it("hands back an error value that is not a string as it is", function()
    start()
    local value = setmetatable({}, { __tostring = function() return "a table error" end })
    join(produce { items = 1, callback = function() error(value) end })
    woken()
    local r = drained(1)
    assert.equal(value, r[3])
    assert.equal(1, r[4]:find("a table error\nstack traceback:", 1, true))
    -- Stopped before an empty poll: empty the queue, so the next item wakes us.
    assert.same({ 0, true, n = 2 }, drained(1))
    join(produce { items = 1, callback = function() error({}) end })
    woken()
    r = drained(1)
    assert.is_table(r[3])
    assert.equal(1, r[4]:find("(error object is a table value)", 1, true))
    assert_all_freed()
  end)

  for _, case in ipairs {
    { decode = "raise", message = "^bgworker: decode raised an error: .*testutil decode raised" },
    { decode = "nofunc", message = "^bgworker: decode must push a function first; it pushed a number first" },
    { decode = "nothing", message = "^bgworker: decode must push a function first; it pushed nothing" },
  } do
    it(("reports decode %s as poll() does, frees that item once, and goes on"):format(case.decode), function()
      start()
      local before = core.stats()
      join(produce { decode = case.decode })
      local got
      join(produce { items = 1, callback = function(p, seq) got = { p, seq } end })
      woken()
      local r = drained(10)
      assert.equal(1, r[1])
      assert.is_nil(r[2])
      assert.matches(case.message, r[3])
      assert.equal(1, r[4]:find(r[3], 1, true), "the traceback starts with the message")
      assert.equal(1, testutil.counters().freed, "the failed item's data, once")
      assert.same({ 1, true, n = 2 }, drained(9))
      assert.same({ 1, 1 }, got)
      assert.equal(1, stats_delta(before).errors)
      assert_all_freed()
    end)
  end

  it("ends the drain as empty when a callback stops the run; the rest is cancelled and freed", function()
    start()
    local got = {}
    join(produce { items = 5, callback = function(_, seq)
      got[#got + 1] = seq
      if seq == 2 then core.stop() end
    end })
    woken()
    assert.same({ 2, true, n = 2 }, drained(10))
    assert.same({ 1, 2 }, got)
    assert.equal(5, testutil.counters().freed)
    assert_all_freed()
  end)

  it("ends at the run it started with when a callback starts another", function()
    start()
    local got = {}
    local function callback(_, seq) got[#got + 1] = seq end
    join(produce { items = 2, callback = function()
      core.stop()
      start()
      join(produce { items = 3, callback = callback })
    end })
    woken()
    assert.same({ 1, true, n = 2 }, drained(10))
    assert.same({}, got)
    woken()
    assert.same({ 3, true, n = 2 }, drained(10))
    assert.same({ 1, 2, 3 }, got)
    assert_all_freed()
  end)

  it("counts only its own items when a callback drains too, also after an error", function()
    start()
    local got, inner = {}, nil
    join(produce { items = 6, callback = function(_, seq)
      got[#got + 1] = seq
      if seq == 1 then inner = pack(core.drain(2)) end
      if seq == 4 then error("item 4 failed") end
    end })
    woken()
    local r = drained(10)
    assert.same({ 2, false, n = 2 }, inner)
    assert.equal(2, r[1], "items 1 and 4: the inner drain's 2 and 3 are its own")
    assert.matches("item 4 failed", r[3])
    assert.same({ 2, true, n = 2 }, drained(8))
    assert.same({ 1, 2, 3, 4, 5, 6 }, got)
    -- Within the budget: the outer drain takes 3, the inner one 2.
    join(produce { items = 6, callback = function(_, seq)
      if seq == 1 then inner = pack(core.drain(2)) end
    end })
    woken()
    assert.same({ 3, false, n = 2 }, drained(3))
    assert.same({ 2, false, n = 2 }, inner)
    assert.equal(1, core.pending())
    assert.same({ 1, true, n = 2 }, drained(10))
    assert_all_freed()
  end)

  it("ends after a callback that cuts it, leaving the rest queued; a cut reaches one drain only", function()
    start()
    local got = {}
    join(produce { items = 8, callback = function(_, seq)
      got[#got + 1] = seq
      if seq == 2 or seq == 5 then core.drain_cut() end
      if seq == 4 then
        -- The inner drain's cut ends the inner drain only.
        assert.same({ 1, false, n = 2 }, pack(core.drain(10)))
      end
    end })
    woken()
    assert.same({ 2, false, n = 2 }, drained(10))
    -- Items 3, 4 and 6 to 8: 4's inner drain took 5, whose cut ended it.
    assert.same({ 5, true, n = 2 }, drained(10))
    assert.same({ 1, 2, 3, 4, 5, 6, 7, 8 }, got)
    -- A cut outside any drain reaches none.
    core.drain_cut()
    join(produce { items = 2, callback = function() end })
    woken()
    assert.same({ 2, true, n = 2 }, drained(10))
    assert_all_freed()
  end)

  describe("round trips", function()
    it("hands the callback's values to the waiting thread", function()
      start()
      local job = call { callback = function() return 42, "two" end }
      woken()
      assert.same({ 1, true, n = 2 }, drained(10))
      assert.same({ code = "BGW_OK", n = 2, 42, "two" }, join(job))
      assert_all_freed()
    end)

    it("gives BGW_ERROR when the callback raises, and reports the error", function()
      start()
      local job = call { callback = function() error("round trip failed") end }
      woken()
      local r = drained(10)
      assert.equal(1, r[1])
      assert.matches("round trip failed", r[3])
      assert.same({ code = "BGW_ERROR", n = 0 }, join(job))
      assert_all_freed()
    end)

    it("gives BGW_ERROR when decode raises, with poll()'s message", function()
      start()
      local job = call { decode = "raise" }
      woken()
      local r = drained(10)
      assert.matches("^bgworker: decode raised an error: .*testutil decode raised", r[3])
      assert.same({ code = "BGW_ERROR", n = 0 }, join(job))
      assert_all_freed()
    end)
  end)

  describe("yields", function()
    it("are possible exactly on Lua 5.2 and later", function()
      assert.equal(_VERSION ~= "Lua 5.1", core.drain_yieldable)
    end)

    if core.drain_yieldable then
      it("pass from a callback to the coroutine that called drain, which ends after it", function()
        start()
        local log = {}
        join(produce { items = 3, callback = function(_, seq)
          log[#log + 1] = "start " .. seq
          local answer = coroutine.yield("paused " .. seq)
          log[#log + 1] = "resumed " .. seq .. " with " .. answer
          if seq == 2 then error("late error " .. seq) end
        end })
        woken()
        -- Resumed, the callback returns and its drain ends there: the
        -- Lua layer went on without it meanwhile (bgworker.runner).
        local co = coroutine.create(function() return core.drain(10) end)
        assert.same({ true, "paused 1" }, { coroutine.resume(co) })
        assert.same({ true, 1, false }, { coroutine.resume(co, "a") })
        -- One that raises after its yield reports the error.
        co = coroutine.create(function() return core.drain(10) end)
        assert.same({ true, "paused 2" }, { coroutine.resume(co) })
        local r = pack(coroutine.resume(co, "b"))
        assert.is_true(r[1])
        assert.is_number(r[2])
        assert.is_nil(r[3])
        assert.matches("late error 2", r[4])
        assert.matches("stack traceback:", r[5], 1, true)
        co = coroutine.create(function() return core.drain(8) end)
        assert.same({ true, "paused 3" }, { coroutine.resume(co) })
        assert.same({ true, 1, false }, { coroutine.resume(co, "c") })
        assert.same({ true, 0, true }, { coroutine.resume(coroutine.create(core.drain), 8) })
        assert.same({ "start 1", "resumed 1 with a", "start 2", "resumed 2 with b", "start 3",
          "resumed 3 with c" }, log)
        assert_all_freed()
      end)
    else
      it("from a callback are errors, and the drain goes on after them", function()
        start()
        local got = {}
        join(produce { items = 2, callback = function(_, seq)
          got[#got + 1] = seq
          if seq == 1 then coroutine.yield() end
        end })
        woken()
        local co = coroutine.create(function() return core.drain(10) end)
        local r = pack(coroutine.resume(co))
        assert.is_true(r[1])
        assert.equal(1, r[2])
        assert.matches("yield", r[4])
        assert.same({ 1, true, n = 2 }, drained(9))
        assert.same({ 1, 2 }, got)
        assert_all_freed()
      end)
    end
  end)
end)

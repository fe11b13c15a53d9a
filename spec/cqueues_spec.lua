-- What only the cqueues dispatcher does (bgworker.new { loop = "cqueues" }):
-- cqueues' polling protocol, polled by hand or by d:loop(), a pipe, and
-- where it can wait. What every loop promises (in a real controller) is in
-- loop_contract_spec.lua.
--
-- cqueues must be installed for Lua 5.1 to 5.4: a missing cqueues fails
-- these specs. Under LuaJIT, Debian's cqueues for Lua 5.1 is used (it does
-- not link liblua5.1, so it may share the process with LuaJIT); if it
-- cannot load there, the specs are pending, with the reason.

local await = require "bgworker.await"
local bgworker = require "bgworker"
local core = require "bgworker.core"
local support = require "support"
local ticker = require "bgworker_ticker"

local cqueues, bgcq = support.require_native("cqueues", "bgworker.cqueues")
local produce, join = support.produce, support.join

describe("bgworker.cqueues", function()
  if not cqueues then
    it("needs cqueues", function()
      pending("cqueues cannot be loaded under LuaJIT here: " .. tostring(bgcq))
    end)
    return
  end

  local d

  -- Run the controller until all its coroutines ended, at most 5 s.
  local function run(cq)
    local deadline = cqueues.monotime() + 5
    while not cq:empty() do
      local left = deadline - cqueues.monotime()
      if left <= 0 then
        d:stop()
        cq:loop(1)
        error("the controller did not finish in time", 2)
      end
      assert(cq:loop(left))
    end
  end

  setup(support.stop_core)

  after_each(function()
    support.finish(d)
    d = nil
  end)

  it("follows the polling protocol, and d:loop() returns the items it handled", function()
    local cq = cqueues.new()
    d = bgworker.new { loop = "cqueues" }
    assert.equals(core.fd(), d.fd)
    assert.equals(d.fd, d:pollfd())
    assert.equals("r", d:events())
    assert.is_nil(d:timeout())
    local total
    local t = ticker.start(5, 2, function(v)
      if v == 5 then d:stop() end
    end)
    cq:wrap(function() total = d:loop() end)
    run(cq)
    t:stop()
    assert.equals(5, total)
    assert.is_nil(d:pollfd())
    assert.equals(0, d:timeout())
  end)

  it("is pollable by hand: cqueues.poll(d), then d:dispatch()", function()
    local cq = cqueues.new()
    d = bgworker.new { loop = "cqueues" }
    local got, wakes = {}, 0
    local t = ticker.start(3, 5, function(v) got[#got + 1] = v end)
    cq:wrap(function()
      while #got < 3 do
        local ready = cqueues.poll(d, 5)
        assert.equals(d, ready)
        wakes = wakes + 1
        d:dispatch()
      end
    end)
    run(cq)
    t:stop()
    assert.same({ 1, 2, 3 }, got)
    assert.is_true(wakes >= 1 and wakes <= 3)
  end)

  it("works with a pipe and a bounded queue", function()
    local cq = cqueues.new()
    d = bgworker.new { loop = "cqueues", kind = "pipe", capacity = 4, budget = 5 }
    local count = 0
    local job = produce { producers = 2, items = 300, callback = function()
      assert(core.pending() <= 4)
      count = count + 1
      if count == 600 then d:stop() end
    end }
    cq:wrap(function() d:loop() end)
    run(cq)
    assert.equals(600, count)
    assert.equals(600, join(job).BGW_OK)
  end)

  it("waits in coroutines of a controller only", function()
    d = bgworker.new { loop = "cqueues" }
    local ok, err = pcall(function() local _ = await(function() end) end)
    assert.is_false(ok)
    assert.matches("cqueues_spec.lua:%d+: await: with a cqueues dispatcher, wait in a coroutine of a" ..
      " cqueues controller", err)
  end)

  it("checks its own options and methods at the caller's line", function()
    local ok, err = pcall(function() local _ = bgworker.new { loop = "cqueues", kind = 3 } end)
    assert.is_false(ok)
    assert.matches("cqueues_spec.lua:%d+: bad argument #1 to 'bgworker.new' %(opts.kind" ..
      ' must be one of "eventfd", "pipe", got 3%)', err)
    d = bgworker.new { loop = "cqueues" }
    ok, err = pcall(function() local _ = d.loop(nil) end)
    assert.is_false(ok)
    assert.matches("calling 'loop' on bad self (dispatcher expected, got nil", err, 1, true)
  end)
end)

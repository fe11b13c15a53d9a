-- What only the luv dispatcher does (bgworker.new { loop = "luv" }): its
-- poll handle and descriptor, dispatch outside the loop's turn, a pipe,
-- and where it can wait. What every loop promises (in a real uv.run()) is
-- in loop_contract_spec.lua.
--
-- luv must be installed for Lua 5.1 to 5.4: a missing luv fails these specs.
-- Under LuaJIT, Debian's luv for Lua 5.1 is used (it does not link liblua5.1,
-- so it may share the process with LuaJIT); if it cannot load there, the
-- specs are pending, with the reason.

local await = require "bgworker.await"
local bgworker = require "bgworker"
local core = require "bgworker.core"
local socket = require "socket"
local support = require "support"

local uv, bgluv = support.require_native("luv", "bgworker.luv")
local produce, join = support.produce, support.join

describe("bgworker.luv", function()
  if not uv then
    it("needs luv", function()
      pending("luv cannot be loaded under LuaJIT here: " .. tostring(bgluv))
    end)
    return
  end

  local d

  setup(support.stop_core)

  after_each(function()
    support.finish(d)
    d = nil
    uv.run()
  end)

  it("watches the core's descriptor with a poll handle, closed by stop", function()
    d = bgworker.new { loop = "luv" }
    assert.equals("luv", d:stats().loop)
    assert.equals(core.fd(), d.fd)
    assert.is_true(d.handle:is_active())
    d:stop()
    assert.is_true(d.handle:is_closing())
  end)

  it("starts on a descriptor number that a dispatcher stopped through bgworker.core left polled", function()
    -- core.stop() closes the descriptor under the old dispatcher's poll
    -- handle; the next descriptor takes its number, which libuv still
    -- lists (EEXIST) until the stale handle is closed.
    local old = bgworker.new { loop = "luv" }
    core.stop()
    d = bgworker.new { loop = "luv" }
    assert.equals(old.fd, d.fd)
    assert.is_true(old.handle:is_closing())
    local got = {}
    join(produce { items = 3, callback = function(_, seq) got[#got + 1] = seq end })
    assert.equals(3, d:dispatch())
    assert.same({ 1, 2, 3 }, got)
  end)

  it("works with a luv loaded anew, as a test runner's insulation does between files", function()
    -- Unloaded and collected, then loaded again: luv's own uv.walk crashed
    -- there (bgworker.busted walks the handles of each luv test), unless
    -- bgworker.luv kept the first luv alive. In a new interpreter: nothing
    -- else holds that first luv.
    local status, output = support.run_lua([[
      require "bgworker.luv"
      package.loaded.luv, package.loaded["bgworker.luv"] = nil, nil
      collectgarbage()
      collectgarbage()
      local uv = require "luv"
      local d = require("bgworker").new { loop = "luv" }
      collectgarbage()
      local polls = 0
      uv.walk(function(handle) if handle:get_type() == "poll" then polls = polls + 1 end end)
      d:stop()
      print("polls", polls)
    ]], 30)
    assert.equals(0, status, output)
    assert.matches("polls\t1", output)
  end)

  it("dispatches without the loop", function()
    finally(support.untimed_drains())
    d = bgworker.new { loop = "luv" }
    local got = {}
    join(produce { items = 5, callback = function(_, seq) got[#got + 1] = seq end })
    assert.equals(2, d:dispatch(2))
    assert.equals(3, d:dispatch())
    assert.equals(0, d:dispatch())
    assert.same({ 1, 2, 3, 4, 5 }, got)
    d:stop()
    assert.equals(0, d:dispatch())
  end)

  it("works with a pipe as well", function()
    d = bgworker.new { loop = "luv", kind = "pipe", budget = 5 }
    local count = 0
    produce { producers = 2, items = 500, callback = function()
      count = count + 1
      if count == 1000 then d:stop() end
    end }
    local watchdog = uv.new_timer()
    uv.update_time() -- timers start from the loop's cached time
    watchdog:start(10000, 0, function() d:stop() end)
    watchdog:unref()
    uv.run()
    watchdog:close()
    assert.equals(1000, count)
  end)

  it("times a wait from its start, also when the loop's clock is stale", function()
    -- libuv starts a timer from the time it cached at its last turn, which
    -- is old when the program did something slow since: a wait must still
    -- last its whole timeout.
    d = bgworker.new { loop = "luv" }
    uv.run("nowait")
    socket.sleep(0.4) -- the loop's cached time is now 0.4 s old
    local result, took
    coroutine.wrap(function()
      local start = core.now()
      result = { await(function() end, 0.5) }
      took = core.now() - start
      d:stop()
    end)()
    uv.run()
    assert.same({ nil, "timeout" }, { result[1], result[2] })
    assert.is_true(took >= 0.5, ("the 0.5 s wait ended after %.3f s"):format(took))
  end)

  it("waits in coroutines only: the main program runs uv.run()", function()
    d = bgworker.new { loop = "luv" }
    local ok, err = pcall(function() local _ = await(function() end) end)
    assert.is_false(ok)
    assert.matches("luv_spec.lua:%d+: await: with a luv dispatcher, wait in a coroutine", err)
  end)

  it("checks its own options at the caller's line", function()
    local ok, err = pcall(function() local _ = bgworker.new { loop = "luv", kind = "socket" } end)
    assert.is_false(ok)
    assert.matches("luv_spec.lua:%d+: bad argument #1 to 'bgworker.new' %(opts.kind must be" ..
      ' one of "eventfd", "pipe", got "socket"%)', err)
    d = bgworker.new { loop = "luv" }
    ok, err = pcall(function() local _ = d:dispatch(0) end)
    assert.is_false(ok)
    assert.matches("luv_spec.lua:%d+: bad argument #1 to 'dispatch' %(max must be a positive integer", err)
  end)
end)

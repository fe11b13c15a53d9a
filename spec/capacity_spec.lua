-- The queue's bound set while the dispatcher runs, from Lua (core.capacity)
-- and from C (bgw_api.set_capacity through the test utility library), and
-- cleared by stop.

local core = require "bgworker.core"
local socket = require "socket"
local support = require "support"
local testutil = require "bgworker_testutil"

local noop = function() end

describe("the queue's capacity", function()
  local reader

  before_each(function()
    support.reset()
    reader = support.start_core()
  end)

  after_each(function()
    support.finish()
    reader:close()
  end)

  it("bounds a running queue from C, and lifting it lets a waiting producer through", function()
    assert.is_nil(core.capacity())
    assert.equal("BGW_OK", testutil.set_capacity(3))
    assert.equal(3, core.capacity())
    assert.same(support.codes { BGW_OK = 3, BGW_FULL = 2 },
      support.join(support.produce { items = 5, timeout = testutil.NOWAIT, callback = noop }))
    local job = support.produce { items = 1, callback = noop }
    socket.sleep(0.05)
    assert.is_false(testutil.done(job), "the producer should wait for room")
    assert.equal("BGW_OK", testutil.set_capacity(0))
    assert.is_nil(core.capacity())
    assert.same(support.codes { BGW_OK = 1 }, support.join(job))
    assert.equal(4, core.pending())
    assert.equal(4, support.drain())
    support.assert_all_freed()
  end)

  it("shrinks below what is queued: producers wait until the reader took the excess", function()
    support.join(support.produce { items = 4, callback = noop })
    assert.equal(2, core.capacity(2))
    assert.same(support.codes { BGW_FULL = 1 },
      support.join(support.produce { items = 1, timeout = testutil.NOWAIT, callback = noop }))
    assert.is_true(support.dispatch(core.poll()))
    assert.is_true(support.dispatch(core.poll()))
    assert.same(support.codes { BGW_FULL = 1 },
      support.join(support.produce { items = 1, timeout = testutil.NOWAIT, callback = noop }))
    assert.is_true(support.dispatch(core.poll()))
    assert.same(support.codes { BGW_OK = 1 },
      support.join(support.produce { items = 1, timeout = testutil.NOWAIT, callback = noop }))
    assert.equal(2, support.drain())
  end)

  it("is cleared by stop, and a bound set while stopped applies to the next start", function()
    core.capacity(1)
    core.stop()
    assert.is_nil(core.capacity())
    core.capacity(1)
    reader:close()
    reader = support.start_core()
    assert.equal(1, core.capacity())
    assert.same(support.codes { BGW_OK = 1, BGW_FULL = 1 },
      support.join(support.produce { items = 2, timeout = testutil.NOWAIT, callback = noop }))
  end)

  it("refuses a bad capacity, naming it", function()
    for _, bad in ipairs { -1, 1.5, "x", true, 2 ^ 31, 2 ^ 40 } do
      local ok, err = pcall(core.capacity, bad)
      assert.is_false(ok)
      assert.matches("capacity must be an integer in 0..2147483647", err, 1, true)
    end
    assert.is_nil(core.capacity())
  end)

  -- bgworker.h: BGW_MAX_CAPACITY, the same range as core.capacity's.
  local MAX = 2 ^ 31 - 1

  it("refuses a bound above BGW_MAX_CAPACITY from C with BGW_INVALID and keeps the one set", function()
    assert.equal("BGW_OK", testutil.set_capacity(3))
    -- -1 is SIZE_MAX once converted to size_t, -2^63 is 2^63.
    for _, huge in ipairs { MAX + 1, -1, -2 ^ 63 } do
      assert.equal("BGW_INVALID", testutil.set_capacity(huge), huge)
      assert.equal(3, core.capacity())
    end
    assert.same(support.codes { BGW_OK = 3, BGW_FULL = 1 },
      support.join(support.produce { items = 4, timeout = testutil.NOWAIT, callback = noop }))
    assert.equal(3, support.drain())
  end)

  it("takes the largest bound from C and from Lua, and it bounds nothing in practice", function()
    assert.equal("BGW_OK", testutil.set_capacity(MAX))
    assert.equal(MAX, core.capacity())
    assert.same(support.codes { BGW_OK = 100 },
      support.join(support.produce { items = 100, timeout = testutil.NOWAIT, callback = noop }))
    assert.equal(MAX, core.capacity(MAX))
    assert.equal(100, support.drain())
    core.stop()
    reader:close()
    reader = support.start_core { capacity = MAX }
    assert.equal(MAX, core.capacity())
    assert.same(support.codes { BGW_OK = 10 },
      support.join(support.produce { items = 10, timeout = testutil.NOWAIT, callback = noop }))
  end)
end)

-- bgworker.luv: dispatching from a uv_poll_t on the core's descriptor
-- signal, inside a real uv.run() loop. The producers are the example ticker
-- (examples/c/ticker.c) and the test utility library (spec/native/testutil.c),
-- both real background threads.
--
-- luv must be installed for Lua 5.1 to 5.4: a missing luv fails these specs.
-- Under LuaJIT, Debian's luv for Lua 5.1 is used (it does not link liblua5.1,
-- so it may share the process with LuaJIT); if it cannot load there, the
-- specs are pending, with the reason.

local core = require "bgworker.core"
local support = require "support"
local testutil = require "bgworker_testutil"
local ticker = require "bgworker_ticker"

local uv, bgluv = support.require_native("luv", "bgworker.luv")
local produce, join, collector = support.produce, support.join, support.collector

local d -- the dispatcher of the current test

-- uv.run() with a watchdog: after `seconds`, stop the dispatcher so the
-- loop can return. Returns whether the watchdog had to fire.
local function run(seconds)
  local fired = false
  local watchdog = uv.new_timer()
  watchdog:start(math.floor((seconds or 5) * 1000), 0, function()
    fired = true
    if d then d:stop() end
  end)
  -- The watchdog alone must not keep the loop alive.
  watchdog:unref()
  uv.run()
  watchdog:close()
  uv.run("nowait")
  return fired
end

-- Count loop iterations with a check handle (it runs after each poll phase).
local function iteration_counter()
  local counter = { n = 0 }
  counter.handle = uv.new_check()
  counter.handle:start(function() counter.n = counter.n + 1 end)
  counter.handle:unref()
  return counter
end

describe("bgworker.luv", function()
  if not uv then
    it("needs luv", function()
      pending("luv cannot be loaded under LuaJIT here: " .. tostring(bgluv))
    end)
    return
  end

  setup(support.stop_core)

  after_each(function()
    support.finish(d)
    d = nil
    -- Close whatever a failed test left in the (process-wide) default loop.
    uv.walk(function(handle)
      if not handle:is_closing() then handle:close() end
    end)
    uv.run()
  end)

  it("runs ticker callbacks inside uv.run(), which returns after stop", function()
    d = bgluv.start()
    assert.is_true(core.running())
    assert.equals(core.fd(), d.fd)
    local got = {}
    local t = ticker.start(5, 2, function(v)
      got[#got + 1] = v
      if v == 5 then d:stop() end
    end)
    assert.is_false(run(5))
    t:stop()
    assert.same({ 1, 2, 3, 4, 5 }, got)
    assert.is_false(core.running())
  end)

  it("runs many items from several threads, each once and in order per thread", function()
    local errors, handler = collector()
    d = bgluv.start { errorhandler = handler }
    local callback, seen = support.in_order(3, function(count)
      if count == 9000 then d:stop() end
    end)
    produce { producers = 3, items = 3000, callback = callback }
    assert.is_false(run(10))
    assert.same({}, errors)
    assert.equals(9000, seen.count)
    assert.same({ 3000, 3000, 3000 }, seen.last)
  end)

  it("wakes up again after the queue ran dry (a drain clears the descriptor)", function()
    d = bgluv.start()
    local fd = d.fd
    local readable = {}
    local got, job = {}, nil
    local timer = uv.new_timer()
    -- Three rounds, 20 ms apart: each round is a new wake-up. Between
    -- rounds, the descriptor must be quiet again.
    local function round(r)
      job = produce { items = 4, callback = function(_, seq)
        got[#got + 1] = r * 10 + seq
        if seq == 4 then
          join(job)
          if r == 3 then
            timer:close()
            d:stop()
          else
            timer:start(20, 0, function()
              readable[#readable + 1] = support.readable(fd, 0)
              round(r + 1)
            end)
          end
        end
      end }
    end
    local before = core.stats()
    round(1)
    assert.is_false(run(5))
    assert.same({ 11, 12, 13, 14, 21, 22, 23, 24, 31, 32, 33, 34 }, got)
    assert.same({ false, false }, readable)
    local after = core.stats()
    assert.equals(12, after.polled - before.polled)
    -- Rounds 1 and 2 ended with the empty poll that clears the descriptor.
    assert.is_true(after.empty_polls - before.empty_polls >= 2)
  end)

  it("sends callback errors and decode errors to the errorhandler, and goes on", function()
    local errors, handler = collector()
    d = bgluv.start { errorhandler = handler }
    local got = {}
    local t = ticker.start(4, 1, function(v)
      got[#got + 1] = v
      if v == 2 then error("callback failed at 2") end
      if v == 3 then error({ code = 3 }) end
      if v == 4 then d:stop() end
    end)
    assert.is_false(run(5))
    t:stop()
    assert.same({ 1, 2, 3, 4 }, got)
    assert.equals(2, #errors)
    assert.matches("callback failed at 2", errors[1].err)
    assert.matches("callback failed at 2", errors[1].tb)
    assert.matches("stack traceback", errors[1].tb)
    assert.same({ code = 3 }, errors[2].err)
    assert.is_string(errors[2].tb)

    -- decode errors
    errors = {}
    d = bgluv.start { errorhandler = function(err, tb)
      errors[#errors + 1] = { err = err, tb = tb }
      if #errors == 3 then d:stop() end
    end }
    join(produce { items = 3, decode = "raise" })
    assert.is_false(run(5))
    assert.equals(3, #errors)
    assert.matches("testutil decode raised", tostring(errors[1].err))
  end)

  it("writes errors to stderr by default, also when the errorhandler raises", function()
    -- The default handler looks io.stderr up at each call.
    local ok, err, text = support.capture_stderr(function()
      -- Each callback stops the dispatcher, then raises.
      d = bgluv.start()
      join(produce { items = 1, callback = function()
        d:stop()
        error("to stderr")
      end })
      assert(not run(5), "timed out")

      d = bgluv.start { errorhandler = function() error("handler broke") end }
      join(produce { items = 1, callback = function()
        d:stop()
        error("original")
      end })
      assert(not run(5), "timed out")
    end)
    assert(ok, err)
    assert.matches("bgworker: [^\n]*to stderr", text)
    assert.matches("stack traceback", text)
    assert.matches("error in errorhandler: [^\n]*handler broke", text)
    assert.matches("original", text)
  end)

  it("handles at most budget items per loop iteration, and the rest later", function()
    d = bgluv.start { budget = 3 }
    local before = core.stats()
    local counter = iteration_counter()
    local at = {}
    local later = uv.new_timer()
    join(produce { items = 10, callback = function(_, seq)
      at[seq] = counter.n
      if seq == 10 then
        -- Stop after the drain, which then ends with an empty poll.
        later:start(10, 0, function()
          later:close()
          d:stop()
        end)
      end
    end })
    assert.is_false(run(5))
    counter.handle:close()
    -- Batches of 3, one per iteration: 3, 3, 3, 1.
    local first = at[1]
    assert.same({ first, first, first, first + 1, first + 1, first + 1,
      first + 2, first + 2, first + 2, first + 3 }, at)
    -- Only the last batch found the queue empty.
    assert.equals(1, core.stats().empty_polls - before.empty_polls)
  end)

  it("stop inside a callback ends the batch and cancels the rest", function()
    d = bgluv.start()
    local got, cancelled = {}, nil
    join(produce { items = 5, callback = function(_, seq)
      got[#got + 1] = seq
      if seq == 2 then cancelled = d:stop() end
    end })
    assert.is_false(run(5))
    assert.same({ 1, 2 }, got)
    assert.equals(3, cancelled)
    assert.equals(0, d:stop())
    assert.equals(0, d:dispatch())
  end)

  it("stop from a timer makes uv.run() return with nothing delivered", function()
    d = bgluv.start()
    local timer = uv.new_timer()
    -- libuv starts timers from its cached loop time, which is stale when
    -- this runs slowly (valgrind): refresh it so the 30 ms are real.
    uv.update_time()
    timer:start(30, 0, function()
      timer:close()
      d:stop()
    end)
    local t0 = uv.hrtime()
    assert.is_false(run(5))
    assert.is_true((uv.hrtime() - t0) / 1e6 >= 25)
    assert.is_false(core.running())
  end)

  it("stops with items pending, before uv.run(), and cancels them", function()
    d = bgluv.start()
    local before = core.stats()
    join(produce { items = 7, callback = function() error("must not run") end })
    assert.equals(7, d:stop())
    assert.is_false(run(5))
    assert.equals(7, core.stats().cancelled - before.cancelled)
  end)

  it("works with a pipe as well", function()
    d = bgluv.start { kind = "pipe", budget = 5 }
    local count = 0
    produce { producers = 2, items = 500, callback = function()
      count = count + 1
      if count == 1000 then d:stop() end
    end }
    assert.is_false(run(10))
    assert.equals(1000, count)
  end)

  it("bounds the queue with capacity", function()
    d = bgluv.start { capacity = 4 }
    local count = 0
    local job = produce { items = 200, timeout = testutil.FOREVER, callback = function()
      assert(core.pending() <= 4)
      count = count + 1
      if count == 200 then d:stop() end
    end }
    assert.is_false(run(10))
    assert.equals(200, count)
    assert.equals(200, join(job).BGW_OK)
  end)

  it("dispatch drains without the loop", function()
    d = bgluv.start()
    local got = {}
    join(produce { items = 5, callback = function(_, seq) got[#got + 1] = seq end })
    assert.equals(2, d:dispatch(2))
    assert.equals(3, d:dispatch())
    assert.equals(0, d:dispatch())
    assert.same({ 1, 2, 3, 4, 5 }, got)
  end)

  it("starts again after stop, in the same loop", function()
    local got = {}
    for round = 1, 3 do
      d = bgluv.start()
      local t = ticker.start(2, 1, function(v)
        got[#got + 1] = round * 10 + v
        if v == 2 then d:stop() end
      end)
      assert.is_false(run(5))
      t:stop()
    end
    assert.same({ 11, 12, 21, 22, 31, 32 }, got)
  end)

  it("refuses to start while the core runs, and checks its options", function()
    d = bgluv.start()
    assert.error_matches(function() bgluv.start() end, "already started")
    d:stop()
    d = nil
    local function bad(opts, msg)
      assert.error_matches(function() bgluv.start(opts) end,
        "bad argument #1 to 'bgworker.luv.start' %(" .. msg)
      assert.is_false(core.running())
    end
    bad("x", "options table expected, got string")
    bad({ nope = 1 }, "unknown option 'nope'")
    bad({ budget = 0 }, "opts.budget must be a positive integer")
    bad({ budget = 1.5 }, "opts.budget must be a positive integer")
    bad({ capacity = -1 }, "opts.capacity must be a positive integer")
    bad({ errorhandler = 1 }, "opts.errorhandler must be a function")
    bad({ kind = "socket" }, 'opts.kind must be "eventfd" or "pipe"')
    d = bgluv.start()
    assert.error_matches(function() d:dispatch(0) end, "max must be a positive integer")
    assert.error_matches(function() d.stop({}) end, "luv dispatcher expected")
  end)

  it("blames the caller for bad options", function()
    local ok, err = pcall(function() bgluv.start { budget = "x" } end)
    assert.is_false(ok)
    assert.matches("luv_spec.lua:%d+: bad argument", err)
  end)
end)

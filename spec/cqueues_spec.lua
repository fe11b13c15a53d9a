-- bgworker.cqueues: a dispatcher that follows cqueues' polling protocol,
-- inside a real cqueues controller (cqueues.new(), :wrap(), :loop()). The
-- producers are the example ticker (examples/c/ticker.c) and the test
-- utility library (spec/native/testutil.c), both real background threads.
--
-- cqueues must be installed for Lua 5.1 to 5.4: a missing cqueues fails
-- these specs. Under LuaJIT, Debian's cqueues for Lua 5.1 is used (it does
-- not link liblua5.1, so it may share the process with LuaJIT); if it
-- cannot load there, the specs are pending, with the reason.

local core = require "bgworker.core"
local support = require "support"
local ticker = require "bgworker_ticker"

local cqueues, bgcq = support.require_native("cqueues", "bgworker.cqueues")
local produce, join, collector = support.produce, support.join, support.collector

local d -- the dispatcher of the current test

-- Run the controller until all its coroutines ended, at most `seconds`.
-- Fails on a controller error; stops the dispatcher and fails on timeout.
local function run(cq, seconds)
  local deadline = cqueues.monotime() + (seconds or 5)
  while not cq:empty() do
    local left = deadline - cqueues.monotime()
    if left <= 0 then
      if d then d:stop() end
      cq:loop(1)
      error("the controller did not finish in time", 2)
    end
    local ok, err = cq:loop(left)
    assert(ok, err)
  end
end

describe("bgworker.cqueues", function()
  if not cqueues then
    it("needs cqueues", function()
      pending("cqueues cannot be loaded under LuaJIT here: " .. tostring(bgcq))
    end)
    return
  end

  setup(support.stop_core)

  after_each(function()
    support.finish(d)
    d = nil
  end)

  it("runs ticker callbacks in d:loop(), which returns after stop", function()
    local cq = cqueues.new()
    d = bgcq.start()
    assert.equals(core.fd(), d.fd)
    assert.equals(d.fd, d:pollfd())
    assert.equals("r", d:events())
    assert.is_nil(d:timeout())
    local got, total = {}, nil
    local t = ticker.start(5, 2, function(v)
      got[#got + 1] = v
      if v == 5 then d:stop() end
    end)
    cq:wrap(function() total = d:loop() end)
    run(cq)
    t:stop()
    assert.same({ 1, 2, 3, 4, 5 }, got)
    assert.equals(5, total)
    assert.is_false(core.running())
    assert.is_nil(d:pollfd())
    assert.equals(0, d:timeout())
  end)

  it("runs many items from several threads, each once and in order per thread", function()
    local cq = cqueues.new()
    local errors, handler = collector()
    d = bgcq.start { errorhandler = handler }
    local callback, seen = support.in_order(3, function(count)
      if count == 9000 then d:stop() end
    end)
    produce { producers = 3, items = 3000, callback = callback }
    cq:wrap(function() d:loop() end)
    run(cq, 10)
    assert.same({}, errors)
    assert.equals(9000, seen.count)
    assert.same({ 3000, 3000, 3000 }, seen.last)
  end)

  it("is pollable by hand: cqueues.poll(d), then d:dispatch()", function()
    local cq = cqueues.new()
    d = bgcq.start()
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

  it("sends callback errors and decode errors to the errorhandler, and goes on", function()
    local cq = cqueues.new()
    local errors, handler = collector()
    d = bgcq.start { errorhandler = handler }
    local got = {}
    local t = ticker.start(4, 1, function(v)
      got[#got + 1] = v
      if v == 2 then error("callback failed at 2") end
      if v == 3 then error({ code = 3 }) end
      if v == 4 then d:stop() end
    end)
    cq:wrap(function() d:loop() end)
    run(cq)
    t:stop()
    assert.same({ 1, 2, 3, 4 }, got)
    assert.equals(2, #errors)
    assert.matches("callback failed at 2", errors[1].err)
    assert.matches("stack traceback", errors[1].tb)
    assert.same({ code = 3 }, errors[2].err)

    errors = {}
    d = bgcq.start { errorhandler = function(err, tb)
      errors[#errors + 1] = { err = err, tb = tb }
      if #errors == 3 then d:stop() end
    end }
    join(produce { items = 3, decode = "raise" })
    cq:wrap(function() d:loop() end)
    run(cq)
    assert.equals(3, #errors)
    assert.matches("testutil decode raised", tostring(errors[1].err))
  end)

  it("writes errors to stderr by default", function()
    local ok, err, text = support.capture_stderr(function()
      local cq = cqueues.new()
      d = bgcq.start()
      join(produce { items = 1, callback = function() error("to stderr") end })
      cq:wrap(function()
        d:dispatch()
        d:stop()
      end)
      run(cq)
    end)
    assert(ok, err)
    assert.matches("bgworker: [^\n]*to stderr", text)
    assert.matches("stack traceback", text)
  end)

  it("lets the other coroutines run after each budget", function()
    local cq = cqueues.new()
    local before = core.stats()
    d = bgcq.start { budget = 3 }
    local turns, at = 0, {}
    join(produce { items = 10, callback = function(_, seq)
      at[seq] = turns
    end })
    cq:wrap(function() d:loop() end)
    cq:wrap(function()
      while #at < 10 do
        turns = turns + 1
        cqueues.sleep(0)
      end
      d:stop()
    end)
    run(cq)
    -- Batches of 3, 3, 3, 1, the other coroutine's turn between each.
    local f = at[1]
    assert.same({ f, f, f, f + 1, f + 1, f + 1, f + 2, f + 2, f + 2, f + 3 }, at)
    assert.equals(1, core.stats().empty_polls - before.empty_polls)
  end)

  it("lets callbacks yield to the controller on every Lua version", function()
    local cq = cqueues.new()
    d = bgcq.start()
    local log = {}
    join(produce { items = 2, callback = function(_, seq)
      log[#log + 1] = "start " .. seq
      cqueues.sleep(0.1)
      log[#log + 1] = "end " .. seq
      if seq == 2 then d:stop() end
    end })
    cq:wrap(function() d:loop() end)
    cq:wrap(function()
      -- Runs while the first callback sleeps.
      while #log == 0 do cqueues.sleep(0) end
      log[#log + 1] = "other"
    end)
    run(cq)
    assert.same({ "start 1", "other", "end 1", "start 2", "end 2" }, log)
  end)

  it("stop from another coroutine ends d:loop() with nothing delivered", function()
    local cq = cqueues.new()
    d = bgcq.start()
    local returned = false
    cq:wrap(function()
      d:loop()
      returned = true
    end)
    cq:wrap(function()
      cqueues.sleep(0.03)
      d:stop()
    end)
    local t0 = cqueues.monotime()
    run(cq)
    assert.is_true(returned)
    assert.is_true(cqueues.monotime() - t0 >= 0.025)
    assert.is_false(core.running())
  end)

  it("stop inside a callback ends the batch and cancels the rest", function()
    local cq = cqueues.new()
    d = bgcq.start()
    local got, cancelled = {}, nil
    join(produce { items = 5, callback = function(_, seq)
      got[#got + 1] = seq
      if seq == 2 then cancelled = d:stop() end
    end })
    cq:wrap(function() d:loop() end)
    run(cq)
    assert.same({ 1, 2 }, got)
    assert.equals(3, cancelled)
    assert.equals(0, d:stop())
    assert.equals(0, d:dispatch())
  end)

  it("works with a pipe and a bounded queue", function()
    local cq = cqueues.new()
    d = bgcq.start { kind = "pipe", capacity = 4, budget = 5 }
    local count = 0
    local job = produce { producers = 2, items = 300, callback = function()
      assert(core.pending() <= 4)
      count = count + 1
      if count == 600 then d:stop() end
    end }
    cq:wrap(function() d:loop() end)
    run(cq, 10)
    assert.equals(600, count)
    assert.equals(600, join(job).BGW_OK)
  end)

  it("starts again after stop, in the same controller", function()
    local cq = cqueues.new()
    local got = {}
    cq:wrap(function()
      for round = 1, 3 do
        d = bgcq.start()
        local t = ticker.start(2, 1, function(v)
          got[#got + 1] = round * 10 + v
          if v == 2 then d:stop() end
        end)
        d:loop()
        t:stop()
      end
    end)
    run(cq)
    assert.same({ 11, 12, 21, 22, 31, 32 }, got)
  end)

  it("refuses to start while the core runs, and checks its options", function()
    d = bgcq.start()
    assert.error_matches(function() bgcq.start() end, "already started")
    d:stop()
    d = nil
    local function bad(opts, msg)
      assert.error_matches(function() bgcq.start(opts) end,
        "bad argument #1 to 'bgworker.cqueues.start' %(" .. msg)
      assert.is_false(core.running())
    end
    bad(true, "options table expected, got boolean")
    bad({ spawn = true }, "unknown option 'spawn'")
    bad({ budget = -3 }, "opts.budget must be a positive integer")
    bad({ capacity = 0 }, "opts.capacity must be a positive integer")
    bad({ errorhandler = "f" }, "opts.errorhandler must be a function")
    bad({ kind = 3 }, 'opts.kind must be "eventfd" or "pipe"')
    d = bgcq.start()
    assert.error_matches(function() d:dispatch(1.5) end, "max must be a positive integer")
    assert.error_matches(function() d.loop(nil) end, "cqueues dispatcher expected")
  end)
end)

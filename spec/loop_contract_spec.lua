-- The loop contract: what every dispatcher promises, whatever its event
-- loop, run against each loop through its driver (spec/loops.lua): a
-- socket.select loop woken by UDP and by an eventfd, Copas (1.2 from Debian
-- on 5.1/LuaJIT, 4.x from the rocks server), luv and cqueues, each in a
-- real loop. The producers are real background threads: the example ticker
-- (examples/c/ticker.c) and the test utility library (spec/native/testutil.c).
-- What only one loop does is in that loop's own spec.

local await = require "bgworker.await"
local bgworker = require "bgworker"
local core = require "bgworker.core"
local loops = require "loops"
local support = require "support"
local testutil = require "bgworker_testutil"
local ticker = require "bgworker_ticker"

local produce, join, collector = support.produce, support.join, support.collector

-- A pool job that sends progress 1..n as fast as its worker can, and
-- returns n.
local function flood(n)
  local progress = require("bgworker.worker").progress
  for i = 1, n do progress(i) end
  return n
end

-- The longest time between two of `stamps` (ascending).
local function longest_gap(stamps)
  local worst = 0
  for i = 2, #stamps do
    worst = math.max(worst, stamps[i] - stamps[i - 1])
  end
  return worst
end

describe("every loop's dispatcher", function()
  setup(support.stop_core)

  loops.each(function(loop)
    local d -- the dispatcher of the current test

    local function new(opts)
      d = loop.new(opts)
      return d
    end

    after_each(function()
      support.finish(d)
      d = nil
      loop.finish()
    end)

    it("runs ticker callbacks in the loop, which lets go after stop", function()
      new()
      assert.is_true(core.running())
      local got = {}
      local t = ticker.start(5, 2, function(v)
        got[#got + 1] = v
        if v == 5 then d:stop() end
      end)
      assert.is_false(loop.run(5), "the loop did not end after stop")
      t:stop()
      assert.same({ 1, 2, 3, 4, 5 }, got)
      assert.is_false(core.running())
    end)

    it("runs many items from several threads, each once and in order per thread", function()
      local errors, handler = collector()
      new { errorhandler = handler }
      local callback, seen = support.in_order(3, function(count)
        if count == 9000 then d:stop() end
      end)
      produce { producers = 3, items = 3000, callback = callback }
      assert.is_false(loop.run(10))
      assert.same({}, errors)
      assert.equals(9000, seen.count)
      assert.same({ 3000, 3000, 3000 }, seen.last)
    end)

    it("wakes up again after the queue ran dry", function()
      new()
      local got = {}
      local function round(r)
        local job
        job = produce { items = 4, callback = function(_, seq)
          got[#got + 1] = r * 10 + seq
          if seq == 4 then
            join(job)
            if r == 3 then
              d:stop()
            else
              loop.after(0.02, function() round(r + 1) end)
            end
          end
        end }
      end
      local before = core.stats()
      round(1)
      assert.is_false(loop.run(5))
      assert.same({ 11, 12, 13, 14, 21, 22, 23, 24, 31, 32, 33, 34 }, got)
      local after = core.stats()
      assert.equals(12, after.polled - before.polled)
      -- Rounds 1 and 2 ended with an empty poll, which lowers the flag.
      assert.is_true(after.empty_polls - before.empty_polls >= 2)
    end)

    it("sends callback and decode errors to the errorhandler, and goes on", function()
      local errors, handler = collector()
      new { errorhandler = handler }
      local got = {}
      local t = ticker.start(4, 1, function(v)
        got[#got + 1] = v
        if v == 2 then error("callback failed at 2") end
        if v == 3 then error({ code = 3 }) end
        if v == 4 then d:stop() end
      end)
      assert.is_false(loop.run(5))
      t:stop()
      assert.same({ 1, 2, 3, 4 }, got)
      assert.equals(2, #errors)
      assert.matches("callback failed at 2", errors[1].err)
      assert.matches("callback failed at 2", errors[1].tb)
      assert.matches("stack traceback", errors[1].tb)
      -- The error value itself, and a traceback that is a string.
      assert.same({ code = 3 }, errors[2].err)
      assert.is_string(errors[2].tb)
      assert.matches("stack traceback", errors[2].tb)

      errors = {}
      new { errorhandler = function(err, tb)
        errors[#errors + 1] = { err = err, tb = tb }
        if #errors == 3 then d:stop() end
      end }
      join(produce { items = 3, decode = "raise" })
      assert.is_false(loop.run(5))
      assert.equals(3, #errors)
      assert.matches("testutil decode raised", tostring(errors[1].err))
      support.assert_all_freed()
    end)

    it("writes errors to stderr by default, also when the errorhandler raises", function()
      local ok, err, text = support.capture_stderr(function()
        new()
        join(produce { items = 1, callback = function()
          d:stop()
          error("to stderr")
        end })
        assert(not loop.run(5), "timed out")

        new { errorhandler = function() error("handler broke") end }
        join(produce { items = 1, callback = function()
          d:stop()
          error("original")
        end })
        assert(not loop.run(5), "timed out")
      end)
      assert(ok, err)
      assert.matches("bgworker: [^\n]*to stderr", text)
      assert.matches("stack traceback", text)
      assert.matches("error in errorhandler: [^\n]*handler broke", text)
      assert.matches("original", text)
    end)

    it("handles at most budget items per turn, and lets the loop's other work run between", function()
      new { budget = 3 }
      local before = core.stats()
      local at = {}
      join(produce { items = 10, callback = function(_, seq)
        at[seq] = loop.turns()
        if seq == 10 then
          -- Stop after the drain, which then ends with an empty poll.
          loop.after(0.01, function() d:stop() end)
        end
      end })
      assert.is_false(loop.run(5))
      local f = at[1]
      for batch = 0, 3 do
        local first = at[batch * 3 + 1]
        for i = batch * 3 + 1, math.min(batch * 3 + 3, 10) do
          assert.equals(first, at[i], "item " .. i .. " is not in the batch of item " .. (batch * 3 + 1))
        end
        if batch > 0 then
          if loop.exact_turns then
            assert.equals(f + batch, first, "batch " .. batch .. " not on the next turn")
          else
            assert.is_true(first > at[batch * 3], "no turn between batches " .. batch .. " and " .. batch + 1)
          end
        end
      end
      -- Only the last batch found the queue empty.
      assert.equals(1, core.stats().empty_polls - before.empty_polls)
    end)

    it("stops inside a callback: the batch ends and the rest is cancelled", function()
      new()
      local got, cancelled = {}, nil
      join(produce { items = 5, callback = function(_, seq)
        got[#got + 1] = seq
        if seq == 2 then cancelled = d:stop() end
      end })
      assert.is_false(loop.run(5))
      assert.same({ 1, 2 }, got)
      assert.equals(3, cancelled)
      assert.equals(0, d:stop())
      support.assert_all_freed()
    end)

    it("stops from the loop with nothing delivered, and the loop lets go", function()
      new()
      loop.after(0.03, function() d:stop() end)
      local t0 = core.now()
      assert.is_false(loop.run(5))
      assert.is_true(core.now() - t0 >= 0.025)
      assert.is_false(core.running())
    end)

    it("stops with items pending before the loop ran, and cancels them", function()
      new()
      local before = core.stats()
      join(produce { items = 7, callback = function() error("must not run") end })
      assert.equals(7, d:stop())
      assert.is_false(loop.run(5))
      assert.equals(7, core.stats().cancelled - before.cancelled)
      support.assert_all_freed()
    end)

    it("bounds the queue with capacity", function()
      new { capacity = 4, budget = 5 }
      local count = 0
      local job = produce { producers = 2, items = 150, timeout = testutil.FOREVER, callback = function()
        assert(core.pending() <= 4)
        count = count + 1
        if count == 300 then d:stop() end
      end }
      assert.is_false(loop.run(10))
      assert.equals(300, count)
      assert.equals(300, join(job).BGW_OK)
    end)

    it("starts again after stop", function()
      local got = {}
      for round = 1, 3 do
        new()
        local t = ticker.start(2, 1, function(v)
          got[#got + 1] = round * 10 + v
          if v == 2 then d:stop() end
        end)
        assert.is_false(loop.run(5))
        t:stop()
      end
      assert.same({ 11, 12, 21, 22, 31, 32 }, got)
    end)

    it("counts what it did in d:stats()", function()
      local _, handler = collector()
      new { errorhandler = handler }
      local s = d:stats()
      assert.equals(loop.name, s.loop)
      assert.is_true(s.running)
      assert.same({ 0, 0, 0, 0 }, { s.delivered, s.dispatched, s.errors, s.pending })
      local n = 0
      join(produce { items = 10, callback = function()
        n = n + 1
        if n == 3 then error("third") end
        if n == 10 then loop.after(0.01, function() d:stop() end) end
      end })
      assert.equals(10, d:stats().pending)
      assert.equals(10, d:stats().delivered)
      assert.is_false(loop.run(5))
      s = d:stats()
      assert.is_false(s.running)
      assert.equals(10, s.delivered)
      assert.equals(10, s.dispatched)
      assert.equals(1, s.errors)
      assert.equals(0, s.pending)
      assert.is_number(s.lag_last)
      assert.is_true(s.lag_max >= s.lag_last and s.lag_last >= 0)
    end)

    it("refuses a second dispatcher, of any loop, while it runs", function()
      new()
      for _, other in ipairs { "select", loop.name } do
        local ok, err = pcall(function() local _ = bgworker.new { loop = other } end)
        assert.is_false(ok)
        assert.matches("loop_contract_spec.lua:%d+: bgworker.new: a dispatcher is already running in" ..
          ' this Lua state %(loop "' .. loop.name .. '"%); stop it first', err)
      end
      d:stop()
      core.start_fd()
      local ok, err = pcall(loop.new)
      assert.is_false(ok)
      assert.matches("bgworker.core is already started in this Lua state; stop it first", err, 1, true)
      core.stop()
    end)

    it("blames the caller's line for bad options", function()
      local function bad(opts, msg)
        opts.loop = loop.name
        local ok, err = pcall(function() local _ = bgworker.new(opts) end)
        assert.is_false(ok)
        assert.matches("^[^:]*loop_contract_spec.lua:%d+: bad argument #1 to 'bgworker.new' %(", err)
        assert.matches(msg, err, 1, true)
        assert.is_false(core.running())
      end
      bad({ nope = 1 }, "unknown option 'nope'")
      bad({ budget = 0 }, "opts.budget must be a positive integer, got 0")
      bad({ budget = 1.5 }, "opts.budget must be a positive integer, got 1.5")
      bad({ capacity = -1 }, "opts.capacity must be an integer in 1..2147483647, got -1")
      bad({ capacity = 2 ^ 31 }, "opts.capacity must be an integer in 1..2147483647, got " .. tostring(2 ^ 31))
      bad({ errorhandler = 1 }, "opts.errorhandler must be a function, got 1")
      local ok, err = pcall(bgworker.new, { loop = "gtk" })
      assert.is_false(ok)
      assert.matches('opts.loop must be one of "select", "copas", "luv", "cqueues", "ngx", got "gtk"',
        err, 1, true)
      new()
      ok, err = pcall(d.stop, {})
      assert.is_false(ok)
      assert.matches("calling 'stop' on bad self (dispatcher expected, got table", err, 1, true)
    end)

    describe("waiting", function()
      it("suspends a coroutine of the loop until the callback, and returns its values", function()
        new()
        local got
        loop.go(function()
          got = { await(function(callback)
            return ticker.start(1, 5, function(v) callback(v, nil, "x") end)
          end) }
          d:stop()
        end)
        assert.is_false(loop.run(5))
        assert.same({ true, 1, nil, "x" }, got)
      end)

      it("times out when nothing comes, and resumes the coroutine then", function()
        new()
        local got, waited
        loop.go(function()
          local t0 = core.now()
          got = { await(function() return "started" end, 0.05) }
          waited = core.now() - t0
          d:stop()
        end)
        assert.is_false(loop.run(5))
        assert.same({ nil, "timeout", "started" }, got)
        assert.is_true(waited >= 0.045, "waited only " .. waited)
      end)

      it("serves many waiting coroutines at once, each with its own values", function()
        new()
        local got, done = {}, 0
        for i = 1, 20 do
          loop.go(function()
            local _, v = await(function(callback)
              return ticker.start(1, 1 + i % 5, function() callback(i * 10) end)
            end, 5)
            got[i] = v
            done = done + 1
            if done == 20 then d:stop() end
          end)
        end
        assert.is_false(loop.run(5))
        for i = 1, 20 do assert.equals(i * 10, got[i]) end
      end)

      it("waits for a pool job with get, and gives up at get's timeout", function()
        new()
        local p = require("bgworker.pool").new { threads = 2 }
        local got, timed_out
        loop.go(function()
          local slow = p:submit(function() require("socket").sleep(5) end)
          local job = p:submit(function(x) return x * 2 end, 21)
          got = { job:get(5) }
          timed_out = { slow:get(0.05) }
          slow:cancel()
          d:stop()
        end)
        assert.is_false(loop.run(5))
        p:close(0)
        assert.same({ true, 42 }, got)
        assert.same({ nil, "timeout" }, timed_out)
      end)

      it("ends a wait with \"stopped\" when the dispatcher stops", function()
        new()
        local got
        loop.go(function()
          got = { await(function() end) }
        end)
        loop.after(0.02, function() d:stop() end)
        assert.is_false(loop.run(5))
        assert.same({ nil, "stopped" }, got)
      end)
    end)

    describe("with callbacks that wait", function()
      -- Every callback may wait: it is suspended on its own, and the
      -- dispatcher goes on with the other items and the other outcomes of
      -- the same batch (bgworker.runner).
      local pool = require "bgworker.pool"

      it("lets a job's callback wait for the next job, with and without a timeout", function()
        new()
        local p = pool.new { threads = 1 }
        local got
        p:submit(function() return 1 end):on_done(function(_, v)
          local a = { p:submit(function(x) return x + 1 end, v):get() }
          local b = { p:submit(function(x) return x + 1 end, a[2]):get(5) }
          local slow = p:submit(function() require("socket").sleep(5) end)
          local c = { slow:get(0.05) }
          slow:cancel()
          got = { a, b, c }
          d:stop()
        end)
        assert.is_false(loop.run(5), "a callback's wait deadlocked its dispatcher")
        p:close(0)
        assert.same({ { true, 2 }, { true, 3 }, { nil, "timeout" } }, got)
      end)

      it("runs waits nested three deep, each resumed when its job ends", function()
        new()
        local p = pool.new { threads = 2 }
        local log = {}
        local function step(depth)
          p:submit(function(x) return x end, depth):on_done(function(_, v)
            log[#log + 1] = "in " .. v
            if v < 3 then step(v + 1) end
            local _, w = p:submit(function(x) return x * 10 end, v):get(5)
            log[#log + 1] = "out " .. w
            if #log == 6 then d:stop() end
          end)
        end
        step(1)
        assert.is_false(loop.run(5))
        p:close(0)
        table.sort(log)
        assert.same({ "in 1", "in 2", "in 3", "out 10", "out 20", "out 30" }, log)
      end)

      it("lets waiting callbacks overlap: none holds back the others", function()
        new()
        local p = pool.new { threads = 4 }
        local log, ended = {}, 0
        for i = 1, 8 do
          p:submit(function(x) return x end, i):on_done(function(_, v)
            log[#log + 1] = "start"
            p:submit(function() require("socket").sleep(0.05) end):get(5)
            log[#log + 1] = "end " .. v
            ended = ended + 1
            if ended == 8 then d:stop() end
          end)
        end
        assert.is_false(loop.run(5))
        p:close(0)
        -- Every callback began before any wait ended.
        for i = 1, 8 do assert.equals("start", log[i]) end
        assert.equals(8, d:stats().suspended)
      end)

      it("lets a progress handler wait, and loses no progress", function()
        new()
        local p = pool.new { threads = 2 }
        local seen, outcome = {}, nil
        local job = p:submit(function()
          local progress = require("bgworker.worker").progress
          for i = 1, 3 do progress(i) end
          return "end"
        end)
        job:on_progress(function(i)
          local _, twice = p:submit(function(x) return 2 * x end, i):get(5)
          seen[#seen + 1] = twice
          if #seen == 3 and outcome then d:stop() end
        end)
        job:on_done(function(ok, v)
          outcome = { ok, v }
          if #seen == 3 then d:stop() end
        end)
        assert.is_false(loop.run(5))
        p:close(0)
        table.sort(seen)
        assert.same({ 2, 4, 6 }, seen)
        assert.same({ true, "end" }, outcome)
      end)

      it("reports an error raised after a wait to the error handler, with its traceback", function()
        local errors, handler = collector()
        new { errorhandler = handler }
        local p = pool.new { threads = 1 }
        p:submit(function() return 1 end):on_done(function()
          p:submit(function() return 2 end):get(5)
          loop.after(0, function() d:stop() end)
          error("after the wait")
        end)
        assert.is_false(loop.run(5))
        p:close(0)
        assert.equals(1, #errors)
        assert.matches("after the wait", errors[1].err)
        assert.matches("stack traceback", errors[1].tb)
      end)

      it("lets a coroutine that a callback resumes itself wait where the dispatcher resumes it," ..
        " and raises where it cannot", function()
        new()
        local p = pool.new { threads = 1 }
        local got, raised
        p:submit(function() return 1 end):on_done(function()
          local ok, err = pcall(coroutine.wrap(function()
            got = { p:submit(function() return 2 end):get(5) }
            d:stop()
          end))
          if not ok then
            raised = err
            d:stop()
          end
        end)
        assert.is_false(loop.run(5))
        p:close(0)
        if loop.resumes_plain then
          assert.same({ true, 2 }, got)
        else
          -- Never another scheduler's values as results: an error instead.
          assert.is_nil(got)
          assert.matches("get: this coroutine is [^\n]*own", raised)
        end
      end)

      it("lets a callback wait in a coroutine of its own, where the loop can resume it", function()
        new()
        local p = pool.new { threads = 1 }
        local got
        p:submit(function() return 1 end):on_done(function()
          loop.go(function()
            got = { p:submit(function() return 2 end):get(5) }
            d:stop()
          end)
        end)
        assert.is_false(loop.run(5))
        p:close(0)
        assert.same({ true, 2 }, got)
      end)
    end)

    describe("with callbacks that take time", function()
      -- A pool's carrier item holds up to 32 events: counting items alone,
      -- one drain ran thousands of handlers. Every progress handler counts
      -- in the budget, and a drain ends after a slice of a few milliseconds.
      local pool = require "bgworker.pool"
      local socket = require "socket"
      -- Events a carrier holds at most: Copas 1.x runs each carrier in a
      -- thread of its own, outside any slice, so they may all run at once.
      local CARRIER = 32

      it("keeps get's timeout and the loop's other work on time while a job floods a slow" ..
        " progress handler, and loses nothing", function()
        new()
        local p = pool.new { threads = 1 }
        local n = support.size(1500, 300)
        local seen, outcome = {}, nil
        local counts, flooding = {}, true
        local function tick()
          counts[#counts + 1] = #seen
          if flooding then loop.after(0.01, tick) end
        end
        tick()
        local first, waited, last
        -- Handlers begun after get's timeout was due, until it returned.
        local due, late = math.huge, 0
        loop.go(function()
          local job = p:submit(flood, n):on_done(function(...) outcome = { #seen, ... } end)
          job:on_progress(function(i)
            seen[#seen + 1] = i
            if core.now() > due then late = late + 1 end
            socket.sleep(0.001)
          end)
          local t0 = core.now()
          due = t0 + 0.2
          first = { job:get(0.2) }
          waited = core.now() - t0
          due = math.huge
          last = { job:get() }
          flooding = false
          d:stop()
        end)
        assert.is_false(loop.run(60))
        p:close(0)
        -- About 1.5 s of handlers, which one drain used to run at once.
        -- Its lateness counted in handlers, not in seconds, which a busy
        -- machine stretches: those of 1 ms that fit in a slice, or two
        -- where the loop runs another drain before the waiter resumes, and
        -- a carrier.
        assert.is_true(waited >= 0.195, ("get(0.2) returned after %.3f s"):format(waited))
        assert.is_true(late <= 2 * (bgworker.SLICE / 0.001 + 1) + CARRIER,
          ("%d handlers began after get's timeout was due"):format(late))
        -- Counted in handlers, not seconds, which a busy machine stretches:
        -- between two turns of the timer, the handlers of 1 ms that fit in
        -- its 10 ms and a slice, twice over for cqueues, whose timers wait
        -- for a second drain, and a carrier; not the 1.5 s of them one
        -- drain used to run.
        local most = longest_gap(counts)
        assert.is_true(most <= 2 * (0.01 + bgworker.SLICE) / 0.001 + 1 + CARRIER,
          ("%d handlers ran between two turns of the loop's timer"):format(most))
        assert.same({ nil, "timeout" }, first)
        -- Every event once, in order, and the outcome after them.
        assert.same({ true, n }, last)
        assert.same({ n, true, n }, outcome)
        assert.equals(n, #seen)
        for i = 1, n do
          if seen[i] ~= i then assert.equals(i, seen[i], "progress out of order") end
        end
      end)

      it("keeps the loop's other work on time when its handlers turn much slower", function()
        -- A busy machine can make a handler of 0.3 ms take tens: a slice
        -- that began at the pace before, room for 16 of them in its 5 ms,
        -- reads the clock after each slow one all the same, so it overruns
        -- by one of them.
        new()
        local p = pool.new { threads = 1 }
        local counts, flooding, slow_left, slow_seen = {}, true, 0, 0
        local function tick()
          counts[#counts + 1] = slow_seen
          -- Between two drains, so that the next slice begins with slow ones.
          if #counts == 5 then slow_left = 20 end
          if flooding then loop.after(0.01, tick) end
        end
        tick()
        local n, seen, slow = 300, 0, 0.03
        loop.go(function()
          local job = p:submit(flood, n)
          job:on_progress(function()
            seen = seen + 1
            if slow_left > 0 then
              slow_left = slow_left - 1
              slow_seen = slow_seen + 1
              socket.sleep(slow)
            else
              socket.sleep(0.0003)
            end
          end)
          assert.same({ true, n }, { job:get() })
          flooding = false
          d:stop()
        end)
        assert.is_false(loop.run(60))
        p:close(0)
        assert.equals(n, seen)
        assert.equals(0, slow_left)
        -- Counted in handlers, as above: one slow handler per slice (up to
        -- three for cqueues), not the 16 the pace before had room for.
        local most = longest_gap(counts)
        assert.is_true(most <= 3, ("%d slow handlers ran between two turns of the loop's timer"):format(most))
      end)

      it("counts every event of a job as a callback of the budget", function()
        new { budget = 10 }
        -- Drains counted where every loop calls them.
        local drains, drain = 0, d.drain
        function d.drain(...)
          drains = drains + 1
          return drain(...)
        end
        local p = pool.new { threads = 1 }
        local seen = {}
        loop.go(function()
          local job = p:submit(flood, 200)
          job:on_progress(function(i) seen[i] = drains end)
          job:get()
          d:stop()
        end)
        assert.is_false(loop.run(10))
        p:close(0)
        assert.equals(200, #seen)
        local handlers = {}
        for i = 1, 200 do
          handlers[seen[i]] = (handlers[seen[i]] or 0) + 1
        end
        for at, count in pairs(handlers) do
          assert.is_true(count <= 10, count .. " handlers in drain " .. at)
        end
      end)
    end)

    if loop.sleep then
      it("lets callbacks yield to the loop, each suspended on its own, on every Lua version", function()
        new()
        local log = {}
        join(produce { items = 2, callback = function(_, seq)
          log[#log + 1] = "start " .. seq
          loop.sleep(0.05 * seq)
          log[#log + 1] = "end " .. seq
          if seq == 2 then d:stop() end
        end })
        loop.go(function()
          -- Runs while the first callback sleeps.
          while #log == 0 do loop.sleep(0.001) end
          log[#log + 1] = "other"
        end)
        assert.is_false(loop.run(5))
        -- The second callback runs while the first sleeps: neither holds
        -- the other back, nor the loop's other work.
        assert.same({ "start 1", "start 2", "other", "end 1", "end 2" }, log)
      end)
    end
  end)
end)

-- The loop adapter interface (bgworker.adapter): each loop of LOOPS
-- supplies the fields of FIELDS, or keeps the base's defaults.
describe("every loop's adapter", function()
  local adapter = require "bgworker.adapter"
  local dispatcher = require "bgworker.dispatcher"

  -- The class of loop `name` from its module, loaded here, or nil and why
  -- not (luv and cqueues under LuaJIT). bgworker.ngx loads against a
  -- stand-in for the few ngx functions it looks up at load.
  local function loop_class(name)
    if name ~= "ngx" then
      local ok, module = pcall(require, "bgworker." .. name)
      if not ok then
        return nil, module
      end
      return module.class
    end
    local saved_ngx, saved = rawget(_G, "ngx"), {}
    for _, m in ipairs { "bgworker.ngx", "ngx.semaphore" } do saved[m] = package.loaded[m] end
    rawset(_G, "ngx", { worker = {}, timer = {}, thread = {} })
    package.loaded["ngx.semaphore"] = {}
    package.loaded["bgworker.ngx"] = nil
    local ok, module = pcall(require, "bgworker.ngx")
    rawset(_G, "ngx", saved_ngx)
    for m, v in pairs(saved) do package.loaded[m] = v end
    assert(ok, module)
    return module.class
  end

  for _, name in ipairs(adapter.LOOPS) do
    it(name .. " supplies every field of the interface", function()
      local class, why = loop_class(name)
      if not class then
        assert(rawget(_G, "jit"), why)
        return pending(name .. " cannot be loaded under LuaJIT here: " .. tostring(why))
      end
      assert.is_nil(adapter.check(class, name))
      for field, required in pairs(adapter.FIELDS) do
        assert.is_function(class[field], field)
        if required then
          assert.is_function(rawget(class, field), name .. " must supply " .. field)
        end
      end
    end)
  end

  it("is refused without a required field, or when not made by class()", function()
    local class = dispatcher.class("test", {})
    class.suspender = function() end
    assert.equals('loop "test": its adapter has no function start', adapter.check(class, "test"))
    class.start = function() return true end
    assert.is_nil(adapter.check(class, "test"))
    class.timer = 1
    assert.equals('loop "test": its adapter has no function timer', adapter.check(class, "test"))
    assert.matches("not a class made by class", adapter.check({}, "test"))
    assert.matches("not a class made by class", adapter.check(class, "other"))
  end)
end)

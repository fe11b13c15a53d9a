-- bgworker.core against its promises (docs/core.md, include/bgworker.h),
-- driven by two utility libraries written against bgworker.h only:
-- bgworker_testutil (spec/native/testutil.c: counting producers, round trips,
-- throw-away Lua states) and the example bgworker_ticker (examples/c/ticker.c).
-- Every wait goes through the real wake path: a UDP socket on 127.0.0.1
-- connected to core.sender(), waited on with socket.select.

local core = require "bgworker.core"
local socket = require "socket"
local support = require "support"
local testutil = require "bgworker_testutil"
local ticker = require "bgworker_ticker"

local produce, call, join, codes = support.produce, support.call, support.join, support.codes
local dispatch, drain, stats_delta = support.dispatch, support.drain, support.stats_delta
local assert_all_freed = support.assert_all_freed

local reader -- the Lua side's socket of the current test

-- Start the core on a new reader socket, connected to the core's sender.
local function start(opts)
  if reader then reader:close() end
  reader = support.start_core(opts)
end

-- Wait up to `timeout` seconds for a wake datagram, then read every datagram
-- waiting. True if one came.
local function wait_wake(timeout)
  if not support.readable(reader, timeout) then return false end
  support.discard(reader)
  return true
end

-- Wake, read, drain, until `done()` or no wake-up came for `stall` seconds.
local function pump_until(done, stall)
  while not done() do
    if not wait_wake(stall or 5) then return false end
    drain()
  end
  return true
end

local function eventually(cond)
  return support.eventually(cond, 5)
end

local function counters() return testutil.counters() end

local function assert_error_matches(pattern, f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error matching " .. pattern)
  assert.matches(pattern, tostring(err))
  return err
end

-- Code run first in a fresh state (support.fresh_state): the core's modules
-- and a port of its own; its `eventually` gives up after 5 s.
local function fresh_state(code)
  return support.fresh_state(code, 5)
end

describe("bgworker.core", function()
  before_each(support.reset)

  after_each(function()
    core.stop()
    support.join_all()
    if reader then
      reader:close()
      reader = nil
    end
  end)

  teardown(function()
    testutil.reset()
  end)

  describe("basics", function()
    it("is idle before start", function()
      assert.is_false(core.running())
      assert.is_nil(core.sender())
      assert.equal(0, core.pending())
      assert.equal(0, select("#", core.poll()))
      assert_error_matches("not started", core.wake)
    end)

    it("starts, sends from 127.0.0.1, and stops", function()
      start()
      assert.is_true(core.running())
      local host, port = core.sender()
      assert.equal("127.0.0.1", host)
      assert.is_true(port >= 1 and port <= 65535 and port % 1 == 0)
      assert.equal(0, core.stop())
      assert.is_false(core.running())
      assert.is_nil(core.sender())
      assert.equal(0, core.stop(), "stopping a stopped instance")
    end)

    it("wake sends one datagram from the sender", function()
      start()
      local before = core.stats()
      core.wake()
      assert.is_true(wait_wake(5))
      assert.equal(1, stats_delta(before).wakeups)
      assert.is_false(wait_wake(0.05), "a second datagram")
    end)

    it("starts again after stop", function()
      start()
      core.stop()
      start()
      assert.is_true(core.running())
      local got = 0
      join(produce { items = 3, callback = function() got = got + 1 end })
      assert.is_true(pump_until(function() return got == 3 end))
      assert_all_freed()
    end)

    it("refuses to start twice", function()
      start()
      local port = select(2, reader:getsockname())
      assert_error_matches("already", core.start, port)
      assert.is_true(core.running())
    end)

    it("rejects bad ports and options, naming the argument", function()
      local port = 9 -- valid, for the opts checks
      for _, bad in ipairs { 0, 65536, 1.5, -1, "x", true } do
        assert_error_matches("port", core.start, bad)
      end
      assert_error_matches("port", core.start)
      assert_error_matches("port", core.start, nil, {})
      assert_error_matches("opts", core.start, port, 5)
      assert_error_matches("opts", core.start, port, "x")
      for _, bad in ipairs { 0, -1, 1.5, "x", true } do
        assert_error_matches("capacity", core.start, port, { capacity = bad })
      end
      assert.is_false(core.running())
    end)

    it("counts pending items", function()
      start()
      join(produce { items = 5, callback = function() end })
      assert.equal(5, core.pending())
      assert.is_true(dispatch(core.poll()))
      assert.equal(4, core.pending())
    end)

    it("keeps stats, in a new table each call", function()
      start()
      local before = core.stats()
      assert.are_not.equal(before, core.stats())
      for _, name in ipairs { "delivered", "polled", "wakeups", "cancelled", "rejected", "errors", "empty_polls",
        "wake_errors" } do
        assert.equal("number", type(before[name]), name)
      end
      join(produce { items = 3, callback = function() end })
      assert.is_true(wait_wake(5))
      assert.equal(3, drain())
      local d = stats_delta(before)
      assert.equal(3, d.delivered)
      assert.equal(3, d.polled)
      assert.equal(1, d.wakeups)
      assert.is_true(d.empty_polls >= 1)
      assert.equal(0, d.rejected + d.cancelled + d.errors + d.wake_errors)
    end)

    it("counts the lag from a wake-up to the drain that answered it", function()
      start()
      join(produce { items = 2, callback = function() end })
      -- The reader is late, by more than a busy machine delays the prompt
      -- drain below.
      socket.sleep(support.LATE)
      assert.equal(2, drain())
      local s = core.stats()
      assert.is_true(s.lag_last_ns >= (support.LATE - 0.01) * 1e9, "lag " .. s.lag_last_ns)
      assert.equal(s.lag_last_ns, s.lag_max_ns)
      join(produce { items = 1, callback = function() end })
      assert.is_true(wait_wake(5))
      assert.equal(1, drain())
      s = core.stats()
      assert.is_true(s.lag_last_ns < s.lag_max_ns, "a prompt drain lowers the last lag only")
      core.stop()
      start()
      assert.equal(0, core.stats().lag_max_ns, "each run counts its own")
    end)

    it("publishes the C API in the registry", function()
      local api = testutil.api()
      assert.equal(1, api.version)
      assert.is_true(api.size >= api.client_size)
      for code, name in ipairs(support.CODES) do
        assert.equal(name, testutil.strerror(code - 1))
      end
    end)

    it("does not receive a datagram from another 127.0.0.1 port", function()
      start()
      local foreign = assert(socket.udp())
      assert(foreign:setsockname("127.0.0.1", 0))
      assert(foreign:sendto("hello", reader:getsockname()))
      assert.is_false(wait_wake(0.2))
      assert.same({ nil, "timeout" }, { reader:receive() })
      foreign:close()
      core.wake() -- the socket itself still works
      assert.is_true(wait_wake(5))
    end)
  end)

  describe("runs and guards", function()
    it("names each run with an id of its own, and none when stopped", function()
      assert.is_nil(core.run())
      start()
      local first = core.run()
      assert.equal("number", type(first))
      assert.equal(first, core.run())
      core.stop()
      assert.is_nil(core.run())
      core.start_fd()
      local second = core.run()
      assert.is_true(second ~= nil and second ~= first)
    end)

    it("stops the run when its guard is collected: items cancelled and freed, descriptor closed", function()
      local fd = core.start_fd()
      local run = core.run()
      join(produce { items = 5, callback = function() error("a cancelled item ran") end })
      assert.equal(5, core.pending())
      local before = core.stats()
      local held = { core.guard() }
      assert.equal("userdata", type(held[1]))
      assert.is_true(testutil.fd_open(fd))
      held[1] = nil
      collectgarbage()
      collectgarbage()
      assert.is_false(core.running())
      assert.is_nil(core.run())
      assert.is_false(testutil.fd_open(fd), "the descriptor stayed open")
      assert.equal(5, stats_delta(before).cancelled)
      assert.equal(0, counters().decodes)
      assert_all_freed()
      -- Stopped as core.stop() would: later delivers are refused, a new start works.
      assert.same(codes { BGW_CLOSED = 1 }, join(produce { items = 1, callback = function() end }))
      start()
      assert.is_true(core.run() ~= run)
    end)

    it("leaves a newer run alone when the guard of an older one is collected", function()
      start()
      local held = { old = core.guard() }
      core.stop()
      start()
      local run = core.run()
      local current = core.guard()
      assert.are_not.equal(current, held.old)
      held.old = nil
      collectgarbage()
      collectgarbage()
      assert.is_true(core.running())
      assert.equal(run, core.run())
      assert.is_not_nil(current)
      local got = 0
      join(produce { items = 3, callback = function() got = got + 1 end })
      assert.is_true(pump_until(function() return got == 3 end))
    end)

    it("makes a guard of no run when stopped, which stops nothing later", function()
      local held = { core.guard() }
      start()
      assert.equal("userdata", type(held[1]))
      held[1] = nil
      collectgarbage()
      collectgarbage()
      assert.is_true(core.running())
    end)
  end)

  describe("handle misuse", function()
    -- In a new interpreter, to see its stderr: a handle released, then used
    -- to deliver and to call, then released again.
    it("refuses a released handle (BGW_INVALID, data freed), ignores a second release, says so once", function()
      local status, output = support.run_lua [[
        local core = require "bgworker.core"
        local socket = require "socket"
        local testutil = require "bgworker_testutil"
        local reader = assert(socket.udp())
        assert(reader:setsockname("127.0.0.1", 0))
        core.start(tonumber((select(2, reader:getsockname()))))
        local handle = testutil.acquire()
        testutil.release(handle)
        local counts = testutil.join(testutil.produce { handle = handle, items = 3, callback = print })
        local call = testutil.join(testutil.call { handle = handle, callback = print })
        testutil.release(handle)
        local c = testutil.counters()
        print(("invalid %d, call %s, allocated %d, freed %d, double frees %d, pending %d"):format(
          counts.BGW_INVALID, call.code, c.allocated, c.freed, c.double_frees, core.pending()))
        testutil.reset()
      ]]
      assert.equal(0, status, output)
      assert.matches("invalid 3, call BGW_INVALID, allocated 4, freed 4, double frees 0, pending 0", output, 1, true)
      local _, reports = output:gsub("already released: a bug in the caller", "")
      assert.equal(1, reports, output)
    end)
  end)

  describe("delivery", function()
    it("delivers 4 x 100000 items exactly once, in order per producer", function()
      local P, N = 4, 100000
      start()
      local before = core.stats()
      local next_seq, bad, received = {}, nil, 0
      for p = 1, P do next_seq[p] = 1 end
      local job = produce {
        producers = P, items = N, payload = 32,
        callback = function(p, seq, ok)
          if seq ~= next_seq[p] or not ok then
            bad = bad or ("producer %d: got seq %d (checksum %s), expected %d"):format(
              p, seq, tostring(ok), next_seq[p])
          end
          next_seq[p] = seq + 1
          received = received + 1
        end,
      }
      assert.is_true(pump_until(function() return received >= P * N end), "items stranded")
      assert.same(codes { BGW_OK = P * N }, join(job))
      assert.is_nil(bad)
      assert.equal(P * N, received)
      for p = 1, P do assert.equal(N + 1, next_seq[p]) end
      assert.equal(0, core.pending())
      local d = stats_delta(before)
      assert.equal(P * N, d.delivered)
      assert.equal(P * N, d.polled)
      assert.is_true(d.wakeups < P * N / 10, "wake-ups not coalesced: " .. d.wakeups)
      local c = counters()
      assert.equal(P * N, c.allocated)
      assert.equal(P * N, c.decodes)
      assert_all_freed()
    end)

    it("announces a burst with one datagram and strands nothing", function()
      start()
      local before = core.stats()
      local received = 0
      assert.same(codes { BGW_OK = 40000 },
        join(produce { producers = 4, items = 10000, callback = function() received = received + 1 end }))
      assert.equal(1, stats_delta(before).wakeups)
      assert.is_true(wait_wake(5))
      assert.equal(40000, drain())
      assert.equal(40000, received)
      assert.is_false(wait_wake(0.05), "a second datagram")
      -- The empty poll disarmed the instance: the next item is announced.
      join(produce { items = 1, callback = function() received = received + 1 end })
      assert.is_true(wait_wake(5))
      assert.equal(1, drain())
      assert_all_freed()
    end)

    it("decodes items freed with free() once each", function()
      start()
      local received = 0
      assert.same(codes { BGW_OK = 1000 },
        join(produce { items = 1000, free = "libc", payload = 16, callback = function() received = received + 1 end }))
      assert.is_true(pump_until(function() return received == 1000 end))
      assert.equal(1000, counters().decodes)
    end)
  end)

  describe("delivery by copy (deliver_copy)", function()
    -- testutil's items are built on the producer's stack and copied: nothing
    -- is allocated or freed, so `allocated` and `freed` stay 0.
    local function in_order(P)
      local state = { next_seq = {}, received = 0 }
      for p = 1, P do state.next_seq[p] = 1 end
      function state.callback(p, seq, ok)
        if seq ~= state.next_seq[p] or not ok then
          state.bad = state.bad or ("producer %d: got seq %d (checksum %s), expected %d"):format(
            p, seq, tostring(ok), state.next_seq[p])
        end
        state.next_seq[p] = seq + 1
        state.received = state.received + 1
      end
      return state
    end

    it("delivers 4 x 100000 records exactly once, in order per producer, byte for byte", function()
      local P, N = 4, support.size(100000, 5000)
      start()
      local before = core.stats()
      local got = in_order(P)
      local job = produce { producers = P, items = N, payload = 150, free = "copy", callback = got.callback }
      assert.is_true(pump_until(function() return got.received >= P * N end), "records stranded")
      assert.same(codes { BGW_OK = P * N }, join(job))
      assert.is_nil(got.bad)
      assert.equal(P * N, got.received)
      local d = stats_delta(before)
      assert.equal(P * N, d.delivered)
      assert.equal(P * N, d.polled)
      local c = counters()
      assert.equal(P * N, c.decodes)
      assert.equal(0, c.allocated + c.freed + c.stale_decodes)
    end)

    it("drains copies with core.drain, mixed with items that own their data", function()
      start()
      local got = in_order(2)
      local N = support.size(20000, 2000)
      local copies = produce { producers = 2, items = N, payload = 64, free = "copy", callback = got.callback }
      local owned = 0
      local frees = produce { items = N, payload = 8, callback = function() owned = owned + 1 end }
      assert.is_true(eventually(function()
        core.drain(1000)
        return got.received == 2 * N and owned == N
      end))
      assert.same(codes { BGW_OK = 2 * N }, join(copies))
      assert.same(codes { BGW_OK = N }, join(frees))
      assert.is_nil(got.bad)
      assert_all_freed()
    end)

    it("returns BGW_INVALID for a NULL handle, a NULL decode, or a record above BGW_COPY_MAX", function()
      start()
      local before = core.stats()
      assert.same(codes { BGW_INVALID = 1 }, join(produce { free = "copy", null_handle = true, callback = print }))
      assert.same(codes { BGW_INVALID = 1 }, join(produce { free = "copy", decode = "null" }))
      assert.same(codes { BGW_INVALID = 1 }, join(produce { free = "copy", copy_len = 257, callback = print }))
      assert.equal(2, stats_delta(before).rejected, "the NULL handle has no instance to count it")
      local received = 0
      assert.same(codes { BGW_OK = 1 },
        join(produce { free = "copy", copy_len = 256, callback = function() received = received + 1 end }))
      assert.is_true(pump_until(function() return received == 1 end))
    end)

    it("returns BGW_FULL with NOWAIT, BGW_TIMEOUT, and BGW_CLOSED after stop, which cancels copies", function()
      start { capacity = 3 }
      assert.same(codes { BGW_OK = 3, BGW_FULL = 2 },
        join(produce { items = 5, free = "copy", timeout = testutil.NOWAIT, callback = print }))
      assert.same(codes { BGW_TIMEOUT = 1 }, join(produce { items = 1, free = "copy", timeout = 20, callback = print }))
      assert.equal(3, core.pending())
      assert.equal(3, core.stop())
      assert.same(codes { BGW_CLOSED = 2 }, join(produce { items = 2, free = "copy", callback = print }))
      assert.equal(0, counters().decodes, "cancelled copies are not decoded")
    end)

    it("reports a decode that raises and goes on", function()
      start()
      join(produce { items = 2, free = "copy", decode = "raise" })
      local received = 0
      join(produce { items = 1, free = "copy", callback = function() received = received + 1 end })
      assert.is_true(wait_wake(5))
      local ok, err = pcall(drain)
      assert.is_false(ok)
      assert.matches("testutil decode raised", tostring(err))
      pcall(drain)
      drain()
      assert.equal(1, received)
      assert.equal(3, counters().decodes)
    end)
  end)

  describe("decode errors", function()
    for _, case in ipairs {
      { decode = "raise", message = "testutil decode raised" },
      { decode = "nofunc", message = "function" },
      { decode = "nothing", message = "function" },
    } do
      it(("raise from poll when decode %s, and poll goes on"):format(case.decode), function()
        start()
        local before = core.stats()
        join(produce { decode = case.decode })
        local got
        join(produce { items = 1, callback = function(p, seq) got = { p, seq } end })
        assert.is_true(wait_wake(5))
        assert_error_matches(case.message, core.poll)
        assert.equal(1, counters().freed, "the failed item's data")
        assert.is_true(dispatch(core.poll()))
        assert.same({ 1, 1 }, got)
        assert.equal(0, select("#", core.poll()))
        assert.equal(1, stats_delta(before).errors)
        assert.equal(2, counters().decodes)
        assert_all_freed()
      end)
    end
  end)

  describe("ownership of data", function()
    it("frees items rejected with BGW_CLOSED after stop", function()
      start()
      core.stop()
      assert.same(codes { BGW_CLOSED = 5 }, join(produce { items = 5, callback = function() end }))
      assert.equal(5, counters().allocated)
      assert_all_freed()
    end)

    it("frees items rejected with BGW_INVALID for a NULL decode", function()
      start()
      local before = core.stats()
      assert.same(codes { BGW_INVALID = 3 }, join(produce { items = 3, decode = "null" }))
      assert.equal(3, counters().allocated)
      assert_all_freed()
      assert.equal(0, core.pending())
      assert.equal(3, stats_delta(before).rejected)
    end)

    it("frees items rejected with BGW_INVALID for a NULL handle", function()
      start()
      assert.same(codes { BGW_INVALID = 3 },
        join(produce { items = 3, null_handle = true, callback = function() end }))
      assert.equal(3, counters().allocated)
      assert_all_freed()
      assert.equal(0, core.pending())
    end)

    it("frees pending items on stop without decoding them", function()
      start()
      local before = core.stats()
      join(produce { producers = 2, items = 10, callback = function() end })
      assert.equal(20, core.stop())
      assert.equal(0, core.pending())
      assert.equal(20, stats_delta(before).cancelled)
      assert.equal(0, counters().decodes)
      assert.equal(20, counters().allocated)
      assert_all_freed()
    end)

    it("frees pending items at lua_close without decoding them", function()
      local ok, pending = fresh_state [[
        core.start(port)
        testutil.join(testutil.produce { items = 10, callback = function() end })
        return core.pending()
      ]]
      assert.is_true(ok, pending)
      assert.equal(10, pending)
      assert.equal(10, counters().allocated)
      assert.equal(0, counters().decodes)
      assert_all_freed()
    end)

    it("answers BGW_CLOSED to producers still running after lua_close", function()
      -- 200 items delivered for sure, then producers that outlive the state.
      -- (Waiting for a pending count instead would race on a loaded machine:
      -- one producer can be far ahead of the other.)
      local ok, job = fresh_state [[
        core.start(port)
        testutil.join(testutil.produce { producers = 2, items = 100, callback = function() end })
        assert(core.pending() == 200)
        return testutil.produce { producers = 2, items = 1, until_closed = 5, callback = function() end }
      ]]
      assert.is_true(ok, job)
      local counts = join(support.adopt(job))
      -- Each producer stops after its 5th BGW_CLOSED; its first item may
      -- have come before or after the close.
      assert.is_true(counts.BGW_CLOSED >= 10 and counts.BGW_CLOSED <= 12, counts.BGW_CLOSED)
      assert.same(codes { BGW_OK = counts.BGW_OK, BGW_CLOSED = counts.BGW_CLOSED }, counts)
      assert.equal(200 + counts.BGW_OK + counts.BGW_CLOSED, counters().allocated)
      assert.equal(0, counters().decodes)
      assert_all_freed()
    end)

    it("releases a producer blocked on a full queue at lua_close", function()
      local ok, job = fresh_state [[
        core.start(port, { capacity = 2 })
        local job = testutil.produce { items = 100, timeout = testutil.FOREVER, callback = function() end }
        eventually(function() return core.pending() == 2 end)
        socket.sleep(0.02)
        assert(not testutil.done(job), "the producer should be waiting for room")
        return job
      ]]
      assert.is_true(ok, job)
      local counts = join(support.adopt(job))
      assert.equal(2, counts.BGW_OK)
      assert.same(codes { BGW_OK = 2, BGW_CLOSED = 98 }, counts)
      assert_all_freed()
    end)
  end)

  describe("bounded queue", function()
    it("returns BGW_FULL at once with NOWAIT", function()
      start { capacity = 5 }
      local before = core.stats()
      assert.same(codes { BGW_OK = 5, BGW_FULL = 3 },
        join(produce { items = 8, timeout = testutil.NOWAIT, callback = function() end }))
      assert.equal(3, counters().freed, "rejected items freed before deliver returned")
      assert.equal(5, core.pending())
      assert.equal(3, stats_delta(before).rejected)
      assert.is_true(wait_wake(5))
      assert.equal(5, drain())
      assert_all_freed()
    end)

    it("blocks until the Lua side makes room", function()
      start { capacity = 10 }
      local received = {}
      local job = produce { items = 200, callback = function(_, seq) received[#received + 1] = seq end }
      assert.is_true(eventually(function() return core.pending() == 10 end))
      socket.sleep(0.05)
      assert.is_false(testutil.done(job), "the producer should be waiting for room")
      assert.equal(10, core.pending())
      assert.is_true(pump_until(function() return #received == 200 end))
      assert.same(codes { BGW_OK = 200 }, join(job))
      for i = 1, 200 do assert.equal(i, received[i]) end
      assert_all_freed()
    end)

    it("returns BGW_TIMEOUT when no room comes in time", function()
      start { capacity = 2 }
      local t0 = socket.gettime()
      assert.same(codes { BGW_OK = 2, BGW_TIMEOUT = 2 },
        join(produce { items = 4, timeout = 30, callback = function() end }))
      assert.is_true(socket.gettime() - t0 >= 0.055, "each timed-out deliver waits 30 ms")
      assert.equal(2, counters().freed)
      assert.equal(2, core.stop())
      assert_all_freed()
    end)
  end)

  describe("round trips", function()
    -- Wait for the call's item, then poll and dispatch it under pcall.
    local function answer()
      assert.is_true(wait_wake(5))
      return pcall(function() return dispatch(core.poll()) end)
    end

    it("hands the callback's values to the waiting thread", function()
      start()
      local job
      job = call { callback = function(id, seq, ok)
        assert.same({ job, 1, true }, { id, seq, ok })
        return 42, "two", 3.5, true
      end }
      assert.same({ true, true }, { answer() })
      assert.same({ code = "BGW_OK", n = 4, 42, "two", 3.5, true }, join(job))
      assert.equal(1, counters().results)
      assert_all_freed()
    end)

    it("gives BGW_ERROR when the callback raises, and re-raises it", function()
      start()
      local job = call { callback = function() error("callback failed") end }
      local ok, err = answer()
      assert.is_false(ok)
      assert.matches("callback failed", tostring(err))
      assert.same({ code = "BGW_ERROR", n = 0 }, join(job))
      assert.equal(0, counters().results)
      assert_all_freed()
    end)

    it("gives BGW_ERROR when decode raises", function()
      start()
      local job = call { decode = "raise" }
      local ok, err = answer()
      assert.is_false(ok)
      assert.matches("testutil decode raised", tostring(err))
      assert.same({ code = "BGW_ERROR", n = 0 }, join(job))
      assert_all_freed()
    end)

    it("gives BGW_ERROR when result raises", function()
      start()
      local job = call { result = "raise", callback = function() return 1 end }
      answer()
      assert.same({ code = "BGW_ERROR", n = 0 }, join(job))
      assert.equal(1, counters().results)
      assert_all_freed()
    end)

    it("gives BGW_INVALID for a NULL result", function()
      start()
      assert.same({ code = "BGW_INVALID", n = 0 }, join(call { result = "null", callback = function() end }))
      assert.equal(0, core.pending())
      assert_all_freed()
    end)

    it("refuses BGW_NOWAIT with BGW_INVALID: a round trip always waits", function()
      start()
      assert.same({ code = "BGW_INVALID", n = 0 },
        join(call { timeout = testutil.NOWAIT, callback = function() end }))
      assert.equal(0, core.pending())
      assert_all_freed()
    end)

    it("times out when Lua never polls; stop() frees the data later", function()
      start()
      local job = call { timeout = 50, callback = function() end }
      assert.same({ code = "BGW_TIMEOUT", n = 0 }, join(job))
      assert.equal(0, counters().freed, "freed while still queued")
      assert.equal(1, core.stop())
      assert.equal(0, counters().decodes)
      assert_all_freed()
    end)

    it("skips decode of an item whose caller timed out", function()
      start()
      local called = false
      assert.same({ code = "BGW_TIMEOUT", n = 0 },
        join(call { timeout = 50, callback = function() called = true end }))
      assert.is_true(wait_wake(5))
      assert.equal(0, drain())
      assert.is_false(called)
      assert.equal(0, counters().decodes)
      assert.equal(0, core.pending())
      assert_all_freed()
    end)

    it("skips result when the caller timed out during the callback", function()
      start()
      local job = call { timeout = 50, callback = function()
        socket.sleep(0.2)
        return 1
      end }
      answer()
      assert.same({ code = "BGW_TIMEOUT", n = 0 }, join(job))
      assert.equal(1, counters().decodes)
      assert.equal(0, counters().results)
      assert_all_freed()
    end)

    it("gives BGW_CANCELLED when stop() cancels the item", function()
      start()
      local job = call { callback = function() end }
      assert.is_true(eventually(function() return core.pending() == 1 end))
      assert.equal(1, core.stop())
      assert.same({ code = "BGW_CANCELLED", n = 0 }, join(job))
      assert.equal(0, counters().decodes)
      assert_all_freed()
    end)

    it("gives BGW_CANCELLED when lua_close cancels the item", function()
      local ok, job = fresh_state [[
        core.start(port)
        local job = testutil.call { callback = function() end }
        eventually(function() return core.pending() == 1 end)
        return job
      ]]
      assert.is_true(ok, job)
      assert.same({ code = "BGW_CANCELLED", n = 0 }, join(support.adopt(job)))
      assert_all_freed()
    end)
  end)

  describe("the ticker example", function()
    it("delivers 1..n in order", function()
      start()
      local got = {}
      local t = ticker.start(5, 10, function(v) got[#got + 1] = v end)
      assert.is_true(pump_until(function() return #got == 5 end))
      assert.same({ 1, 2, 3, 4, 5 }, got)
      assert.is_false(wait_wake(0.05), "a wake-up after the last value")
      t:stop()
    end)

    it("calls back no more after stop()", function()
      start()
      local got = {}
      local t = ticker.start(100000, 1, function(v) got[#got + 1] = v end)
      assert.is_true(pump_until(function() return #got >= 3 end))
      t:stop()
      local seen = #got
      socket.sleep(0.02)
      drain()
      assert.equal(seen, #got)
      for i = 1, seen do assert.equal(i, got[i]) end
      t:stop() -- a second stop does nothing
    end)

    it("stops when collected", function()
      start()
      local got = 0
      local held = { ticker.start(100000, 1, function() got = got + 1 end) }
      local weak = setmetatable({ held[1] }, { __mode = "v" })
      assert.is_true(pump_until(function() return got >= 1 end))
      held[1] = nil
      collectgarbage()
      collectgarbage()
      assert.is_nil(weak[1], "the ticker was not collected")
      local seen = got
      socket.sleep(0.02)
      drain()
      assert.equal(seen, got)
    end)

    it("stops promptly while blocked on a full queue", function()
      start { capacity = 1 }
      local t = ticker.start(100, 0, function() end)
      assert.is_true(eventually(function() return core.pending() == 1 end))
      socket.sleep(0.02)
      local t0 = socket.gettime()
      t:stop()
      assert.is_true(socket.gettime() - t0 < 1)
    end)

    it("rejects bad arguments, naming them", function()
      local f = function() end
      for _, bad in ipairs { 0, 1.5, "3", -1 } do
        assert_error_matches("#1 .*n must be", ticker.start, bad, 1, f)
      end
      assert_error_matches("#2 .*interval_ms", ticker.start, 1, -1, f)
      assert_error_matches("#2 .*interval_ms", ticker.start, 1, nil, f)
      assert_error_matches("#3 .*callback", ticker.start, 1, 1, "f")
    end)

    it("survives lua_close with a ticker running", function()
      local ok, err = fresh_state [[
        core.start(port)
        ticker.start(1000000, 1, function() end)
        eventually(function() return core.pending() >= 3 end)
      ]]
      assert.is_true(ok, err)
    end)

    it("stops ticking once the dispatcher is stopped", function()
      start()
      local got = 0
      local t = ticker.start(100000, 1, function() got = got + 1 end)
      assert.is_true(pump_until(function() return got >= 1 end))
      core.stop()
      socket.sleep(0.02) -- the next value gets BGW_CLOSED
      start()
      local seen = got
      assert.is_false(wait_wake(0.05), "a value delivered after BGW_CLOSED")
      assert.equal(seen, got)
      t:stop()
    end)
  end)
end)

-- The Lua layer `bgworker` in a plain LuaSocket loop: bgworker.new(),
-- dispatch, wait, error handling, stop, and argument checks. The producers
-- are the example ticker (examples/c/ticker.c) and the test utility library
-- (spec/native/testutil.c), both real background threads.

local bgworker = require "bgworker"
local core = require "bgworker.core"
local protect = require "bgworker.protect"
local socket = require "socket"
local support = require "support"
local testutil = require "bgworker_testutil"
local ticker = require "bgworker_ticker"

local produce, join, collector = support.produce, support.join, support.collector

local d -- the dispatcher of the current test

-- Is the dispatcher's socket readable within `timeout` seconds?
local function readable(timeout)
  return support.readable(d.socket, timeout)
end

describe("bgworker", function()
  -- Start from a stopped core, whatever ran before in this Lua state.
  setup(support.stop_core)

  after_each(function()
    support.finish(d)
    d = nil
  end)

  it("has a version and its core", function()
    assert.is_string(bgworker.version)
    assert.matches("^%d+%.%d+%.%d+", bgworker.version)
    assert.equals("bgworker " .. bgworker.version, bgworker._VERSION)
    assert.equals(core, bgworker.core)
    assert.equals(1000, bgworker.DEFAULT_BUDGET)
    -- The utilities load on first use.
    assert.equals(require "bgworker.pool", bgworker.pool)
    assert.equals(require "bgworker.dns", bgworker.dns)
    assert.equals(require "bgworker.process", bgworker.process)
    assert.is_nil(bgworker.no_such_module)
  end)

  describe("new", function()
    it("runs ticker callbacks in a socket.select loop", function()
      d = bgworker.new()
      assert.is_true(core.running())
      local got = {}
      local t = ticker.start(5, 5, function(v) got[#got + 1] = v end)
      local deadline = socket.gettime() + 5
      while #got < 5 and socket.gettime() < deadline do
        local r = socket.select({ d.socket }, nil, 1)
        if r[d.socket] then d:dispatch() end
      end
      t:stop()
      assert.same({ 1, 2, 3, 4, 5 }, got)
    end)

    for _, kind in ipairs { "eventfd", "pipe" } do
      it("wakes through a " .. kind .. " that socket.select takes as the dispatcher itself", function()
        d = bgworker.new { kind = kind }
        assert.is_nil(d.socket)
        assert.equals(core.fd(), d:getfd())
        assert.is_false(d:dirty())
        local got = {}
        local job = produce { producers = 2, items = 500, callback = function(p, seq)
          got[#got + 1] = p * 1000 + seq
        end }
        local deadline = socket.gettime() + 10
        while #got < 1000 and socket.gettime() < deadline do
          local r = socket.select({ d }, nil, 1)
          if r[d] then d:dispatch(100) end
        end
        join(job)
        assert.equals(1000, #got)
        -- A dispatch that stops at its max leaves the descriptor readable
        -- (the rest may be pending); the one that finds the queue empty
        -- clears it.
        assert.equals(0, d:dispatch())
        assert.equals(0, #socket.select({ d }, nil, 0.05))
        assert.equals(0, d:wait(0.05))
        d:stop()
        assert.equals(-1, d:getfd())
      end)
    end

    it("refuses an unknown descriptor kind", function()
      local ok, err = pcall(bgworker.new, { kind = "socketpair" })
      assert.is_false(ok)
      assert.matches('opts.kind must be one of "udp", "eventfd", "pipe", got "socketpair"', err, 1, true)
      assert.is_false(core.running())
    end)

    it("stops a dispatch at max and brings the rest with a new wake-up", function()
      finally(support.untimed_drains())
      d = bgworker.new()
      local got = {}
      join(produce { items = 10, callback = function(_, seq) got[#got + 1] = seq end })
      assert.is_true(readable(2))
      local wakeups = core.stats().wakeups
      assert.equals(3, d:dispatch(3))
      assert.same({ 1, 2, 3 }, got)
      -- The instance stays armed: the datagram comes from the dispatcher's wake.
      assert.is_true(readable(2))
      assert.equals(wakeups + 1, core.stats().wakeups)
      assert.equals(3, d:dispatch(3))
      assert.is_true(readable(2))
      assert.equals(4, d:dispatch(5))
      assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, got)
      -- Drained to the empty poll: no wake-up is owed.
      assert.is_false(readable(0.05))
      assert.equals(0, d:dispatch())
    end)

    it("dispatches at most the budget by default", function()
      finally(support.untimed_drains())
      d = bgworker.new { budget = 4 }
      local count = 0
      join(produce { items = 10, callback = function() count = count + 1 end })
      assert.is_true(readable(2))
      assert.equals(4, d:dispatch())
      assert.equals(4, count)
      assert.equals(4, d:wait(2))
      assert.equals(2, d:wait(2))
      assert.equals(10, count)
    end)

    it("returns from wait for callbacks carried over from the slice before", function()
      -- A pool's outcomes cross in shared items: those past the budget are
      -- carried over to the next drain, which may take no new item. The
      -- drain counts them, so wait returns: a wait with no timeout, or a
      -- job:get() in a select program's main chunk, would block for ever.
      d = bgworker.new { budget = 4 }
      local workers = require("bgworker.pool").new { threads = 1 }
      finally(function() workers:close(0) end)
      local n, done = 200, 0
      for _ = 1, n do
        workers:submit(function() end):on_done(function() done = done + 1 end)
      end
      while done < n do
        local before = done
        local handled = d:wait(5)
        assert.is_true(handled > 0, ("wait ran %d callbacks but returned 0"):format(done - before))
      end
    end)

    it("takes items delivered during a dispatch", function()
      d = bgworker.new()
      local count = 0
      local job = produce { items = 20000, callback = function() count = count + 1 end }
      local deadline = socket.gettime() + 10
      while count < 20000 and socket.gettime() < deadline do d:wait(1) end
      join(job)
      assert.equals(20000, count)
      assert.equals(0, core.pending())
    end)

    it("passes capacity to the core", function()
      d = bgworker.new { capacity = 2 }
      local counts = join(produce {
        items = 5, timeout = testutil.NOWAIT, callback = function() end,
      })
      assert.equals(2, counts.BGW_OK)
      assert.equals(3, counts.BGW_FULL)
      assert.equals(2, d:wait(2))
    end)
  end)

  describe("wait", function()
    it("returns 0 when the timeout passes with nothing delivered", function()
      d = bgworker.new()
      local t0 = socket.gettime()
      assert.equals(0, d:wait(0.2))
      local elapsed = socket.gettime() - t0
      assert.is_true(elapsed >= 0.15, "returned after " .. elapsed)
      assert.is_true(elapsed < 2, "returned after " .. elapsed)
      assert.equals(0, d:wait(0))
    end)

    it("returns as soon as a callback ran", function()
      d = bgworker.new()
      local got
      local t = ticker.start(1, 50, function(v) got = v end)
      local t0 = socket.gettime()
      assert.equals(1, d:wait(10))
      assert.equals(1, got)
      assert.is_true(socket.gettime() - t0 < 5)
      t:stop()
    end)

    it("takes timeouts too long for one socket.select", function()
      d = bgworker.new()
      for _, timeout in ipairs { 2 ^ 31, 2 ^ 53, 1e308, math.huge } do
        join(produce { items = 1, callback = function() end })
        assert.equals(1, d:wait(timeout))
      end
    end)

    it("waits without a timeout", function()
      d = bgworker.new()
      local t = ticker.start(2, 50, function() end)
      local n = d:wait()
      assert.is_true(n == 1 or n == 2)
      if n == 1 then assert.equals(1, d:wait()) end
      t:stop()
    end)
  end)

  describe("errors", function()
    it("sends decode errors to the errorhandler and goes on", function()
      local errors, handler = collector()
      d = bgworker.new { errorhandler = handler }
      local count = 0
      join(produce { items = 2, decode = "raise" })
      join(produce { items = 2, decode = "nofunc" })
      join(produce { items = 3, callback = function() count = count + 1 end })
      local handled, deadline = 0, socket.gettime() + 5
      while handled < 7 and socket.gettime() < deadline do handled = handled + d:wait(1) end
      assert.equals(7, handled)
      assert.equals(3, count)
      assert.equals(4, #errors)
      for _, e in ipairs(errors) do assert.is_string(e.err) end
    end)

    it("reports a callback that yields outside any coroutine", function()
      local errors, handler = collector()
      d = bgworker.new { errorhandler = handler }
      local after = false
      local n = 0
      local t = ticker.start(2, 1, function()
        n = n + 1
        if n == 1 then coroutine.yield() end
        after = true
      end)
      local deadline = socket.gettime() + 5
      while n < 2 and socket.gettime() < deadline do d:wait(1) end
      t:stop()
      assert.is_true(after)
      assert.equals(1, #errors)
      assert.matches("yield", tostring(errors[1].err))
    end)
  end)

  describe("yielding callbacks", function()
    it("pass their yields to the coroutine that called dispatch", function()
      finally(support.untimed_drains())
      d = bgworker.new()
      local log = {}
      local t = ticker.start(2, 1, function(v)
        log[#log + 1] = "start " .. v
        local answer = coroutine.yield("paused " .. v)
        log[#log + 1] = "resumed " .. v .. " with " .. answer
      end)
      local deadline = socket.gettime() + 5
      while core.pending() < 2 and socket.gettime() < deadline do socket.sleep(0.005) end
      assert.is_true(readable(2))
      local co = coroutine.create(function() return d:dispatch() end)
      assert.same({ true, "paused 1" }, { coroutine.resume(co) })
      assert.same({ true, "paused 2" }, { coroutine.resume(co, "a") })
      assert.same({ true, 2 }, { coroutine.resume(co, "b") })
      t:stop()
      assert.same({ "start 1", "resumed 1 with a", "start 2", "resumed 2 with b" }, log)
    end)

    it("can raise after they yielded", function()
      finally(support.untimed_drains())
      local errors, handler = collector()
      d = bgworker.new { errorhandler = handler }
      local t = ticker.start(2, 1, function(v)
        coroutine.yield()
        if v == 1 then error("late") end
      end)
      local deadline = socket.gettime() + 5
      while core.pending() < 2 and socket.gettime() < deadline do socket.sleep(0.005) end
      local co = coroutine.create(function() return d:dispatch() end)
      local results
      repeat results = { coroutine.resume(co) } until coroutine.status(co) == "dead"
      t:stop()
      assert.same({ true, 2 }, results)
      assert.equals(1, #errors)
      assert.matches("late", errors[1].err)
    end)
  end)

  describe("protect", function()
    it("calls like pcall and adds a traceback", function()
      assert.same({ true, 3, "x" }, { protect.call(function(a, b) return a + b, "x" end, 1, 2) })
      local ok, err, tb = protect.call(function() error("boom") end)
      assert.is_false(ok)
      assert.matches("boom", err)
      assert.matches("stack traceback", tb)
    end)

    it("lets the function yield", function()
      local co = coroutine.wrap(function()
        return protect.call(function(x) return 2 * coroutine.yield(x) end, 5)
      end)
      assert.equals(5, co())
      local ok, v = co(21)
      assert.is_true(ok)
      assert.equals(42, v)
    end)

    it("is native exactly where xpcall can yield", function()
      local jit = rawget(_G, "jit")
      assert.equals(_VERSION ~= "Lua 5.1" or jit ~= nil, protect.native)
    end)
  end)

  describe("stop", function()
    it("cancels pending items, closes the socket and stops the core", function()
      local count = 0
      d = bgworker.new()
      join(produce { items = 5, callback = function() count = count + 1 end })
      local sock = d.socket
      assert.equals(5, d:stop())
      assert.is_false(core.running())
      assert.equals(-1, sock:getfd())
      assert.equals(0, d:dispatch())
      assert.equals(0, d:wait(0.01))
      assert.equals(0, d:wait())
      assert.equals(0, count)
      assert.equals(0, d:stop())
      d = nil
    end)

    it("can be called from a callback", function()
      d = bgworker.new()
      local count = 0
      join(produce { items = 10, callback = function(_, seq)
        count = count + 1
        if seq == 3 then d:stop() end
      end })
      assert.equals(3, d:wait(2))
      assert.equals(3, count)
      assert.is_false(core.running())
    end)

    it("lets a new dispatcher start", function()
      d = bgworker.new()
      d:stop()
      d = bgworker.new()
      assert.is_true(core.running())
      local t = ticker.start(1, 1, function() end)
      assert.equals(1, d:wait(5))
      t:stop()
    end)
  end)

  describe("a select dispatcher", function()
    it("is the current one while it runs", function()
      assert.is_nil(bgworker.current())
      d = bgworker.new()
      assert.equals(d, bgworker.current())
      d:stop()
      assert.is_nil(bgworker.current())
    end)

    it("is stopped when nobody references it any more, and a new one can start", function()
      local before = core.stats()
      join(produce { items = 3, callback = function() error("must not run") end })
      do
        local dropped = bgworker.new()
        join(produce { items = 3, callback = function() error("must not run") end })
        assert.is_true(dropped:stats().running)
      end
      collectgarbage()
      collectgarbage()
      assert.is_false(core.running(), "a dispatcher that was collected left the core running")
      assert.is_nil(bgworker.current())
      assert.equals(3, core.stats().cancelled - before.cancelled)
      support.assert_all_freed()
      d = bgworker.new()
      assert.is_true(core.running())
    end)

    it("resumes a waiting coroutine at its timeout while the loop blocks in socket.select", function()
      d = bgworker.new()
      local got
      local co = coroutine.create(function()
        got = { require("bgworker.await")(function() end, 0.05) }
      end)
      assert(coroutine.resume(co))
      local t0 = core.now()
      -- No timeout of the loop's own: the core's alarm makes the socket readable.
      while not got and core.now() - t0 < 5 do
        local ready = socket.select({ d.socket }, nil, 5)
        if ready[d.socket] then d:dispatch() end
      end
      assert.same({ nil, "timeout" }, got)
      assert.is_true(core.now() - t0 < 2, "resumed after " .. core.now() - t0 .. " s")
    end)

    it("keeps its last stats after stop", function()
      d = bgworker.new()
      join(produce { items = 4, callback = function() end })
      assert.equals(4, d:wait(2))
      d:stop()
      local s = d:stats()
      assert.is_false(s.running)
      assert.equals(4, s.dispatched)
      assert.equals(4, s.delivered)
      assert.equals(0, s.pending)
    end)
  end)

  describe("after fork()", function()
    -- In a new interpreter: the parent forks children while two producers
    -- deliver; each child finds its inherited dispatcher refusing (naming
    -- fork()), starts its own and gets its own item; the parent gets every
    -- one of its items.
    for _, kind in ipairs { "udp", "eventfd" } do
      it("belongs to the process that started it (" .. kind .. ")", function()
        local status, out = support.run_lua(([[
          local bgworker = require "bgworker"
          local testutil = require "bgworker_testutil"
          local d = bgworker.new { kind = %q }
          local count = 0
          local job = testutil.produce { producers = 2, items = 2000, callback = function()
            count = count + 1
          end }
          for _ = 1, 5 do
            local pid = testutil.fork()
            if pid == 0 then
              local ok = pcall(function()
                for _, method in ipairs { "dispatch", "wait" } do
                  local refused, err = pcall(d[method], d, 1)
                  assert(not refused, method .. " worked in the child")
                  assert(tostring(err):find("fork()", 1, true), err)
                end
                local mine = bgworker.new { kind = %q }
                local got = false
                testutil.produce { items = 1, callback = function() got = true end }
                assert(mine:wait(5) == 1 and got, "the child's own dispatcher got nothing")
                mine:stop()
              end)
              testutil._exit(ok and 0 or 1)
            end
            assert(testutil.waitpid(pid, 20) == 0, "a child failed or hung")
          end
          while count < 4000 do assert(d:wait(5) > 0, "stalled at " .. count) end
          testutil.join(job)
          io.write("parent got ", count)
        ]]):format(kind, kind))
        assert.equals(0, status, out)
        assert.equals("parent got 4000", out)
      end)
    end
  end)

  describe("refuses", function()
    local function refuses(pattern, f, ...)
      local ok, err = pcall(f, ...)
      assert.is_false(ok, "no error")
      assert.is_string(err)
      assert.is_truthy(err:find(pattern, 1, true), err)
      -- Blamed on the caller, not on bgworker's own files.
      assert.is_falsy(err:find("lua/bgworker/", 1, true), err)
    end

    it("bad options", function()
      refuses("bad argument #1 to 'bgworker.new' (options table expected, got string)",
        bgworker.new, "x")
      refuses('(opts.budget must be a positive integer, got "3")', bgworker.new, { budget = "3" })
      refuses("(opts.budget must be a positive integer, got inf)", bgworker.new,
        { budget = math.huge })
      refuses("(opts.errorhandler must be a function, got true)", bgworker.new,
        { errorhandler = true })
      refuses("(unknown option 'bugdet')", bgworker.new, { bugdet = 1 })
      refuses("(unknown option 'spawn')", bgworker.new, { spawn = true })
      refuses("bad argument #1 to 'bgworker.new' (opts.spawn is retired: every callback that" ..
        " waits is suspended on its own now, as spawn did; remove it)",
        bgworker.new, { loop = "copas", spawn = true })
      refuses('bad argument #1 to \'bgworker.new\' (opts.loop must be one of "select", "copas",' ..
        ' "luv", "cqueues", "ngx", got 42)', bgworker.new, { loop = 42 })
      assert.is_false(core.running())
    end)

    it("bad method arguments", function()
      d = bgworker.new()
      refuses("bad argument #1 to 'dispatch' (max must be a positive integer, got 0)",
        d.dispatch, d, 0)
      refuses("(max must be a positive integer, got 2.5)", d.dispatch, d, 2.5)
      refuses('(max must be a positive integer, got "2")', d.dispatch, d, "2")
      refuses("bad argument #1 to 'wait' (timeout must be a non-negative number of seconds, got -1)",
        d.wait, d, -1)
      refuses('(timeout must be a non-negative number of seconds, got "1")', d.wait, d, "1")
      refuses("calling 'dispatch' on bad self (dispatcher expected, got nil;", d.dispatch)
      refuses("calling 'wait' on bad self (dispatcher expected, got table;", d.wait, {})
      refuses("calling 'stop' on bad self (dispatcher expected, got number;", d.stop, 1)
      refuses("calling 'stats' on bad self (dispatcher expected, got nil;", d.stats)
      assert.is_true(core.running())
    end)
  end)
end)

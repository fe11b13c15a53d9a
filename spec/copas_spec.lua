-- What only the Copas dispatcher does (bgworker.new with loop = "copas"):
-- Copas I/O in callbacks, spawn, stop while a callback waits, copas.loop
-- and copas.exit. What every loop promises is in loop_contract_spec.lua.
-- `make specs-<ver>` runs these against Copas 4 on every Lua version,
-- `make specs-copas1-<ver>` against Debian's Copas 1.x on 5.1, 5.2 and
-- LuaJIT; a missing Copas fails (support.needs_copas). The tests
-- drive Copas with copas.step, which every version has; what Copas 1.x lacks
-- (a copas.loop that returns, copas.exit, socket timeouts) is pending there
-- only. They step Copas themselves (support.copas_until) rather than run in
-- bgworker.busted's async tests, which are built on this dispatcher: they
-- look at single steps and at the reader thread, and make dispatchers with
-- options (errorhandler, spawn) that an async test sets itself.

local support = require "support"

describe("bgworker.copas", function()
  local copas = support.needs_copas()
  if not copas then return end

  local bgworker = require "bgworker"
  local core = require "bgworker.core"
  local socket = require "socket"
  local ticker = require "bgworker_ticker"

  local produce, join, collector = support.produce, support.join, support.collector
  local run_until = support.copas_until

  local d -- the dispatcher of the current test
  local closers = {} -- sockets to close after the test

  local function reader_done()
    return coroutine.status(d.reader) == "dead"
  end

  -- A gate: a UDP socket that a Copas thread can wait on until open() sends
  -- it a datagram.
  local function gate()
    local s, port = support.udp_socket()
    closers[#closers + 1] = s
    return {
      wait = function() return copas.receive(s, 16) end,
      open = function()
        local o = socket.udp()
        o:sendto("x", "127.0.0.1", port)
        o:close()
      end,
    }
  end

  -- A TCP server that answers each line "echo <line>".
  local function echo_server()
    local server = assert(socket.bind("127.0.0.1", 0))
    closers[#closers + 1] = server
    copas.addserver(server, function(skt)
      while true do
        local line = copas.receive(skt, "*l")
        if not line then return end
        copas.send(skt, "echo " .. line .. "\n")
      end
    end)
    local _, port = server:getsockname()
    return tonumber(port), server
  end

  -- One request over a new TCP connection, with Copas I/O: it yields.
  local function echo(port, text)
    local c = socket.tcp()
    c:settimeout(0)
    assert(copas.connect(c, "127.0.0.1", port))
    assert(copas.send(c, text .. "\n"))
    local reply, err = copas.receive(c, "*l")
    c:close()
    return reply or error(err)
  end

  setup(support.stop_core)

  after_each(function()
    if d then
      assert(support.stop_copas(d), "the reader thread did not end")
    end
    d = nil
    support.join_all()
    for _, s in ipairs(closers) do
      if copas.removeserver then pcall(copas.removeserver, s) end
      s:close()
    end
    closers = {}
  end)

  it("drains a batch within one step when the budget allows", function()
    d = bgworker.new { loop = "copas" }
    local count, first_step = 0, nil
    join(produce { items = 100, callback = function()
      count = count + 1
      first_step = first_step or support.copas_steps
    end })
    assert.is_true(run_until(function() return count == 100 end))
    assert.equals(first_step, support.copas_steps - 1)
  end)

  it("lets callbacks do Copas I/O", function()
    local port = echo_server()
    d = bgworker.new { loop = "copas" }
    local replies = {}
    local t = ticker.start(3, 1, function(v)
      -- (The reply first: callbacks that wait overlap, so an index taken
      -- before the wait may be taken by another callback meanwhile.)
      local reply = echo(port, "ping " .. v)
      replies[#replies + 1] = reply
    end)
    assert.is_true(run_until(function() return #replies == 3 end))
    t:stop()
    table.sort(replies)
    assert.same({ "echo ping 1", "echo ping 2", "echo ping 3" }, replies)
  end)

  it("sends errors of yielding callbacks to the errorhandler and goes on", function()
    local port = echo_server()
    local errors, handler = collector()
    d = bgworker.new { loop = "copas", errorhandler = handler }
    local done = 0
    local t = ticker.start(4, 1, function(v)
      local reply = echo(port, "v" .. v)
      done = done + 1
      if v % 2 == 1 then error("after " .. reply) end
    end)
    assert.is_true(run_until(function() return done == 4 end))
    t:stop()
    assert.equals(2, #errors)
    assert.matches("after echo v1", errors[1].err)
    assert.matches("after echo v3", errors[2].err)
    assert.matches("stack traceback", errors[1].tb)
  end)

  it("lets callbacks use Copas socket timeouts", function()
    if support.is_copas1(copas) then
      pending(copas._VERSION .. " has no socket timeouts")
      return
    end
    d = bgworker.new { loop = "copas" }
    local results = {}
    local t = ticker.start(2, 1, function(v)
      local s = support.udp_socket()
      copas.settimeout(s, 0.2)
      local t0 = socket.gettime()
      local data, err = copas.receive(s, 16)
      s:close()
      results[v] = { data = data, err = err, elapsed = socket.gettime() - t0 }
    end)
    -- Each callback waits on its own: they may end in either order.
    assert.is_true(run_until(function() return results[1] ~= nil and results[2] ~= nil end))
    t:stop()
    for v = 1, 2 do
      assert.is_nil(results[v].data)
      assert.equals("timeout", results[v].err)
      assert.is_true(results[v].elapsed >= 0.15, "timed out after " .. results[v].elapsed)
    end
  end)

  describe("callbacks that wait", function()
    it("do not delay the others", function()
      d = bgworker.new { loop = "copas" }
      local g = gate()
      local log = {}
      join(produce { items = 3, callback = function(_, seq)
        log[#log + 1] = "start " .. seq
        if seq == 1 then g.wait() end
        log[#log + 1] = "end " .. seq
      end })
      assert.is_true(run_until(function() return #log == 5 end))
      assert.same({ "start 1", "start 2", "end 2", "start 3", "end 3" }, log)
      assert.equals(1, d:stats().suspended)
      g.open()
      assert.is_true(run_until(function() return #log == 6 end))
      assert.equals("end 1", log[6])
    end)

    it("may do Copas I/O", function()
      local port = echo_server()
      d = bgworker.new { loop = "copas" }
      local replies = {}
      local t = ticker.start(3, 1, function(v)
        replies[v] = echo(port, "ping " .. v)
      end)
      assert.is_true(run_until(function() return replies[1] and replies[2] and replies[3] end))
      t:stop()
      assert.same({ "echo ping 1", "echo ping 2", "echo ping 3" }, replies)
    end)

    it("send their errors to the errorhandler, after the wait too", function()
      local errors, handler = collector()
      local port = echo_server()
      d = bgworker.new { loop = "copas", errorhandler = handler }
      local count = 0
      join(produce { items = 1, decode = "raise" })
      join(produce { items = 4, callback = function(_, seq)
        if seq % 2 == 0 then
          assert.equals("echo " .. seq, echo(port, seq))
          count = count + 1
          error("waited " .. seq)
        end
        count = count + 1
      end })
      assert.is_true(run_until(function() return count == 4 and #errors == 3 end))
      -- The two that waited end in either order.
      local waited = { tostring(errors[2].err), tostring(errors[3].err) }
      table.sort(waited)
      assert.matches("waited 2", waited[1])
      assert.matches("waited 4", waited[2])
      assert.matches("stack traceback", errors[3].tb)
    end)

    it("make the retired spawn option an error that says so", function()
      local ok, err = pcall(bgworker.new, { loop = "copas", spawn = true })
      assert.is_false(ok)
      assert.matches("opts.spawn is retired", err)
    end)
  end)

  describe("stop", function()
    it("ends the reader, closes the socket and stops the core", function()
      d = bgworker.new { loop = "copas" }
      run_until(function() return false end, 0.05)
      assert.equals("suspended", coroutine.status(d.reader))
      local sock = d.socket
      assert.equals(0, d:stop())
      assert.is_false(core.running())
      assert.is_true(run_until(reader_done, 2))
      assert.equals(-1, sock:getfd())
    end)

    it("can be called while a callback waits on I/O", function()
      d = bgworker.new { loop = "copas" }
      -- A gate each: Copas lets one thread at a time wait on a socket.
      local gates = { gate(), gate() }
      local log = {}
      join(produce { items = 2, callback = function(_, seq)
        log[#log + 1] = seq
        gates[seq].wait()
        log[#log + 1] = "end " .. seq
      end })
      run_until(function() return #log == 2 end)
      d:stop()
      assert.is_true(run_until(reader_done, 2))
      gates[1].open()
      gates[2].open()
      assert.is_true(run_until(function() return #log == 4 end))
      table.sort(log, function(a, b) return tostring(a) < tostring(b) end)
      assert.same({ 1, 2, "end 1", "end 2" }, log)
    end)

    it("lets copas.loop() return when nothing else runs", function()
      if support.is_copas1(copas) then
        pending(copas._VERSION .. ": copas.loop never returns")
        return
      end
      local got = {}
      copas.addthread(function()
        d = bgworker.new { loop = "copas" }
        local t
        t = ticker.start(3, 5, function(v)
          got[#got + 1] = v
          if v == 3 then
            t:stop()
            d:stop()
          end
        end)
      end)
      copas.loop()
      assert.same({ 1, 2, 3 }, got)
      assert.is_true(reader_done())
    end)

    it("happens on copas.exit()", function()
      if support.is_copas1(copas) then
        pending(copas._VERSION .. " has no copas.exit")
        return
      end
      copas.addthread(function()
        d = bgworker.new { loop = "copas" }
        copas.pause(0.05)
        copas.exit()
      end)
      copas.loop()
      assert.is_true(d.stopped)
      assert.is_true(reader_done())
    end)
  end)

  describe("waits", function()
    it("work under copas.step() in a dispatcher started after an earlier copas.loop()", function()
      if support.is_copas1(copas) then
        pending(copas._VERSION .. ": copas.loop never returns")
        return
      end
      -- The loop ends and leaves Copas exiting, which a new dispatcher's
      -- exit watch must not take for a copas.exit() of its own.
      copas.loop(function() copas.pause(0.01) end)
      d = bgworker.new { loop = "copas" }
      local p = require("bgworker.pool").new { threads = 1 }
      local got
      copas.addthread(function()
        got = { p:submit(function() return 7 end):get(5) }
      end)
      assert.is_true(run_until(function() return got ~= nil end))
      p:close(0)
      assert.same({ true, 7 }, got)
      assert.is_false(d.stopped)
    end)

    it("raise in a coroutine of the program's own inside a Copas thread, which Copas cannot" ..
      " resume", function()
      d = bgworker.new { loop = "copas" }
      local p = require("bgworker.pool").new { threads = 1 }
      local got
      copas.addthread(function()
        got = { pcall(coroutine.wrap(function()
          local ok, v = p:submit(function() return 1 end):get(5)
          return ok, v
        end)) }
      end)
      assert.is_true(run_until(function() return got ~= nil end))
      p:close(0)
      assert.is_false(got[1])
      assert.matches("get: this coroutine is not a Copas thread", got[2])
    end)
  end)

  it("belongs to the process that started it: a forked child's reader ends without reading", function()
    -- In a new interpreter: a wake-up is waiting on the socket when the
    -- parent forks; each child steps Copas, whose inherited reader must end
    -- (naming fork()) rather than read it, or the parent never wakes.
    local status, out = support.run_lua [[
      local copas = require "copas"
      local bgworker = require "bgworker"
      local testutil = require "bgworker_testutil"
      local errors = {}
      local d = bgworker.new { loop = "copas", errorhandler = function(e) errors[#errors + 1] = tostring(e) end }
      local count = 0
      local job = testutil.produce { producers = 2, items = 2000, callback = function() count = count + 1 end }
      require("socket").sleep(0.05)
      for _ = 1, 3 do
        local pid = testutil.fork()
        if pid == 0 then
          for _ = 1, 20 do copas.step(0.01) end
          local ok = d.stopped and count == 0 and #errors == 1 and errors[1]:find("fork()", 1, true)
          if not ok then io.stderr:write("child: ", tostring(errors[1]), "\n") end
          testutil._exit(ok and 0 or 1)
        end
        assert(testutil.waitpid(pid, 20) == 0, "a child failed or hung")
      end
      local deadline = os.time() + 20
      while count < 4000 and os.time() < deadline do copas.step(0.01) end
      testutil.join(job)
      d:stop()
      io.write("parent got ", count, " errors ", #errors)
    ]]
    assert.equals(0, status, out)
    assert.equals("parent got 4000 errors 0", out)
  end)

  it("refuses dispatch and wait, which Copas does", function()
    d = bgworker.new { loop = "copas" }
    assert.has_error(function() d:dispatch() end,
      "dispatch: this dispatcher is driven by Copas; a select loop needs bgworker.new()")
    assert.has_error(function() d:wait(0) end,
      "wait: this dispatcher is driven by Copas; a select loop needs bgworker.new()")
  end)

  it("is made by bgworker.new { loop = \"copas\" } too", function()
    d = bgworker.new { loop = "copas", budget = 5 }
    assert.equals("copas", d:stats().loop)
    assert.equals(5, d.budget)
  end)
end)

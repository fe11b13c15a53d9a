-- bgworker.pool: Lua functions on background threads, each worker with a
-- Lua state of its own. Callbacks come back through a real dispatcher
-- (bgworker.new() and :wait()); closing a Lua state with running jobs runs
-- in a subprocess of the same interpreter (BGWORKER_LUA, set by the
-- Makefile), under valgrind when it is installed.
--
-- pool:run needs Copas: those specs follow spec/copas_spec.lua (against
-- Copas 4 on every Lua version, and Debian's Copas 1.x on 5.1, 5.2 and
-- LuaJIT).

local bgworker = require "bgworker"
local core = require "bgworker.core"
local pool = require "bgworker.pool"
local socket = require "socket"
local support = require "support"

local pack = table.pack or function(...)
  return { n = select("#", ...), ... }
end
local unpack = table.unpack or unpack

local has_integers = math.type ~= nil
local LUA = os.getenv("BGWORKER_LUA") or "lua"

local d -- the dispatcher of the current test
local p -- the pool of the current test

-- Wait for callbacks until `done()`; fails after 10 s without one.
local function pump_until(done)
  while not done() do
    assert(d:wait(10) > 0, "no callback within 10 s")
  end
end

-- Run fn(...) on p and wait: the callback's arguments, packed.
local function run(fn, ...)
  local args = pack(...)
  local result
  args[args.n + 1] = function(...)
    result = pack(...)
  end
  p:submit(fn, unpack(args, 1, args.n + 1))
  pump_until(function() return result ~= nil end)
  return result
end

-- The error raised by p:submit(...), which must raise.
local function submit_error(...)
  local ok, err = pcall(p.submit, p, ...)
  assert.is_false(ok, "submit did not raise")
  return err
end

local function identity(...)
  return ...
end

-- OS threads of this process (Linux).
local function threads()
  local f = assert(io.open("/proc/self/status"))
  local n = f:read("*a"):match("\nThreads:%s*(%d+)")
  f:close()
  return tonumber(n)
end

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

-- A job's function as source, so that a subprocess can load it too: create
-- `path`; wait until the file `after` exists, if given; sleep `seconds`;
-- write "done" into `path`. It sleeps rather than spins: under valgrind,
-- which runs one thread at a time, spinning threads starve the others.
local SLOW = [[
  local path, seconds, after = ...
  local socket = require "socket"
  local function exists(name)
    local f = io.open(name)
    if f then f:close() end
    return f ~= nil
  end
  local f = assert(io.open(path, "w"))
  f:close()
  local stop = socket.gettime() + 20
  while after and not exists(after) do
    assert(socket.gettime() < stop, "no " .. after)
    socket.sleep(0.01)
  end
  socket.sleep(seconds)
  f = assert(io.open(path, "w"))
  f:write("done")
  f:close()
  return "done"
]]
local slow = assert((loadstring or load)(SLOW))

local function wait_for_file(path)
  local deadline = socket.gettime() + 10
  while not exists(path) do
    assert(socket.gettime() < deadline, "the job did not start within 10 s")
    socket.sleep(0.01)
  end
end

describe("bgworker.pool", function()
  setup(function()
    -- Start from a stopped core, whatever ran before in this Lua state.
    if core.running() then core.stop() end
  end)

  before_each(function()
    d = bgworker.new()
    p = pool.new { threads = 2 }
  end)

  after_each(function()
    if p then p:close() end
    if d then d:stop() end
    p, d = nil, nil
  end)

  describe("values", function()
    it("round-trip nil, booleans and numbers, trailing nils counted", function()
      local r = run(identity, nil, true, false, 0, -1, 1.5, 2 ^ 53, -2 ^ 53, 1e308, nil, nil)
      assert.same(pack(true, nil, true, false, 0, -1, 1.5, 2 ^ 53, -2 ^ 53, 1e308, nil, nil), r)
      r = run(identity)
      assert.same(pack(true), r)
    end)

    it("round-trip NaN, infinities and negative zero", function()
      -- Not the literal -0.0: Lua 5.1 may compile it as the constant 0.
      local zero = 0.0
      local r = run(identity, 0 / 0, math.huge, -math.huge, -zero)
      assert.is_true(r[2] ~= r[2])
      assert.equals(math.huge, r[3])
      assert.equals(-math.huge, r[4])
      assert.equals(-math.huge, 1 / r[5])
    end)

    it("keep integers and floats apart where Lua has both", function()
      if not has_integers then
        -- One number type: 1 and 1.0 are the same value.
        assert.same(pack(true, 1, 1), run(identity, 1, 1.0))
        return
      end
      local r = run(function(...)
        local types = {}
        for i = 1, select("#", ...) do types[i] = math.type((select(i, ...))) end
        return types, ...
      end, 1, 1.0, math.maxinteger, math.mininteger, 2 ^ 63, -0.0, { 3, 3.0 })
      assert.same({ "integer", "float", "integer", "integer", "float", "float" }, r[2])
      assert.equals("float", math.type(r[4]))
      assert.equals("integer", math.type(r[3]))
      assert.equals(math.maxinteger, r[5])
      assert.equals(math.mininteger, r[6])
      assert.equals("integer", math.type(r[9][1]))
      assert.equals("float", math.type(r[9][2]))
    end)

    it("round-trip strings of any bytes, large ones too", function()
      local bytes = {}
      for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
      local all = table.concat(bytes)
      local large = ("\0\255ab"):rep(4 * 1024 * 1024) -- 16 MiB
      local r = run(function(a, b, c) return #a, a, b, c end, all, "", large)
      assert.equals(256, r[2])
      assert.equals(all, r[3])
      assert.equals("", r[4])
      assert.equals(#large, #r[5])
      assert.is_true(large == r[5])
    end)

    it("round-trip nested, empty and mixed tables", function()
      local t = {
        1, 2.5, "three", { {}, { {} } }, nil, 6,
        name = "x", [true] = false, [1.5] = "half", ["with space"] = { deep = { deeper = { 1 } } },
        [{ "table key" }] = "table value",
      }
      local r = run(identity, t, {})
      local back = r[2]
      assert.same({}, r[3])
      for k, v in pairs(t) do
        if type(k) ~= "table" then assert.same(v, back[k]) end
      end
      local tkey, tvalue
      for k, v in pairs(back) do
        if type(k) == "table" then tkey, tvalue = k, v end
      end
      assert.same({ "table key" }, tkey)
      assert.equals("table value", tvalue)
    end)

    it("keep shared sub-tables shared, in arguments and results", function()
      local shared = { 1 }
      local r = run(function(a, b, c)
        local s = { "s" }
        return a == b, a == c[1], s, { s, s }
      end, shared, shared, { shared })
      assert.is_true(r[2])
      assert.is_true(r[3])
      assert.equals(r[4], r[5][1])
      assert.equals(r[5][1], r[5][2])
      -- A graph whose tree has 2^100 leaves crosses as its 101 tables.
      local dag = {}
      for _ = 1, 100 do dag = { dag, dag } end
      r = run(function(t)
        local n = 0
        while t[1] do
          assert(t[1] == t[2])
          n, t = n + 1, t[1]
        end
        return n
      end, dag)
      assert.same(pack(true, 100), r)
    end)

    it("do not copy metatables", function()
      local r = run(identity, setmetatable({ 1 }, { __index = function() return "meta" end }))
      assert.is_nil(getmetatable(r[2]))
      assert.is_nil(r[2].anything)
    end)

    it("arrive in workers that have the standard libraries", function()
      local r = run(function()
        return _VERSION, type(string.dump), type(io.open), type(os.clock), type(debug.traceback),
          type(package.loaded), type(coroutine.wrap), type(table.concat), type(math.floor), type(require),
          type(rawget(_G, "jit")), (pcall(require, "ffi"))
      end)
      assert.same(pack(true, _VERSION, "function", "function", "function", "function", "table",
        "function", "function", "function", "function", type(rawget(_G, "jit")), (pcall(require, "ffi"))), r)
    end)
  end)

  describe("errors", function()
    it("give the callback false and the message with a traceback", function()
      local r = run(function(x)
        local function inner() error("boom " .. x) end
        inner()
      end, 42)
      assert.is_false(r[1])
      assert.matches("boom 42", r[2])
      assert.matches("stack traceback:", r[2])
      assert.matches("inner", r[2])
      assert.equals(2, r.n)
    end)

    it("keep the bytes of the message", function()
      local r = run(function() error("bytes \0\255 end") end)
      assert.is_false(r[1])
      assert.truthy(r[2]:find("bytes \0\255 end", 1, true))
    end)

    it("turn non-string error values into text", function()
      local r = run(function() error(setmetatable({}, { __tostring = function() return "custom" end })) end)
      assert.is_false(r[1])
      assert.matches("^custom\nstack traceback:", r[2])
    end)

    it("report results that cannot cross, by position", function()
      local r = run(function() return 1, print end)
      assert.same(pack(false, "result #2: a function cannot be copied back from the worker"), r)
      r = run(function() return coroutine.create(function() end) end)
      assert.same(pack(false, "result #1: a coroutine cannot be copied back from the worker"), r)
      r = run(function() return { file = io.stdout } end)
      assert.same(pack(false, "result #1: a userdata at .file cannot be copied back from the worker"), r)
      r = run(function()
        local t = {}
        t.self = t
        return t
      end)
      assert.same(pack(false, "result #1: a table that contains itself at .self cannot be copied back" ..
        " from the worker"), r)
    end)

    it("leave the worker usable", function()
      for _ = 1, 4 do assert.is_false(run(function() error("x") end)[1]) end
      assert.same(pack(true, 3), run(function(a, b) return a + b end, 1, 2))
    end)
  end)

  describe("module.function", function()
    local dir, saved_path

    setup(function()
      dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. dir))
      local f = assert(io.open(dir .. "/pool_spec_jobs.lua", "w"))
      f:write([[
        local M = {}
        function M.twice(x) return 2 * x end
        function M.fail() error("failed in a module") end
        M.notafunction = 1
        return M
      ]])
      f:close()
      saved_path = package.path
    end)

    teardown(function()
      package.path = saved_path
      os.remove(dir .. "/pool_spec_jobs.lua")
      os.remove(dir)
    end)

    it("requires the module in the worker, on the caller's package.path at pool creation", function()
      p:close()
      package.path = dir .. "/?.lua;" .. saved_path
      p = pool.new { threads = 1 }
      package.path = saved_path
      assert.same(pack(true, 42), run("pool_spec_jobs.twice", 21))
      local r = run("pool_spec_jobs.fail")
      assert.is_false(r[1])
      assert.matches("failed in a module", r[2])
      assert.same(pack(true, "abab"), run("string.rep", "ab", 2))
    end)

    it("reports missing modules and functions to the callback", function()
      local r = run("pool_spec_no_such_module.f")
      assert.is_false(r[1])
      assert.matches("module 'pool_spec_no_such_module' not found", r[2])
      r = run("string.no_such_function")
      assert.is_false(r[1])
      assert.matches("'string.no_such_function' is not a function", r[2])
    end)
  end)

  describe("bad arguments", function()
    local function cb() end

    it("refuse a cycle, naming the argument", function()
      local t = { 1 }
      t[2] = t
      assert.matches("bad argument #3 to 'submit' %(a table that contains itself at %[2%] cannot be copied" ..
        " to a worker%)", submit_error(identity, 1, t, cb))
      local key = {}
      key[key] = true
      assert.matches("bad argument #2 to 'submit' %(a table that contains itself at %[table%]",
        submit_error(identity, key, cb))
    end)

    it("refuse functions, userdata and coroutines, naming the argument", function()
      assert.matches("bad argument #2 to 'submit' %(a function cannot be copied to a worker%)",
        submit_error(identity, print, cb))
      assert.matches("bad argument #3 to 'submit' %(a userdata cannot be copied to a worker%)",
        submit_error(identity, 1, io.stdout, cb))
      assert.matches("bad argument #2 to 'submit' %(a coroutine cannot be copied to a worker%)",
        submit_error(identity, coroutine.create(function() end), cb))
      assert.matches("bad argument #2 to 'submit' %(a function at .a%[1%] cannot be copied to a worker%)",
        submit_error(identity, { a = { print } }, cb))
      assert.matches("bad argument #2 to 'submit' %(a function used as a table key cannot be copied",
        submit_error(identity, { [print] = 1 }, cb))
    end)

    it("refuse tables nested too deep", function()
      local t = {}
      for _ = 1, 250 do t = { t } end
      assert.matches("bad argument #2 to 'submit' %(tables nested more than 200 deep cannot be copied to a worker%)",
        submit_error(identity, t, cb))
    end)

    it("refuse what cannot be a job's function", function()
      assert.matches("bad argument #1 to 'submit' %(function or 'module.function' string expected, got number%)",
        submit_error(42, cb))
      assert.matches("bad argument #1 to 'submit' %(function or 'module.function' string expected, got table%)",
        submit_error({}, cb))
      assert.matches("bad argument #1 to 'submit' %('module.function' expected, got 'nodot'%)",
        submit_error("nodot", cb))
      assert.matches("bad argument #1 to 'submit' %(a C function cannot move to a worker%)",
        submit_error(print, cb))
      local upvalue = 1
      assert.matches("bad argument #1 to 'submit' %(the function has upvalue 'upvalue'",
        submit_error(function() return upvalue end, cb))
    end)

    it("need a callback last", function()
      assert.matches("bad argument #3 to 'submit' %(callback function expected as the last argument, got number%)",
        submit_error(identity, 1, 2))
      assert.matches("bad argument #2 to 'submit' %(callback function expected as the last argument, got nil%)",
        submit_error(identity))
    end)

    it("are raised at the caller, and leave the pool usable", function()
      local ok, err = pcall(function() p:submit(identity, print, cb) end)
      assert.is_false(ok)
      assert.matches("pool_spec.lua:%d+: bad argument", err)
      assert.same(pack(true, 1), run(identity, 1))
    end)

    it("check options and self", function()
      assert.has_error(function() pool.new { threads = 0 } end,
        "bad argument #1 to 'bgworker.pool.new' (opts.threads must be an integer in 1..1024, got 0)")
      assert.has_error(function() pool.new { threads = 1.5 } end)
      assert.has_error(function() pool.new { thread = 1 } end,
        "bad argument #1 to 'bgworker.pool.new' (unknown option 'thread')")
      assert.has_error(function() pool.new(3) end)
      assert.matches("pool expected", select(2, pcall(p.submit, {}, identity, cb)))
    end)

    it("refuse pool:run outside a Copas thread", function()
      local ok, err = pcall(p.run, p, identity)
      assert.is_false(ok)
      assert.matches("not in a Copas thread", err)
    end)

    it("need a running dispatcher, and work with the next one", function()
      d:stop()
      assert.matches("no bgworker dispatcher is running", submit_error(identity, cb))
      d = bgworker.new()
      assert.same(pack(true, "again"), run(identity, "again"))
    end)
  end)

  describe("close", function()
    it("cancels queued jobs, finishes the running one, and joins the threads", function()
      local before = threads()
      p:close()
      assert.equals(before - 2, threads())
      p = pool.new { threads = 1 }
      assert.equals(before - 1, threads())
      local path = os.tmpname()
      os.remove(path)
      local results = {}
      local function collect(i)
        return function(...) results[i] = pack(...) end
      end
      p:submit(slow, path, 0.2, collect(1))
      wait_for_file(path)
      for i = 2, 4 do p:submit(identity, i, collect(i)) end
      assert.equals(3, p:close())
      assert.equals(before - 2, threads())
      pump_until(function() return results[1] and results[2] and results[3] and results[4] end)
      assert.same(pack(true, "done"), results[1])
      for i = 2, 4 do assert.same(pack(false, "cancelled"), results[i]) end
      os.remove(path)
      assert.equals(0, p:close())
      assert.has_error(function() p:submit(identity, collect(5)) end, "submit: the pool is closed")
    end)

    it("happens when the pool is collected", function()
      p:close()
      local before = threads()
      p = pool.new { threads = 3 }
      assert.equals(before + 3, threads())
      p = nil
      collectgarbage()
      collectgarbage()
      assert.equals(before, threads())
      p = pool.new { threads = 1 }
    end)

    it("does not wait for room in a full bounded dispatcher queue", function()
      -- In a subprocess under `timeout`: a deadlock would hang the specs.
      local path = os.tmpname()
      local file = assert(io.open(path, "w"))
      file:write([[
        local bgworker = require "bgworker"
        local pool = require "bgworker.pool"
        local d = bgworker.new { capacity = 1 }
        local p = pool.new { threads = 2 }
        local called = 0
        for i = 1, 10 do
          p:submit(function(x) return x end, i, function() called = called + 1 end)
        end
        require("socket").sleep(0.2)
        io.write("cancelled ", p:close(), "\n")
        while d:wait(0.2) > 0 do end
        io.write("called ", called, "\n")
      ]])
      file:close()
      local out = io.popen(("timeout 20 %s %s 2>&1; echo \"exit $?\""):format(LUA, path)):read("*a")
      os.remove(path)
      -- Typically 7 cancelled and 1 called: one result found room, the
      -- workers blocked with the next two gave up when the pool closed,
      -- and the cancellations found no room.
      local cancelled, called = out:match("^cancelled (%d+)\ncalled (%d+)\nexit 0\n$")
      assert.truthy(cancelled, out)
      assert.is_true(tonumber(cancelled) >= 7 and tonumber(called) <= 1, out)
    end)

    it("happens when the Lua state closes with running and queued jobs, without crash or leak", function()
      local path = os.tmpname()
      -- The running jobs go on for a second after the script's last
      -- statement, so the state closes while they run, and while the
      -- others are still queued.
      local script = ([[
        local bgworker = require "bgworker"
        local pool = require "bgworker.pool"
        local path = %q
        local function exists(name)
          local f = io.open(name)
          if f then f:close() end
          return f ~= nil
        end
        local d = bgworker.new()
        local p = pool.new { threads = 2 }
        local slow = assert((loadstring or load)(%q))
        for i = 1, 2 do p:submit(slow, path .. i, 1, path .. "end", print) end
        for i = 3, 6 do p:submit(slow, path .. i, 0, print) end
        while not (exists(path .. 1) and exists(path .. 2)) do require("socket").sleep(0.01) end
        print("end of script")
        io.open(path .. "end", "w"):close()
      ]]):format(path, SLOW)
      local file = assert(io.open(path, "w"))
      file:write(script)
      file:close()
      local cmd = ("%s %s 2>&1"):format(LUA, path)
      local valgrind = os.execute("valgrind --version >/dev/null 2>&1")
      if valgrind == true or valgrind == 0 then
        cmd = ("valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite %s"):format(cmd)
      end
      local out = io.popen(cmd .. "; echo \"exit $?\""):read("*a")
      assert.matches("end of script\nexit 0\n$", out)
      -- The running jobs finished: closing the state waited for them.
      for i = 1, 2 do
        local f = io.open(path .. i)
        assert.equals("done", f and f:read("*a"))
        if f then f:close() end
        os.remove(path .. i)
      end
      -- The queued ones never ran.
      for i = 3, 6 do
        assert.is_false(exists(path .. i))
      end
      os.remove(path .. "end")
      os.remove(path)
    end)
  end)
end)

describe("bgworker.pool:run in Copas", function()
  local copas = support.needs_copas()
  if not copas then return end

  -- Step Copas until `done()`; false after 10 s. (Copas 1.x's loop never
  -- returns.)
  local function step_until(done)
    local deadline = socket.gettime() + 10
    while not done() do
      if socket.gettime() > deadline then return false end
      copas.step(0.01)
    end
    return true
  end

  before_each(function()
    if core.running() then core.stop() end
    d = bgworker.copas()
    p = pool.new { threads = 2 }
  end)

  after_each(function()
    p:close()
    d:stop()
    step_until(function() return coroutine.status(d.reader) == "dead" end)
    p, d = nil, nil
  end)

  it("suspends only the calling thread, and returns like pcall", function()
    local path = os.tmpname()
    local got, ticks, ticks_while_waiting = nil, 0, nil
    copas.addthread(function()
      local r = pack(p:run(slow, path, 0.3))
      ticks_while_waiting = ticks
      got = r
    end)
    -- Another thread goes on while the job runs: it yields to Copas
    -- through a socket that is always writable.
    copas.addthread(function()
      local s = assert(socket.udp())
      assert(s:setpeername("127.0.0.1", 9))
      while not got do
        copas.send(s, "")
        ticks = ticks + 1
      end
      s:close()
    end)
    assert.is_true(step_until(function() return got ~= nil end))
    os.remove(path)
    assert.same(pack(true, "done"), got)
    assert.is_true(ticks_while_waiting > 1, "the other thread did not run: " .. ticks_while_waiting)
  end)

  it("gives errors and uncopyable results as false and a message", function()
    local got
    copas.addthread(function()
      local a = pack(p:run(function(x) error("run failed " .. x) end, 7))
      local b = pack(p:run(function() return print end))
      got = { a, b }
    end)
    assert.is_true(step_until(function() return got ~= nil end))
    assert.is_false(got[1][1])
    assert.matches("run failed 7\nstack traceback:", got[1][2])
    assert.same(pack(false, "result #1: a function cannot be copied back from the worker"), got[2])
  end)

  it("serves many threads at once, each with its own results", function()
    local n, got, done = 10, {}, 0
    for i = 1, n do
      copas.addthread(function()
        got[i] = pack(p:run(function(x) return x * x, "square" end, i))
        done = done + 1
      end)
    end
    assert.is_true(step_until(function() return done == n end))
    for i = 1, n do assert.same(pack(true, i * i, "square"), got[i]) end
  end)

  it("raises bad arguments in the calling thread, without waiting", function()
    local got
    copas.addthread(function()
      got = { pcall(p.run, p, identity, print) }
    end)
    assert.is_true(step_until(function() return got ~= nil end))
    assert.is_false(got[1])
    assert.matches("bad argument #2 to 'run' %(a function cannot be copied to a worker%)", got[2])
  end)

  it("returns false, \"cancelled\" for a job that close cancelled", function()
    local path = os.tmpname()
    os.remove(path)
    p:close()
    p = pool.new { threads = 1 }
    local first, second
    copas.addthread(function()
      first = pack(p:run(slow, path, 0.2))
    end)
    copas.addthread(function()
      second = pack(p:run(identity, 2))
    end)
    assert.is_true(step_until(function() return exists(path) end))
    assert.equals(1, p:close())
    assert.is_true(step_until(function() return first ~= nil and second ~= nil end))
    os.remove(path)
    assert.same(pack(true, "done"), first)
    assert.same(pack(false, "cancelled"), second)
  end)
end)

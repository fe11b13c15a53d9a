-- bgworker.pool: Lua functions on background threads, each worker with a
-- Lua state of its own, as jobs with handles: submit, get with a timeout,
-- cancel, progress, stats, worker init. Outcomes come back through a real
-- dispatcher (a select one here, and Copas at the end; every loop's get is
-- in loop_contract_spec.lua). What depends on the Lua version inside the
-- workers (cancelling past pcall and coroutines, __close, LuaJIT's JIT) is
-- in pool_native_spec.lua. Closing a Lua state with running jobs runs in a
-- subprocess of the same interpreter (BGWORKER_LUA, set by the Makefile).

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

local d -- the dispatcher of the current test
local p -- the pool of the current test

-- Run fn(...) on p and wait: what the callback got, packed; the job's get
-- must say the same.
local function run(fn, ...)
  local result
  local job = p:submit(fn, ...):on_done(function(...) result = pack(...) end)
  local got = pack(job:get(10))
  assert.is_not_nil(got[1], "no outcome within 10 s: " .. tostring(got[2]))
  -- The same values (NaN too, which is not equal to itself).
  assert.equals(result.n, got.n)
  for i = 1, got.n do
    assert.is_true(rawequal(got[i], result[i]) or got[i] ~= got[i] and result[i] ~= result[i], "value " .. i)
  end
  return result
end

-- The error raised by p:submit(...), which must raise.
local function submit_error(...)
  local args = pack(...)
  local ok, err = pcall(function() local _ = p:submit(unpack(args, 1, args.n)) end)
  assert.is_false(ok, "submit did not raise")
  return err
end

-- f() must raise an error at its line in this file that contains `msg`.
local function refuses(msg, f)
  local ok, err = pcall(f)
  assert.is_false(ok)
  assert.matches("pool_spec.lua:%d+: ", err)
  assert.truthy(err:find(msg, 1, true), err)
end

local function identity(...)
  return ...
end

-- The ids of the pools' worker threads in this process, as a set (Linux:
-- they are named "bgworker-pool-N"). Specs compare ids, not counts: the
-- workers of other specs' pools (collected, or abandoned in a blocking call)
-- may end at any moment.
local function pool_threads()
  local f = assert(io.open("/proc/self/status"))
  local pid = f:read("*a"):match("\nPid:%s*(%d+)")
  f:close()
  local found = io.popen("cd /proc/" .. pid .. "/task && grep -l '^bgworker-pool' */comm 2>/dev/null")
  local ids = {}
  for path in found:lines() do
    ids[path:match("^(%d+)/")] = true
  end
  found:close()
  return ids
end

-- The worker threads started since `before` (a set of pool_threads()), as a list.
local function started_since(before)
  local list = {}
  for id in pairs(pool_threads()) do
    if not before[id] then list[#list + 1] = id end
  end
  return list
end

-- How many of the threads in `ids` (a list) still run.
local function alive(ids)
  local now, n = pool_threads(), 0
  for _, id in ipairs(ids) do
    if now[id] then n = n + 1 end
  end
  return n
end

-- Wait until `cond()`, at most 10 s, dispatching meanwhile.
local function pump_until(cond)
  assert.is_true(support.pump(d, cond, 10), "timed out")
end

-- The pools of these specs run the interpreter on LuaJIT (`jit = false`):
-- they cancel jobs that spin and count on the hook to stop them at once. A
-- spin that the JIT (on by default) compiled would be retired instead,
-- which pool_retire_spec.lua covers.
local function interpreted_pool(threads)
  return pool.new { threads = threads, jit = false }
end

-- A job that spins in Lua until cancelled (or `seconds` passed), telling
-- the test it started through a progress event.
local function spin(seconds)
  local clock = os.clock
  local stop = clock() + (seconds or 60)
  require("bgworker.worker").progress("started")
  while clock() < stop do end
  return "spun"
end

-- A job that sends progress 1..count as fast as it can, and returns "end".
local function flood(count)
  local progress = require("bgworker.worker").progress
  for i = 1, count do progress(i) end
  return "end"
end

local function started(job)
  local yes = false
  job:on_progress(function(what) yes = yes or what == "started" end)
  pump_until(function() return yes end)
end

-- Make p a pool of one worker, busy with a job that spins until cancelled,
-- so that the jobs submitted next stay queued: that spinning job.
local function one_busy_worker()
  p:close()
  p = interpreted_pool(1)
  local blocker = p:submit(spin, 60)
  started(blocker)
  return blocker
end

describe("bgworker.pool", function()
  setup(support.stop_core)

  before_each(function()
    d = bgworker.new()
    p = interpreted_pool(2)
  end)

  after_each(function()
    if p then p:close(5) end
    support.finish(d)
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
    it("give false, the error value and a traceback", function()
      local r = run(function(x)
        local function inner() error("boom " .. x) end
        inner()
      end, 42)
      assert.equals(3, r.n)
      assert.is_false(r[1])
      assert.matches("boom 42$", r[2])
      assert.matches("stack traceback:", r[3])
      assert.matches("inner", r[3])
    end)

    it("keep error values that can cross: tables, numbers, booleans", function()
      local r = run(function() error({ code = 42, detail = { "x" } }) end)
      assert.same({ code = 42, detail = { "x" } }, r[2])
      assert.is_string(r[3])
      assert.equals(7, run(function() error(7, 0) end)[2])
      assert.equals(false, run(function() error(false) end)[2])
    end)

    it("describe error values that cannot cross", function()
      -- A table crosses without its metatable, as any value does.
      local r = run(function() error(setmetatable({ 1 }, { __tostring = function() return "custom" end })) end)
      assert.same({ 1 }, r[2])
      r = run(function() error(print) end)
      assert.is_false(r[1])
      assert.matches("^function", r[2])
    end)

    it("keep the bytes of the message", function()
      local r = run(function() error("bytes \0\255 end", 0) end)
      assert.same("bytes \0\255 end", r[2])
    end)

    it("report results that cannot cross, by position, with no traceback (nothing raised)", function()
      local r = run(function() return 1, print end)
      assert.same(pack(false, "result #2: a function cannot be copied back from the worker", nil), r)
      r = run(function() return { file = io.stdout } end)
      assert.equals("result #1: a userdata at .file cannot be copied back from the worker", r[2])
    end)

    it("fail only their job when it returns or reports too many, not the jobs crossing with it", function()
      p:close()
      p = interpreted_pool(1)
      local max = pool.MAX_VALUES
      -- Nearly as many values as a worker can return (its unpack's 7997 on
      -- Lua 5.1 and LuaJIT, its stack's 10^6 slots later): they used to
      -- overflow this state's stack, and lose every outcome crossing with
      -- them.
      local many = _VERSION == "Lua 5.1" and 7980 or 999950
      assert.is_true(many > max)
      local function values(n, report)
        local spread = table.unpack or _G.unpack
        local t = {}
        for i = 1, n do t[i] = i end
        if report then require("bgworker.worker").progress(spread(t, 1, n)) end
        return spread(t, 1, n)
      end
      -- One worker, no dispatch until the 33rd outcome asked for a second
      -- carrier (pending goes up by 2): the first carries the first 32
      -- outcomes, so the big ones cross with quick ones on both sides.
      local before = core.pending()
      local jobs, called = {}, nil
      for i = 1, 33 do
        if i == 5 then
          jobs[i] = p:submit(values, many)
        elseif i == 6 then
          jobs[i] = p:submit(values, max):on_done(function(...) called = select("#", ...) end)
        elseif i == 7 then
          jobs[i] = p:submit(values, max + 1, true)
        else
          jobs[i] = p:submit(identity, i)
        end
      end
      assert.is_true(support.eventually(function() return core.pending() == before + 2 end))
      for i = 1, 33 do
        if i < 5 or i > 7 then
          assert.same(pack(true, i), pack(jobs[i]:get(10)))
        end
      end
      assert.same(pack(false, ("%d results cannot be copied back from the worker: at most %d can" ..
        " (return them in a table)"):format(many, max), nil), pack(jobs[5]:get(10)))
      local all = pack(jobs[6]:get(10))
      assert.equals(max + 1, all.n)
      assert.is_true(all[1] and all[2] == 1 and all[max + 1] == max)
      assert.equals(max + 1, called)
      local ok, err = jobs[7]:get(10)
      assert.is_false(ok)
      assert.matches(("'progress' got %d values: at most %d can cross to the Lua thread"):format(max + 1, max),
        err, 1, true)
      assert.same({ "done", "failed", "failed" }, { jobs[6]:status(), jobs[5]:status(), jobs[7]:status() })
      local s = p:stats()
      assert.same({ 31, 2, 0 }, { s.done, s.failed, s.cancelled })
    end)

    it("leave the worker usable", function()
      for _ = 1, 4 do assert.is_false(run(function() error("x") end)[1]) end
      assert.same(pack(true, 3), run(function(a, b) return a + b end, 1, 2))
    end)
  end)

  describe("inline functions", function()
    it("run their own code, a new closure per job, however alike the functions look", function()
      -- As programs write jobs: inline, so a new closure each time (Lua 5.4,
      -- LuaJIT), of functions that differ only in a constant, on one line.
      local held = function(x) return "held " .. x end
      local jobs, expected = {}, {}
      for i = 1, 200 do
        local k = i % 4 + 1
        local fs = { function() return "a" end, function() return "b" end, held, function(x) return x end }
        jobs[i] = p:submit(fs[k], i)
        expected[i] = ({ "a", "b", "held " .. i, i })[k]
      end
      for i = 1, 200 do
        assert.same({ true, expected[i] }, { jobs[i]:get(10) })
      end
    end)

    it("see each worker's globals, not the caller's", function()
      -- luacheck: globals answer
      answer = "the caller's"
      local results = {}
      for i = 1, 20 do
        results[i] = p:submit(function() return answer end)
      end
      for i = 1, 20 do
        assert.same({ true, nil }, { results[i]:get(10) })
      end
      answer = nil
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
      f = assert(io.open(dir .. "/pool_spec_broken.lua", "w"))
      f:write('error("broken while loading")\n')
      f:close()
      saved_path = package.path
    end)

    teardown(function()
      package.path = saved_path
      os.remove(dir .. "/pool_spec_jobs.lua")
      os.remove(dir .. "/pool_spec_broken.lua")
      os.remove(dir)
    end)

    it("requires the module in the worker, on the caller's package.path at pool creation", function()
      p:close()
      package.path = dir .. "/?.lua;" .. saved_path
      p = interpreted_pool(1)
      package.path = saved_path
      assert.same(pack(true, 42), run("pool_spec_jobs.twice", 21))
      local r = run("pool_spec_jobs.fail")
      assert.is_false(r[1])
      assert.matches("failed in a module", r[2])
      assert.same(pack(true, "abab"), run("string.rep", "ab", 2))
    end)

    it("reports missing modules and functions in the user's words, at no location of the pool's", function()
      local r = run("pool_spec_no_such_module.f")
      assert.is_false(r[1])
      assert.matches("^cannot load 'pool_spec_no_such_module%.f': module 'pool_spec_no_such_module' not found",
        r[2])
      assert.is_nil(r[2]:find("bgworker.pool", 1, true))
      r = run("string.no_such_function")
      assert.is_false(r[1])
      assert.matches("'string.no_such_function' is not a function", r[2])
    end)

    it("reports a module that raises while it loads, with the traceback of where", function()
      p:close()
      package.path = dir .. "/?.lua;" .. saved_path
      p = interpreted_pool(1)
      package.path = saved_path
      local r = run("pool_spec_broken.f")
      assert.is_false(r[1])
      assert.matches("^cannot load 'pool_spec_broken%.f': [^\n]*pool_spec_broken%.lua:1: broken while loading$", r[2])
      assert.matches("pool_spec_broken%.lua:1: in main chunk", r[3])
    end)
  end)

  describe("init", function()
    it("runs once in each worker before any job", function()
      p:close()
      p = pool.new { threads = 2, init = function()
        counter = (counter or 0) + 1 -- luacheck: ignore 111 113
        prefix = "ready" -- luacheck: ignore 111
      end }
      local jobs = {}
      for i = 1, 8 do
        jobs[i] = p:submit(function(n) return prefix, counter, n end, i) -- luacheck: ignore 113
      end
      for i = 1, 8 do
        assert.same(pack(true, "ready", 1, i), pack(jobs[i]:get(10)))
      end
    end)

    it("takes a module.function", function()
      p:close()
      p = pool.new { threads = 1, init = "os.clock" }
      assert.same(pack(true, 2), run("string.len", "ab"))
    end)

    it("that fails makes pool.new raise that error, with the worker's traceback, and leaves no thread", function()
      p:close()
      local before = pool_threads()
      local ok, err = pcall(function()
        local _ = pool.new { threads = 3, init = function()
          local function setup() error("no config") end
          setup()
        end }
      end)
      assert.is_false(ok)
      assert.matches("pool_spec.lua:%d+: bgworker.pool.new: init failed in a worker: ", err)
      assert.matches("no config", err)
      assert.matches("stack traceback", err)
      assert.same({}, started_since(before))
      p = nil
    end)

    it("that raises another value makes pool.new raise that value; a table's tostring has the traceback", function()
      p:close()
      local ok, err = pcall(pool.new, { threads = 2, init = function()
        local function setup() error({ code = 42, where = { "config" } }) end
        setup()
      end })
      assert.is_false(ok)
      assert.same({ code = 42, where = { "config" } }, err)
      assert.matches("^bgworker.pool.new: init failed in a worker: table: [^\n]*\nstack traceback:.*in .*setup",
        tostring(err))
      -- Level 0: Lua 5.1 and 5.2 make error(42) a string with a position.
      assert.same(pack(false, 42), pack(pcall(pool.new, { threads = 1, init = function() error(42, 0) end })))
      assert.same(pack(false, false), pack(pcall(pool.new, { threads = 1, init = function() error(false) end })))
      p = nil
    end)
  end)

  describe("bad arguments", function()
    it("refuse a cycle, naming the argument", function()
      local t = { 1 }
      t[2] = t
      assert.matches("bad argument #3 to 'submit' %(a table that contains itself at %[2%] cannot be copied" ..
        " to a worker%)", submit_error(identity, 1, t))
      local key = {}
      key[key] = true
      assert.matches("bad argument #2 to 'submit' %(a table that contains itself at %[table%]",
        submit_error(identity, key))
    end)

    it("refuse userdata and coroutines, naming the argument", function()
      assert.matches("bad argument #3 to 'submit' %(a userdata cannot be copied to a worker%)",
        submit_error(identity, 1, io.stdout))
      assert.matches("bad argument #2 to 'submit' %(a coroutine cannot be copied to a worker%)",
        submit_error(identity, coroutine.create(function() end)))
      assert.matches("bad argument #2 to 'submit' %(a function at .a%[1%] cannot be copied to a worker%)",
        submit_error(identity, { a = { print } }))
      assert.matches("bad argument #2 to 'submit' %(a function used as a table key cannot be copied",
        submit_error(identity, { [print] = 1 }))
      assert.matches("bad argument #2 to 'submit' %(a function cannot be copied to a worker%)",
        submit_error(identity, print, 1))
    end)

    it("refuse tables nested too deep", function()
      local t = {}
      for _ = 1, 250 do t = { t } end
      assert.matches("bad argument #2 to 'submit' %(tables nested more than 200 deep cannot be copied to a worker%)",
        submit_error(identity, t))
    end)

    it("refuse what cannot be a job's function", function()
      assert.matches("bad argument #1 to 'submit' %(function or 'module.function' string expected, got number%)",
        submit_error(42))
      assert.matches("bad argument #1 to 'submit' %('module.function' expected, got 'nodot'%)",
        submit_error("nodot"))
      assert.matches("bad argument #1 to 'submit' %(a C function cannot move to a worker%)",
        submit_error(print))
      local upvalue = io.stdout
      assert.matches("bad argument #1 to 'submit' %(a userdata at upvalue 'upvalue' cannot be copied to a worker",
        submit_error(function() return upvalue end))
    end)

    it("name the method called in a forked child, where a pool refuses", function()
      local status, out = support.run_lua([[
        local bgworker = require "bgworker"
        local pool = require "bgworker.pool"
        local testutil = require "bgworker_testutil"
        bgworker.new()
        local p = pool.new { threads = 1, jit = false }
        io.stdout:flush()
        local pid = testutil.fork()
        if pid == 0 then
          -- The child's own (the parent's dispatcher is not), kept referenced:
          -- a dispatcher that is collected stops.
          local d = bgworker.new()
          local function refusal(f) return select(2, pcall(f)) .. "\n" end
          io.write(refusal(function() p:submit(function() end) end), refusal(function() p:run(function() end) end),
            refusal(function() p:stats() end))
          io.stdout:flush()
          d:stop()
          testutil._exit(0)
        end
        io.write("child: ", tostring(testutil.waitpid(pid, 10)), "\n")
      ]], 60)
      assert.equals(0, status, out)
      local refused = "this pool belongs to the process that made it, and this one is a fork of it\n"
      assert.matches("^[^\n]*:13: submit: " .. refused .. "[^\n]*:13: run: " .. refused .. "[^\n]*stats: " ..
        refused .. "child: 0\n$", out)
    end)

    it("are raised at the caller's line, and leave the pool usable", function()
      assert.matches("pool_spec.lua:%d+: bad argument", submit_error(identity, io.stdout))
      assert.same(pack(true, 1), run(identity, 1))
    end)

    it("check options, self and the new methods", function()
      refuses("bad argument #1 to 'bgworker.pool.new' (opts.threads must be an integer in 1..1024, got 0)",
        function() local _ = pool.new { threads = 0 } end)
      refuses("(opts.threads must be an integer in 1..1024, got 1.5)",
        function() local _ = pool.new { threads = 1.5 } end)
      refuses("bad argument #1 to 'bgworker.pool.new' (unknown option 'thread')",
        function() local _ = pool.new { thread = 1 } end)
      refuses("(opts.init: 'module.function' expected, got 'x')",
        function() local _ = pool.new { init = "x" } end)
      refuses("calling 'submit' on bad self (pool expected, got table; call it as pool:submit())",
        function() local _ = p.submit({}, identity) end)
      local job = p:submit(identity, 1)
      refuses("calling 'cancel' on bad self (job expected, got nil",
        function() local _ = job.cancel() end)
      refuses("calling 'stats' on bad self (pool expected, got nil",
        function() local _ = p.stats() end)
    end)

    it("count a method's arguments without self, as submit does", function()
      local job = p:submit(identity, 1)
      refuses("bad argument #1 to 'get' (timeout must be a non-negative number of seconds, got \"x\")",
        function() local _ = job:get("x") end)
      refuses("bad argument #1 to 'get' (timeout must be a non-negative number of seconds, got -1)",
        function() local _ = job:get(-1) end)
      refuses("bad argument #1 to 'on_progress' (handler must be a function, got 5)",
        function() local _ = job:on_progress(5) end)
      refuses("bad argument #1 to 'on_done' (callback must be a function, got 5)",
        function() local _ = job:on_done(5) end)
      refuses("bad argument #1 to 'close' (timeout must be a non-negative number of seconds, got \"1\")",
        function() local _ = p:close("1") end)
      refuses("bad argument #1 to 'submit' (function or 'module.function' string expected, got number)",
        function() local _ = p:submit(1) end)
      refuses("bad argument #2 to 'submit' (a userdata cannot be copied to a worker)",
        function() local _ = p:submit(identity, io.stdout) end)
      refuses("bad argument #1 to 'run' (function or 'module.function' string expected, got nil)",
        function() local _ = p:run() end)
      refuses("calling 'get' on bad self (job expected, got string",
        function() local _ = job.get("x") end)
    end)

    it("need a running dispatcher, and work with the next one", function()
      d:stop()
      assert.matches("submit: no bgworker dispatcher is running", submit_error(identity))
      d = bgworker.new()
      assert.same(pack(true, "again"), run(identity, "again"))
    end)
  end)

  describe("whose dispatcher stops", function()
    -- The job's callback, get, status and cancel, once it ended as cancelled
    -- and the next dispatcher delivered that.
    local function ends_cancelled(job, callback_got)
      pump_until(function() return callback_got() ~= nil end)
      assert.same(pack(false, "cancelled"), callback_got())
      assert.equals("cancelled", job:status())
      assert.same(pack(false, "cancelled"), pack(job:get(1)))
      assert.is_false(job:cancel())
      assert.is_nil(next(p.jobs), "the pool forgot the job")
    end

    it("end as cancelled when they finish while none runs, once the next one starts", function()
      local got
      local job = p:submit(function()
        require("socket").sleep(0.2)
        return "late"
      end):on_done(function(...) got = pack(...) end)
      assert.is_true(support.eventually(function() return p:stats().running == 1 end))
      d:stop()
      -- The job ends in its worker while no dispatcher runs: its outcome
      -- cannot be delivered.
      assert.is_true(support.eventually(function() return p:stats().cancelled == 1 end))
      d = bgworker.new()
      ends_cancelled(job, function() return got end)
      assert.same(pack(true, "next"), run(identity, "next"))
    end)

    it("end as cancelled when stop drops their outcomes from the queue", function()
      local got
      local job = p:submit(identity, "dropped"):on_done(function(...) got = pack(...) end)
      -- Its outcome waits in the core, undispatched, when stop frees it.
      assert.is_true(support.eventually(function() return core.pending() == 1 end))
      d:stop()
      assert.is_nil(got)
      d = bgworker.new()
      ends_cancelled(job, function() return got end)
    end)

    it("end exactly once under a race of stops, starts and completions", function()
      local calls, outcomes, jobs = {}, {}, {}
      for i = 1, 200 do
        jobs[i] = p:submit(function(n)
          require("socket").sleep(n % 7 * 0.001)
          return n
        end, i):on_done(function(...)
          calls[i] = (calls[i] or 0) + 1
          outcomes[i] = pack(...)
        end)
        if i % 25 == 0 then
          d:stop()
          socket.sleep(0.003)
          d = bgworker.new()
        end
        d:dispatch()
      end
      pump_until(function()
        for i = 1, #jobs do
          if not calls[i] then return false end
        end
        return true
      end)
      d:dispatch()
      for i = 1, #jobs do
        assert.equals(1, calls[i], "callback of job " .. i)
        local o = outcomes[i]
        if o[1] then
          assert.same(pack(true, i), o)
          assert.equals("done", jobs[i]:status())
        else
          assert.same(pack(false, "cancelled"), o)
          assert.equals("cancelled", jobs[i]:status())
        end
      end
      assert.is_nil(next(p.jobs))
    end)
  end)

  describe("jobs", function()
    it("go from queued to running to done, and cancel returns false once done", function()
      p:close()
      p = interpreted_pool(1)
      local first = p:submit(spin, 60)
      local second = p:submit(identity, "second")
      assert.equals("queued", second:status())
      started(first)
      assert.equals("running", first:status())
      assert.equals("queued", second:status())
      assert.is_true(first:cancel())
      assert.equals("cancelled", first:status())
      assert.same(pack(true, "second"), pack(second:get(10)))
      assert.equals("done", second:status())
      assert.is_false(second:cancel())
      assert.is_false(first:cancel())
      assert.equals("done", second:status())
    end)

    it("cancelled while queued never run, and their callbacks get false, \"cancelled\"", function()
      local blocker = one_busy_worker()
      local path, got = os.tmpname(), nil
      os.remove(path)
      local job = p:submit(function(file) io.open(file, "w"):close() end, path):on_done(function(...)
        got = pack(...)
      end)
      assert.is_true(job:cancel())
      assert.equals("cancelled", job:status())
      pump_until(function() return got ~= nil end)
      assert.same(pack(false, "cancelled"), got)
      assert.same(pack(false, "cancelled"), pack(job:get()))
      blocker:cancel()
      assert.same(pack(true), pack(p:submit(identity):get(10)))
      local f = io.open(path)
      if f then f:close() os.remove(path) end
      assert.is_nil(f, "the cancelled job ran")
    end)

    it("cancelled while running stop a CPU-bound loop, and the worker takes the next job", function()
      p:close()
      p = interpreted_pool(1)
      local job = p:submit(spin, 60)
      started(job)
      local t0 = core.now()
      assert.is_true(job:cancel())
      -- The worker is free again: the next job runs, so the loop stopped.
      assert.same(pack(true, "next"), pack(p:submit(identity, "next"):get(10)))
      assert.is_true(core.now() - t0 < 5, "the loop ran on for " .. core.now() - t0 .. " s")
      assert.same(pack(false, "cancelled"), pack(job:get()))
    end)

    it("cancelled while running stop after the application took SIGURG, whose handler still gets its own", function()
      -- In a process of its own: signal dispositions are the process's.
      local status, out = support.run_lua([[
        local bgworker = require "bgworker"
        local pool = require "bgworker.pool"
        local socket = require "socket"
        local testutil = require "bgworker_testutil"
        local d = bgworker.new()
        local p = pool.new { threads = 1, jit = false }
        -- Take SIGURG as `action` says, then cancel a job that never ends
        -- by itself: the next job runs only if it stopped.
        local function cancel_after(action)
          testutil.sigurg(action)
          local started = false
          local job = p:submit(function()
            require("bgworker.worker").progress("started")
            while true do end
          end)
          job:on_progress(function() started = true end)
          local deadline = socket.gettime() + 10
          while not started and socket.gettime() < deadline do d:wait(0.05) end
          local cancelled = job:cancel()
          local ok, next_result = p:submit(function() return "next" end):get(10)
          io.write(action, ": ", tostring(cancelled), " ", tostring(ok), " ", tostring(next_result), "\n")
        end
        cancel_after("ignore")
        cancel_after("count")
        -- A SIGURG that is not a pool's reaches the application's handler.
        io.write("counted: ", testutil.sigurg("raise"), "\n")
        -- A handler that passes SIGURG on to the one it replaced, the
        -- pool's: it gets it once, and the pool's lets it go.
        cancel_after("chain")
        io.write("counted: ", testutil.sigurg("raise"), "\n")
        p:close(1)
      ]], 60)
      assert.equals(0, status, out)
      local warning = ("bgworker.pool: SIGURG's handler was replaced"):gsub("%p", "%%%0")
      assert.equals(1, select(2, out:gsub(warning, "")), out)
      assert.equals("ignore: true true next\ncount: true true next\ncounted: 1\nchain: true true next\ncounted: 2\n",
        out:gsub("[^\n]*" .. warning .. "[^\n]*\n", ""), out)
    end)

    it("call each callback exactly once under a race of cancels and completions", function()
      local n = support.size(3000, 300)
      local calls, jobs = {}, {}
      for i = 1, n do
        jobs[i] = p:submit(function(x) return x end, i):on_done(function(ok, v)
          calls[i] = (calls[i] or 0) + 1
          assert(ok == false and v == "cancelled" or ok == true and v == i)
        end)
      end
      math.randomseed(42)
      local cancelled = 0
      for round = 1, n do
        local i = math.random(n)
        if jobs[i]:cancel() then cancelled = cancelled + 1 end
        if round % 100 == 0 then d:dispatch() end
      end
      pump_until(function()
        for i = 1, n do
          if not calls[i] then return false end
        end
        return true
      end)
      d:wait(0.1) -- nothing more may come
      local cancelled_calls = 0
      for i = 1, n do
        assert.equals(1, calls[i], "job " .. i)
        if jobs[i]:status() == "cancelled" then cancelled_calls = cancelled_calls + 1 end
      end
      assert.equals(cancelled, cancelled_calls)
      local s = p:stats()
      assert.equals(n, s.submitted)
      assert.equals(n, s.done + s.failed + s.cancelled)
    end)

    it("get times out with nil, \"timeout\", leaves the job running, and can wait again", function()
      local job = p:submit(function()
        require("socket").sleep(0.3)
        return "late"
      end)
      local t0 = core.now()
      assert.same(pack(nil, "timeout"), pack(job:get(0.05)))
      assert.is_true(core.now() - t0 >= 0.045)
      assert.equals("running", job:status())
      assert.same(pack(true, "late"), pack(job:get(10)))
      assert.same(pack(true, "late"), pack(job:get(0)))
    end)

    it("serves several waiting coroutines of one job", function()
      local job = p:submit(function() require("socket").sleep(0.05) return "shared" end)
      local got = {}
      for i = 1, 3 do
        local co = coroutine.create(function() got[i] = pack(job:get(10)) end)
        assert(coroutine.resume(co))
      end
      pump_until(function() return got[1] and got[2] and got[3] end)
      for i = 1, 3 do assert.same(pack(true, "shared"), got[i]) end
    end)

    it("run waits like pcall", function()
      assert.same(pack(true, 6), pack(p:run(function(a, b) return a * b end, 2, 3)))
      local r = pack(p:run(function() error({ code = 1 }) end))
      assert.is_false(r[1])
      assert.same({ code = 1 }, r[2])
      local ok, err = pcall(function() local _ = p:run(identity, io.stdout) end)
      assert.is_false(ok)
      assert.matches("pool_spec.lua:%d+: bad argument #2 to 'run'", err)
    end)
  end)

  describe("on_done", function()
    -- A callback that counts its calls and keeps what the last one got.
    local function recorder()
      local r = { calls = 0 }
      function r.callback(...)
        r.calls = r.calls + 1
        r.got = pack(...)
      end
      return r
    end

    it("runs the callback once, with what get returns, and returns the job", function()
      local r = recorder()
      local job = p:submit(function(a, b)
        require("socket").sleep(0.05)
        return a + b, "sum"
      end, 1, 2)
      assert.equals(job, job:on_done(r.callback))
      pump_until(function() return r.calls > 0 end)
      assert.same(pack(true, 3, "sum"), r.got)
      assert.same(r.got, pack(job:get(0)))
      local failed = recorder()
      local raises = p:submit(function() error("boom", 0) end):on_done(failed.callback)
      local ok, err = raises:get(10)
      assert.same({ false, "boom" }, { ok, err })
      pump_until(function() return failed.calls > 0 end)
      assert.same(pack(raises:get(0)), failed.got)
      assert.matches("stack traceback", failed.got[3])
      d:wait(0.05) -- nothing more may come
      assert.same({ 1, 1 }, { r.calls, failed.calls })
    end)

    it("given after the job ended, runs at the next drain, not inside on_done", function()
      local job = p:submit(identity, "late", nil)
      assert.same(pack(true, "late", nil), pack(job:get(10)))
      local r = recorder()
      assert.equals(job, job:on_done(r.callback))
      assert.equals(0, r.calls, "on_done called the callback itself")
      d:dispatch()
      assert.equals(1, r.calls)
      assert.same(pack(true, "late", nil), r.got)
      d:wait(0.05)
      assert.equals(1, r.calls)
    end)

    it("given after the dispatcher stopped, runs in the next dispatcher", function()
      local job = p:submit(identity, 7)
      assert.same(pack(true, 7), pack(job:get(10)))
      d:stop()
      local r = recorder()
      job:on_done(r.callback)
      assert.equals(0, r.calls)
      d = bgworker.new()
      pump_until(function() return r.calls > 0 end)
      assert.same(pack(true, 7), r.got)
      d:wait(0.05)
      assert.equals(1, r.calls)
    end)

    it("gets false, \"cancelled\" for a cancelled job, given before or after the cancel", function()
      local blocker = one_busy_worker()
      local before, after, stopped = recorder(), recorder(), recorder()
      local job = p:submit(identity, 1):on_done(before.callback)
      assert.is_true(job:cancel())
      local other = p:submit(identity, 2)
      assert.is_true(other:cancel())
      other:on_done(after.callback)
      assert.same({ 0, 0 }, { before.calls, after.calls }, "called inside cancel or on_done")
      -- A cancel's call is deferred: a dispatcher that stops before its
      -- drain leaves it to the next one.
      local third = p:submit(identity, 3):on_done(stopped.callback)
      pump_until(function() return before.calls > 0 and after.calls > 0 end)
      assert.is_true(third:cancel())
      d:stop()
      assert.equals(0, stopped.calls)
      d = bgworker.new()
      pump_until(function() return stopped.calls > 0 end)
      d:wait(0.05)
      for _, r in ipairs { before, after, stopped } do
        assert.equals(1, r.calls)
        assert.same(pack(false, "cancelled"), r.got)
      end
      blocker:cancel()
    end)

    it("gets false, \"cancelled\" when the pool closes, given before or after", function()
      local running, queued, after = recorder(), recorder(), recorder()
      one_busy_worker():on_done(running.callback)
      p:submit(identity, 1):on_done(queued.callback)
      local later = p:submit(identity, 2)
      assert.is_true(p:close(5))
      later:on_done(after.callback)
      assert.same({ 0, 0, 0 }, { running.calls, queued.calls, after.calls }, "called inside close or on_done")
      pump_until(function() return running.calls > 0 and queued.calls > 0 and after.calls > 0 end)
      d:wait(0.05)
      for _, r in ipairs { running, queued, after } do
        assert.equals(1, r.calls)
        assert.same(pack(false, "cancelled"), r.got)
      end
    end)

    it("reports a callback that raises to the dispatcher's error handler", function()
      local errors, handler = support.collector()
      d:stop()
      d = bgworker.new { errorhandler = handler }
      local job = p:submit(identity, 1):on_done(function() error("in on_done", 0) end)
      local r = recorder()
      p:submit(identity, 2):on_done(r.callback)
      pump_until(function() return #errors == 1 and r.calls == 1 end)
      assert.equals("in on_done", errors[1].err)
      job:get(1)
      -- After the outcome too.
      local ended = p:submit(identity, 3)
      ended:get(10)
      ended:on_done(function() error("late", 0) end)
      pump_until(function() return #errors == 2 end)
      assert.equals("late", errors[2].err)
    end)

    it("refuses what is not a function, and a second callback, at the caller's line", function()
      local job = p:submit(identity, 1)
      local function refusal(f)
        local ok, err = pcall(f)
        assert.is_false(ok)
        return err
      end
      assert.matches("pool_spec.lua:%d+: bad argument #1 to 'on_done' %(callback must be a function, got 5%)",
        refusal(function() job:on_done(5) end))
      assert.matches("pool_spec.lua:%d+: bad argument #1 to 'on_done' %(callback must be a function, got nil%)",
        refusal(function() job:on_done() end))
      assert.matches("pool_spec.lua:%d+: calling 'on_done' on bad self %(job expected, got table",
        refusal(function() job.on_done({}, print) end))
      local r = recorder()
      job:on_done(r.callback)
      assert.matches("pool_spec.lua:%d+: on_done: the job has its callback already",
        refusal(function() job:on_done(r.callback) end))
      assert.same(pack(true, 1), pack(job:get(10)))
      -- Once it ran too.
      pump_until(function() return r.calls == 1 end)
      assert.matches("on_done: the job has its callback already", refusal(function() job:on_done(print) end))
      d:wait(0.05)
      assert.equals(1, r.calls)
    end)

    it("is the only way to give a callback: submit refuses a last function like any function argument", function()
      local before = p:stats().submitted
      assert.matches("pool_spec.lua:%d+: bad argument #3 to 'submit' %(a function cannot be copied to a worker;" ..
        " give a callback with job:on_done%)", submit_error(identity, 1, function() end))
      assert.matches("bad argument #2 to 'submit' %(a function cannot be copied to a worker; give a callback",
        submit_error(identity, print))
      -- Not last: no hint.
      assert.matches("bad argument #2 to 'submit' %(a function cannot be copied to a worker%)$",
        submit_error(identity, print, 1))
      assert.equals(before, p:stats().submitted)
    end)
  end)

  describe("progress", function()
    it("reaches the handler in order, before the outcome, under load", function()
      local n = support.size(2000, 200)
      local jobs, seen, order = {}, {}, {}
      for j = 1, 4 do
        seen[j] = 0
        jobs[j] = p:submit(function(count, id)
          local progress = require("bgworker.worker").progress
          for i = 1, count do progress(id, i) end
          return "end"
        end, n, j):on_done(function(ok)
          order[#order + 1] = { j, seen[j], ok }
        end)
        jobs[j]:on_progress(function(id, i)
          assert(id == j and i == seen[j] + 1, "out of order")
          seen[j] = i
        end)
      end
      pump_until(function() return #order == 4 end)
      for _, o in ipairs(order) do
        assert.same({ o[1], n, true }, o)
      end
    end)

    it("slows a job that emits faster than the loop drains, with bounded memory", function()
      local job = p:submit(function(count)
        local progress = require("bgworker.worker").progress
        for i = 1, count do progress(i) end
        return "end"
      end, support.size(100000, 5000))
      local last = 0
      job:on_progress(function(i) last = i end)
      socket.sleep(0.2) -- no dispatch: the job must wait
      assert.is_true(core.pending() <= 100, core.pending() .. " items pending")
      assert.equals("running", job:status())
      assert.same(pack(true, "end"), pack(job:get(60)))
      assert.equals(support.size(100000, 5000), last)
    end)

    it("keeps get's timeout outside a coroutine while a job floods a slow handler", function()
      -- Every loop's coroutines: loop_contract_spec.lua. Here the caller
      -- blocks, running the dispatcher.
      local n = support.size(1500, 300)
      local job = p:submit(flood, n)
      local last, due, late = 0, math.huge, 0
      job:on_progress(function(i)
        assert(i == last + 1, "out of order")
        last = i
        if core.now() > due then late = late + 1 end
        socket.sleep(0.001)
      end)
      local t0 = core.now()
      due = t0 + 0.2
      local first = pack(job:get(0.2))
      local waited = core.now() - t0
      due = math.huge
      -- About 1.5 s of handlers, which one drain used to run at once. Its
      -- lateness counted in handlers begun after it was due, not in
      -- seconds, which a busy machine stretches: those that fit in a slice.
      assert.is_true(waited >= 0.195, ("get(0.2) returned after %.3f s"):format(waited))
      assert.is_true(late <= bgworker.SLICE / 0.001 + 1, ("%d handlers began after get's timeout was due"):format(late))
      assert.same(pack(nil, "timeout"), first)
      assert.same(pack(true, "end"), pack(job:get(30)))
      assert.equals(n, last)
    end)

    it("leaves the events a slice did not reach to the next slice, of the next dispatcher if it stops", function()
      d:stop()
      d = bgworker.new { budget = 5 }
      local seen = {}
      -- The job's events are all sent before anything is dispatched, so
      -- that one carrier takes them all: the job says so in a file.
      local sent = os.tmpname()
      local job = p:submit(function(n, path)
        local progress = require("bgworker.worker").progress
        for i = 1, n do progress(i) end
        local f = assert(io.open(path, "w"))
        f:write("sent")
        f:close()
        return "end"
      end, 20, sent)
      job:on_progress(function(i) seen[#seen + 1] = i end)
      assert.is_true(support.eventually(function()
        local f = assert(io.open(sent))
        local said = f:read("*a")
        f:close()
        return said == "sent"
      end))
      os.remove(sent)
      d:dispatch()
      assert.is_true(#seen >= 1 and #seen <= 5, #seen .. " handlers in a drain of budget 5")
      d:stop()
      d = bgworker.new()
      assert.same(pack(true, "end"), pack(job:get(5)))
      local all = {}
      for i = 1, 20 do all[i] = i end
      assert.same(all, seen)
    end)

    it("reports each error of a slow handler that raises, in order, and keeps get's timeout", function()
      local errors, handler = support.collector()
      d:stop()
      d = bgworker.new { errorhandler = handler }
      local n = support.size(500, 100)
      local job = p:submit(flood, n)
      local due, late = math.huge, 0
      job:on_progress(function(i)
        if core.now() > due then late = late + 1 end
        socket.sleep(0.001)
        error("progress " .. i, 0)
      end)
      local t0 = core.now()
      due = t0 + 0.1
      local first = pack(job:get(0.1))
      local waited = core.now() - t0
      due = math.huge
      -- Late by a slice's handlers at most, as above.
      assert.is_true(waited >= 0.095, ("get(0.1) returned after %.3f s"):format(waited))
      assert.is_true(late <= bgworker.SLICE / 0.001 + 1, ("%d handlers began after get's timeout was due"):format(late))
      assert.same(pack(nil, "timeout"), first)
      assert.same(pack(true, "end"), pack(job:get(30)))
      assert.equals(n, #errors)
      for i = 1, n do
        if errors[i].err ~= "progress " .. i then assert.equals("progress " .. i, errors[i].err) end
      end
    end)

    it("ends with a cancelled job, whose handler gets nothing more", function()
      local job = p:submit(function()
        local worker = require "bgworker.worker"
        for i = 1, 1e9 do worker.progress(i) end
      end)
      local last = 0
      job:on_progress(function(i)
        last = i
        if i == 10 then job:cancel() end
      end)
      pump_until(function() return job:status() == "cancelled" end)
      d:wait(0.1)
      assert.equals(10, last)
    end)
  end)

  describe("stats", function()
    it("add up at every moment, and time the queue and the runs", function()
      p:close()
      p = interpreted_pool(2)
      local function check()
        local s = p:stats()
        assert.equals(s.submitted, s.queued + s.running + s.done + s.failed + s.cancelled)
        return s
      end
      local jobs = {}
      for i = 1, 20 do
        jobs[i] = p:submit(function(x)
          require("socket").sleep(0.01)
          if x % 5 == 0 then error("five") end
          return x
        end, i)
        check()
      end
      jobs[20]:cancel()
      for i = 1, 19 do
        jobs[i]:get(10)
        check()
      end
      local s = check()
      assert.same({ 2, 20, 0, 0, 16, 3, 1 }, { s.threads, s.submitted, s.queued, s.running, s.done,
        s.failed, s.cancelled })
      assert.is_true(s.run_mean >= 0.009 and s.run_max >= s.run_mean, "run times")
      assert.is_true(s.wait_max >= s.wait_mean and s.wait_mean >= 0, "wait times")
      -- Jobs waited in the queue behind two threads.
      assert.is_true(s.wait_max >= 0.02, "wait_max " .. s.wait_max)
    end)
  end)

  describe("close", function()
    it("cancels queued jobs, stops the running ones, and joins the threads", function()
      p:close()
      local before = pool_threads()
      p = interpreted_pool(1)
      local workers = started_since(before)
      assert.equals(1, #workers)
      local results = {}
      local running = p:submit(spin, 60):on_done(function(...) results[1] = pack(...) end)
      started(running)
      for i = 2, 4 do p:submit(identity, i):on_done(function(...) results[i] = pack(...) end) end
      assert.is_true(p:close(5))
      assert.equals(0, alive(workers))
      pump_until(function() return results[1] and results[2] and results[3] and results[4] end)
      for i = 1, 4 do assert.same(pack(false, "cancelled"), results[i]) end
      assert.is_true(p:close())
      local ok, err = pcall(function() local _ = p:submit(identity) end)
      assert.is_false(ok)
      assert.matches("submit: the pool is closed", err)
    end)

    it("gives up on a job blocked in C after its timeout, and abandons the worker", function()
      local job = p:submit(function()
        require("socket").sleep(1)
        return "late"
      end)
      socket.sleep(0.05) -- it is in socket.sleep now
      local t0 = core.now()
      assert.same({ false, "timeout" }, { p:close(0.1) })
      assert.is_true(core.now() - t0 < 0.9, "close waited " .. core.now() - t0 .. " s")
      assert.same(pack(false, "cancelled"), pack(job:get()))
    end)

    it("when the pool is collected, cancels its jobs without waiting for them", function()
      local got = {}
      local q = interpreted_pool(2)
      q:submit(function() require("socket").sleep(1) end):on_done(function(...) got.running = pack(...) end)
      q:submit(identity, "done"):on_done(function(...) got.done = pack(...) end)
      -- One job sleeps in C; the other's outcome waits in the core.
      assert.is_true(support.eventually(function()
        local s = q:stats()
        return s.queued == 0 and core.pending() == 1
      end))
      -- What two full collections cost without the pool (more under valgrind).
      local t0 = core.now()
      collectgarbage()
      collectgarbage()
      local base = core.now() - t0
      q = nil -- luacheck: ignore 311
      t0 = core.now()
      collectgarbage()
      collectgarbage()
      local took = core.now() - t0
      assert.is_true(took < base + 0.5, ("the collection took %.3f s (%.3f s without the pool):" ..
        " it waited for the sleeping job"):format(took, base))
      pump_until(function() return got.running and got.done end)
      assert.same(pack(false, "cancelled"), got.running)
      assert.same(pack(false, "cancelled"), got.done)
    end)

    it("happens when the pool is collected", function()
      p:close()
      local before = pool_threads()
      p = interpreted_pool(3)
      local workers = started_since(before)
      assert.equals(3, #workers)
      p = nil
      collectgarbage()
      collectgarbage()
      assert.is_true(support.eventually(function() return alive(workers) == 0 end, 5))
    end)

    it("lets the process exit soon, and cleanly, when its jobs never end", function()
      -- Under valgrind where it is installed: the abandoned worker must not
      -- touch freed memory, and nothing may be lost. --fair-sched=yes, since
      -- valgrind's default scheduler lets the spinning worker starve the
      -- main thread (the exit then took 20 to 90 s instead of 2).
      local valgrind = os.execute("valgrind --version >/dev/null 2>&1")
      local prefix = (valgrind == true or valgrind == 0) and
        "valgrind -q --fair-sched=yes --error-exitcode=99 --leak-check=full --show-leak-kinds=definite,indirect" ..
        " --errors-for-leak-kinds=definite,indirect"
      local t0 = core.now()
      local status, out = support.run_lua([[
        local bgworker = require "bgworker"
        local pool = require "bgworker.pool"
        local d = bgworker.new() -- referenced: a collected dispatcher stops
        -- (The interpreter on LuaJIT, whose hook ends the loop: a compiled
        -- one would still spin at exit, its state never freed; the exit's
        -- speed with one is in pool_retire_spec.lua.)
        local p = pool.new { threads = 2, jit = false }
        p:submit(function() while true do end end)
        p:submit(function() require("socket").sleep(30) end)
        require("socket").sleep(0.2)
        io.write("end of script\n")
      ]], 60, prefix)
      local took = core.now() - t0
      assert.equals(0, status, out)
      assert.equals("end of script\n", out)
      -- The sleeping job is abandoned after the close grace of 1 s (and
      -- valgrind is slow to start): far less than its 30 s.
      assert.is_true(took < 20, "the process took " .. took .. " s to exit")
    end)
  end)
end)

-- Each test is a Copas thread of bgworker.busted's: a dispatcher of its
-- own, and its pool closed and its threads removed after it.
describe("bgworker.pool in Copas", function()
  local copas = support.needs_copas()
  if not copas then return end
  local helper = require "bgworker.busted"

  local function in_copas(body)
    return helper.async(body, { loop = "copas", timeout = 10 })
  end

  -- Pause the calling Copas thread (Copas 1.x has no copas.pause).
  local function pause(seconds)
    bgworker.await(function(done) bgworker.current():timer(seconds, done) end)
  end

  it("run suspends only the calling thread, and returns like pcall", in_copas(function()
    local workers = interpreted_pool(2)
    local ticks, waiting = 0, true
    copas.addthread(function()
      while waiting do
        ticks = ticks + 1
        pause(0.01)
      end
    end)
    local got = pack(workers:run(function() require("socket").sleep(0.2) return "done" end))
    waiting = false
    assert.same(pack(true, "done"), got)
    assert.is_true(ticks > 1, "the other thread did not run")
  end))

  it("get answers a request with a timeout, and cancel stops the job", in_copas(function()
    local job = interpreted_pool(2):submit(spin, 60)
    assert.same(pack(nil, "timeout"), pack(job:get(0.1)))
    assert.is_true(job:cancel())
    assert.equals("cancelled", job:status())
  end))

  it("serves many threads at once, each with its own results", in_copas(function()
    local workers = interpreted_pool(2)
    local n, got, done = 10, {}, 0
    for i = 1, n do
      copas.addthread(function()
        got[i] = pack(workers:run(function(x) return x * x, "square" end, i))
        done = done + 1
      end)
    end
    helper.eventually(function() return done == n end, 10)
    for i = 1, n do assert.same(pack(true, i * i, "square"), got[i]) end
  end))

  it("raises bad arguments in the calling thread, without waiting", in_copas(function()
    local workers = interpreted_pool(2)
    local ok, err = pcall(function() local _ = workers:run(identity, io.stdout) end)
    assert.is_false(ok)
    assert.matches("pool_spec.lua:%d+: bad argument #2 to 'run' %(a userdata cannot be copied to a worker%)", err)
  end))
end)

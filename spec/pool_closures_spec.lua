-- A job's function may be a closure: its upvalues are copied with its
-- arguments (the same rules: shared tables stay shared, a table that
-- contains itself is refused), functions among them too, with theirs; the
-- global table is the worker's own. An upvalue that cannot be copied is
-- refused by `submit`, at the caller's line, by its name.

local bgworker = require "bgworker"
local pool = require "bgworker.pool"
local socket = require "socket"

-- Lua 5.1 cannot tell that two closures share a variable (LuaJIT can).
local TELLS_SHARED_VARIABLES = _VERSION ~= "Lua 5.1" or jit ~= nil

describe("a closure as a job's function", function()
  local d, workers

  before_each(function()
    d = bgworker.new()
    workers = pool.new { threads = 2 }
  end)

  after_each(function()
    workers:close(0)
    d:stop()
  end)

  it("runs with copies of the numbers, strings and tables its upvalues hold", function()
    local n, s, t = 6, "ab", { list = { 1, 2, 3 }, name = "t" }
    local job = workers:submit(function(k)
      local sum = 0
      for _, v in ipairs(t.list) do sum = sum + v end
      return n * k, s:upper(), sum, t.name
    end, 7)
    assert.same({ true, 42, "AB", 6, "t" }, { job:get(10) })
  end)

  it("sees the values its upvalues held when it was submitted; its changes stay in the worker", function()
    local n, t = 1, { x = "caller" }
    local read = function()
      t.x = "worker"
      n = n + 100
      return n, t.x
    end
    local first = workers:submit(read)
    n = 2
    local second = workers:submit(read)
    assert.same({ true, 101, "worker" }, { first:get(10) })
    assert.same({ true, 102, "worker" }, { second:get(10) })
    assert.equals(2, n)
    assert.equals("caller", t.x)
  end)

  it("copies the functions it calls, with their upvalues, recursive ones too", function()
    local base = 10
    local function add(x) return base + x end
    local ops = { double = function(x) return add(x) * 2 end }
    local function fib(k) if k < 2 then return k end return fib(k - 1) + fib(k - 2) end
    local even, odd
    function even(k) if k == 0 then return true end return odd(k - 1) end
    function odd(k) if k == 0 then return false end return even(k - 1) end
    local job = workers:submit(function(x) return ops.double(x), fib(15), even(10), odd(10) end, 1)
    assert.same({ true, 22, 610, true, false }, { job:get(10) })
    -- A recursive local function as the job's function itself.
    assert.same({ true, 55 }, { workers:submit(fib, 10):get(10) })
  end)

  it("keeps a variable its functions share as one variable (not on Lua 5.1)", function()
    local count = 0
    local function inc() count = count + 1 end
    local job = workers:submit(function() inc() inc() return count end)
    assert.same({ true, TELLS_SHARED_VARIABLES and 2 or 0 }, { job:get(10) })
  end)

  it("keeps a table its upvalues and its arguments share as one table", function()
    local shared = { 1 }
    local job = workers:submit(function(arg) return rawequal(arg, shared), #shared end, shared)
    assert.same({ true, true, 1 }, { job:get(10) })
  end)

  it("uses the worker's global table for _ENV and for an upvalue that holds _G", function()
    local G = _G
    rawset(_G, "bgworker_closure_marker", "caller")
    local job = workers:submit(function()
      return rawequal(G, _G), G.bgworker_closure_marker, type(G.require)
    end)
    local got = { job:get(10) }
    rawset(_G, "bgworker_closure_marker", nil)
    assert.same({ true, true, nil, "function" }, got)
  end)

  it("runs as a pool's init", function()
    local factor = 3
    local p = pool.new { threads = 1, init = function() rawset(_G, "factor", factor) end }
    assert.same({ true, 3 }, { p:submit(function() return rawget(_G, "factor") end):get(10) })
    p:close(0)
  end)

  it("refuses an upvalue that cannot be copied, naming it, at the caller's line", function()
    local udp = socket.udp()
    local co = coroutine.create(function() end)
    local function refusal(f)
      local ok, err = pcall(function() workers:submit(f) end)
      assert.is_false(ok)
      return err
    end
    local err = refusal(function() return udp end)
    assert.matches("pool_closures_spec.lua:%d+: bad argument #1 to 'submit' %(a userdata at upvalue 'udp' " ..
      "cannot be copied to a worker %(upvalues are copied: require modules inside the function%)%)", err)
    assert.matches("a coroutine at upvalue 'co' cannot", refusal(function() return co end))
    -- A module: what refuses it depends on its insides, the name does not.
    assert.matches("at upvalue 'socket'[^(]* cannot be copied", refusal(function() return socket.gettime() end))
    local function wrap(x) return function() return x end end
    local t = {}
    t.f = wrap(t)
    assert.matches("a table that contains itself at upvalue 't'%.f, upvalue 'x' cannot",
      refusal(function() return t end))
    local ok, why = pcall(function() pool.new { threads = 1, init = function() return udp end } end)
    assert.is_false(ok)
    assert.matches("pool_closures_spec.lua:%d+: bad argument #1 to 'bgworker.pool.new' %(opts%.init: a userdata " ..
      "at upvalue 'udp' cannot be copied", why)
    udp:close()
  end)

  it("still refuses a function as an argument (give the callback with on_done)", function()
    local ok, err = pcall(function() workers:submit(function(f) return f end, function() end) end)
    assert.is_false(ok)
    assert.matches("bad argument #2 to 'submit' %(a function cannot be copied to a worker; give a callback", err)
  end)
end)

-- What issue 20 asks of each loop: messages in order, a job blocked in
-- receive ended at its cancel with its worker back, a closure over numbers,
-- strings and tables.
local function loop_block(loop)
  local helper = require "bgworker.busted"
  local function async(body) return helper.async(body, { loop = loop, timeout = 10 }) end

  it("hands 100 messages to a running job in the order sent", async(function()
    local workers = pool.new { threads = 1 }
    local job = workers:submit(function()
      local receive = require("bgworker.worker").receive
      local got = {}
      for i = 1, 100 do got[i] = receive(10) end
      return got
    end)
    for i = 1, 100 do
      while true do
        local ok, why = job:send(i)
        if ok then break end
        assert.equals("full", why)
        bgworker.await(function(done) bgworker.current():timer(0.001, done) end)
      end
    end
    local ok, got = job:get(10)
    assert.is_true(ok)
    for i = 1, 100 do assert(got[i] == i, "message " .. i .. " came as " .. tostring(got[i])) end
  end))

  it("ends a job blocked in receive at its cancel; its worker takes the next job", async(function()
    local workers = pool.new { threads = 1 }
    local job = workers:submit(function() return require("bgworker.worker").receive() end)
    helper.eventually(function() return workers:stats().running == 1 end, 5)
    assert.is_true(job:cancel())
    assert.same({ true, "next" }, { workers:submit(function() return "next" end):get(10) })
    -- Back from receive: not retired and replaced after the grace.
    assert.equals(0, workers:stats().abandoned)
  end))

  it("runs a closure over numbers, strings and tables", async(function()
    local workers = pool.new { threads = 1 }
    local n, s, t = 2, "x", { y = { 3 } }
    assert.same({ true, 6, "xx" }, { workers:submit(function() return n * t.y[1], s .. s end):get(10) })
  end))
end

describe("messages and closures in a select loop", function()
  loop_block("select")
end)

describe("messages and closures in Copas", function()
  if not require("support").needs_copas() then return end
  loop_block("copas")
end)

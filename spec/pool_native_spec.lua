-- bgworker.pool_native, the native half of bgworker.pool, where the Lua
-- version matters: cancelling a running job (past its pcalls and
-- coroutines, __close on 5.4, LuaJIT's JIT), progress, structured errors,
-- init, and a process whose pool runs a job that never ends. The Rust tests
-- (crates/bgworker-pool) cover the whole contract on Lua 5.4.

-- Globals of the workers' states, set and read by jobs.
-- luacheck: globals inits ran closed

local bgworker = require "bgworker"
local native = require "bgworker.pool_native"
local socket = require "socket"
local support = require "support"

local pack = table.pack or function(...)
  return { n = select("#", ...), ... }
end
local unpack = table.unpack or unpack

-- events[id]: job id's events in order, each packed as `"progress",
-- values...`, `"done", results...` or `"failed", err, traceback`.
local d, p, events

local function record(id, event, ...)
  local list = events[id] or {}
  events[id] = list
  list[#list + 1] = pack(event, ...)
end

-- The pool's `on_events(list, n)`: pairs `id, value` (the crate's lib.rs).
local function on_events(list, n)
  for i = 1, n, 2 do
    local id, value = list[i], list[i + 1]
    if id < 0 then
      record(-id, "progress", unpack(value, 1, value.n))
    elseif value == true then
      record(id, "done")
    elseif value[1] then
      record(id, "done", unpack(value, 2, value.n))
    else
      record(id, "failed", value[2], value[3])
    end
  end
end

-- A pool of one thread (so that a job that did not stop keeps the next
-- one from running). On LuaJIT, with the JIT off: compiled code cannot be
-- cancelled (the last test shows it).
local function new_pool(opts)
  opts = opts or {}
  opts.threads = opts.threads or 1
  opts.path, opts.cpath, opts.on_events = package.path, package.cpath, on_events
  if opts.jit == nil then
    opts.jit = false
  end
  return native.new(opts)
end

local function submit(f, ...)
  return (p:queue(f, ...))
end

local function outcome(id)
  for _, e in ipairs(events[id] or {}) do
    if e[1] == "done" or e[1] == "failed" then
      return e
    end
  end
end

local function pump_until(done)
  assert.is_true(support.pump(d, done), "no event within 10 s")
end

local function wait_running(id)
  assert.is_true(support.eventually(function() return p:status(id) == "running" end))
end

-- Submit `f`, wait until it runs, cancel it: it stops, its worker runs
-- the next job, and no event of it ever arrives.
local function cancels(f)
  local victim = submit(f)
  wait_running(victim)
  socket.sleep(0.02)
  assert.equals("running", p:cancel(victim))
  local after = submit(function() return "after" end)
  pump_until(function() return outcome(after) ~= nil end)
  assert.is_nil(events[victim])
  assert.equals("finished", p:status(victim))
end

-- A script for a child process: a pool of one thread (the JIT left on)
-- that runs `while true do end` as job `id`.
local RUNAWAY = [[
  local bgworker = require "bgworker"
  local native = require "bgworker.pool_native"
  local d = bgworker.new()
  local p = native.new { threads = 1, path = package.path, cpath = package.cpath, on_events = print }
  local id = p:queue(function() while true do end end)
  while p:status(id) ~= "running" do end
]]

describe("bgworker.pool_native", function()
  before_each(function()
    support.stop_core()
    d = bgworker.new()
    events = {}
  end)

  after_each(function()
    if p then p:close(5) end
    d:stop()
    p, d = nil, nil
  end)

  it("runs a job and reports its progress in order, then its results", function()
    p = new_pool()
    local id = submit(function(n)
      local worker = require "bgworker.worker"
      for i = 1, n do worker.progress(i) end
      return n * 2, { "t" }
    end, 50)
    pump_until(function() return outcome(id) ~= nil end)
    assert.equals(51, #events[id])
    for i = 1, 50 do assert.same(pack("progress", i), events[id][i]) end
    assert.same(pack("done", 100, { "t" }), events[id][51])
  end)

  it("reports an error value itself, with a traceback", function()
    p = new_pool()
    local id = submit(function() error({ code = 42 }) end)
    pump_until(function() return outcome(id) ~= nil end)
    local e = outcome(id)
    assert.equals("failed", e[1])
    assert.same({ code = 42 }, e[2])
    assert.matches("^stack traceback:", e[3])
  end)

  it("runs init once in each worker before any job", function()
    p = new_pool { threads = 2, init = function() inits = (inits or 0) + 1 end }
    local ids = {}
    for i = 1, 6 do ids[i] = submit(function() return inits end) end
    pump_until(function() return p:stats().done == 6 end)
    for i = 1, 6 do assert.same(pack("done", 1), outcome(ids[i])) end
  end)

  it("cancels a queued job, which never runs", function()
    p = new_pool()
    local blocker = submit(function() while true do end end)
    local queued = submit(function() ran = true end)
    wait_running(blocker)
    assert.equals("queued", p:cancel(queued))
    assert.equals("running", p:cancel(blocker))
    local check = submit(function() return ran == nil end)
    pump_until(function() return outcome(check) ~= nil end)
    assert.same(pack("done", true), outcome(check))
  end)

  it("stops a CPU-bound loop", function()
    p = new_pool()
    cancels(function() while true do end end)
    cancels(function()
      local s = 0
      for i = 1, math.huge do s = s + i % 7 end
      return s
    end)
  end)

  it("stops a loop past the job's own pcall, xpcall and coroutines", function()
    p = new_pool()
    cancels(function() while true do pcall(function() while true do end end) end end)
    cancels(function() while true do xpcall(function() while true do end end, function(e) return e end) end end)
    cancels(function() while true do coroutine.resume(coroutine.create(function() while true do end end)) end end)
    cancels(function() while true do pcall(coroutine.wrap(function() while true do end end)) end end)
  end)

  it("runs __close variables of a cancelled job (Lua 5.4)", function()
    if _VERSION ~= "Lua 5.4" then
      return -- no to-be-closed variables before 5.4
    end
    p = new_pool()
    -- Lua 5.4 syntax: loaded from source so that older versions parse this file.
    cancels(assert(load([[
      return function()
        local guard <close> = setmetatable({}, { __close = function() closed = true end })
        while true do end
      end
    ]]))())
    local check = submit(function() return closed end)
    pump_until(function() return outcome(check) ~= nil end)
    assert.same(pack("done", true), outcome(check))
  end)

  it("lets a process whose pool runs a job that never ends exit 0", function()
    -- The state closes at the end of the script: the pool closes without
    -- waiting, abandons the worker, and the process exits.
    local started = socket.gettime()
    local status, output = support.run_lua(RUNAWAY .. [[
      io.write("closing\n")
    ]])
    local took = socket.gettime() - started
    assert.equals(0, status, output)
    assert.equals("closing\n", output)
    assert.is_true(took < 4, ("the process took %.1f s to exit"):format(took))
  end)

  if jit then
    it("with LuaJIT's JIT on, cannot stop a compiled loop, and close abandons its worker", function()
      local status, output = support.run_lua(RUNAWAY .. [[
        local socket = require "socket"
        socket.sleep(0.1)
        io.write(p:cancel(id), "\n")
        p:queue(function() io.write("the next job ran\n") end)
        socket.sleep(0.5)
        io.write(tostring((p:close(0.2))), "\n")
      ]])
      assert.equals(0, status, output)
      assert.equals("running\nfalse\n", output)
    end)
  end
end)

-- Shared pieces of the specs (not a spec: busted runs only *_spec.lua):
-- sizes, testutil jobs that are always joined, the core's counters and
-- stats, sockets and draining, errors and stderr, waiting, fresh Lua states
-- and child processes, and the optional libraries (Copas, luv, cqueues).
--
--     local support = require "support"
--
-- It is found through spec/?.lua on LUA_PATH, which the Makefile (specs-*,
-- leakcheck) and scripts/rock-check set.

local busted = require "busted"
local core = require "bgworker.core"
local luassert = require "luassert"
local socket = require "socket"
local testutil = require "bgworker_testutil"

local support = {}

--------------------------------------------------------------------------
-- Sizes

--- BGWORKER_SMALL=1 (the valgrind run) shrinks every size.
support.small = os.getenv("BGWORKER_SMALL") == "1"

function support.size(full, small)
  return support.small and small or full
end

--- Seconds a wait may end after its timeout, or a loop's timer after its
-- time, in specs that check both stay on time: the machine may be loaded
-- (CI runs beside busy loops), and valgrind slows every callback. Such a
-- spec's old failure was late by far more (seconds of callbacks).
support.LATE = support.size(0.25, 3)

local dispatcher = require "bgworker.dispatcher"

--- For a spec of what a drain does by count (`max`, the budget, yields
-- across one drain): no time bound on drains for the rest of the test, so
-- that a process the machine stalls for a few ms (a loaded CI, valgrind)
-- cannot end one early. Slices by time have specs of their own. Returns
-- what puts the bound back, for the test's `finally`:
--     finally(support.untimed_drains())
function support.untimed_drains()
  local slice = dispatcher.SLICE
  dispatcher.SLICE = math.huge
  return function() dispatcher.SLICE = slice end
end

--------------------------------------------------------------------------
-- testutil jobs

-- testutil jobs not yet joined: join_all() after each test, so that a
-- failed test leaves no thread running into the next.
local jobs = {}

function support.produce(opts)
  local job = testutil.produce(opts)
  jobs[job] = true
  return job
end

function support.call(opts)
  local job = testutil.call(opts)
  jobs[job] = true
  return job
end

--- Adopt a job started elsewhere (in a fresh state).
function support.adopt(job)
  jobs[job] = true
  return job
end

function support.join(job)
  jobs[job] = nil
  return testutil.join(job)
end

function support.join_all()
  for job in pairs(jobs) do support.join(job) end
end

--- A callback for `producers` testutil producers that raises unless each
-- producer's items come in order, once each, with their checksum intact;
-- and its record: `last[p]`, the last sequence number of producer p, and
-- `count`, the items so far. `after(count)`, if given, runs after each item.
function support.in_order(producers, after)
  local seen = { last = {}, count = 0 }
  for p = 1, producers do seen.last[p] = 0 end
  return function(p, seq, ok)
    assert(ok and seq == seen.last[p] + 1)
    seen.last[p] = seq
    seen.count = seen.count + 1
    if after then after(seen.count) end
  end, seen
end

--------------------------------------------------------------------------
-- Before and after a test

--- Stop the core if it runs (whatever ran before in this Lua state).
function support.stop_core()
  if core.running() then core.stop() end
end

--- A clean start: the core stopped, testutil's counters at 0.
function support.reset()
  support.stop_core()
  testutil.reset()
end

--- After a test: stop its dispatcher `d` (if any) and the core, if it still
-- runs (producers still delivering then get BGW_CLOSED), and join the jobs.
function support.finish(d)
  if d then d:stop() end
  support.stop_core()
  support.join_all()
end

--------------------------------------------------------------------------
-- Counters and stats

support.CODES = { "BGW_OK", "BGW_FULL", "BGW_CLOSED", "BGW_TIMEOUT", "BGW_INVALID", "BGW_CANCELLED", "BGW_ERROR" }

--- A counts table with every code at 0 but the given ones.
function support.codes(expected)
  local t = { other = 0 }
  for _, name in ipairs(support.CODES) do t[name] = expected[name] or 0 end
  return t
end

--- Every counting item allocated was freed once, and never used after.
function support.assert_all_freed()
  local c = testutil.counters()
  luassert.equal(c.allocated, c.freed, "items allocated and freed")
  luassert.equal(0, c.double_frees, "double frees")
  luassert.equal(0, c.stale_decodes, "decodes or results of freed items")
end

function support.stats_delta(before)
  local now, d = core.stats(), {}
  for k, v in pairs(now) do d[k] = v - before[k] end
  return d
end

--------------------------------------------------------------------------
-- Waiting

--- Wait until cond() is true; false if `timeout` seconds (10) pass first.
function support.eventually(cond, timeout)
  local deadline = socket.gettime() + (timeout or 10)
  while not cond() do
    if socket.gettime() > deadline then return false end
    socket.sleep(0.001)
  end
  return true
end

--- Run d:wait() until done(); false if `stall` seconds pass with no
-- callback. It waits in short slices, since done() may turn true without
-- a callback (a round trip that timed out).
function support.pump(d, done, stall)
  local deadline = socket.gettime() + (stall or 10)
  while not done() do
    if d:wait(0.05) > 0 then
      deadline = socket.gettime() + (stall or 10)
    elseif socket.gettime() > deadline then
      return false
    end
  end
  return true
end

--- Is `waitable` (a socket, an object with getfd, or a descriptor) readable
-- within `timeout` seconds?
function support.readable(waitable, timeout)
  if type(waitable) == "number" then
    local fd = waitable
    waitable = { getfd = function() return fd end }
  end
  return socket.select({ waitable }, nil, timeout)[waitable] ~= nil
end

--------------------------------------------------------------------------
-- Sockets and the core

--- A UDP socket bound to 127.0.0.1 port 0, and its port.
function support.udp_socket(host)
  local s = assert(socket.udp())
  assert(s:setsockname(host or "127.0.0.1", 0))
  s:settimeout(0)
  local _, port = s:getsockname()
  return s, tonumber(port)
end

--- Start the core on a new reader socket, connected to the sender unless
-- `connect` is false. Returns the socket and its port.
function support.start_core(opts, connect)
  local reader, port = support.udp_socket()
  core.start(port, opts)
  if connect ~= false then assert(reader:setpeername(core.sender())) end
  return reader, port
end

--- Read every datagram waiting on `sock`; how many.
function support.discard(sock)
  local n = 0
  while sock:receive(65535) do n = n + 1 end
  return n
end

--- Call what core.poll() returned; false when it returned nothing.
function support.dispatch(f, ...)
  if f == nil then return false end
  f(...)
  return true
end

--- Poll until empty, calling each callback; how many.
function support.drain()
  local n = 0
  while support.dispatch(core.poll()) do n = n + 1 end
  return n
end

--------------------------------------------------------------------------
-- Errors and stderr

--- Errors sent to an errorhandler: the list, as { err = ..., tb = ... }
-- pairs, and the handler.
function support.collector()
  local errors = {}
  return errors, function(err, tb)
    errors[#errors + 1] = { err = err, tb = tb }
  end
end

--- pcall(f) with io.stderr replaced by a recorder, restored after: pcall's
-- ok and error, and all that was written.
function support.capture_stderr(f)
  local stderr, written = io.stderr, {}
  io.stderr = { write = function(_, ...) -- luacheck: ignore 122
    for i = 1, select("#", ...) do written[#written + 1] = tostring((select(i, ...))) end
  end }
  local ok, err = pcall(f)
  io.stderr = stderr -- luacheck: ignore 122
  return ok, err, table.concat(written)
end

--------------------------------------------------------------------------
-- Fresh Lua states and child processes

-- Code run first in a fresh state: the core's modules and a reader port,
-- and an `eventually` that raises after DEADLINE seconds.
local PRELUDE = [[
local core = require "bgworker.core"
local socket = require "socket"
local testutil = require "bgworker_testutil"
local ticker = require "bgworker_ticker"
local reader = assert(socket.udp())
assert(reader:setsockname("127.0.0.1", 0))
local _, port = reader:getsockname()
local function eventually(cond)
  local deadline = socket.gettime() + DEADLINE
  while not cond() do
    assert(socket.gettime() < deadline, "timed out")
    socket.sleep(0.001)
  end
end
]]

--- Run `code` in a new Lua state, closed before this returns; its
-- `eventually` gives up after `timeout` seconds (10).
function support.fresh_state(code, timeout)
  return testutil.fresh_state(PRELUDE:gsub("DEADLINE", tostring(timeout or 10)) .. code)
end

--- Run `script` in a new interpreter (BGWORKER_LUA, which make specs-* sets),
-- stderr with stdout. Returns its exit status and its output. An
-- interpreter still running after `timeout` seconds (120) is killed: status
-- 124 (or 137).
function support.run_lua(script, timeout, prefix)
  local lua = os.getenv("BGWORKER_LUA")
  luassert.is_string(lua, "BGWORKER_LUA names the interpreter (set by make specs-*)")
  local path = os.tmpname()
  local file = assert(io.open(path, "w"))
  file:write(script)
  file:close()
  local command = ("timeout -k 5 %d %s%s %s 2>&1; echo \"exit:$?\""):format(timeout or 120,
    prefix and prefix .. " " or "", lua, path)
  local pipe = assert(io.popen(command))
  local output = pipe:read("*a")
  pipe:close()
  os.remove(path)
  local text, status = output:match("^(.-)exit:(%d+)%s*$")
  return tonumber(status), text or output
end

--------------------------------------------------------------------------
-- Optional libraries

--- `require(name)` and then `require(adapter)`, where `name` must load on
-- Lua 5.1 to 5.4 (an error otherwise) and may fail under LuaJIT: then nil
-- and the reason.
function support.require_native(name, adapter)
  local ok, lib = pcall(require, name)
  if ok then
    return lib, require(adapter)
  elseif type(rawget(_G, "jit")) ~= "table" then
    error(name .. " is required for these specs on " .. _VERSION .. ": " .. tostring(lib), 2)
  end
  return nil, lib
end

-- The Copas this run expects, from BGWORKER_COPAS_VERSION: the Makefile sets
-- "4.11.0" (its COPAS_VERSION) for the runs with its Copas 4 tree on
-- LUA_PATH, and "1" (any 1.x) for the runs against Debian's Copas. Unset:
-- whichever Copas loads.
local COPAS_EXPECTED = os.getenv("BGWORKER_COPAS_VERSION")

-- "4.11.0" from a Copas' _VERSION ("Copas 4.11.0"), or nil.
local function copas_version(copas)
  return tostring(copas._VERSION):match("^Copas (%d[%d.]*)")
end

--- Copas, for the describe block that calls this; nil when it cannot be
-- loaded, or is not the Copas this run expects (BGWORKER_COPAS_VERSION: "1"
-- means any 1.x): then the block gets a failing test and returns. A missing
-- Copas fails on every Lua version.
function support.needs_copas()
  local ok, copas = pcall(require, "copas")
  local problem
  if not ok then
    problem = "Copas is required for these specs on " .. _VERSION .. ": " .. tostring(copas)
  elseif COPAS_EXPECTED then
    local version = copas_version(copas) or ""
    if version ~= COPAS_EXPECTED and version:sub(1, #COPAS_EXPECTED + 1) ~= COPAS_EXPECTED .. "." then
      problem = "these specs run against Copas " .. COPAS_EXPECTED .. " (BGWORKER_COPAS_VERSION)," ..
        " but require 'copas' gave " .. tostring(copas._VERSION)
    end
  end
  if not problem then return copas end
  busted.it("needs Copas", function() error(problem, 0) end)
  return nil
end

--- Is `copas` a Copas 1.x, whose copas.loop never returns and which has
-- neither copas.exit nor socket timeouts? Tests of those features are
-- pending there (and only there: the Copas 4 runs check they got Copas 4).
function support.is_copas1(copas)
  return (copas_version(copas) or ""):match("^1%.") ~= nil
end

--- copas.step calls made by copas_until so far.
support.copas_steps = 0

--- Functions copas_until calls after each step (a set).
support.copas_step_hooks = {}

--- Step Copas until cond() is true or `timeout` seconds (5) passed; false
-- then.
function support.copas_until(cond, timeout)
  local copas = require "copas"
  local deadline = socket.gettime() + (timeout or 5)
  while not cond() do
    if socket.gettime() > deadline then return false end
    copas.step(0.01)
    support.copas_steps = support.copas_steps + 1
    -- A hook may add hooks and remove itself: call those of before the step.
    local hooks = {}
    for hook in pairs(support.copas_step_hooks) do hooks[#hooks + 1] = hook end
    for _, hook in ipairs(hooks) do hook() end
  end
  return true
end

--- Stop a Copas dispatcher and step Copas until its reader thread
-- ended; false if that takes over 2 s.
function support.stop_copas(d)
  d:stop()
  return support.copas_until(function() return coroutine.status(d.reader) == "dead" end, 2)
end

--- From a Copas thread: let the other threads run; this one resumes at a
-- later loop step. Copas 4 pauses it for 0 s; Copas 1.x, which cannot
-- pause, sees a send on a bound UDP socket (always writable) that reports
-- "timeout" once, and resumes the thread when the socket is writable.
function support.copas_yield()
  local copas = require "copas"
  if copas.pause then
    copas.pause(0)
    return
  end
  local udp, once = support.udp_socket(), true
  copas.send({
    getfd = function() return udp:getfd() end,
    send = function()
      if once then
        once = false
        return nil, "timeout", 0
      end
      return 1
    end,
    -- Copas 1.x closes the socket that last resumed a thread that ends.
    close = function() return udp:close() end,
  }, "")
  udp:close()
end

--- A Copas thread that ticks once per loop step (copas_yield) until
-- `done()`: `ticks` counts the ticks so far, `ended` is true once it
-- ended; `on_tick(ticks)`, if given, runs after each tick.
function support.copas_ticker(done, on_tick)
  local ticker = { ticks = 0, ended = false }
  require("copas").addthread(function()
    while not done() do
      support.copas_yield()
      ticker.ticks = ticker.ticks + 1
      if on_tick then on_tick(ticker.ticks) end
    end
    ticker.ended = true
  end)
  return ticker
end

return support

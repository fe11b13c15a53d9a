-- Shared pieces of the reliability specs (spec/reliability/README.md):
-- sizes, testutil jobs that are always joined, leak counters, and the
-- socket and Lua-state helpers.

local core = require "bgworker.core"
local luassert = require "luassert"
local socket = require "socket"
local testutil = require "bgworker_testutil"

local support = {}

--- BGWORKER_SMALL=1 (the valgrind run) shrinks every size.
support.small = os.getenv("BGWORKER_SMALL") == "1"

function support.size(full, small)
  return support.small and small or full
end

support.CODES = { "BGW_OK", "BGW_FULL", "BGW_CLOSED", "BGW_TIMEOUT", "BGW_INVALID", "BGW_CANCELLED", "BGW_ERROR" }

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

--- Poll until empty, calling each callback; how many.
function support.drain()
  local n = 0
  local function run(f, ...)
    if f == nil then return false end
    f(...)
    return true
  end
  while run(core.poll()) do n = n + 1 end
  return n
end

-- Code run first in a fresh state: the core's modules and a reader port.
local PRELUDE = [[
local core = require "bgworker.core"
local socket = require "socket"
local testutil = require "bgworker_testutil"
local ticker = require "bgworker_ticker"
local reader = assert(socket.udp())
assert(reader:setsockname("127.0.0.1", 0))
local _, port = reader:getsockname()
local function eventually(cond)
  local deadline = socket.gettime() + 10
  while not cond() do
    assert(socket.gettime() < deadline, "timed out")
    socket.sleep(0.001)
  end
end
]]

--- Run `code` in a new Lua state, closed before this returns.
function support.fresh_state(code)
  return testutil.fresh_state(PRELUDE .. code)
end

return support

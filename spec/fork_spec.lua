-- fork() with a dispatcher running (docs/core.md, "fork()"): the run
-- belongs to the process that started it. A parent with 4 producers
-- delivering forks children over and over; each child does one thing with
-- the run it inherited: uses it (refused, naming fork()), closes its Lua
-- state with it, stops it and starts its own, or leaves at once. The parent
-- must get every item exactly once and in order, and every child must end
-- within its time.
--
-- Each case runs in a new interpreter (support.run_lua), and there in a Lua
-- state of its own (testutil.fresh_state), so that a child can close that
-- state on every Lua version (lua_close: the path that hung) and then leave
-- with testutil._exit.

local support = require "support"

-- The parent's side, run in the fresh state. CASE sets KIND ("udp" or
-- "fd"), CHILDREN, and SCENARIOS, the names of what children do, in turn.
local PARENT = [==[
local core = require "bgworker.core"
local socket = require "socket"
local testutil = require "bgworker_testutil"
local P, N = 4, ITEMS
local STALL = 10 -- seconds without an item: stranded

-- The reader: a connected UDP socket, or the descriptor.
local reader, waitable
local function start(kind)
  if kind == "udp" then
    reader = assert(socket.udp())
    assert(reader:setsockname("127.0.0.1", 0))
    reader:settimeout(0)
    core.start(tonumber((select(2, reader:getsockname()))))
    assert(reader:setpeername(core.sender()))
    waitable = reader
  else
    local fd = core.start_fd()
    reader, waitable = nil, { getfd = function() return fd end }
  end
end
start(KIND)
local run = core.run()
local held = testutil.acquire() -- a handle from before every fork

local function noop() end

-- Wait up to `timeout` for a wake-up; then drain, at most BUDGET items
-- (then wake ourselves, as a reader that stops early must). How many
-- callbacks ran.
local BUDGET = 200
local function wait_and_drain(timeout)
  if not socket.select({ waitable }, nil, timeout)[waitable] then return 0 end
  if reader then
    while reader:receive() do end
  end
  for n = 0, BUDGET - 1 do
    local f, a, b, c = core.poll()
    if not f then return n end
    f(a, b, c)
  end
  core.wake()
  return BUDGET
end

-- What a child does; an error fails it. Returning closes its Lua state.
local scenario = {}

-- The inherited run refuses everything but stop and start, naming fork().
function scenario.refuses()
  for _, name in ipairs { "poll", "drain", "wake", "pending", "fd", "sender", "greeted", "capacity", "stats" } do
    local ok, err = pcall(core[name])
    assert(not ok, name .. " worked on the inherited run")
    assert(tostring(err):find("fork()", 1, true), name .. ": " .. tostring(err))
  end
  assert(core.running() == false, "the inherited run counts as running")
  assert(core.run() == nil, "core.run() names the inherited run")
  assert(core.guard(), "a guard of no run")
end

-- Stop forgets the inherited run; a handle from before fork() is refused
-- until the child starts its own run, and then delivers to it.
function scenario.stops_and_starts()
  assert(core.stop() == 0, "stop cancelled the parent's items")
  assert(core.pending() == 0 and core.poll() == nil and core.stats().delivered == 0)
  local freed = testutil.counters().freed
  local counts = testutil.join(testutil.produce { handle = held, items = 1, callback = noop })
  assert(counts.BGW_CLOSED == 1, "a held handle delivered into no run")
  assert(testutil.counters().freed == freed + 1, "the refused item was not freed")
  start("udp")
  assert(core.run() and core.run() ~= run, "the child's run has the parent's id")
  local got = {}
  local job = testutil.produce { handle = held, items = 3, callback = function(_, seq) got[#got + 1] = seq end }
  local deadline = socket.gettime() + STALL
  while #got < 3 and socket.gettime() < deadline do wait_and_drain(0.1) end
  testutil.join(job)
  assert(#got == 3 and got[1] == 1 and got[3] == 3, "the child's run got " .. #got .. " of 3")
  assert(core.stop() == 0)
end

-- Start straight away, over the inherited run; leave it running for lua_close.
function scenario.starts()
  start("fd")
  local got = 0
  local callback = function() got = got + 1 end
  local jobs = { testutil.produce { items = 2, callback = callback },
    testutil.produce { handle = held, items = 2, callback = callback } }
  local deadline = socket.gettime() + STALL
  while got < 4 and socket.gettime() < deadline do wait_and_drain(0.1) end
  for _, job in ipairs(jobs) do testutil.join(job) end
  assert(got == 4, "the child's own run got " .. got .. " of 4")
end

-- Close the Lua state with the inherited run in it, while the parent's
-- producers were delivering at the fork.
function scenario.closes() end

-- Leave without closing anything.
function scenario.exits() testutil._exit(0) end

local next_seq, received, bad = {}, 0, nil
for p = 1, P do next_seq[p] = 1 end
local job = testutil.produce { producers = P, items = N, callback = function(p, seq, ok)
  if seq ~= next_seq[p] or not ok then
    bad = bad or ("producer %d: got seq %d, expected %d"):format(p, seq, next_seq[p])
  end
  next_seq[p] = seq + 1
  received = received + 1
end }

-- Fork while the producers deliver: one child between every two drains.
local children, forks, last_item = {}, 0, socket.gettime()
while received < P * N or forks < CHILDREN do
  if forks < CHILDREN then
    forks = forks + 1
    local name = SCENARIOS[forks % #SCENARIOS + 1]
    local pid = testutil.fork()
    if pid == 0 then
      local ok, err = pcall(scenario[name])
      return "child", ok and 0 or 1, name .. ": " .. tostring(err)
    end
    children[#children + 1] = { pid = pid, name = name }
  end
  if wait_and_drain(received < P * N and 0.5 or 0) > 0 then
    last_item = socket.gettime()
  elseif received < P * N and socket.gettime() - last_item > STALL then
    error(("%d of %d items stranded in the parent after %d forks"):format(P * N - received, P * N, forks))
  end
end

testutil.join(job)
assert(not bad, bad)
assert(core.run() == run, "the parent's run changed")
assert(core.pending() == 0, "items left pending")
local stats = core.stats()
assert(stats.delivered == P * N and stats.polled == P * N and stats.cancelled == 0 and stats.rejected == 0,
  "stats: delivered " .. stats.delivered .. ", polled " .. stats.polled)

local hung, failed, deadline = {}, {}, socket.gettime() + STALL
for _, child in ipairs(children) do
  local status = testutil.waitpid(child.pid, math.max(0, deadline - socket.gettime()))
  if status == nil then
    testutil.kill(child.pid)
    hung[#hung + 1] = child.name
  elseif status ~= 0 then
    failed[#failed + 1] = child.name .. " (" .. status .. ")"
  end
end
assert(#hung == 0, #hung .. " children hung: " .. table.concat(hung, ", "))
assert(#failed == 0, #failed .. " children failed: " .. table.concat(failed, ", "))
testutil.release(held)
return "parent", ("parent ok: %d items, %d children"):format(received, forks)
]==]

-- The interpreter's script: the parent's side in a fresh state; a child
-- comes back out of it (its state closed) and leaves with its status.
local OUTER = [==[
local testutil = require "bgworker_testutil"
local ok, role, status, message = testutil.fresh_state(PARENT)
if role == "child" then
  if status ~= 0 then io.stderr:write("child ", message, "\n") end
  testutil._exit(status)
end
print(ok and status or role)
os.exit(ok and 0 or 1)
]==]

-- One child drains the inherited run as far as it lets it, while the
-- parent has 100 items queued and its eventfd readable.
local POLLING_CHILD = [==[
local core = require "bgworker.core"
local socket = require "socket"
local testutil = require "bgworker_testutil"
local fd = core.start_fd()
local received = 0
testutil.join(testutil.produce { items = 100, callback = function() received = received + 1 end })
local pid = testutil.fork()
if pid == 0 then
  local polled = 0
  while pcall(function() assert(core.poll()) end) do polled = polled + 1 end
  return "child", polled == 0 and 0 or 1, "polled " .. polled .. " of the parent's items"
end
assert(testutil.waitpid(pid, 10) == 0, "the child polled the parent's items, or hung")
local waitable = { getfd = function() return fd end }
assert(socket.select({ waitable }, nil, 2)[waitable], "the child cleared the parent's wake-up")
while true do
  local f, a, b, c = core.poll()
  if not f then break end
  f(a, b, c)
end
assert(received == 100, "the parent got " .. received .. " of 100")
return "parent", "parent ok"
]==]

local function run_parent(parent)
  local status, output = support.run_lua(OUTER:gsub("PARENT", function() return ("%q"):format(parent) end))
  assert.matches("parent ok", output)
  assert.equal(0, status, output)
end

local function run_case(kind, children, scenarios)
  run_parent(("local KIND, CHILDREN, ITEMS, SCENARIOS = %q, %d, %d, { %s }\n"):format(kind, children,
    support.size(20000, 2000), '"' .. table.concat(scenarios, '", "') .. '"') .. PARENT)
end

describe("fork() with a dispatcher running", function()
  it("a child cannot poll the inherited run, so the parent's wake-up stays", function()
    run_parent(POLLING_CHILD)
  end)

  for _, kind in ipairs { "udp", "fd" } do
    describe("(" .. kind .. ")", function()
      it("children that close or leave never hang, and the parent gets every item once", function()
        run_case(kind, support.size(150, 10), { "closes", "exits" })
      end)

      it("the inherited run refuses in the child, naming fork(), and the parent loses no wake-up", function()
        run_case(kind, support.size(60, 6), { "refuses" })
      end)

      it("a child stops the inherited run or starts over it; a handle from before fork() then delivers", function()
        run_case(kind, support.size(40, 4), { "stops_and_starts", "starts" })
      end)
    end)
  end
end)

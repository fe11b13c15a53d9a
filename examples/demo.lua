-- The demo run by `make demo`: a Copas server whose requests do CPU-heavy
-- Lua work and name lookups, loaded by a client in the same process.
--
-- It runs twice. First the request handler does the work itself: while it
-- counts primes, the whole loop waits, and so does every other request.
-- Then the same handler hands the work to bgworker.pool and the lookups to
-- bgworker.dns: only the requesting Copas thread waits, the loop stays free
-- and the work runs on other cores. A ping, answered at once by the server,
-- shows how long the loop keeps a request waiting.
--
--     LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/jit/?.so;;" luajit examples/demo.lua
--
-- It works with Copas 1.x (Debian's) and 4.x, on LuaJIT and Lua 5.1.

local copas = require "copas"
local socket = require "socket"
local bgworker = require "bgworker"
local pool = require "bgworker.pool"
local dns = require "bgworker.dns"

local gettime = socket.gettime

local REQUESTS = 300 -- work requests in each run
local CONCURRENCY = 50 -- client connections, each with one request in flight
local LOOKUP_EVERY = 5 -- one work request in five is a name lookup
local LOOKUP_NAME = "localhost"
local WORK_TIME = 0.03 -- seconds of CPU one prime count takes
local PING_INTERVAL = 0.01 -- seconds between a ping's answer and the next ping
local PROGRESS_INTERVAL = 0.1 -- seconds between updates of the progress line
local THREADS = 2 -- of the pool

-- The CPU-heavy work: count the primes below `bound`. bgworker.pool moves
-- it to a worker thread, which has its own Lua state.
local function count_primes(bound)
  local count = 0
  for n = 2, bound - 1 do
    local prime = true
    for d = 2, math.floor(math.sqrt(n)) do
      if n % d == 0 then
        prime = false
        break
      end
    end
    if prime then
      count = count + 1
    end
  end
  return count
end

-- The bound for which a count takes about WORK_TIME here (LuaJIT counts
-- many times faster than Lua 5.1); its count, and the seconds it took.
local function calibrate()
  local bound = 1000
  while true do
    local start = os.clock()
    local count = count_primes(bound)
    local took = os.clock() - start
    if took >= WORK_TIME then
      return bound, count, took
    end
    bound = math.floor(bound * 1.25)
  end
end

-- The two work requests, and the answer each must get.
local BOUND, COUNT, COUNT_TIME = calibrate()
local PRIMES = "primes " .. BOUND
local RESOLVE = "resolve " .. LOOKUP_NAME
local ANSWERS = {
  [PRIMES] = tostring(COUNT),
  [RESOLVE] = socket.dns.toip(LOOKUP_NAME),
}

-- Serve one connection. Requests are lines: "primes <bound>", "resolve
-- <name>" or "ping". `work` says how to count and how to resolve: the only
-- difference between the two runs.
local function serve(conn, work)
  while true do
    local request = copas.receive(conn, "*l")
    if not request then
      return
    end
    local kind, arg = request:match("^(%a+) ?(.*)$")
    local reply
    if kind == "primes" then
      reply = work.count_primes(tonumber(arg))
    elseif kind == "resolve" then
      local ip, err = work.toip(arg)
      reply = ip or "error: " .. tostring(err)
    elseif kind == "ping" then
      reply = "pong"
    else
      reply = "error: unknown request"
    end
    copas.send(conn, reply .. "\n")
  end
end

-- Send one request line on a connected socket and return the answer line
-- (nil if the connection failed).
local function ask(conn, request)
  if not copas.send(conn, request .. "\n") then
    return nil
  end
  return (copas.receive(conn, "*l"))
end

local function percentile(sorted, p)
  return sorted[math.max(1, math.ceil(p * #sorted))]
end

-- One run: serve with `work`, send REQUESTS work requests over CONCURRENCY
-- connections and ping all along. A wrong or missing answer is an error.
local function run(work)
  -- The backlog holds every client at once: see below.
  local server = assert(socket.bind("127.0.0.1", 0, CONCURRENCY))
  local _, port = server:getsockname()
  local accepted = 0
  copas.addserver(server, function(conn)
    accepted = accepted + 1
    return serve(conn, work)
  end)

  -- Copas accepts one connection per step: were the clients to connect
  -- during the run, inline work would slow their start down too. So they
  -- connect first (over loopback, a blocking connect returns at once).
  local conns = {}
  for i = 1, CONCURRENCY do
    conns[i] = assert(socket.connect("127.0.0.1", port))
    conns[i]:settimeout(0)
  end
  while accepted < CONCURRENCY do
    copas.step(1)
  end

  local issued, answered, failed = 0, 0, {}
  local clients = CONCURRENCY
  local pings, pinging = {}, false
  local start, cpu_start = gettime(), os.clock()
  local wall, cpu
  local next_ping, next_progress = start, start

  local function client(conn)
    while issued < REQUESTS do
      issued = issued + 1
      local request = issued % LOOKUP_EVERY == 0 and RESOLVE or PRIMES
      local reply = ask(conn, request)
      if reply == ANSWERS[request] then
        answered = answered + 1
      else
        failed[#failed + 1] = ("%s: %s"):format(request, tostring(reply))
        if not reply then
          break
        end
      end
    end
    conn:close()
    clients = clients - 1
    if clients == 0 then
      wall, cpu = gettime() - start, os.clock() - cpu_start
    end
  end

  -- A ping is timed from here, in the loop below, so the time a new Copas
  -- thread waits to start counts too.
  local function ping()
    local sent = gettime()
    pinging, next_ping = true, math.huge
    copas.addthread(function()
      local conn = socket.tcp()
      local reply = copas.connect(conn, "127.0.0.1", port) and ask(conn, "ping")
      if reply == "pong" then
        pings[#pings + 1] = gettime() - sent
      else
        failed[#failed + 1] = "ping: " .. tostring(reply)
      end
      conn:close()
      pinging, next_ping = false, gettime() + PING_INTERVAL
    end)
  end

  local function progress()
    io.write(("\r%-9s %3d/%d answered, %4d pings, %5.1f s"):format(
      work.name, answered, REQUESTS, #pings, gettime() - start))
    io.flush()
  end

  -- (Closures: Copas 1.x and 4.x pass arguments to a new thread differently.)
  for _, conn in ipairs(conns) do
    copas.addthread(function()
      client(conn)
    end)
  end
  -- Copas 1.x has no timers (and its copas.loop never returns): this loop
  -- steps Copas and starts the pings itself. It ends once the clients are
  -- done and the last ping is back.
  while clients > 0 or pinging do
    copas.step(math.max(0, math.min(next_ping, next_progress) - gettime()))
    local now = gettime()
    if clients > 0 and now >= next_ping then
      ping()
    end
    if now >= next_progress then
      progress()
      next_progress = now + PROGRESS_INTERVAL
    end
  end
  progress()
  io.write("\n")
  if copas.removeserver then
    copas.removeserver(server)
  else
    server:close()
  end

  if #failed > 0 then
    error(("%s: %d requests failed, first %s"):format(work.name, #failed, failed[1]))
  end
  table.sort(pings)
  return {
    name = work.name,
    rate = answered / wall,
    p50 = percentile(pings, 0.5),
    p99 = percentile(pings, 0.99),
    pings = #pings,
    wall = wall,
    cpu = cpu,
  }
end

print(("%s on %s, %s"):format(bgworker._VERSION, rawget(_G, "jit") and jit.version or _VERSION,
  copas._VERSION))
print(("Each run: %d requests, %d at a time: one in %d resolves %s, the others\n" ..
  "count the primes below %d (%.0f ms of CPU each); and one ping at a time,\n" ..
  "%.0f ms apart."):format(REQUESTS, CONCURRENCY, LOOKUP_EVERY, LOOKUP_NAME, BOUND,
  COUNT_TIME * 1000, PING_INTERVAL * 1000))

local results = {}

results[1] = run({
  name = "inline",
  count_primes = count_primes,
  toip = socket.dns.toip,
})

local dispatcher = bgworker.new { loop = "copas" }
-- The counts are short jobs, never cancelled: on LuaJIT the workers may
-- compile them as the inline run does (a compiled loop cannot be
-- cancelled, so the JIT is off in a pool's workers unless asked for).
local workers = pool.new { threads = THREADS, jit = true }
results[2] = run({
  name = "bgworker",
  count_primes = function(n)
    -- Suspends only this Copas thread until a worker has counted;
    -- returns as pcall does.
    local ok, count = workers:run(count_primes, n)
    assert(ok, count)
    return count
  end,
  toip = dns.toip,
})

workers:close()
dispatcher:stop()
-- The reader thread ends (and closes its socket) at its next step.
while coroutine.status(dispatcher.reader) ~= "dead" do
  copas.step(0.1)
end

print()
print(("%-9s %7s %10s %10s %6s %8s %8s %8s"):format(
  "", "req/s", "ping p50", "ping p99", "pings", "wall", "CPU", "CPU/wall"))
for _, r in ipairs(results) do
  print(("%-9s %7.1f %7.1f ms %7.1f ms %6d %6.2f s %6.2f s %8.2f"):format(
    r.name, r.rate, r.p50 * 1000, r.p99 * 1000, r.pings, r.wall, r.cpu, r.cpu / r.wall))
end
print("ping: how long a ping waited for its answer during the load.")
print("CPU: the process's CPU time, all threads (os.clock).")

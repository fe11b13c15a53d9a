-- The soak run (`make soak`, not part of `make test`): 4 producers deliver
-- into a bounded queue for SOAK_SECONDS (150) while this Lua state drains it
-- through the real wake path (a UDP socket connected to the core's sender).
-- Every item must arrive exactly once and in order per producer with its
-- payload intact, every item must be freed once, the core's stats must add
-- up, and the resident memory must stay flat. It prints a sample every 10
-- seconds and a summary; the last summary goes into bench/README.md ("Soak").

local core = require "bgworker.core"
local socket = require "socket"
local testutil = require "bgworker_testutil"

local SECONDS = tonumber(os.getenv("SOAK_SECONDS") or "150")
local P, CAPACITY, SAMPLE = 4, 65536, 10

local page = tonumber(io.popen("getconf PAGESIZE"):read("*l"))
local function rss_mb()
  local statm = assert(io.open("/proc/self/statm")):read("*l")
  return tonumber(statm:match("^%d+ (%d+)")) * page / 2 ^ 20
end

local reader = assert(socket.udp())
assert(reader:setsockname("127.0.0.1", 0))
reader:settimeout(0)
core.start(tonumber((select(2, reader:getsockname()))), { capacity = CAPACITY })
assert(reader:setpeername(core.sender()))

local next_seq, received, bad = {}, 0, nil
for p = 1, P do next_seq[p] = 1 end
local job = testutil.produce {
  producers = P, items = 1e15, payload = 64,
  callback = function(p, seq, ok)
    if seq ~= next_seq[p] or not ok then
      bad = bad or ("producer %d: seq %d (payload %s), expected %d"):format(p, seq, tostring(ok), next_seq[p])
    end
    next_seq[p] = seq + 1
    received = received + 1
  end,
}

-- Poll at most `budget` items (all if nil); true when the queue was found
-- empty. A reader that stops before that wakes itself (docs/core.md).
local function drain(budget)
  for _ = 1, budget or math.huge do
    local f, p, seq, ok = core.poll()
    if not f then return true end
    f(p, seq, ok)
  end
  core.wake()
  return false
end

-- Wait for a wake-up, then drain a budget's worth: the producers keep the
-- queue full, so a drain to empty would never end. testutil keeps freed
-- items to catch double frees; let them go after each drain.
local function wait_and_drain(timeout)
  if socket.select({ reader }, nil, timeout)[reader] then
    while reader:receive() do end
    drain(100000)
    testutil.bury()
  end
end

local start = socket.gettime()
local samples, next_sample = {}, start + SAMPLE
print(("%6s %12s %10s %8s %8s %8s %8s"):format("s", "items", "items/s", "RSS MB", "Lua MB", "pending", "wakeups"))
while socket.gettime() - start < SECONDS do
  wait_and_drain(1)
  local now = socket.gettime()
  if now >= next_sample then
    local last = samples[#samples] or { t = 0, received = 0 }
    local sample = { t = now - start, received = received, rss = rss_mb() }
    samples[#samples + 1] = sample
    print(("%6.0f %12d %10.0f %8.1f %8.1f %8d %8d"):format(sample.t, received,
      (received - last.received) / (sample.t - last.t), sample.rss, collectgarbage("count") / 1024, core.pending(),
      core.stats().wakeups))
    io.stdout:flush()
    next_sample = next_sample + SAMPLE
  end
  assert(not bad, bad)
end

-- The producers stop after the item each is delivering; drain what is left.
testutil.stop(job)
local deadline = socket.gettime() + 10
while not testutil.done(job) do
  assert(socket.gettime() < deadline, "the producers did not stop")
  wait_and_drain(0.01)
end
local counts = testutil.join(job)
drain()

assert(not bad, bad)
local elapsed = socket.gettime() - start
local stats, c = core.stats(), testutil.counters()
local function check(ok, what) if not ok then error("soak: " .. what, 2) end end
check(counts.BGW_OK == received, ("delivered %d, received %d"):format(counts.BGW_OK, received))
check(counts.BGW_OK + counts.BGW_FULL + counts.BGW_TIMEOUT + counts.BGW_CLOSED + counts.BGW_INVALID + counts.other
  == counts.BGW_OK, "a deliver was refused")
local sum = 0
for p = 1, P do sum = sum + next_seq[p] - 1 end
check(sum == received, "items per producer do not add up")
check(stats.delivered == received and stats.polled == received and stats.cancelled == 0 and stats.rejected == 0
  and stats.errors == 0 and stats.wake_errors == 0 and core.pending() == 0, "stats do not add up")
check(c.allocated == received and c.freed == received and c.double_frees == 0 and c.stale_decodes == 0,
  ("allocated %d, freed %d, double frees %d, stale %d"):format(c.allocated, c.freed, c.double_frees, c.stale_decodes))
local first, last, max = samples[1].rss, samples[#samples].rss, 0
for _, s in ipairs(samples) do max = math.max(max, s.rss) end
core.stop()
collectgarbage()
print(("soak %s: %.0f s, %d producers, capacity %d: %d items (%.0f/s), exactly once and in order, all freed; " ..
  "wake-ups %d; RSS %.1f MB at %d s, %.1f MB at the end, max %.1f MB"):format(_VERSION, elapsed, P, CAPACITY, received,
  received / elapsed, stats.wakeups, first, SAMPLE, last, max))
-- Flat: the queue is bounded, so growth past the first sample is a leak.
check(last <= first + 16, ("RSS grew from %.1f MB to %.1f MB"):format(first, last))

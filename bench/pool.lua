--- Wall time of CPU-bound jobs: run inline, on a bgworker.pool, and with
-- luv's uv.new_work (when luv is installed for this Lua), in one run.
--
--     LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/5.4/?.so;;" \
--         lua5.4 bench/pool.lua [jobs [threads]]
--     make bench-pool          # every Lua version
--
-- Each job takes about 0.1 s inline. Every figure is the best of three
-- runs. The pool's figure excludes making the pool (reported apart); luv's
-- thread pool has UV_THREADPOOL_SIZE threads (libuv's default: 4). "CPU /
-- wall" is the process's CPU time (all threads) over the wall time: how
-- many cores the run kept busy, which stays telling when other processes
-- compete for the cores and the wall times do not.

local bgworker = require "bgworker"
local pool = require "bgworker.pool"
local socket = require "socket"

local gettime = socket.gettime
local floor, huge = math.floor, math.huge

local JOBS = tonumber(arg and arg[1]) or 8
local THREADS = tonumber(arg and arg[2]) or 2
local ROUNDS = 3
-- Seconds a job takes inline.
local JOB_TIME = 0.1

-- The job: CPU-bound, and without upvalues, so that it can move to a worker.
local function work(n)
    local s = 0
    for i = 1, n do
        s = s + (i % 7) * 0.5
    end
    return s
end

-- Loop count for a job of JOB_TIME seconds.
local function calibrate()
    local n = 1e5
    while true do
        local start = gettime()
        work(n)
        local took = gettime() - start
        if took > 0.02 then
            return floor(n * JOB_TIME / took)
        end
        n = n * 4
    end
end

local N = calibrate()
local EXPECTED = work(N)

local function check(result)
    assert(result == EXPECTED, "wrong result: " .. tostring(result))
end

-- Best wall time of ROUNDS runs of f, and that run's CPU time / wall time.
local function best(f)
    local wall, cores = huge, nil
    for _ = 1, ROUNDS do
        local start, cpu = gettime(), os.clock()
        f()
        local took = gettime() - start
        if took < wall then
            wall, cores = took, (os.clock() - cpu) / took
        end
    end
    return wall, cores
end

local function inline()
    for _ = 1, JOBS do
        check(work(N))
    end
end

local dispatcher = bgworker.new()
local made = gettime()
local p = pool.new { threads = THREADS }
made = gettime() - made

local function on_pool()
    local done = 0
    local function callback(ok, result)
        assert(ok, result)
        check(result)
        done = done + 1
    end
    for _ = 1, JOBS do
        p:submit(work, N, callback)
    end
    while done < JOBS do
        dispatcher:wait()
    end
end

-- luv's own thread pool, driven by its own loop.
local has_luv, uv = pcall(require, "luv")
local function on_luv()
    local done = 0
    local job = uv.new_work(work, function(result)
        check(result)
        done = done + 1
    end)
    for _ = 1, JOBS do
        job:queue(N)
    end
    while done < JOBS do
        uv.run("once")
    end
end

local rows = {
    { "inline", best(inline) },
    { ("bgworker.pool, %d threads"):format(THREADS), best(on_pool) },
}
if has_luv then
    rows[#rows + 1] = { ("luv uv.new_work, %s threads"):format(os.getenv("UV_THREADPOOL_SIZE") or "4"), best(on_luv) }
end
p:close()
dispatcher:stop()

print(("%s: %d jobs of %.2f s inline, best of %d runs"):format(_VERSION .. (jit and " (" .. jit.version .. ")" or ""),
    JOBS, rows[1][2] / JOBS, ROUNDS))
print(("%-30s %8s %10s %10s"):format("", "wall s", "vs inline", "CPU / wall"))
for _, row in ipairs(rows) do
    print(("%-30s %8.3f %9.2fx %10.2f"):format(row[1], row[2], rows[1][2] / row[2], row[3]))
end
if not has_luv then
    print("luv: not installed for this Lua")
end
print(("(making the pool of %d threads took %.4f s)"):format(THREADS, made))

--- Run Lua functions on background threads.
--
-- A pool is a set of OS threads, each with a Lua state of its own (of this
-- state's Lua version, with the standard libraries, and `package.path` and
-- `package.cpath` as they were here when the pool was made). A job is a
-- function and its arguments; a worker runs it, and its callback runs on
-- this Lua thread when the bgworker dispatcher collects the result, so a
-- dispatcher must be running (`bgworker.new()` or `bgworker.copas()`).
--
--     local dispatcher = require("bgworker").new()
--     local pool = require("bgworker.pool").new { threads = 2 }
--     pool:submit(function(n)
--         local s = 0
--         for i = 1, n do s = s + i end
--         return s
--     end, 1e8, function(ok, sum) print(ok, sum) end)
--     dispatcher:wait()
--
-- In a Copas thread, `pool:run(fn, ...)` waits for the result instead,
-- suspending only that thread, and returns as `pcall` does.
--
-- The job's function is either a Lua function without upvalues (other than
-- `_ENV`), moved with `string.dump` (so it sees the worker's globals, not
-- this state's), or a string "module.function", which the worker requires.
-- Each worker keeps its state between jobs: required modules stay loaded.
--
-- Values cross by copy: nil, booleans, numbers (integers and floats stay
-- apart on Lua 5.3+), strings of any bytes, and tables of those, nested
-- up to 200 levels. A table reached twice in one job's arguments (or
-- results) arrives as one table reached twice; a table that contains itself
-- is refused. Metatables do not cross. Functions, userdata, coroutines and
-- cdata are refused: as arguments with an error at submit naming the
-- argument, as results with `false` and a message to the callback.
--
-- @module bgworker.pool

local await = require "bgworker.await"
local core = require "bgworker.core"
local native = require "bgworker_pool"

local debug, error, getmetatable, package, pairs, select, setmetatable, string, tostring, type =
    debug, error, getmetatable, package, pairs, select, setmetatable, string, tostring, type
local floor, huge = math.floor, math.huge
local pack = table.pack or function(...)
    return { n = select("#", ...), ... }
end
local unpack = table.unpack or unpack

local pool = {}

--- Most threads a pool may have.
pool.MAX_THREADS = 1024

local Pool = {}
Pool.__index = Pool

local function badarg(fname, n, msg)
    return ("bad argument #%d to '%s' (%s)"):format(n, fname, msg)
end

local function argerror(fname, n, msg, level)
    error(badarg(fname, n, msg), level + 1)
end

-- Dumps of the functions submitted so far, so that a function submitted
-- again is neither checked nor dumped again.
local dumps = setmetatable({}, { __mode = "k" })

-- What the workers receive for fn: code and whether it is a name; or nil
-- and why fn cannot be a job.
local function job_function(fn)
    if type(fn) == "string" then
        if not fn:match("^[^.].*%.[^.]+$") then
            return nil, ("'module.function' expected, got '%s'"):format(fn)
        end
        return fn, true
    end
    if type(fn) ~= "function" then
        return nil, "function or 'module.function' string expected, got " .. type(fn)
    end
    local code = dumps[fn]
    if code then
        return code, false
    end
    local info = debug.getinfo(fn, "Su")
    if info.what == "C" then
        return nil, "a C function cannot move to a worker"
    end
    for i = 1, info.nups do
        local name = debug.getupvalue(fn, i)
        if name ~= "_ENV" then
            return nil, ("the function has upvalue '%s': a job's function must not use" ..
                " local variables from outside it"):format(tostring(name))
        end
    end
    code = string.dump(fn)
    dumps[fn] = code
    return code, false
end

local function check_self(self, method)
    if getmetatable(self) ~= Pool then
        argerror(method, 1, "pool expected, got " .. type(self) .. "; call it as pool:" .. method .. "()", 3)
    end
end

-- Queue fn(...) (n arguments) with callback. Returns nothing, or why the
-- job cannot be queued (an error message).
local function queue(self, fname, fn, callback, n, ...)
    if self.closed then
        return fname .. ": the pool is closed"
    end
    if not core.running() then
        return fname .. ": no bgworker dispatcher is running in this Lua state; start one with" ..
            " bgworker.new() or bgworker.copas() first"
    end
    local code, named = job_function(fn)
    if not code then
        return badarg(fname, 1, named)
    end
    local position, message = self.native:submit(callback, code, named, n, ...)
    if position then
        return badarg(fname, position + 1, message)
    end
end

--- Make a pool.
-- @tparam[opt] table opts
--   `threads` (integer in 1..MAX_THREADS): how many worker threads; by
--   default as many as the system runs at once.
-- @return the pool
function pool.new(opts)
    if opts == nil then
        opts = {}
    elseif type(opts) ~= "table" then
        argerror("bgworker.pool.new", 1, "options table expected, got " .. type(opts), 2)
    end
    for k in pairs(opts) do
        if k ~= "threads" then
            argerror("bgworker.pool.new", 1, "unknown option '" .. tostring(k) .. "'", 2)
        end
    end
    local threads = opts.threads or native.cpus
    if type(threads) ~= "number" or threads < 1 or threads > pool.MAX_THREADS or threads ~= floor(threads)
        or threads == huge then
        argerror("bgworker.pool.new", 1, ("opts.threads must be an integer in 1..%d, got %s"):format(
            pool.MAX_THREADS, tostring(threads)), 2)
    end
    local handle, err = native.new(floor(threads), package.path, package.cpath)
    if not handle then
        error("bgworker.pool.new: " .. err, 2)
    end
    return setmetatable({ native = handle, threads = floor(threads), closed = false }, Pool)
end

--- Run `fn(...)` on a worker; `callback` runs on this thread with `true`
-- and fn's results, or `false` and an error message (with a traceback for
-- an error raised by fn; "cancelled" for a job that `close` cancelled).
-- @param fn a function without upvalues (other than `_ENV`), or a string
--   "module.function"
-- @param ... fn's arguments, then the callback (the last argument)
function Pool:submit(fn, ...)
    check_self(self, "submit")
    local n = select("#", ...)
    local last = n > 0 and n or 1
    local callback = (select(last, ...))
    if type(callback) ~= "function" then
        argerror("submit", last + 1, "callback function expected as the last argument, got " ..
            type(callback), 2)
    end
    local err = queue(self, "submit", fn, callback, n - 1, ...)
    if err then
        error(err, 2)
    end
end

--- Run `fn(...)` on a worker and wait for it, suspending only the running
-- Copas thread (with `bgworker.await`), while a Copas dispatcher
-- (`bgworker.copas()`) collects the result.
-- @param fn as for `submit`
-- @param ... fn's arguments
-- @return as `pcall`: `true` and fn's results, or `false` and an error
-- message (with a traceback for an error raised by fn; "cancelled" for a
-- job that `close` cancelled)
function Pool:run(fn, ...)
    check_self(self, "run")
    local args = pack(...)
    local err
    local results = pack(await(function(callback)
        err = queue(self, "run", fn, callback, args.n, unpack(args, 1, args.n))
        if err then
            -- Nothing to wait for.
            callback()
        end
    end))
    if err then
        error(err, 2)
    end
    if not results[1] then
        return nil, results[2]
    end
    return unpack(results, 2, results.n)
end

--- Finish the running jobs, cancel the queued ones (their callbacks get
-- `false, "cancelled"` from the dispatcher), and join the threads. Blocks
-- until the running jobs are done. Closing a closed pool does nothing. A
-- pool that is garbage collected, or whose Lua state closes, is closed the
-- same way.
--
-- With a bounded dispatcher queue (`capacity`), callbacks that find the
-- queue full during `close` are dropped: this thread, which would make
-- room, is waiting for the workers.
-- @treturn int the number of jobs cancelled
function Pool:close()
    check_self(self, "close")
    if self.closed then
        return 0
    end
    self.closed = true
    return self.native:close()
end

-- Lua 5.4: `local p <close> = pool.new()`.
Pool.__close = Pool.close

return pool

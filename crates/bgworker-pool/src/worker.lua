-- Runs in each worker's Lua state: the one function the worker calls per job.
-- run(code, named, ...) returns true and the job's results, or false and
-- the error message with a traceback of where it was raised.
local debug, error, require, select, tostring, type, xpcall =
    debug, error, require, select, tostring, type, xpcall
-- Lua 5.1 and LuaJIT load a binary chunk from a string with loadstring,
-- 5.2+ with load (5.2 has both).
local loadcode = loadstring or load
local unpack = table.unpack or unpack

-- The message, then the traceback from where it was raised. Concatenated
-- here: debug.traceback(message) would cut the message at a zero byte.
local function handler(err)
    return tostring(err) .. debug.traceback("", 2)
end

-- "a.b.f": function f of module "a.b".
local function resolve(name)
    local module, field = name:match("^(.+)%.([^.]+)$")
    local exports = require(module)
    local f = type(exports) == "table" and exports[field]
    if type(f) ~= "function" then
        error(("'%s' is not a function: module '%s' has no function '%s'"):format(name, module, field), 0)
    end
    return f
end

local function call(code, named, ...)
    local f
    if named then
        f = resolve(code)
    else
        f = assert(loadcode(code, "=job"))
    end
    return f(...)
end

return function(...)
    -- Lua 5.1's xpcall passes no arguments to the function.
    local n, args = select("#", ...), { ... }
    return xpcall(function()
        return call(unpack(args, 1, n))
    end, handler)
end

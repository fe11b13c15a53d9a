--- Yield-transparent protected calls.
--
-- `protect.call(f, ...)` calls `f(...)` in protected mode, like `pcall`, and
-- also records a traceback of where an error was raised. Unlike Lua 5.1's
-- `pcall`, `f` may yield: the yield passes through to whoever resumed the
-- caller (a Copas thread, say), and the answer comes back to `f`.
--
-- On Lua 5.2 and later, and on LuaJIT, `xpcall` is yieldable and takes
-- arguments, so `call` is a thin layer over it. On Lua 5.1 it runs `f` in a
-- coroutine of its own and passes yields through by hand. Those coroutines
-- are reused: a call that returns or yields allocates nothing.
--
-- One difference remains on Lua 5.1: inside `f`, `coroutine.running()` is
-- the helper coroutine, not the caller's; `protect.running()` is the
-- caller's, on every version.
--
-- @module bgworker.protect

local coroutine = coroutine
local create, resume, yield, running = coroutine.create, coroutine.resume, coroutine.yield,
  coroutine.running
local traceback = debug.traceback
local select, setmetatable, tostring, type, xpcall = select, setmetatable, tostring, type, xpcall

local protect = {}

-- Both versions of `call` return what `finish` makes of xpcall's results. The
-- message handler runs where the error was raised: it keeps the traceback
-- aside and returns the error value unchanged.
local last_traceback

local function handler(err)
  last_traceback = traceback(tostring(err), 2)
  return err
end

local function finish(ok, ...)
  if ok then
    return true, ...
  end
  local tb = last_traceback
  last_traceback = nil
  return false, (...), tb
end

--- A `call` made of coxpcall's `xpcall`, for code that finds the running
-- thread with `coxpcall.running` (Copas 4 on Lua 5.1 does, for its socket
-- timeouts): coxpcall's helper coroutines are known to it, ours are not.
-- It allocates a coroutine per call.
-- @param cox the coxpcall module
-- @return a function like `call`
function protect.coxpcall(cox)
  local cxpcall = cox.xpcall
  return function(f, ...)
    -- The coroutine coxpcall runs f in, for a traceback of its stack.
    local co
    local function run(...)
      co = running()
      return f(...)
    end
    -- coxpcall 1.17 in a coroutine calls the handler after the coroutine
    -- died, with `debug.traceback(co, err)` and then the error; for an
    -- error that is not a string that "traceback" is the error itself, so
    -- make one from the dead coroutine's stack. Outside a coroutine it
    -- calls the handler with the error alone.
    local function cox_handler(first, ...)
      if select("#", ...) == 0 then
        return handler(first)
      end
      local err = ...
      if type(first) == "string" and first ~= err then
        last_traceback = first
      else
        last_traceback = traceback(co, tostring(err))
      end
      return err
    end
    return finish(cxpcall(run, cox_handler, ...))
  end
end

--- `true` when `call` is the platform's own `xpcall` (Lua 5.2+, LuaJIT),
-- `false` when it is the coroutine-based version (Lua 5.1). Decided from the
-- version, not by trying: a try needs a coroutine, and OpenResty's
-- init_worker phase, where this module may load, forbids them.
protect.native = _VERSION ~= "Lua 5.1" or rawget(_G, "jit") ~= nil

if protect.native then
  --- The running coroutine, or nil in the main thread; on Lua 5.1 seen
  -- through `call`'s helper coroutines, to the one that called `call`.
  function protect.running()
    local co, main = running()
    if main then
      return nil
    end
    return co
  end

  --- Call `f(...)` in protected mode; `f` may yield.
  -- @param f the function to call
  -- @param ... its arguments
  -- @return `true` and the values `f` returned, or `false`, the error
  -- value and a traceback string (the error as text, then the stack)
  function protect.call(f, ...)
    return finish(xpcall(f, handler, ...))
  end

  return protect
end

-- Lua 5.1: each call runs in a worker coroutine. A worker runs one function,
-- yields DONE and the function's values, and waits for the next function.
-- Any other yield comes from the function itself and is passed on.
local DONE = {}
local pool, npool = {}, 0

-- Who called `call` in each helper coroutine: a coroutine, or MAIN.
local MAIN = {}
local caller = setmetatable({}, { __mode = "k" })

function protect.running()
  local co = running()
  while co do
    local c = caller[co]
    if c == nil then
      return co
    elseif c == MAIN then
      return nil
    end
    co = c
  end
  return nil
end

-- `worker` hands the values to `idle` by a tail call, so that a worker
-- waiting in the pool holds neither the function it ran nor its arguments
-- (a dispatcher passed as one stayed reachable, and was never collected).
local idle

local function worker(f, ...)
  return idle(f(...))
end

function idle(...)
  return worker(yield(DONE, ...))
end

local OUTSIDE = "attempt to yield from outside a coroutine"

local function run(co, ok, first, ...)
  if not ok then
    -- co is dead, with its stack as it was when the error was raised.
    return false, first, traceback(co, tostring(first))
  end
  if first == DONE then
    npool = npool + 1
    pool[npool] = co
    return true, ...
  end
  if running() == nil then
    -- The main thread cannot yield. co stays suspended and is dropped.
    return false, OUTSIDE, traceback(co, OUTSIDE)
  end
  return run(co, resume(co, yield(first, ...)))
end

function protect.call(f, ...)
  local co
  if npool > 0 then
    co = pool[npool]
    pool[npool] = nil
    npool = npool - 1
  else
    co = create(worker)
  end
  caller[co] = running() or MAIN
  return run(co, resume(co, f, ...))
end

return protect

-- Runs once in each worker's Lua state, with the native helpers and its own
-- chunk name (which tracebacks leave out): sets the state up and returns
-- what the worker's native side calls each task (its init, then its jobs)
-- with: the message handler of that call, `traceback()` (what the handler
-- kept of the last failure) and `resolve(name)` (a named task's function).
local native, CHUNK = ...
local CANCEL, interrupted, enter, leave = native.CANCEL, native.interrupted, native.enter, native.leave

local coroutine, debug, error, package, require, table, tostring, type =
  coroutine, debug, error, package, require, table, tostring, type
local raw_pcall, raw_xpcall, raw_resume, create = pcall, xpcall, coroutine.resume, coroutine.create
-- Lua 5.4: runs a dead coroutine's pending __close variables.
local close = coroutine.close

-- A cancelled task must end: a protected call that failed while the task
-- is cancelled failed because of the cancellation (or hides it), so the
-- cancellation error goes on up (interrupt.rs).
local function rethrow(ok, ...)
  if not ok and interrupted() then
    error(CANCEL, 0)
  end
  return ok, ...
end

function pcall(f, ...)
  return rethrow(raw_pcall(f, ...))
end

function xpcall(f, handler, ...)
  return rethrow(raw_xpcall(f, handler, ...))
end

-- `enter` records the coroutine being resumed, so that a cancellation
-- reaches it; `leave` forgets it.
local function resumed(co, depth, ok, ...)
  leave(depth)
  if not ok and interrupted() then
    if close then
      close(co)
    end
    error(CANCEL, 0)
  end
  return ok, ...
end

function coroutine.resume(co, ...)
  local depth = enter(co)
  return resumed(co, depth, raw_resume(co, ...))
end

local resume = coroutine.resume

-- As the standard wrap, over the resume above. Errors go on unchanged
-- (the standard one prefixes string errors with the resumer's position).
local function unwrap(co, ok, ...)
  if ok then
    return ...
  end
  if close then
    close(co)
  end
  error((...), 0)
end

function coroutine.wrap(f)
  local co = create(f)
  return function(...)
    return unwrap(co, resume(co, ...))
  end
end

local progress, job_cancelled, in_job, next_message = native.progress, native.cancelled,
  native.in_job, native.receive

-- What `receive` returns for what the native side got (see state.rs).
local function received(ok, ...)
  if ok then
    return ...
  end
  local problem, message = ...
  if problem == "timeout" then
    return nil, "timeout"
  elseif problem == "cancelled" then
    error(CANCEL, 0)
  end
  error(message, 0)
end

package.loaded["bgworker.worker"] = {
  -- Values cross as a job's results do. Waits while too many of this
  -- job's progress items are on their way; raises for a value that
  -- cannot cross, for too many values, outside a job, and once the job is
  -- cancelled.
  progress = function(...)
    local problem, message = progress(...)
    if problem == "cancelled" then
      error(CANCEL, 0)
    elseif problem then
      error(message, 2)
    end
  end,
  -- True once the running job was cancelled; false in a pool's init.
  cancelled = job_cancelled,
  -- The values of the next message that `job:send` queued for this job,
  -- in the order sent, waiting up to `timeout` seconds (nil: until one
  -- comes); nil, "timeout" when none came. A cancellation point: a cancel
  -- ends the job here at once.
  receive = function(timeout)
    if timeout ~= nil and (type(timeout) ~= "number" or not (timeout >= 0)) then
      error("bad argument #1 to 'receive' (timeout must be a non-negative number of seconds, got " ..
        tostring(timeout) .. ")", 2)
    elseif not in_job() then
      error("bgworker.worker.receive: not in a job (a pool's init receives no messages)", 2)
    end
    return received(next_message(timeout))
  end,
}

-- A traceback without the frames of this file that called the task's
-- function (and the xpcall and tail call in between).
local function trim(traceback)
  local lines = {}
  for line in traceback:gmatch("[^\n]+") do
    if line:find(CHUNK, 1, true) then
      break
    end
    lines[#lines + 1] = line
  end
  while #lines > 1 and (lines[#lines]:find("^%s*%[C%]") or lines[#lines]:find("tail call", 1, true)) do
    lines[#lines] = nil
  end
  return table.concat(lines, "\n")
end

-- The name that `resolve` is loading, while it is: an error raised then
-- failed that load.
local loading

-- What a load of `name` that raised `err` reports: the name as the user
-- gave it, then why. `require` words its own errors ("module 'x' not
-- found") from where it was called, which is `resolve`: that location is
-- ours, not the user's, and is left out.
local HERE = "^" .. CHUNK:gsub("%p", "%%%0") .. ":%d+: "
local function load_error(name, err)
  if type(err) ~= "string" then
    return err
  end
  return ("cannot load '%s': %s"):format(name, (err:gsub(HERE, "", 1)))
end

-- The traceback of the last error, taken where it was raised: the
-- message handler of the worker's call of each task.
local last_traceback
local function handler(err)
  last_traceback = trim(debug.traceback("", 2))
  if loading then
    err, loading = load_error(loading, err), nil
  end
  return err
end

local function traceback()
  local taken = last_traceback
  last_traceback = nil
  return taken
end

-- "a.b.f": function f of module "a.b", required now.
local function resolve(name)
  local module, field = name:match("^(.+)%.([^.]+)$")
  if not module then
    error(("'%s' is not a 'module.function' name"):format(name), 0)
  end
  loading = name
  local exports = require(module)
  loading = nil
  local f = type(exports) == "table" and exports[field]
  if type(f) ~= "function" then
    error(("'%s' is not a function: module '%s' has no function '%s'"):format(name, module, field), 0)
  end
  return f
end

return handler, traceback, resolve

-- Part of bgworker.core: runs a round trip's callback and hands its outcome
-- to the core. The callback may yield across it, on every Lua version.
local complete, pcall_cannot_yield = ...

local pcall = pcall
if pcall_cannot_yield then
  local create, resume, status, yield = coroutine.create, coroutine.resume, coroutine.status, coroutine.yield

  -- Run the function in a coroutine of its own: an error ends that
  -- coroutine only, and its yields are passed on to ours and back.
  local function step(co, ok, ...)
    if not ok then
      return false, ...
    end
    if status(co) == "dead" then
      return true, ...
    end
    return step(co, resume(co, yield(...)))
  end

  local plain_pcall = pcall
  pcall = function(f, ...)
    -- 5.1 coroutines cannot start on a C function, and a C function cannot
    -- yield across a pcall anyway: those take the plain pcall.
    local ok, co = plain_pcall(create, f)
    if not ok then
      return plain_pcall(f, ...)
    end
    return step(co, resume(co, ...))
  end
end

return function(token, callback, ...)
  return complete(token, pcall(callback, ...))
end

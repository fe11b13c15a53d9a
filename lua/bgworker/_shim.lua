-- TEMPORARY (until the core and pool branches merge): core.run, core.guard, core.token.
local core = require "bgworker.core"
if core.run then return end
local run = 0
for _, name in ipairs { "start", "start_fd", "start_greeting" } do
  local f = core[name]
  core[name] = function(...)
    local r = { f(...) }
    run = run + 1
    return (table.unpack or unpack)(r)
  end
end
core.run = function() return core.running() and run or nil end
core.guard = function() return {} end
core.token = core.token or function()
  local t = { c = false }
  function t.cancel() local was = t.c; t.c = true; return not was end
  function t.cancelled() return t.c end
  return t
end

-- Run by spec/busted_spec.lua after left_running.lua, in one busted run: the
-- dispatcher that file left running is found (bgworker.current) and
-- stopped, by the helper or by hand.

local bgworker = require "bgworker"
local async = require("bgworker.busted").async

it("sees the dispatcher the last file left running", function()
  local leftover = bgworker.current()
  assert.is_table(leftover)
  assert.has_error(function() bgworker.new() end)
end)

it("starts its own dispatcher in an async test", async(function()
  local p = require("bgworker.pool").new { threads = 1 }
  assert.same({ true, 2 }, { p:submit(function() return 2 end):get(5) })
end, { loop = "select" }))

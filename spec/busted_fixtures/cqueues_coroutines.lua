-- Run by spec/busted_spec.lua: an error in another coroutine of the
-- controller that the test started fails the test; what that test left in
-- its controller does not run on in the next test.

local async = require("bgworker.busted").async
local cqueues = require "cqueues"

local leftover_ran = false

it("fails at an error of a coroutine it wrapped", async(function()
  local controller = cqueues.running()
  controller:wrap(function()
    cqueues.sleep(0.05)
    error("the coroutine's own message")
  end)
  controller:wrap(function()
    cqueues.sleep(0.3)
    leftover_ran = true
  end)
  cqueues.sleep(1)
end, { loop = "cqueues" }))

it("finds what the last test left behind stopped", async(function()
  cqueues.sleep(0.5)
  assert.is_false(leftover_ran)
end, { loop = "cqueues" }))

-- Run by spec/busted_spec.lua before another file, in one busted run: a
-- spec file that starts a dispatcher as a program would, and never stops
-- it. busted's insulation then unloads bgworker before the next file.

local d = require("bgworker").new()

it("starts a dispatcher and leaves it running", function()
  assert.is_false(d.stopped)
end)

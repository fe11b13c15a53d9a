-- The README's smallest utility library (examples/c/answer.c) does what the
-- README says: a thread's number arrives in a Lua callback.

local bgworker = require "bgworker"
local answer = require "answer"

describe("the README's C utility library", function()
  it("delivers 42 from its thread to the callback", function()
    local d = bgworker.new()
    local got = {}
    for _ = 1, 3 do
      answer.answer(function(value) got[#got + 1] = value end)
    end
    local deadline = os.time() + 10
    while #got < 3 and os.time() < deadline do
      d:wait(1)
    end
    d:stop()
    assert.same({ 42, 42, 42 }, got)
  end)
end)

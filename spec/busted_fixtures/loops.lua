-- Run by spec/busted_spec.lua in a busted of its own (TAP output): in each
-- loop (LOOPS, or those of the environment's BGWORKER_TEST_LOOPS), one
-- test of each kind, in this order: passes, fails in a pool callback,
-- never ends, never yields (PUC Lua only: LuaJIT runs no hook in compiled
-- code), passes (after those that timed out).

local helper = require "bgworker.busted"
local pool = require "bgworker.pool"
local async, eventually = helper.async, helper.eventually

local loops = {}
for loop in (os.getenv("BGWORKER_TEST_LOOPS") or "copas select luv cqueues"):gmatch("%S+") do
  loops[#loops + 1] = loop
end

for _, loop in ipairs(loops) do
  describe(loop, function()
    it("passes", async(function()
      local p = pool.new { threads = 1 }
      assert.same({ true, 3 }, { p:submit(function(a, b) return a + b end, 1, 2):get(5) })
      local called = false
      p:submit(function() return 1 end):on_done(function() called = true end)
      eventually(function() return called end, 5)
    end, { loop = loop }))

    it("fails in a pool callback", async(function()
      local p = pool.new { threads = 1 }
      local called = false
      p:submit(function() return 1 end):on_done(function(_, v)
        called = true
        assert.equals("the callback's own message", v)
      end)
      eventually(function() return called end, 5)
      -- Not reached when the test fails at the callback's error.
      require("socket").sleep(1)
    end, { loop = loop }))

    it("never ends", async(function()
      local p = pool.new { threads = 1 }
      p:submit(function() require("socket").sleep(5) end):get()
    end, { loop = loop, timeout = 0.3 }))

    if not rawget(_G, "jit") then
      it("never yields", async(function()
        while true do end
      end, { loop = loop, timeout = 0.3 }))
    end

    it("passes after one that timed out", async(function()
      local p = pool.new { threads = 1 }
      assert.same({ true, "next" }, { p:submit(function() return "next" end):get(5) })
    end, { loop = loop }))
  end)
end

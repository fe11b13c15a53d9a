-- Loops that end when their work is done (Copas 4's copas.loop(), luv's
-- uv.run()) end with a dispatcher in them too: the dispatcher keeps the
-- loop alive only while something is outstanding (a job, a lookup, a
-- wait, a utility library's handle that keeps it alive), or after
-- d:ref(). Each case is a program of its own, run in a new interpreter
-- with a time limit: a loop that does not end is killed, and fails.
--
-- The other loops never end by themselves (Copas 1.x, select, cqueues'
-- controller with our reader in it, OpenResty): this file is not run
-- against Copas 1.x.

local support = require "support"

-- How each loop runs a program: `setup` makes the dispatcher `d`; `spawn`
-- runs a function where it may wait; `after(s, fn)` calls fn after s
-- seconds; `run` is the loop, which must return.
local LOOPS = {
  copas = {
    setup = [[
      local copas = require "copas"
      local d = require("bgworker").new { loop = "copas" }
      local function spawn(fn) copas.addthread(fn) end
      local function after(s, fn) copas.addthread(function() copas.pause(s) fn() end) end
      local function run() copas.loop() end
    ]],
  },
  luv = {
    setup = [[
      local uv = require "luv"
      local d = require("bgworker").new { loop = "luv" }
      local function spawn(fn) coroutine.wrap(fn)() end
      local function after(s, fn)
        local t = uv.new_timer()
        t:start(math.floor(s * 1000), 0, function() t:close() fn() end)
      end
      local function run() uv.run() end
    ]],
  },
}

-- Run `body` (a program's middle, between setup and the loop) in loop
-- `name`; it may set `after_loop`, run once the loop returned. Returns the
-- program's output; the test fails if it did not exit 0 in time.
local function program(name, body)
  local script = LOOPS[name].setup .. [[
    local core = require "bgworker.core"
    local after_loop = function() end
    local started = core.now()
  ]] .. body .. [[
    run()
    print(("loop returned after %.2f s"):format(core.now() - started))
    after_loop()
    if not d.stopped then d:stop() end
  ]]
  local status, output = support.run_lua(script, 30)
  assert.equals(0, status, "the program did not end (or failed):\n" .. output)
  assert.matches("loop returned after", output)
  return output
end

-- The seconds the loop ran, from a program's output.
local function loop_seconds(output)
  return tonumber(output:match("loop returned after ([%d.]+) s"))
end

for _, name in ipairs { "copas", "luv" } do
  describe("a " .. name .. " loop with a dispatcher in it", function()
    if name == "copas" then
      local copas = support.needs_copas()
      if not copas then return end
    else
      local uv, why = support.require_native("luv", "bgworker.luv")
      if not uv then
        it("needs luv", function() pending("luv cannot be loaded under LuaJIT here: " .. tostring(why)) end)
        return
      end
    end

    it("ends when the program's work is done, with an idle pool", function()
      local output = program(name, [[
        local pool = require("bgworker.pool").new { threads = 1 }
        after(0.1, function() print("work done") end)
      ]])
      assert.matches("work done", output)
    end)

    it("ends after a callback that waits for the next job (the issue's program)", function()
      local output = program(name, [[
        local workers = require("bgworker.pool").new { threads = 1 }
        workers:submit(function() return 1 end):on_done(function(ok, v)
          spawn(function()
            print("chained", ok, v, workers:submit(function() return 2 end):get())
          end)
        end)
      ]])
      assert.matches("chained\ttrue\t1\ttrue\t2", output)
    end)

    it("stays alive for a job's outcome, and for its callback", function()
      local output = program(name, [[
        local workers = require("bgworker.pool").new { threads = 1 }
        workers:submit(function()
          local t = os.clock() + 0.2
          while os.clock() < t do end
          return 7
        end):on_done(function(ok, v) print("outcome", ok, v) end)
      ]])
      assert.matches("outcome\ttrue\t7", output)
    end)

    it("stays alive for a DNS lookup", function()
      local output = program(name, [[
        require("bgworker.dns").resolve("localhost", function(addresses, err)
          print("resolved", addresses and #addresses > 0, err)
        end)
      ]])
      assert.matches("resolved\ttrue", output)
    end)

    it("stays alive for a wait whose answer comes from a handle that does not keep the loop", function()
      local output = program(name, [[
        local await = require "bgworker.await"
        local testutil = require "bgworker_testutil"
        spawn(function()
          local job
          print("awaited", await(function(done)
            job = testutil.produce { items = 1, interval_ms = 200, unref = true,
              callback = function() done("answer") end }
          end))
          testutil.join(job)
        end)
      ]])
      assert.matches("awaited\ttrue\tanswer", output)
    end)

    it("stays alive while a utility library's handles keep it, and dispatches all they deliver", function()
      local output = program(name, [[
        local testutil = require "bgworker_testutil"
        local count = 0
        local job = testutil.produce { producers = 2, items = 20, interval_ms = 10,
          callback = function() count = count + 1 end }
        after_loop = function()
          print("delivered", count)
          testutil.join(job)
        end
      ]])
      assert.matches("delivered\t40", output)
    end)

    it("does not stay alive for a handle that is unref'd", function()
      local output = program(name, [[
        local testutil = require "bgworker_testutil"
        local count = 0
        local job = testutil.produce { items = 1, interval_ms = 2000, unref = true,
          callback = function() count = count + 1 end }
        after_loop = function()
          print("dispatched before the end", count)
          testutil.join(job)
        end
      ]])
      assert.matches("dispatched before the end\t0", output)
    end)

    it("stays alive after d:ref() until d:unref()", function()
      local output = program(name, [[
        assert(d:ref() == d and d:has_ref())
        after(0.3, function()
          print("unref", d:unref() == d, d:has_ref())
        end)
      ]])
      assert.matches("unref\ttrue\tfalse", output)
      assert.is_true(loop_seconds(output) >= 0.29, output)
    end)

    it("stays alive while a handle says ref, and not after its unref", function()
      local output = program(name, [[
        local testutil = require "bgworker_testutil"
        local handle = testutil.acquire()
        assert(testutil.unref(handle) == 0 and testutil.unref(handle) == 0)
        assert(testutil.ref(handle) == 0)
        after(0.3, function()
          print("unref", testutil.unref(handle))
        end)
        after_loop = function()
          testutil.release(handle)
          print("released handle", testutil.ref(handle))
        end
      ]])
      assert.matches("unref\t0", output)
      assert.is_true(loop_seconds(output) >= 0.29, output)
      -- BGW_INVALID for a released handle.
      assert.matches("released handle\t4", output)
    end)

    it("ends at d:stop() while something is outstanding", function()
      local output = program(name, [[
        local workers = require("bgworker.pool").new { threads = 1 }
        workers:submit(function()
          local t = os.clock() + 5
          while os.clock() < t do end
        end)
        after(0.1, function() print("stopped", d:stop() >= 0) end)
        after_loop = function() workers:close(0) end
      ]])
      assert.matches("stopped\ttrue", output)
      assert.is_true(loop_seconds(output) < 4, output)
    end)
  end)
end

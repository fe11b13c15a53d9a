-- Drivers for the loop contract (loop_contract_spec.lua): one small driver
-- per event loop, each making that loop's dispatcher and running the loop
-- for real (socket.select, Copas, luv, cqueues). Not a spec: busted runs
-- only *_spec.lua. The drivers run each loop themselves, rather than
-- through bgworker.busted (which is built on what they test): the contract
-- counts the loop's turns and makes dispatchers with every option.
--
-- A driver has:
--   name                 the loop, as bgworker.new's opts.loop
--   new(opts)            a dispatcher of this loop (opts.loop filled in)
--   run(seconds)         run the loop until the dispatcher stopped and the
--                        loop let it go; after `seconds` (5) a watchdog
--                        stops it. Returns true when the watchdog fired.
--   turns()              how many turns the loop took so far (other work
--                        in the loop counts them)
--   exact_turns          true when a batch of `budget` items takes exactly
--                        one turn (one loop iteration)
--   go(fn)               run fn() in a coroutine of the loop, now, until it
--                        first waits (from a callback: soon)
--   after(seconds, fn)   run fn() in the loop after `seconds`
--   resumes_plain        true when a coroutine that a callback makes and
--                        resumes itself may wait too (the dispatcher resumes
--                        it); false where the loop's scheduler would, and a
--                        wait there raises
--   copas1               true for Copas 1.x (Copas's driver)
--   sleep(seconds)       from a callback or a coroutine of the loop: let the
--                        loop run for `seconds` (nil where callbacks cannot
--                        yield to the loop)
--   finish()             after each test: close what the driver made
--
-- `loops.each(fn)` calls fn(driver) for every loop of this Lua version: a
-- missing library fails (Lua 5.1 to 5.4), except luv and cqueues under
-- LuaJIT, which Debian builds for Lua 5.1 only: there the loop's specs are
-- pending with the reason.

local busted = require "busted"
local bgworker = require "bgworker"
local core = require "bgworker.core"
local support = require "support"

local loops = {}

-- A watchdog's seconds (5 by default), longer under valgrind (BGWORKER_SMALL),
-- where everything runs many times slower.
local function scaled(seconds)
  return (seconds or 5) * (support.small and 6 or 1)
end

local function options(name, opts)
  local o = { loop = name }
  for k, v in pairs(opts or {}) do o[k] = v end
  return o
end

--------------------------------------------------------------------------
-- socket.select, woken by a UDP datagram or by an eventfd

local function select_driver(kind)
  local driver = { name = "select", label = "select (" .. kind .. ")", exact_turns = true,
    resumes_plain = true }
  local d, turns, timers
  function driver.new(opts)
    opts = options("select", opts)
    opts.kind = opts.kind or kind
    d = bgworker.new(opts)
    return d
  end
  function driver.turns() return turns end
  function driver.after(seconds, fn)
    timers[#timers + 1] = { at = core.now() + seconds, fn = fn }
  end
  local function run_timers()
    for i = #timers, 1, -1 do
      if core.now() >= timers[i].at then
        table.remove(timers, i).fn()
      end
    end
  end
  function driver.run(seconds)
    local deadline = core.now() + scaled(seconds)
    while not d.stopped do
      if core.now() > deadline then
        d:stop()
        return true
      end
      d:wait(0.01)
      turns = turns + 1
      run_timers()
    end
    return false
  end
  function driver.go(fn)
    local co = coroutine.create(fn)
    assert(coroutine.resume(co))
  end
  function driver.finish()
    turns, timers = 0, {}
  end
  driver.finish()
  return driver
end

--------------------------------------------------------------------------
-- Copas (1.2 from Debian, or 4.x)

local function copas_driver(copas)
  local driver = { name = "copas", label = "copas (" .. tostring(copas._VERSION) .. ")",
    copas1 = support.is_copas1(copas) }
  local d
  function driver.new(opts)
    d = bgworker.new(options("copas", opts))
    return d
  end
  function driver.turns() return support.copas_steps end
  function driver.run(seconds)
    local function ended()
      return d.stopped and coroutine.status(d.reader) == "dead"
    end
    if support.copas_until(ended, scaled(seconds)) then
      return false
    end
    d:stop()
    assert(support.copas_until(ended, 2), "the reader did not end after stop")
    return true
  end
  function driver.go(fn)
    copas.addthread(fn)
  end
  function driver.after(seconds, fn)
    local deadline = core.now() + seconds
    local hook
    hook = function()
      if core.now() >= deadline then
        support.copas_step_hooks[hook] = nil
        fn()
      end
    end
    support.copas_step_hooks[hook] = true
  end
  if copas.pause then
    driver.sleep = copas.pause
  end
  function driver.finish()
    support.copas_step_hooks = {}
  end
  driver.finish()
  return driver
end

--------------------------------------------------------------------------
-- luv: uv.run() with a watchdog

local function luv_driver(uv)
  local driver = { name = "luv", label = "luv", exact_turns = true, resumes_plain = true }
  local d, counter
  function driver.new(opts)
    d = bgworker.new(options("luv", opts))
    return d
  end
  function driver.turns() return counter.n end
  function driver.run(seconds)
    local fired = false
    local watchdog = uv.new_timer()
    -- libuv starts timers from the time it cached at its last turn, which
    -- is old after the other loops' tests ran: refresh it first.
    uv.update_time()
    watchdog:start(math.floor(scaled(seconds) * 1000), 0, function()
      fired = true
      if d then d:stop() end
    end)
    -- The watchdog alone must not keep the loop alive.
    watchdog:unref()
    uv.run()
    watchdog:close()
    uv.run("nowait")
    return fired
  end
  function driver.go(fn)
    local co = coroutine.create(fn)
    assert(coroutine.resume(co))
  end
  function driver.after(seconds, fn)
    local timer = uv.new_timer()
    uv.update_time()
    timer:start(math.floor(seconds * 1000), 0, function()
      timer:close()
      fn()
    end)
  end
  function driver.finish()
    -- Close whatever a failed test left in the (process-wide) default loop.
    uv.walk(function(handle)
      if not handle:is_closing() then handle:close() end
    end)
    uv.run()
    counter = { n = 0 }
    counter.handle = uv.new_check()
    counter.handle:start(function() counter.n = counter.n + 1 end)
    counter.handle:unref()
  end
  driver.finish()
  return driver
end

--------------------------------------------------------------------------
-- cqueues: a controller, with d:loop() in one of its coroutines

local function cqueues_driver(cqueues)
  local driver = { name = "cqueues", label = "cqueues", exact_turns = true, sleep = cqueues.sleep }
  local d, cq, turns
  function driver.new(opts)
    d = bgworker.new(options("cqueues", opts))
    cq:wrap(function() d:loop() end)
    return d
  end
  function driver.turns() return turns end
  function driver.run(seconds)
    -- Counts turns of the controller while the dispatcher runs.
    cq:wrap(function()
      while not d.stopped do
        turns = turns + 1
        cqueues.sleep(0)
      end
    end)
    local deadline = cqueues.monotime() + scaled(seconds)
    while not cq:empty() do
      local left = deadline - cqueues.monotime()
      if left <= 0 then
        d:stop()
        assert(cq:loop(1))
        return true
      end
      assert(cq:loop(left))
    end
    return false
  end
  function driver.go(fn)
    cq:wrap(fn)
    -- From inside the controller (a callback), it runs at its next step.
    if not cqueues.running() then
      assert(cq:step(0))
    end
  end
  function driver.after(seconds, fn)
    cq:wrap(function()
      cqueues.sleep(seconds)
      fn()
    end)
  end
  function driver.finish()
    cq, turns = cqueues.new(), 0
  end
  driver.finish()
  return driver
end

--------------------------------------------------------------------------

-- luv or cqueues: the library, or nil and why it is pending (LuaJIT only).
local function optional(name)
  local ok, lib = pcall(require, name)
  if ok then
    return lib
  end
  if type(rawget(_G, "jit")) ~= "table" then
    error(name .. " is required for these specs on " .. _VERSION .. ": " .. tostring(lib), 2)
  end
  return nil, lib
end

--- Call fn(driver) for each loop of this Lua version, inside a describe
-- block named after it.
function loops.each(fn)
  local drivers = { select_driver("udp"), select_driver("eventfd") }
  local copas = support.needs_copas()
  if copas then
    drivers[#drivers + 1] = copas_driver(copas)
  end
  local pending = {}
  for _, name in ipairs { "luv", "cqueues" } do
    local lib, why = optional(name)
    if lib then
      drivers[#drivers + 1] = (name == "luv" and luv_driver or cqueues_driver)(lib)
    else
      pending[#pending + 1] = name .. " cannot be loaded under LuaJIT here: " .. tostring(why)
    end
  end
  for _, why in ipairs(pending) do
    busted.pending(why)
  end
  for _, driver in ipairs(drivers) do
    busted.describe(driver.label, function()
      fn(driver)
    end)
  end
end

return loops

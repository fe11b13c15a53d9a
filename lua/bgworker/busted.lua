--- Async tests for busted: a test body that runs in an event loop with a
-- bgworker dispatcher, waits as any callback can (`job:get`, `dns.toip`,
-- `bgworker.await`, `copas.pause`, Copas sockets), fails on an error raised
-- anywhere it started, and fails at its timeout instead of hanging the run.
--
--     local async = require("bgworker.busted").async
--
--     it("adds on a worker", async(function()
--       local pool = require("bgworker.pool").new { threads = 1 }
--       assert.same({ true, 3 }, { pool:submit(function(a, b) return a + b end, 1, 2):get(1) })
--     end, { loop = "copas", timeout = 5 }))
--
-- `async(fn, opts)` gives a function for `it`, `before_each`, `after_each`,
-- `setup` or `teardown`. When busted calls it:
--
-- 1. a dispatcher still running (left by an earlier test, or by a spec file
--    that busted's insulation has unloaded) is stopped;
-- 2. a dispatcher of `opts.loop` starts, and `fn` runs in a coroutine of
--    that loop (a Copas thread for Copas, a coroutine of a controller of
--    its own for cqueues) while the test drives the loop;
-- 3. the test fails with the first error raised in `fn`, in a callback the
--    dispatcher runs (a pool's `on_done` or `on_progress`, a `dns` or
--    `await` callback, an item of a native library), in another Copas
--    thread or server handler (Copas 4), or in another coroutine of the
--    controller (cqueues: `cqueues.running():wrap(fn)`); or, when `fn` has
--    not returned within `opts.timeout` seconds, with a message that says so and where
--    `fn` is waiting (a body that never yields fails there too, on Lua
--    5.1 to 5.4; LuaJIT runs no hook in compiled code);
-- 4. whatever happened, the loop is left clean for the next test: the pools
--    made during the test are closed, the dispatcher is stopped, and with
--    Copas 4 every thread, timer, socket and server left over is removed
--    (`copas.cancelall`); with luv the handles made during the test are
--    closed; with cqueues the test's controller is dropped, with whatever
--    it still runs.
--
-- With Copas 1.x (Lua 5.1, 5.2 and LuaJIT on Debian) the tests run, but
-- the Copas threads and servers a test leaves behind stay: Copas 1.x has
-- no way to remove them.
--
-- @module bgworker.busted

local args = require "bgworker.args"
local bgworker = require "bgworker"
local pool = require "bgworker.pool"

local coroutine, debug, error, pairs, pcall, rawget, require, tostring, type =
  coroutine, debug, error, pairs, pcall, rawget, require, tostring, type

local M = {}

--- Seconds a test may run by default.
M.DEFAULT_TIMEOUT = 5

--- How often (seconds) a test looks at its clock while its loop is idle.
local TICK = 0.01

-- ------------------------------------------------------------------------
-- Loops: each runs the test's body and drives its loop until `test.done`,
-- a failure, or the deadline; then cleans up after it.

local loops = {}

-- The failure of the test whose coroutine `co` raised `err`.
local function raised(test, err, co)
  test.fail(err, debug.traceback(co, tostring(err)))
end

local function timeout_message(test, where)
  return ("the test did not end within %g s (opts.timeout); %s"):format(test.timeout, where)
end

-- PUC Lua: a count hook on the test's coroutine raises at the deadline, so
-- that a body that never yields (a loop of its own) fails at its timeout
-- too. Not on LuaJIT, whose hooks are the whole state's and do not run in
-- compiled code.
local function watch(test)
  if rawget(_G, "jit") then
    return
  end
  local gettime, deadline = test.dispatcher.gettime, test.deadline
  debug.sethook(test.co, function()
    if gettime() >= deadline then
      error(timeout_message(test, "it was still running, without a wait"), 2)
    end
  end, "", 10000)
end

-- The body, in the coroutine it is resumed in, which becomes the test's
-- (`test.co`, watched from here on), unprotected: an error ends that
-- coroutine, whose stack then shows where it was raised, and whoever
-- resumed it makes it the test's failure (see each loop). So also the
-- stack of a body still waiting at the timeout is that coroutine's own (a
-- protected call would run it in a coroutine of its own on Lua 5.1).
local function run_body(test)
  test.co = coroutine.running()
  watch(test)
  test.body()
  test.done = true
end

local function driving(test)
  return not test.done and not test.failure and test.dispatcher.gettime() < test.deadline
end

loops.copas = {
  start = function(test)
    local copas = require "copas"
    test.copas = copas
    if copas.geterrorhandler then
      -- Copas 4: errors of every Copas thread come here, as failures.
      test.copas_errorhandler = copas.geterrorhandler()
      copas.seterrorhandler(function(msg, co, skt)
        test.fail(msg, copas.gettraceback(msg, co, skt))
      end, true)
    end
    copas.addthread(function()
      -- The test's own thread reports to the test, with Copas 1.x too
      -- (whose error handlers are per thread).
      local set_handler = copas.seterrorhandler or copas.setErrorHandler
      set_handler(function(err, co) raised(test, err, co) end)
      run_body(test)
    end)
  end,
  drive = function(test)
    local copas = test.copas
    while driving(test) do
      copas.step(TICK)
    end
  end,
  clean = function(test)
    local copas = test.copas
    if copas.cancelall then
      -- Its last step, copas.exit(), raises when no copas.loop() ever ran
      -- (the test drove Copas with copas.step()): what it removes is
      -- removed by then.
      pcall(copas.cancelall)
      -- Copas is left exiting: an empty loop (which returns at once)
      -- starts it afresh.
      if copas.finished() then
        copas.loop()
      end
    end
    if test.copas_errorhandler then
      copas.seterrorhandler(test.copas_errorhandler, true)
    end
  end,
}

-- A plain coroutine that the dispatcher resumes when what it waits for
-- comes (bgworker.waiter): select and luv. An error after a wait reaches
-- the dispatcher's error handler, which is the test's.
local function start_coroutine(test)
  local co = coroutine.create(run_body)
  local ok, err = coroutine.resume(co, test)
  if not ok then
    raised(test, err, co)
  end
end

loops.select = {
  start = start_coroutine,
  drive = function(test)
    while driving(test) do
      test.dispatcher:wait(TICK)
    end
  end,
  clean = function() end,
}

-- The luv handles that exist now.
local function luv_handles(uv)
  local handles = {}
  uv.walk(function(handle) handles[handle] = true end)
  return handles
end

loops.luv = {
  start = function(test)
    -- bgworker.luv first: it keeps each luv alive (an earlier luv collected
    -- makes uv.walk crash).
    require "bgworker.luv"
    local uv = require "luv"
    test.uv, test.handles = uv, luv_handles(uv)
    -- Brings uv.run("once") back at least every TICK, for the clock.
    test.ticker = uv.new_timer()
    test.ticker:start(TICK * 1000, TICK * 1000, function() end)
    start_coroutine(test)
  end,
  drive = function(test)
    while driving(test) do
      test.uv.run("once")
    end
  end,
  clean = function(test)
    local uv = test.uv
    uv.walk(function(handle)
      if not test.handles[handle] and not handle:is_closing() then
        handle:close()
      end
    end)
    uv.run("nowait")
  end,
}

-- A controller of the test's own, with the dispatcher's loop and the body
-- in two of its coroutines. An error in any coroutine of the controller
-- ends that step of it, and is the test's failure; what is left in the
-- controller after the test is dropped with it.
loops.cqueues = {
  start = function(test)
    test.controller = require("cqueues").new()
    test.controller:wrap(function() test.dispatcher:loop() end)
    test.controller:wrap(run_body, test)
  end,
  drive = function(test)
    while driving(test) do
      local ok, err, _, co = test.controller:step(TICK)
      if not ok then
        raised(test, err, co)
      end
    end
  end,
  clean = function() end,
}

-- ------------------------------------------------------------------------
-- Running a test

local function default_loop()
  return pcall(require, "copas") and "copas" or "select"
end

-- The error the test fails with for `failure` ({ err, traceback }): the
-- error value itself (busted tells a failed assertion by it), with the
-- traceback of where it was raised when it is a string.
local function failure_error(failure)
  local err = failure.err
  if type(err) == "string" and failure.traceback then
    return failure.traceback:find(err, 1, true) and failure.traceback or err .. "\n" .. failure.traceback
  end
  return err
end

local function run(body, opts)
  local leftover = bgworker.current()
  if leftover then
    leftover:stop()
  end
  local loop_name = opts.loop or default_loop()
  local loop = loops[loop_name]
  local test = { body = body, done = false, timeout = opts.timeout or M.DEFAULT_TIMEOUT }
  function test.fail(err, tb)
    test.failure = test.failure or { err = err, traceback = tb }
  end
  local pools_before = pool.open_pools()
  test.dispatcher = bgworker.new { loop = loop_name, errorhandler = test.fail }
  test.deadline = test.dispatcher.gettime() + test.timeout
  local ok, err = pcall(function()
    loop.start(test)
    loop.drive(test)
  end)
  if not ok then
    test.fail(err, debug.traceback(tostring(err)))
  end
  local timed_out = not test.done and not test.failure
  local waiting_at = timed_out and test.co and debug.traceback(test.co, "", 0) or ""
  for p in pairs(pool.open_pools()) do
    if not pools_before[p] then
      p:close(0)
    end
  end
  test.dispatcher:stop()
  loop.clean(test)
  if test.failure then
    error(failure_error(test.failure), 0)
  elseif timed_out then
    error(timeout_message(test, "it was waiting here:" .. waiting_at), 0)
  end
end

local OPTIONS = {
  loop = args.option.one_of { "copas", "select", "luv", "cqueues" },
  timeout = args.option.seconds,
}

--- A function for busted's `it` (or `before_each`, `after_each`, `setup`,
-- `teardown`) that runs `fn` as an async test (see above).
-- @tparam function fn the test's body
-- @tparam[opt] table opts `loop`: `"copas"`, `"select"`, `"luv"` or
--   `"cqueues"` (by
--   default Copas when it can be required, else select); `timeout`: seconds
--   the test may take (`DEFAULT_TIMEOUT`, 5 s, by default)
-- @treturn function
function M.async(fn, opts)
  local msg = args.typed("bgworker.busted.async", 1, "fn", fn, "function")
  if msg then error(msg, 2) end
  opts, msg = args.options("bgworker.busted.async", 2, opts, OPTIONS)
  if not opts then error(msg, 2) end
  return function()
    return run(fn, opts)
  end
end

--- In an async test: wait until `predicate()` is true, letting the loop
-- run meanwhile; raise when it is not after `timeout` seconds (1 s by
-- default).
-- @tparam function predicate
-- @tparam[opt] number timeout seconds
-- @return what `predicate` returned
function M.eventually(predicate, timeout)
  local msg = args.typed("eventually", 1, "predicate", predicate, "function") or
    args.seconds("eventually", 2, "timeout", timeout, true)
  if msg then error(msg, 2) end
  local d = bgworker.current()
  if not d then
    error("eventually: no bgworker dispatcher is running; call it in an async test", 2)
  end
  local deadline = d.gettime() + (timeout or 1)
  while true do
    local result = predicate()
    if result then
      return result
    end
    if d.gettime() >= deadline then
      error(("eventually: still not true after %g s"):format(timeout or 1), 2)
    end
    bgworker.await(function(done) d:timer(TICK, done) end)
  end
end

return M

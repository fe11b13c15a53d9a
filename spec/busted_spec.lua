-- bgworker.busted as users run it: the spec files of spec/busted_fixtures/
-- run in a busted of their own (TAP output, the interpreter of this run,
-- its LUA_PATH and LUA_CPATH), and each test's outcome and message is
-- checked here. In each loop: a passing test, a failed assertion inside a
-- pool callback, a test that never ends (failed at its timeout) and the
-- test after it; errors of other Copas threads and server handlers (Copas
-- 4) and of other coroutines of a cqueues controller; a second spec file
-- in the same run after one that left a dispatcher running; and the
-- example spec of the docs (examples/server_spec.lua: a Copas 4 server,
-- end to end).

local support = require "support"

local BUSTED = os.getenv("BGWORKER_BUSTED") or "/usr/bin/busted"
local FIXTURES = "spec/busted_fixtures/"

-- Run busted on the spec files at `paths` (with `env`, "NAME=value ..."):
-- the tests' outcomes in order ({ ok, name, message }), and the whole
-- output.
local function run_busted(paths, env)
  local lua = os.getenv("BGWORKER_LUA")
  assert.is_string(lua, "BGWORKER_LUA names the interpreter (set by make specs-*)")
  local pipe = assert(io.popen(("%s timeout -k 5 120 %s %s -o TAP %s 2>&1"):format(env or "", lua, BUSTED,
    table.concat(paths, " "))))
  local output = pipe:read("*a")
  pipe:close()
  local tests = {}
  for line in output:gmatch("[^\n]+") do
    local not_ok, name = line:match("^(n?o?t? ?)ok %d+ %- (.*)$")
    if name then
      tests[#tests + 1] = { ok = not_ok == "", name = name, message = "" }
    elseif line:match("^# ") and tests[#tests] then
      tests[#tests].message = tests[#tests].message .. line:sub(3) .. "\n"
    end
  end
  return tests, output
end

local function assert_test(test, name, ok, message, output)
  assert(test, "no test '" .. name .. "' ran:\n" .. output)
  assert.equals(name, test.name, output)
  assert(test.ok == ok, ("'%s' %s:\n%s"):format(name, ok and "failed" or "passed", output))
  if message then
    assert(test.message:find(message, 1, true), ("'%s' did not say '%s':\n%s"):format(name, message, output))
  end
end

describe("bgworker.busted", function()
  local copas = support.needs_copas()
  if not copas then return end

  for _, loop in ipairs { "copas", "select", "luv", "cqueues" } do
    it("runs async tests in " .. loop .. ": callbacks' failures and timeouts fail their own test", function()
      local t0 = os.time()
      local tests, output = run_busted({ FIXTURES .. "loops.lua" }, "BGWORKER_TEST_LOOPS=" .. loop)
      assert_test(tests[1], loop .. " passes", true, nil, output)
      assert_test(tests[2], loop .. " fails in a pool callback", false, "the callback's own message", output)
      assert_test(tests[3], loop .. " never ends", false, "did not end within 0.3 s (opts.timeout)", output)
      -- Where it waits: the body's line, inside get.
      assert.matches("busted_fixtures/loops.lua:%d+: in ", tests[3].message)
      local next_test = 4
      if not rawget(_G, "jit") then
        assert_test(tests[4], loop .. " never yields", false,
          "did not end within 0.3 s (opts.timeout); it was still running, without a wait", output)
        assert.matches("busted_fixtures/loops.lua:%d+:", tests[4].message)
        next_test = 5
      end
      assert_test(tests[next_test], loop .. " passes after one that timed out", true, nil, output)
      assert.equals(next_test, #tests, output)
      -- The job that never ends (5 s) does not hold up the run.
      assert.is_true(os.time() - t0 < 5, output)
    end)
  end

  it("fails a test at an error of a Copas thread or a server handler it added, and removes them", function()
    if support.is_copas1(copas) then
      pending(copas._VERSION .. " has neither an error handler for every thread nor a way to remove threads")
      return
    end
    local tests, output = run_busted { FIXTURES .. "copas_threads.lua" }
    assert_test(tests[1], "fails at an error of a Copas thread it added", false, "the thread's own message", output)
    assert_test(tests[2], "fails at an error of a server handler it added", false, "the handler's own message",
      output)
    assert_test(tests[3], "finds none of their threads and servers left", true, nil, output)
  end)

  it("fails a test at an error of another coroutine of its cqueues controller, and drops them", function()
    local tests, output = run_busted { FIXTURES .. "cqueues_coroutines.lua" }
    assert_test(tests[1], "fails at an error of a coroutine it wrapped", false, "the coroutine's own message", output)
    assert_test(tests[2], "finds what the last test left behind stopped", true, nil, output)
  end)

  it("stops a dispatcher that an earlier spec file of the run left running", function()
    local tests, output = run_busted { FIXTURES .. "left_running.lua", FIXTURES .. "second_file.lua" }
    assert_test(tests[1], "starts a dispatcher and leaves it running", true, nil, output)
    assert_test(tests[2], "sees the dispatcher the last file left running", true, nil, output)
    assert_test(tests[3], "starts its own dispatcher in an async test", true, nil, output)
  end)

  it("runs the docs' example: a spec of a Copas 4 server whose handler uses the pool", function()
    if support.is_copas1(copas) then
      pending("the example is written for Copas 4 (" .. copas._VERSION .. " here)")
      return
    end
    local tests, output = run_busted { "examples/server_spec.lua" }
    assert.equals(3, #tests, output)
    for _, test in ipairs(tests) do
      assert(test.ok, output)
    end
  end)

  it("shows that example in the docs as it is", function()
    local doc = assert(io.open("docs/testing.md")):read("*a")
    local example = assert(io.open("examples/server_spec.lua")):read("*a")
    local shown = doc:match("```lua\n(local helper.-)```")
    assert.is_string(shown, "docs/testing.md shows no example")
    assert.equals(example:match("\n(local helper.*)$"), shown)
  end)

  it("refuses bad arguments at the caller's line", function()
    local async = require("bgworker.busted").async
    local ok, err = pcall(async, 1)
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'bgworker.busted.async' %(fn must be a function, got 1%)", err)
    ok, err = pcall(async, function() end, { loop = "uv" })
    assert.is_false(ok)
    assert.matches("opts.loop must be one of \"copas\", \"select\", \"luv\", \"cqueues\", got \"uv\"", err)
    ok, err = pcall(async, function() end, { timeout = -1 })
    assert.is_false(ok)
    assert.matches("opts.timeout must be a non%-negative number of seconds", err)
  end)
end)

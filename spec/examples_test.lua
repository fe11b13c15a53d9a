-- Smoke runs of the programs in examples/ and of the README's first
-- program: each runs as a user runs it, in a new interpreter with the
-- modules on its paths, must end by itself within RUN_TIMEOUT seconds,
-- exit 0, and print what it promises, line by line. The OpenResty example
-- runs in a real nginx (spec/nginx/harness.lua).
--
--   make examples            (examples-5.1 ... examples-jit)
--
-- Which examples run depends on the Lua version, as their loops do:
--   select, messages (a job fed by messages, in a select loop), Copas 4
--   (the README's program, process.lua), the Copas 1.x variant and the C
--   ticker (examples/c/ticker.c, from build/<ver>/) with Copas 4:
--                              every version;
--   the Copas 1.x variant and the README's program's Copas 1.x ending with
--   Debian's Copas 1.2:        Lua 5.1, 5.2 and LuaJIT;
--   luv, cqueues:              Lua 5.1 to 5.4 (a missing one fails), and
--                              LuaJIT when they load there (else pending);
--   OpenResty:                 LuaJIT, in nginx with lua-nginx-module.
-- (examples/demo.lua is `make demo`, a run of half a minute: not here.)
--
-- Its name does not match busted's _spec pattern: `busted spec` leaves it
-- alone. Run from the top of the checkout. Environment (the Makefile sets
-- it): BGWORKER_LUA, the interpreter; LUA_PATH and LUA_CPATH, where the
-- examples find bgworker (lua/ and build/<ver>/, or an installed rock's
-- tree); BGWORKER_COPAS4_TREE, a LuaRocks tree with Copas 4 that goes first
-- on the Copas 4 runs' path (unset: LUA_PATH finds Copas 4 already, as in
-- scripts/rock-check); BGWORKER_COPAS_VERSION, the Copas 4 version those
-- runs must get; BGWORKER_BUILD, the LuaJIT build for nginx.

local harness = require "spec.nginx.harness"

local ROOT = os.getenv("BGWORKER_ROOT") or os.getenv("PWD")
local LUA = os.getenv("BGWORKER_LUA")
local BUILD = os.getenv("BGWORKER_BUILD") or "build/jit"
local COPAS4_TREE = os.getenv("BGWORKER_COPAS4_TREE")
local COPAS4_VERSION = os.getenv("BGWORKER_COPAS_VERSION") or "4"
local LUA_PATH = os.getenv("LUA_PATH") or ";;"
local LUA_CPATH = os.getenv("LUA_CPATH") or ";;"

-- Each example ends by itself in a second or two; this is the watchdog.
local RUN_TIMEOUT = 30

local IS_JIT = type(rawget(_G, "jit")) == "table"
local unpack = table.unpack or unpack
local API = _VERSION:match("%d+%.%d+")

--------------------------------------------------------------------------
-- Running a program

-- LUA_PATH with the Copas 4 tree first (if one was given).
local function copas4_path()
  if not COPAS4_TREE then
    return LUA_PATH
  end
  local share = ("%s/share/lua/%s"):format(COPAS4_TREE, API)
  return ("%s/?.lua;%s/?/init.lua;%s"):format(share, share, LUA_PATH)
end

-- Run Lua file `file` with `path` as LUA_PATH: its exit status and its
-- output (stderr with stdout) as a list of lines.
local function run(file, path)
  assert(LUA, "BGWORKER_LUA names the interpreter (make examples sets it)")
  local q = harness.quote
  local pipe = assert(io.popen(("cd %s && LUA_PATH=%s LUA_CPATH=%s timeout -s KILL %d %s %s 2>&1;" ..
    " echo \"exit:$?\""):format(q(ROOT), q(path), q(LUA_CPATH), RUN_TIMEOUT, LUA, q(file))))
  local output = pipe:read("*a")
  pipe:close()
  local text, status = output:match("^(.-)exit:(%d+)%s*$")
  text = text or output
  if text ~= "" and text:sub(-1) ~= "\n" then
    text = text .. "\n"
  end
  local lines = {}
  for line in text:gmatch("([^\n]*)\n") do
    lines[#lines + 1] = line
  end
  return tonumber(status), lines
end

-- The Copas version that `path` gives the interpreter ("4.11.0", "1.2.0"), or
-- nil and why not.
local function copas_version(path)
  local file = os.tmpname()
  harness.write_file(file, 'io.write((tostring(require("copas")._VERSION):match("%d[%d.]*")))\n')
  local status, lines = run(file, path)
  os.remove(file)
  if status ~= 0 then
    return nil, table.concat(lines, "\n")
  end
  return lines[1] or ""
end

-- Does `line` match `want`: a Lua pattern (anchored at both ends), or
-- { pattern, check }, where check(captures...) must be true too?
local function matches(line, want)
  local pattern, check = want, nil
  if type(want) == "table" then
    pattern, check = want[1], want[2]
  end
  local found = { line:match("^" .. pattern .. "$") }
  if #found == 0 then
    return false
  end
  return check == nil or check(unpack(found))
end

local function show(lines)
  return "\n--- output ---\n" .. table.concat(lines, "\n")
end

-- Run `file` (with `path`): it must exit 0 and print one line per entry of
-- `expected`, in that order, or, with `any_order`, in any order.
local function check_run(file, path, expected, any_order)
  local status, lines = run(file, path)
  assert(status == 0, ("%s exited with status %s"):format(file, tostring(status)) .. show(lines))
  assert(#lines == #expected, ("%s printed %d lines, expected %d"):format(file, #lines, #expected) ..
    show(lines))
  local used = {}
  for i, want in ipairs(expected) do
    local ok = false
    if any_order then
      for j, line in ipairs(lines) do
        if not used[j] and matches(line, want) then
          used[j], ok = true, true
          break
        end
      end
    else
      ok = matches(lines[i], want)
    end
    assert(ok, ("%s: no line matches %q"):format(file, type(want) == "table" and want[1] or want) ..
      show(lines))
  end
end

local function at_least(n)
  return function(count)
    return tonumber(count) >= n
  end
end

local function need_copas(path, major)
  local version, err = copas_version(path)
  assert(version, "Copas " .. major .. " is required for this example on " .. _VERSION .. ": " ..
    tostring(err))
  assert(version:match("^" .. major .. "%."),
    "expected Copas " .. major .. ", but require 'copas' gave Copas " .. version)
  return version
end

--------------------------------------------------------------------------
-- The README's first program

-- The ```lang blocks of the README's section `title`, in order.
local function readme_blocks(title, lang)
  local readme = assert(harness.read_file(ROOT .. "/README.md"), "README.md not found")
  local section = readme:match("\n## " .. title:gsub("%p", "%%%0") .. "\n(.-)\n## ")
  assert(section, "README.md has no section '## " .. title .. "'")
  local blocks = {}
  for block in section:gmatch("\n```" .. lang .. "\n(.-\n)```\n") do
    blocks[#blocks + 1] = block
  end
  assert(#blocks > 0, "the section '## " .. title .. "' of README.md has no ```" .. lang .. " block")
  return blocks
end

-- The README's first program, and the lines its Copas 1.x variant ends with.
local function readme_program()
  local blocks = readme_blocks("A first program", "lua")
  return blocks[1], blocks[2]
end

-- Run `program` (text) as a file with `path`, as check_run does.
local function check_program(program, path, expected)
  local file = os.tmpname()
  harness.write_file(file, program)
  local ok, err = pcall(check_run, file, path, expected)
  os.remove(file)
  assert(ok, err)
end

local COPAS4_OUTPUT = {
  "progress 25%%", "progress 50%%", "progress 75%%", "progress 100%%",
  "primes up to 100000:\ttrue\t9592",
  "endless job:\tnil\ttimeout",
  "cancel:\ttrue\tcancelled",
  -- The endless job was awaited for 0.2 s, with a tick every 0.01 s.
  { "loop ticks meanwhile:\t(%d+)", at_least(5) },
}

describe("the README's first program", function()
  it("is examples/copas.lua", function()
    assert.equals(harness.read_file(ROOT .. "/examples/copas.lua"), (readme_program()))
  end)

  it("runs, with Copas " .. COPAS4_VERSION .. ", and prints what it promises", function()
    local path = copas4_path()
    need_copas(path, COPAS4_VERSION:match("^%d+"))
    check_program(readme_program(), path, COPAS4_OUTPUT)
  end)

  -- Debian packages Copas 1.2 for these (and LuaJIT).
  if _VERSION == "Lua 5.1" or _VERSION == "Lua 5.2" then
    it("ends with a loop of its own on Copas 1.2, as the README says", function()
      need_copas(LUA_PATH, "1")
      local program, ending = readme_program()
      local start = program:find("\nlocal ticks = 0\n", 1, true)
      assert(start, "the README's first program has no line 'local ticks = 0'")
      local expected = { unpack(COPAS4_OUTPUT, 1, #COPAS4_OUTPUT - 1) }
      check_program(program:sub(1, start) .. ending, LUA_PATH, expected)
    end)
  end

  it("has examples/c/answer.c as its C library", function()
    local answer = assert(harness.read_file(ROOT .. "/examples/c/answer.c"))
    local block = readme_blocks("Writing a utility library in C", "c")[1]
    assert.truthy(answer:find(block, 1, true), "the README's C block is not part of examples/c/answer.c")
  end)
end)

--------------------------------------------------------------------------
-- One program per loop

describe("examples/", function()
  it("select.lua: a LuaSocket select loop", function()
    check_run("examples/select.lua", LUA_PATH, {
      "callback:\ttrue\t144",
      "get:\ttrue\tbgworker",
      "toip:\t127%.0%.0%.1",
      "jobs done:\t2\tcallback errors:\t0",
    }, true)
  end)

  it("messages.lua: a long-lived job fed by messages", function()
    check_run("examples/messages.lua", LUA_PATH, {
      "so far: 250 lines, 1250 words",
      "so far: 500 lines, 2500 words",
      "so far: 750 lines, 3750 words",
      "so far: 1000 lines, 5000 words",
      "counted:\ttrue\t1000\t5000",
      { "sends refused as full, then sent again:\t(%d+)", at_least(0) },
    })
  end)

  it("process.lua: a Copas server that streams the output of a command per request", function()
    local path = copas4_path()
    need_copas(path, COPAS4_VERSION:match("^%d+"))
    check_run("examples/process.lua", path, {
      "count: out 1", "count: out 2", "count: out 3", "count: end true exit 0", "count: streamed: true",
      "hello: out hello from a child process", "hello: end true exit 0",
      "fail: err about to fail", "fail: end nil exit 3",
    }, true)
  end)

  local COPAS1_OUTPUT = {
    "job:\ttrue\t1063329044",
    "localhost:\t127%.0%.0%.1\tlocalhost",
    { "loop turns meanwhile:\t(%d+)", at_least(2) },
  }

  it("copas1.lua: the Copas 1.x variant, with Copas 4", function()
    local path = copas4_path()
    need_copas(path, COPAS4_VERSION:match("^%d+"))
    check_run("examples/copas1.lua", path, COPAS1_OUTPUT, true)
  end)

  if _VERSION == "Lua 5.1" or _VERSION == "Lua 5.2" then
    it("copas1.lua: the Copas 1.x variant, with Debian's Copas 1.2", function()
      need_copas(LUA_PATH, "1")
      check_run("examples/copas1.lua", LUA_PATH, COPAS1_OUTPUT, true)
    end)
  end

  it("ticker_copas.lua: the C ticker's thread into Copas (make demo-ticker)", function()
    local path = copas4_path()
    need_copas(path, COPAS4_VERSION:match("^%d+"))
    local expected = { "bgworker %d+%.%d+%.%d+: dispatching in a Copas loop" }
    for i = 1, 5 do
      expected[#expected + 1] = " *%d+%.%d+ s  TICK " .. i .. " OF 5"
    end
    expected[#expected + 1] = "done"
    check_run("examples/ticker_copas.lua", path, expected)
  end)

  -- luv and cqueues: required on Lua 5.1 to 5.4; under LuaJIT, Debian's
  -- builds for Lua 5.1 may load (then they run) or not (then pending).
  local function loop_library(name)
    local ok, err = pcall(require, name)
    if ok or not IS_JIT then
      assert(ok, name .. " is required for this example on " .. _VERSION .. ": " .. tostring(err))
      return true
    end
    pending(name .. " does not load under LuaJIT here: " .. tostring(err))
    return false
  end

  it("luv.lua: a luv loop", function()
    if not loop_library("luv") then return end
    check_run("examples/luv.lua", LUA_PATH, {
      "progress 25%%", "progress 50%%", "progress 75%%", "progress 100%%",
      "sum:\ttrue\t8000002000000",
      "localhost:\t127%.0%.0%.1",
      "slow:\tnil\ttimeout",
      "cancel:\ttrue\tfalse\tcancelled",
      { "timer ticks meanwhile:\t(%d+)", at_least(5) },
    })
  end)

  it("cqueues.lua: a cqueues controller", function()
    if not loop_library("cqueues") then return end
    check_run("examples/cqueues.lua", LUA_PATH, {
      "words:\ttrue\t6",
      "slept:\ttrue",
      "localhost:\t127%.0%.0%.1",
      "error:\tfalse\t42",
      { "ticks meanwhile:\t(%d+)", at_least(5) },
    })
  end)
end)

--------------------------------------------------------------------------
-- OpenResty: examples/openresty/nginx.conf with app.lua, in a real nginx

if IS_JIT then
  describe("examples/openresty", function()
    local server

    -- Lazy: only when a test of the block runs (not under --filter).
    lazy_setup(function()
      harness.check_requirements(BUILD, { "bgworker/core.so", "bgworker/pool_native.so",
        "bgworker/dns_native.so" })
      -- The example's configuration as a user adapts it: this build, this
      -- nginx's modules, a free port; temp paths in the test's directory.
      server = harness.new(ROOT)
      local conf = assert(harness.read_file(ROOT .. "/examples/openresty/nginx.conf"))
      local function replace(from, to)
        local start, stop = conf:find(from, 1, true)
        assert(start, "examples/openresty/nginx.conf has no '" .. from .. "'")
        conf = conf:sub(1, start - 1) .. to .. conf:sub(stop + 1)
      end
      local build = BUILD:sub(1, 1) == "/" and BUILD or ROOT .. "/" .. BUILD
      replace("$prefix/build/jit/?.so", build .. "/?.so")
      replace("/usr/lib/nginx/modules/ndk_http_module.so", harness.MODULES .. "/ndk_http_module.so")
      replace("/usr/lib/nginx/modules/ngx_http_lua_module.so", harness.MODULES .. "/ngx_http_lua_module.so")
      replace("listen 127.0.0.1:8080;", "listen 127.0.0.1:" .. server.port .. ";")
      replace("http {\n", "http {\n" .. server:temp_paths())
      server:write_config(conf)
      server:start(harness.user_directive() .. " pid " .. server.dir .. "/nginx.pid;")
    end)

    lazy_teardown(function()
      if server then
        server:cleanup()
      end
    end)

    it("answers from a pool job", function()
      local code, body = server:get("/collatz?limit=100000")
      assert.equals(200, code, server:log_tail())
      assert.equals("longest up to 100000: 77031 (350 steps)", body)
    end)

    it("gives up on a job after the request's timeout, and cancels it", function()
      local code, body = server:get("/collatz?limit=100000000&timeout=0.2")
      assert.equals(504, code, server:log_tail())
      assert.matches("^gave up at %d+%%, job cancelled$", body)
    end)

    it("answers from a name lookup", function()
      local code, body = server:get("/resolve?host=localhost")
      assert.equals(200, code, server:log_tail())
      assert.matches("^127%.0%.0%.1", body)
    end)

    it("quits cleanly, with no error logged", function()
      server:quit()
      local log = server:assert_no_crash()
      assert.is_nil(log:find("[error]", 1, true), "an error was logged" .. server:log_tail())
    end)
  end)
end

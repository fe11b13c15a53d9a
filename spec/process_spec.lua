-- bgworker.process: programs run off the Lua thread. `run` returns as
-- os.execute does, with the output; `spawn` streams output as it is
-- written and takes input; a timeout kills the whole process group; no
-- child is left running or unreaped, whatever ends its owner; waits
-- suspend only their caller, in every loop.

local bgworker = require "bgworker"
local core = require "bgworker.core"
local process = require "bgworker.process"
local support = require "support"

local function pack(...) return { n = select("#", ...), ... } end
-- Seconds a wait that must end may take: far more under valgrind
-- (BGWORKER_SMALL), where the helper processes (forks that never exec)
-- run under valgrind too.
local PATIENCE = support.size(10, 60)
local unpack = table.unpack or unpack

-- This process's pid: the parent of the shell it runs.
local function own_pid()
  local _, _, _, out = process.run { "sh", "-c", "echo $PPID" }
  return tonumber(out)
end

-- The processes of the system: { pid = ..., state = ..., ppid = ..., cmdline = ... }.
local function processes()
  local _, _, _, out = process.run { "sh", "-c",
    "for p in /proc/[0-9]*; do s=$(cat $p/stat 2>/dev/null) && " ..
    "printf '%s|%s\\n' \"$s\" \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\"; done" }
  local list = {}
  for line in out:gmatch("[^\n]+") do
    local pid, state, ppid, cmdline = line:match("^(%d+) %(.*%) (%a) (%d+) .-|(.*)$")
    if pid then
      list[#list + 1] = { pid = tonumber(pid), state = state, ppid = tonumber(ppid), cmdline = cmdline }
    end
  end
  return list
end

-- The processes whose command line has `marker`.
local function with_marker(marker)
  local found = {}
  for _, p in ipairs(processes()) do
    if p.cmdline:find(marker, 1, true) and not p.cmdline:find("/proc/", 1, true) then
      found[#found + 1] = p
    end
  end
  return found
end

-- Children of this process that are zombies.
local function zombies()
  local me, found = own_pid(), {}
  for _, p in ipairs(processes()) do
    if p.ppid == me and p.state == "Z" then found[#found + 1] = p.pid end
  end
  return found
end

-- Whether process `pid` is gone within `seconds` (reaped: its /proc entry
-- is gone), while the dispatcher runs.
local function gone(pid, seconds)
  local deadline = core.now() + (seconds or PATIENCE)
  repeat
    local f = io.open("/proc/" .. pid .. "/stat")
    if not f then return true end
    f:close()
    bgworker.current():wait(0.02)
  until core.now() > deadline
  return false
end

-- A line written, then one 0.3 s later: the first is read well before
-- the second was written (were output held back, they would come
-- together).
local function streams_lines()
  local p = process.spawn { "sh", "-c", "echo a; sleep 0.3; echo b" }
  assert.equals("a", p:read_line(PATIENCE))
  local first = core.now()
  assert.equals("b", p:read_line(PATIENCE))
  local between = core.now() - first
  assert.same(pack(nil, "eof"), pack(p:read_line(PATIENCE)))
  assert.same(pack(true, "exit", 0), pack(p:wait(PATIENCE)))
  assert.is_true(between > 0.15, "b came " .. between .. " s after a")
end

describe("bgworker.process", function()
  local d

  before_each(function()
    d = bgworker.new()
  end)

  after_each(function()
    if d then d:stop() end
  end)

  describe("run", function()
    it("returns as os.execute does, with stdout and stderr", function()
      assert.same(pack(nil, "exit", 3, "out\n", "err\n"),
        pack(process.run { "sh", "-c", "echo out; echo err >&2; exit 3" }))
      assert.same(pack(true, "exit", 0, "", ""), pack(process.run { "true" }))
      assert.same(pack(nil, "signal", 15, "", ""), pack(process.run { "sh", "-c", "kill -TERM $$" }))
    end)

    it("passes arguments as they are, with no shell", function()
      local _, _, _, out = process.run { "printf", "%s|", "a b", "$HOME", "*" }
      assert.equals("a b|$HOME|*|", out)
    end)

    it("feeds stdin, and runs in cwd with env as the whole environment", function()
      assert.same(pack(true, "exit", 0, "some\ninput", ""), pack(process.run({ "cat" }, { stdin = "some\ninput" })))
      local _, _, _, out = process.run({ "sh", "-c", "echo $FOO; echo ${HOME:-none}; pwd" },
        { env = { FOO = "bar" }, cwd = "/tmp" })
      assert.equals("bar\nnone\n/tmp\n", out)
      -- Without stdin, the program reads nothing (it does not wait).
      assert.same(pack(true, "exit", 0, "", ""), pack(process.run { "cat" }))
    end)

    it("takes large output in both streams", function()
      local ok, _, _, out, err = process.run { "sh", "-c", "head -c 3000000 /dev/zero; head -c 2000000 /dev/zero >&2" }
      assert.is_true(ok)
      assert.equals(3000000, #out)
      assert.equals(2000000, #err)
    end)

    it("kills the program and every process it started at its timeout", function()
      local marker = "31.4159" .. math.random(1000, 9999)
      local t0 = core.now()
      assert.same(pack(nil, "timeout"), pack(process.run({ "sh", "-c", "sleep " .. marker .. " & sleep " .. marker },
        { timeout = 0.3 })))
      assert.is_true(core.now() - t0 < PATIENCE)
      local deadline = core.now() + PATIENCE
      while #with_marker(marker) > 0 and core.now() < deadline do d:wait(0.05) end
      assert.same({}, with_marker(marker))
    end)

    it("raises for a program that cannot run and for bad arguments, at the caller's line", function()
      local ok, err = pcall(function() process.run { "bgworker-no-such-program" } end)
      assert.is_false(ok)
      assert.matches("process_spec.lua:%d+: bgworker.process.run: cannot run 'bgworker%-no%-such%-program': " ..
        "No such file or directory", err)
      local function refusal(...)
        local args = pack(...)
        local ok2, err2 = pcall(function() process.run(unpack(args, 1, args.n)) end)
        assert.is_false(ok2)
        return err2
      end
      assert.matches("process_spec.lua:%d+: bad argument #1 to 'run' %(argv must be a table", refusal("ls"))
      assert.matches("bad argument #1 to 'run' %(argv is empty", refusal({}))
      assert.matches("bad argument #1 to 'run' %(argv%[2%] must be a string, got 3%)", refusal({ "ls", 3 }))
      assert.matches("argv%[1%] contains a NUL byte", refusal({ "l\0s" }))
      assert.matches("bad argument #2 to 'run' %(unknown option 'stdout'%)", refusal({ "ls" }, { stdout = 1 }))
      assert.matches("opts.timeout must be a non%-negative number", refusal({ "ls" }, { timeout = -1 }))
      assert.matches("opts.env must map names to values, all strings", refusal({ "ls" }, { env = { A = 1 } }))
      assert.matches("cannot run 'ls': No such file or directory", refusal({ "ls" }, { cwd = "/no/such/dir" }))
    end)

    it("raises without a dispatcher", function()
      d:stop()
      d = nil
      local ok, err = pcall(function() process.run { "true" } end)
      assert.is_false(ok)
      assert.matches("no bgworker dispatcher is running", err)
    end)
  end)

  describe("spawn", function()
    it("delivers each line as it is written", streams_lines)

    it("echoes what is written to cat, line by line, until stdin is closed", function()
      local p = process.spawn { "cat" }
      assert.is_number(p.pid)
      for i = 1, 20 do
        assert.is_true(p:write("line " .. i .. "\n"))
        assert.equals("line " .. i, p:read_line(PATIENCE))
      end
      assert.is_true(p:write("no newline"))
      p:close_stdin()
      assert.same(pack(nil, "closed"), pack(p:write("late")))
      assert.equals("no newline", p:read_line(PATIENCE))
      assert.same(pack(nil, "eof"), pack(p:read_line(PATIENCE)))
      assert.same(pack(true, "exit", 0), pack(p:wait(PATIENCE)))
    end)

    it("reads stderr and raw chunks, and times out a read", function()
      local p = process.spawn { "sh", "-c", "printf 'x y'; printf 'e1\\ne2\\n' >&2; read line; echo \"got $line\"" }
      assert.equals("e1", p.stderr:read_line(PATIENCE))
      assert.equals("e2", p.stderr:read_line(PATIENCE))
      local chunk = p:read(PATIENCE)
      assert.equals("x y", chunk)
      assert.same(pack(nil, "timeout"), pack(p:read(0.05)))
      assert.same(pack(nil, "timeout"), pack(p:wait(0.05)))
      p:write("it\n")
      assert.equals("got it", p:read_line(PATIENCE))
      assert.same(pack(nil, "eof"), pack(p.stderr:read(PATIENCE)))
      assert.same(pack(true, "exit", 0), pack(p:wait(PATIENCE)))
    end)

    it("sends signals to the whole group, and says when the program was reaped", function()
      local marker = "27.1828" .. math.random(1000, 9999)
      local p = process.spawn { "sh", "-c", "sleep " .. marker .. " & sleep " .. marker .. "; echo never" }
      assert.is_true(p:kill())
      assert.same(pack(nil, "signal", 15), pack(p:wait(PATIENCE)))
      assert.same(pack(nil, "eof"), pack(p:read_line(PATIENCE)))
      assert.same(pack(nil, "ended"), pack(p:kill("KILL")))
      local deadline = core.now() + PATIENCE
      while #with_marker(marker) > 0 and core.now() < deadline do d:wait(0.05) end
      assert.same({}, with_marker(marker))
      local ok, err = pcall(function() p:kill("NOPE") end)
      assert.is_false(ok)
      assert.matches("bad argument #1 to 'kill' %(signal must be a name of process.SIGNALS", err)
    end)

    it("holds output back while it is not read, and loses none of it", function()
      -- Far more than UNREAD_MAX (1 MiB): unread, the program is held
      -- back (it blocks on a full pipe), and ends once it is read.
      local p = process.spawn { "head", "-c", "8000000", "/dev/zero" }
      assert.same(pack(nil, "timeout"), pack(p:wait(0.5)))
      local total = 0
      while true do
        local chunk, why = p:read(PATIENCE)
        if not chunk then
          assert.equals("eof", why)
          break
        end
        total = total + #chunk
      end
      assert.equals(8000000, total)
      assert.same(pack(true, "exit", 0), pack(p:wait(PATIENCE)))
    end)

    it("hands the output to on_output as it comes, instead of keeping it", function()
      local got, ended = {}, 0
      local p = process.spawn({ "sh", "-c", "echo one; echo two >&2; sleep 0.1; echo three" }, {
        on_output = function(stream, data)
          if data then got[#got + 1] = stream .. ":" .. data else ended = ended + 1 end
        end,
      })
      assert.same(pack(true, "exit", 0), pack(p:wait(PATIENCE)))
      while ended < 2 do d:wait(1) end
      table.sort(got)
      assert.same({ "stderr:two\n", "stdout:one\n", "stdout:three\n" }, got)
      assert.same(pack(nil, "eof"), pack(p:read_line(1)))
      local ok, err = pcall(function() process.spawn({ "true" }, { on_output = 1 }) end)
      assert.is_false(ok)
      assert.matches("bad argument #2 to 'spawn' %(opts.on_output must be a function, got 1%)", err)
    end)

    it("kills and reaps a process whose object is collected", function()
      local pid = process.spawn({ "sleep", "30" }).pid
      collectgarbage()
      collectgarbage()
      assert.is_true(gone(pid), "process " .. pid .. " still there")
    end)

    it("kills and reaps a running process when the dispatcher stops", function()
      local p = process.spawn { "sleep", "30" }
      d:stop()
      d = bgworker.new()
      assert.is_true(gone(p.pid), "process " .. p.pid .. " still there")
    end)
  end)

  describe("owners that end", function()
    local function child_of(script)
      local status, out = support.run_lua([[
        local bgworker = require "bgworker"
        local process = require "bgworker.process"
        local d = bgworker.new()
        local p = process.spawn { "sleep", "30" }
        io.write(p.pid, "\n")
        io.stdout:flush()
        ]] .. script, 30)
      local pid = tonumber(out:match("^(%d+)\n"))
      assert(pid, out)
      return status, pid
    end

    it("kills the processes of a Lua state that closes", function()
      local status, pid = child_of("d:stop()")
      assert.equals(0, status)
      assert.is_true(gone(pid), "process " .. pid .. " still there")
    end)

    it("kills the processes of a program that exits without closing its state", function()
      local status, pid = child_of("os.exit(3, false)")
      assert.equals(3, status)
      assert.is_true(gone(pid), "process " .. pid .. " still there")
    end)
  end)
end)

-- Processes at once in the tests that run many (fewer under valgrind).
local MANY = support.size(100, 20)

-- Waits suspend only the caller, in each loop; the issue's cases run in
-- select and Copas (`all`), the others in every loop.
local function loop_block(loop, all)
  local helper = require "bgworker.busted"
  local function async(body) return helper.async(body, { loop = loop, timeout = 3 * PATIENCE }) end

  it("runs a program while the loop goes on", async(function()
    local ticks, running = 0, true
    local tick = bgworker.current()
    local function again()
      ticks = ticks + 1
      if running then tick:timer(0.01, again) end
    end
    tick:timer(0.01, again)
    local got = pack(process.run { "sh", "-c", "sleep 0.2; echo out; echo err >&2; exit 3" })
    running = false
    assert.same(pack(nil, "exit", 3, "out\n", "err\n"), got)
    assert.is_true(ticks > 3, "the loop ticked " .. ticks .. " times")
  end))

  it("streams the lines of a spawned program as they are written", async(streams_lines))

  it("echoes what is written to cat", async(function()
    local p = process.spawn { "cat" }
    for i = 1, 10 do
      assert.is_true(p:write(i .. "\n"))
      assert.equals(tostring(i), p:read_line(PATIENCE))
    end
    p:close_stdin()
    assert.same(pack(nil, "eof"), pack(p:read_line(PATIENCE)))
    assert.same(pack(true, "exit", 0), pack(p:wait(PATIENCE)))
  end))

  it("kills a program that started processes of its own at its timeout, leaving none", async(function()
    local marker = "16.1803" .. math.random(1000, 9999)
    assert.same(pack(nil, "timeout"), pack(process.run({ "sh", "-c", "sleep " .. marker .. " & sleep " .. marker },
      { timeout = 0.3 })))
    helper.eventually(function() return #with_marker(marker) == 0 end, PATIENCE)
  end))

  it("runs 20 processes at once from as many job callbacks, which wait", async(function()
    local done, results = 0, {}
    local workers = require("bgworker.pool").new { threads = 1 }
    for i = 1, 20 do
      workers:submit(function() end):on_done(function()
        results[i] = pack(process.run { "sh", "-c", "sleep 0.1; echo " .. i })
        done = done + 1
      end)
    end
    helper.eventually(function() return done == 20 end, PATIENCE)
    for i = 1, 20 do assert.same(pack(true, "exit", 0, i .. "\n", ""), results[i]) end
  end))

  if not all then return end

  it("runs " .. MANY .. " processes at once, each with its output and status, and leaves no zombie", async(function()
    local list = {}
    for i = 1, MANY do
      list[i] = process.spawn { "sh", "-c", "echo " .. i .. "; exit " .. (i % 7) }
    end
    for i = 1, MANY do
      assert.equals(tostring(i), list[i]:read_line(PATIENCE))
      assert.same(pack(i % 7 == 0 or nil, "exit", i % 7), pack(list[i]:wait(PATIENCE)))
    end
    assert.same({}, zombies())
  end))
end

for _, loop in ipairs { "select", "copas", "luv", "cqueues" } do
  describe("bgworker.process in " .. loop, function()
    if loop == "copas" then
      if not support.needs_copas() then return end
    elseif loop ~= "select" then
      local lib, why = support.require_native(loop, "bgworker." .. loop)
      if not lib then
        pending(loop .. " cannot be loaded under LuaJIT here: " .. tostring(why))
        return
      end
    end
    loop_block(loop, loop == "select" or loop == "copas")
  end)
end

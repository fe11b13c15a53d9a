--- Child processes that never block the loop.
--
-- A program runs with its arguments as given (no shell, unless you run
-- one), in a process group of its own; a thread of `bgworker.process_native`
-- feeds its stdin, reads its output as it comes and reaps it, and the
-- running dispatcher (see `bgworker.new`) hands all of it to this module,
-- in any loop.
--
--     local process = require "bgworker.process"
--     -- os.execute plus the output, waiting only in the caller:
--     local ok, how, code, out, err = process.run({ "ls", "-l" }, { timeout = 5 })
--     -- A process to talk to:
--     local p = process.spawn { "sort" }
--     p:write("b\na\n")
--     p:close_stdin()
--     print(p:read_line(), p:read_line(), p:read_line()) --> a  b  nil
--     print(p:wait())                                    --> true  exit  0
--
-- Waits (`run`, `read_line`, `read`, `wait`) wait wherever `bgworker.await`
-- can: only the calling coroutine in a Copas thread, a coroutine of a
-- select or luv loop, a cqueues coroutine or an OpenResty request; outside
-- any coroutine, with a select dispatcher, they block while running it.
--
-- A running process keeps the dispatcher's loop alive, as a job does.
-- Every child is reaped. It is killed (`SIGKILL` to its process group)
-- when its process object is collected, when its Lua state closes, when
-- the dispatcher stops while it runs (its output could not be delivered),
-- or, on Linux, when the thread that started it ends (the program exits,
-- `os.exit` included). Keep a reference to a process as long as you need
-- it.
--
-- @module bgworker.process

local args = require "bgworker.args"
local core = require "bgworker.core"
local dispatcher = require "bgworker.dispatcher"
local native = require "bgworker.process_native"
local waiting = require "bgworker.waiter"

local concat, error, getmetatable, ipairs, max, pairs, setmetatable, tostring, type =
  table.concat, error, getmetatable, ipairs, math.max, pairs, setmetatable, tostring, type
local now = core.now

local process = {}

-- The handles of the children, to the dispatcher they were started under
-- (a child that ended stays until its handle is collected: killing it
-- again does nothing). Weak keys: a handle collected kills its child
-- itself.
local running = setmetatable({}, { __mode = "k" })

-- A dispatcher that stops kills the children started under it: their
-- events could no longer be delivered. Their helpers reap them.
dispatcher.on_stop("bgworker.process", function(d)
  for handle, owner in pairs(running) do
    if owner == d then
      -- While the Lua state closes, a handle may be gone already (its
      -- child killed by then): mlua then raises.
      pcall(function() handle:kill(native.SIGNALS.KILL) end)
    end
  end
end)

--- Signal numbers by name (`TERM`, `KILL`, `INT`, `HUP`, `QUIT`, `USR1`,
-- `USR2`, `PIPE`, `ALRM`, `CONT`, `STOP`), for `p:kill`.
process.SIGNALS = native.SIGNALS

-- ------------------------------------------------------------------------
-- A child's state on this side: what its thread delivered (output not yet
-- read, its end, how it exited) and the waits for more. Its thread's events
-- hold it, so it holds neither the process object nor the native handle:
-- those can be collected while the child runs (which kills it).

-- A stream's output not yet read: `parts[1..n]`, in order.
local function new_buffer()
  return { parts = {}, n = 0, ended = false }
end

local function finished(state)
  return state.how ~= nil and state.stdout.ended and state.stderr.ended
end

local WEAK_VALUES = { __mode = "v" }

-- The event handler of `state`'s child, run by the dispatcher. The
-- program's `on_output` runs last: if it raises, the state is up to date.
local function on_event(state)
  return function(kind, a, b)
    local on_output = kind ~= "exit" and state.on_output
    if kind == "exit" then
      state.how, state.code = a, b
    elseif a == nil then
      state[kind].ended = true
    elseif on_output then
      -- Taken by on_output: the thread may read on (the handle is held
      -- weakly: collected, it killed the program).
      local handle = state.acker[1]
      if handle then handle:ack(#a) end
    else
      local buffer = state[kind]
      buffer.n = buffer.n + 1
      buffer.parts[buffer.n] = a
      if state.collect then
        -- run keeps all of it: the thread may read on.
        state.handle:ack(#a)
      end
    end
    local waiters = state.waiters
    state.waiters = {}
    for waiter in pairs(waiters) do
      waiter:wake()
    end
    if not state.released and finished(state) then
      state.released = true
      state.dispatcher:unhold()
    end
    if on_output then
      on_output(kind, a)
    end
  end
end

-- Wait until `ready()`, `timeout` seconds passed (nil: no limit) or the
-- dispatcher stopped: true, or nil and "timeout" or "stopped". `waiter`:
-- the first wait's, already made for the caller.
local function wait_until(state, fname, timeout, ready, waiter)
  local deadline = timeout and now() + timeout
  while not ready() do
    if not waiter then
      local why
      waiter, why = waiting.for_caller(fname)
      if not waiter then
        return nil, why
      end
    end
    state.waiters[waiter] = true
    local ok, reason = waiter:wait(deadline and max(0, deadline - now()))
    state.waiters[waiter] = nil
    waiter = nil
    if not ok then
      return nil, reason
    end
  end
  return true
end

-- ------------------------------------------------------------------------
-- Arguments

local function check_argv(fname, argv)
  if type(argv) ~= "table" then
    return args.bad(fname, 1, "argv must be a table (the program, then its arguments), got " ..
      args.describe(argv))
  end
  if argv[1] == nil then
    return args.bad(fname, 1, "argv is empty: the program is argv[1]")
  end
  for i, v in ipairs(argv) do
    if type(v) ~= "string" then
      return args.bad(fname, 1, ("argv[%d] must be a string, got %s"):format(i, args.describe(v)))
    elseif v:find("\0", 1, true) then
      return args.bad(fname, 1, ("argv[%d] contains a NUL byte"):format(i))
    end
  end
end

local function check_env(fname, n, name, env)
  if env == nil then
    return nil
  elseif type(env) ~= "table" then
    return args.typed(fname, n, name, env, "table")
  end
  for k, v in pairs(env) do
    if type(k) ~= "string" or type(v) ~= "string" then
      return args.bad(fname, n, ("%s must map names to values, all strings: got %s = %s"):format(
        name, args.describe(k), args.describe(v)))
    end
  end
end

local RUN_OPTIONS = {
  timeout = args.option.seconds, stdin = args.option.string, cwd = args.option.string, env = check_env,
}
local SPAWN_OPTIONS = { cwd = args.option.string, env = check_env, on_output = args.option.func }

-- Start `argv` for `fname`: its state and native handle, or nil and the
-- message of an error to raise. `collect`: keep all the output (run).
local function start(fname, argv, opts, collect)
  local d, none = dispatcher.current_for(fname)
  if not d then
    return nil, none
  end
  local state = {
    dispatcher = d, waiters = {}, collect = collect, released = false,
    stdout = new_buffer(), stderr = new_buffer(), on_output = opts.on_output,
  }
  local handle, why = native.spawn(argv, {
    cwd = opts.cwd, env = opts.env, stdin = not collect or opts.stdin ~= nil,
  }, on_event(state))
  if not handle then
    return nil, fname .. ": " .. why
  end
  if collect then
    state.handle = handle
  elseif state.on_output then
    state.acker = setmetatable({ handle }, WEAK_VALUES)
  end
  running[handle] = d
  -- The loop stays alive until the child ended and its output was
  -- delivered (bgworker.dispatcher, "Keeping the loop alive").
  d:hold()
  return state, handle
end

-- How the child ended, as os.execute says it.
local function status(state)
  if state.how == "exit" and state.code == 0 then
    return true, "exit", 0
  end
  return nil, state.how, state.code
end

--- Run a program to its end, and take its output.
-- @tparam table argv the program (looked up in `PATH` unless it has a
-- slash), then its arguments: strings, passed as they are (no shell: run
-- `{"sh", "-c", line}` for one)
-- @tparam[opt] table opts `timeout` (seconds: then the program and every
-- process of its group are killed), `stdin` (a string the program reads;
-- without it, it reads nothing), `cwd` (its working directory), `env` (a
-- table of names to values, strings: its whole environment; by default
-- this process's)
-- @return as `os.execute`, with the output: `true, "exit", 0, stdout,
-- stderr`, or `nil, "exit", code, stdout, stderr` or `nil, "signal",
-- signal, stdout, stderr`; `nil, "timeout"`; or `nil, "stopped"` when the
-- dispatcher stopped first (the program is killed then too)
-- @raise for bad arguments, and when the program cannot be started (a
-- missing program: "cannot run 'name': No such file or directory")
function process.run(argv, opts)
  local opts_or_nil, msg = args.options("run", 2, opts, RUN_OPTIONS)
  msg = check_argv("run", argv) or msg
  if msg then error(msg, 2) end
  opts = opts_or_nil
  local waiter, why = waiting.for_caller("bgworker.process.run")
  if not waiter then error(why, 2) end
  local state, handle = start("bgworker.process.run", argv, opts, true)
  if not state then error(handle, 2) end
  if opts.stdin ~= nil then
    handle:write(opts.stdin)
    handle:close_stdin()
  end
  local ok, reason = wait_until(state, "bgworker.process.run", opts.timeout, function() return finished(state) end,
    waiter)
  if not ok then
    handle:kill(native.SIGNALS.KILL)
    return nil, reason
  end
  local done, how, code = status(state)
  return done, how, code, concat(state.stdout.parts, "", 1, state.stdout.n),
    concat(state.stderr.parts, "", 1, state.stderr.n)
end

-- ------------------------------------------------------------------------
-- Processes and their output streams

local Process = {}
Process.__index = Process

local Stream = {}
Stream.__index = Stream

local function check_process(self, method)
  if getmetatable(self) ~= Process then
    return args.bad_self(method, "process expected, got " .. args.describe(self))
  end
end

local function check_stream(self, method)
  if getmetatable(self) ~= Stream then
    return args.bad_self(method, "stream expected, got " .. args.describe(self))
  end
end

-- Take `count` bytes of `buffer` (all of it when nil) as one string; the
-- thread may read on.
local function take(stream, count)
  local buffer = stream.buffer
  local all = concat(buffer.parts, "", 1, buffer.n)
  local taken = count and all:sub(1, count) or all
  local rest = count and all:sub(count + 1) or ""
  buffer.parts, buffer.n = { rest }, rest == "" and 0 or 1
  stream.process.handle:ack(#taken)
  return taken
end

-- Wait on `stream` until `ready()`, for `fname`: true; nil and "timeout"
-- or "stopped"; or false and the message of an error to raise (the caller
-- cannot wait here).
local function wait_stream(stream, fname, timeout, ready)
  local ok, reason = wait_until(stream.state, fname, timeout, ready)
  if ok or reason == "timeout" or reason == "stopped" then
    return ok, reason
  end
  return false, reason
end

-- read_line's work: see Stream:read_line.
local function read_line(stream, timeout)
  local buffer, newline = stream.buffer, nil
  local ok, reason = wait_stream(stream, "bgworker.process: read_line", timeout, function()
    local before = 0
    for i = 1, buffer.n do
      local part = buffer.parts[i]
      local at = part:find("\n", 1, true)
      if at then
        newline = before + at
        return true
      end
      before = before + #part
    end
    return buffer.ended
  end)
  if not ok then
    return ok, reason
  elseif newline then
    return (take(stream, newline):sub(1, -2))
  elseif buffer.n > 0 then
    return take(stream)
  end
  return nil, "eof"
end

-- read's work: see Stream:read.
local function read(stream, timeout)
  local buffer = stream.buffer
  local ok, reason = wait_stream(stream, "bgworker.process: read", timeout, function()
    return buffer.n > 0 or buffer.ended
  end)
  if not ok then
    return ok, reason
  elseif buffer.n > 0 then
    return take(stream)
  end
  return nil, "eof"
end

-- Return `...`, or raise its message at the caller's caller's line when
-- the first value is false.
local function returned(first, ...)
  if first == false then error((...), 3) end
  return first, ...
end

--- The next line of output, without its "\n", as soon as the program wrote
-- it. The last line may have no "\n".
-- @tparam[opt] number timeout seconds; by default no limit
-- @return the line; or nil and "eof" at the end of the output, "timeout",
-- or "stopped" (the dispatcher stopped)
function Stream:read_line(timeout)
  local msg = check_stream(self, "read_line") or args.seconds("read_line", 1, "timeout", timeout, true)
  if msg then error(msg, 2) end
  return returned(read_line(self, timeout))
end

--- What the program wrote since the last read, as soon as it wrote
-- something.
-- @tparam[opt] number timeout seconds; by default no limit
-- @return the bytes; or nil and "eof", "timeout" or "stopped"
function Stream:read(timeout)
  local msg = check_stream(self, "read") or args.seconds("read", 1, "timeout", timeout, true)
  if msg then error(msg, 2) end
  return returned(read(self, timeout))
end

local function new_stream(p, name)
  return setmetatable({ process = p, state = p.state, buffer = p.state[name] }, Stream)
end

--- Start a program, to talk to it while it runs.
-- @tparam table argv as for `run`
-- @tparam[opt] table opts `cwd`, `env`, as for `run`; `on_output`, a
-- function that the dispatcher calls as `on_output("stdout", data)` or
-- `on_output("stderr", data)` with the output as it comes (`data` nil at
-- the end of that stream), instead of keeping it for `read_line` and
-- `read` (which then say "eof" at once). It may wait; an error it raises
-- goes to the dispatcher's error handler. The output of a program can end
-- after the program (a process it started may hold it open): a `wait` may
-- return before the last call.
-- @return the process: `p.pid`, `p.stdout` and `p.stderr` (streams, with
-- `read_line` and `read`), and the methods below
-- @raise as `run`
function process.spawn(argv, opts)
  local opts_or_nil, msg = args.options("spawn", 2, opts, SPAWN_OPTIONS)
  msg = check_argv("spawn", argv) or msg
  if msg then error(msg, 2) end
  local state, handle = start("bgworker.process.spawn", argv, opts_or_nil, false)
  if not state then error(handle, 2) end
  local p = setmetatable({ state = state, handle = handle, pid = handle.pid }, Process)
  p.stdout, p.stderr = new_stream(p, "stdout"), new_stream(p, "stderr")
  return p
end

--- `p.stdout:read_line(timeout)`.
function Process:read_line(timeout)
  local msg = check_process(self, "read_line") or args.seconds("read_line", 1, "timeout", timeout, true)
  if msg then error(msg, 2) end
  return returned(read_line(self.stdout, timeout))
end

--- `p.stdout:read(timeout)`.
function Process:read(timeout)
  local msg = check_process(self, "read") or args.seconds("read", 1, "timeout", timeout, true)
  if msg then error(msg, 2) end
  return returned(read(self.stdout, timeout))
end

--- Queue `data` for the program's stdin: it never waits (the data waits,
-- in this process's memory, until the program reads it).
-- @tparam string data
-- @return true; or nil and "closed" once stdin was closed (by
-- `close_stdin`, or by the program)
function Process:write(data)
  local msg = check_process(self, "write") or args.typed("write", 1, "data", data, "string")
  if msg then error(msg, 2) end
  if self.handle:write(data) then
    return true
  end
  return nil, "closed"
end

--- Close the program's stdin once what was written reached it: it then
-- reads the end of its input.
function Process:close_stdin()
  local msg = check_process(self, "close_stdin")
  if msg then error(msg, 2) end
  self.handle:close_stdin()
end

--- Wait for the program to end.
-- @tparam[opt] number timeout seconds; by default no limit
-- @return as `os.execute`: `true, "exit", 0`; `nil, "exit", code`; `nil,
-- "signal", signal`; or `nil, "timeout"` (it runs on), `nil, "stopped"`
function Process:wait(timeout)
  local msg = check_process(self, "wait") or args.seconds("wait", 1, "timeout", timeout, true)
  if msg then error(msg, 2) end
  local state = self.state
  local ok, reason = wait_until(state, "bgworker.process: wait", timeout, function() return state.how ~= nil end)
  if not ok then
    if reason ~= "timeout" and reason ~= "stopped" then error(reason, 2) end
    return nil, reason
  end
  return status(state)
end

--- Send a signal to the program and every process of its group.
-- @param[opt] signal a name of `process.SIGNALS` (`"TERM"` by default,
-- `"KILL"`, `"INT"`...) or a number
-- @return true; or nil and "ended" (it was reaped already) or the system's
-- message
function Process:kill(signal)
  local msg = check_process(self, "kill")
  local number = signal == nil and native.SIGNALS.TERM or native.SIGNALS[signal] or
    (type(signal) == "number" and signal)
  if not msg and not number then
    msg = args.bad("kill", 1, "signal must be a name of process.SIGNALS or a number, got " .. args.describe(signal))
  end
  if msg then error(msg, 2) end
  return self.handle:kill(number)
end

function Process:__tostring()
  return "bgworker.process " .. tostring(self.pid)
end

return process

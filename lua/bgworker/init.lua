--- Deliver results from background threads of native libraries into this
-- Lua state.
--
-- Utility libraries queue items from any thread through `bgworker.core`. A
-- dispatcher collects them on the Lua thread and calls their callbacks, under
-- an error handler: one failing callback never stops the others. It wakes
-- through a UDP socket on 127.0.0.1 that receives one datagram per batch, so
-- it fits any loop that can wait on a socket:
--
--   * `bgworker.copas([opts])` runs a reader thread in a Copas loop;
--   * `bgworker.new([opts])` returns a dispatcher whose `socket` goes into the
--     read set of `socket.select`, and whose `dispatch` runs the callbacks;
--     `wait` blocks until callbacks ran, for scripts with no event loop.
--
-- One dispatcher runs in a Lua state at a time.
--
--     local copas = require "copas"
--     local bgworker = require "bgworker"
--     copas.addthread(function()
--         local dispatcher = bgworker.copas()
--         -- start utility libraries; their callbacks run in this loop
--     end)
--     copas.loop()
--
-- @module bgworker

local core = require "bgworker.core"
local drain = require "bgworker.drain"
local protect = require "bgworker.protect"
local socket = require "socket"

local wake = core.wake
local error, getmetatable, pcall, setmetatable = error, getmetatable, pcall, setmetatable
local tonumber, tostring, type = tonumber, tostring, type
local floor, max, min = math.floor, math.max, math.min
local is_count, report = drain.is_count, drain.report
local traceback = debug.traceback

local bgworker = {
  --- The version of this module, "MAJOR.MINOR.PATCH".
  version = "0.1.0",
  --- The native core this layer is built on (see docs/core.md).
  core = core,
}
bgworker._VERSION = "bgworker " .. bgworker.version

--- Items a dispatcher handles before it lets others run, by default.
bgworker.DEFAULT_BUDGET = drain.DEFAULT_BUDGET

-- Wake-up datagrams carry no information; read at most this much of each.
local DATAGRAM = 16

-- socket.select refuses timeouts of 2^31 ms and more: wait longer in parts.
local LONGEST_SELECT = 86400

local Dispatcher = {}
Dispatcher.__index = Dispatcher

-- The dispatcher running in this state, if any.
local active

--------------------------------------------------------------------------
-- Arguments

-- `level` as for error(), counted from the function that calls argerror.
local function argerror(level, fname, n, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), level + 1)
end

local OPTIONS = {
  new = { capacity = true, budget = true, errorhandler = true, kind = true },
  copas = { capacity = true, budget = true, errorhandler = true, spawn = true },
}

-- Check opts and fill in the dispatcher's drain fields (see bgworker.drain).
-- Errors blame the caller of bgworker.new or bgworker.copas, via open.
local function check_options(self, fname, opts)
  opts = drain.init(self, "bgworker." .. fname, opts, OPTIONS[fname], 4)
  if opts.spawn ~= nil and type(opts.spawn) ~= "boolean" then
    argerror(4, "bgworker." .. fname, 1, "opts.spawn must be a boolean, got " .. tostring(opts.spawn))
  end
  return opts
end

local function check_self(self, method)
  if getmetatable(self) ~= Dispatcher then
    argerror(3, method, 1, "dispatcher expected, got " .. type(self) ..
      "; call it as dispatcher:" .. method .. "()")
  end
end

--------------------------------------------------------------------------
-- Errors

--- The error handler used when `opts.errorhandler` is not given: it writes
-- the traceback (which starts with the message) to stderr.
-- @function default_errorhandler
-- @param err the error value
-- @param tb a traceback string, or nil
bgworker.default_errorhandler = drain.default_errorhandler

--------------------------------------------------------------------------
-- Waking

-- Read every wake-up datagram that is waiting, without blocking.
-- (LuaSocket 3.0's receive on a closed UDP socket returns "": stop there.)
local function discard(sock)
  while sock:receive(DATAGRAM) and sock:getfd() >= 0 do
  end
end

--------------------------------------------------------------------------
-- Making a dispatcher

local function refuse_second(fname)
  if active and not active.stopped then
    error("bgworker." .. fname .. ": a dispatcher is already running in this Lua state;" ..
      " stop it first", 4)
  end
end

-- Start the core with wake-up datagrams to a new UDP socket, connected back
-- to the core's sender so that nobody else's datagrams reach it.
local function open_socket(self, fname, opts)
  if core.running() then
    error("bgworker." .. fname .. ": bgworker.core is already started in this Lua state", 4)
  end
  local sock = assert((socket.udp4 or socket.udp)())
  sock:settimeout(0)
  local ok, err = sock:setsockname("127.0.0.1", 0)
  if ok then
    local _, port = sock:getsockname()
    ok, err = pcall(core.start, tonumber(port),
      opts.capacity and { capacity = floor(opts.capacity) } or nil)
    if ok then
      ok, err = sock:setpeername(core.sender())
      if not ok then
        core.stop()
      end
    end
  end
  if not ok then
    sock:close()
    error("bgworker." .. fname .. ": cannot start: " .. tostring(err), 4)
  end
  self.socket = sock
end

-- A new dispatcher of `fname` ("new" or "copas"), started, and the active
-- one. `prepare(self)`, if given, runs once the options are known good and
-- before the core starts (it may raise: nothing is started yet).
local function open(fname, opts, prepare)
  local self = setmetatable({}, Dispatcher)
  opts = check_options(self, fname, opts)
  refuse_second(fname)
  if prepare then
    prepare(self)
  end
  if opts.kind then
    drain.open_fd(self, "bgworker." .. fname, opts, 3)
  else
    open_socket(self, fname, opts)
  end
  active = self
  return self, opts
end

--- Make a dispatcher for a `socket.select` loop (or any loop that can wait
-- for a socket to be readable).
--
--     local d = bgworker.new()
--     while true do
--         local readable = socket.select({ d.socket, other }, nil)
--         if readable[d.socket] then d:dispatch() end
--         ...
--     end
--
-- With `kind`, it wakes through a descriptor instead of a UDP socket, and
-- the dispatcher itself goes into the read set (it has `getfd` and `dirty`,
-- which `socket.select` asks of any object):
--
--     local d = bgworker.new { kind = "eventfd" }
--     local readable = socket.select({ d, other }, nil)
--     if readable[d] then d:dispatch() end
--
-- @tparam[opt] table opts
--   `capacity` (positive integer): bound the queue; by default unbounded.
--   `budget` (positive integer): the default `max` of `dispatch`, 1000 by
--   default.
--   `errorhandler` (function): called as `errorhandler(err, traceback)` for
--   each callback that raised an error and each item whose decode failed;
--   by default writes the traceback to stderr.
--   `kind` ("eventfd" or "pipe"): wake through a descriptor; `socket` is
--   then absent and the dispatcher is what `socket.select` waits on.
-- @return a dispatcher; its field `socket` is the LuaSocket UDP socket to
-- wait on (without `kind`)
function bgworker.new(opts)
  local self = open("new", opts)
  self.mode = "select"
  self.waitable = self.socket or self
  self.readset = { self.waitable }
  return self
end

--- The descriptor to wait on, for `socket.select` (`kind` dispatchers; a
-- UDP dispatcher's socket has its own).
-- @treturn int the descriptor, or -1 once stopped
function Dispatcher:getfd()
  check_self(self, "getfd")
  return self.stopped and -1 or self.fd or self.socket:getfd()
end

--- For `socket.select`: nothing is buffered on the Lua side.
-- @treturn boolean false
function Dispatcher:dirty() -- luacheck: no unused args
  return false
end

--- Run the callbacks of waiting items, without blocking.
-- Reads the waiting wake-up datagrams, then handles items until the queue
-- is empty or `limit` were handled; in the latter case it arranges for the
-- socket to become readable again, so the rest is not forgotten.
-- @tparam[opt] int limit handle at most this many items (default: the budget)
-- @treturn int the number of items handled: callbacks run, including those
-- that raised, and items whose decode failed
function Dispatcher:dispatch(limit)
  check_self(self, "dispatch")
  if limit ~= nil and not is_count(limit) then
    argerror(2, "dispatch", 2, "max must be a positive integer, got " .. tostring(limit))
  end
  if self.mode ~= "select" then
    error("dispatch: this dispatcher is driven by Copas; make one with bgworker.new()", 2)
  end
  if self.stopped then
    return 0
  end
  if self.socket then
    discard(self.socket)
  end
  return (drain.batch(self, limit or self.budget))
end

--- Wait until at least one item was handled, or the timeout passed.
-- For scripts and tests with no event loop: blocks in `socket.select`.
-- @tparam[opt] number timeout seconds (non-negative); by default no limit
-- @treturn int the number of items handled, 0 when the time ran out (or the
-- dispatcher is stopped)
function Dispatcher:wait(timeout)
  check_self(self, "wait")
  if timeout ~= nil and not (type(timeout) == "number" and timeout >= 0) then
    argerror(2, "wait", 2, "timeout must be a non-negative number, got " .. tostring(timeout))
  end
  if self.mode ~= "select" then
    error("wait: this dispatcher is driven by Copas; make one with bgworker.new()", 2)
  end
  local gettime = socket.gettime
  local deadline = timeout and gettime() + timeout
  while not self.stopped do
    local left = deadline and min(max(deadline - gettime(), 0), LONGEST_SELECT)
    local readable = socket.select(self.readset, nil, left)
    if readable[self.waitable] then
      local n = self:dispatch()
      if n > 0 then
        return n
      end
    end
    if deadline and gettime() >= deadline then
      break
    end
  end
  return 0
end

--------------------------------------------------------------------------
-- Copas

-- Copas 1.x resumes a new thread with a nil socket before its arguments,
-- Copas 4.x with the arguments alone: a marker tells where they start.
local THREAD = {}

local function thread_main(first, fn, ...)
  if first ~= THREAD then
    return thread_main(fn, ...)
  end
  return fn(...)
end

-- Copas 1.x has neither pause nor sleep, and only yields when a socket is
-- not ready. A nudge stands for the dispatcher's UDP socket in Copas's
-- write set: its first send reports "timeout", so copas.send yields; a UDP
-- socket is always writable, so Copas resumes the thread at its next step,
-- after the other ready threads ran.
local Nudge = {}
Nudge.__index = Nudge

function Nudge:getfd()
  return self.socket:getfd()
end

function Nudge:send()
  if self.armed then
    self.armed = false
    return nil, "timeout", 0
  end
  return 1
end

-- Copas 1.x closes the socket that last resumed a thread when it ends.
function Nudge:close()
  return self.socket:close()
end

local function nudge(self)
  local n = self.nudge
  n.armed = true
  self.copas.send(n, "")
end

-- Let the other Copas threads run, and come back.
local function pause(self)
  local copas = self.copas
  if copas.pause then
    copas.pause(0)
  elseif copas.sleep then
    copas.sleep(0)
  else
    nudge(self)
  end
end

-- Spawn mode: each callback in a Copas thread of its own. Copas reports
-- its errors to the thread's error handler, which passes them on.
local function spawned(self, f, ...)
  self.seterrorhandler(self.thread_errorhandler)
  return f(...)
end

-- The drain's item handler in spawn mode (see bgworker.drain.run).
local function spawn_item(self, f, ...)
  if f == nil then
    return false
  end
  self.copas.addthread(thread_main, THREAD, spawned, self, f, ...)
  return true
end

local function reader(self)
  local copas, sock = self.copas, self.socket
  local receive = copas.receive
  local handle = self.spawn and spawn_item or nil
  local budget = self.budget
  while not self.stopped do
    local ok, err = receive(sock, DATAGRAM)
    if self.stopped then
      break
    end
    if sock:getfd() < 0 or (not ok and err ~= "timeout") then
      report(self, "wake-up socket failed: " .. tostring(err or "closed"))
      self:stop()
      break
    end
    discard(sock)
    repeat
      local _, empty = drain.run(self, budget, handle)
      if not empty then
        -- The instance stays armed: no datagram will come, so carry
        -- on draining after the others had their turn.
        pause(self)
      end
    until empty or self.stopped
  end
  if self.nudge then
    -- Copas 1.x closes the socket that resumed a thread when it ends:
    -- make that our own, not one a callback was using.
    nudge(self)
  end
  sock:close()
end

-- Copas 4.8+: one thread waits for copas.exit() and then stops the running
-- dispatcher. (waitforexit raises when no copas.loop runs: then no watch.)
local watching = false

local function exit_watch(call, waitforexit)
  local exiting = call(waitforexit)
  watching = false
  if exiting and active and active.mode == "copas" then
    active:stop()
  end
end

local function require_copas(self)
  self.copas = require "copas"
end

--- Dispatch inside a Copas loop: add a Copas thread that waits on the
-- wake-up socket and runs the callbacks.
--
-- Callbacks may yield (do Copas I/O, sleep) on every Lua version. Without
-- `spawn`, they run one after the other in the reader thread, so a callback
-- that waits delays the ones after it. With `spawn`, each runs in a Copas
-- thread of its own.
--
-- After `budget` items the reader lets the other Copas threads run, then
-- goes on. With Copas 4.8 or later, `copas.exit()` stops the dispatcher.
--
-- @tparam[opt] table opts
--   `capacity` (positive integer): bound the queue; by default unbounded.
--   `budget` (positive integer): items handled before the reader lets other
--   threads run; 1000 by default.
--   `errorhandler` (function): called as `errorhandler(err, traceback)` for
--   each callback that raised an error and each item whose decode failed;
--   by default writes the traceback to stderr.
--   `spawn` (boolean): run each callback in a Copas thread of its own.
-- @return a dispatcher; stop it with `dispatcher:stop()`
function bgworker.copas(opts)
  local self
  self, opts = open("copas", opts, require_copas)
  local copas = self.copas
  self.mode = "copas"
  self.spawn = opts.spawn or false
  if not copas.pause and not copas.sleep then
    self.nudge = setmetatable({ socket = self.socket, armed = false }, Nudge)
  end
  if not protect.native then
    -- Copas 4 on Lua 5.1 finds the running thread with coxpcall.running,
    -- which sees through coxpcall's coroutines only.
    local major = tonumber(tostring(copas._VERSION):match("(%d+)%.")) or 1
    if major >= 4 then
      self.call = protect.coxpcall(require "coxpcall")
    end
  end
  if self.spawn then
    self.seterrorhandler = copas.seterrorhandler or copas.setErrorHandler
    self.thread_errorhandler = function(err, co)
      report(self, err, type(co) == "thread" and traceback(co, tostring(err)) or nil)
    end
  end
  self.reader = copas.addthread(thread_main, THREAD, reader, self)
  if copas.waitforexit and not watching then
    watching = true
    copas.addthread(thread_main, THREAD, exit_watch, self.call, copas.waitforexit)
  end
  return self
end

--------------------------------------------------------------------------
-- Stopping

--- Stop dispatching: the core refuses further items and frees the pending
-- ones without running them. A Copas reader ends at its next step (so
-- `copas.loop()` can return) and closes the socket; other dispatchers close
-- it at once. Stopping a stopped dispatcher does nothing. It may be called
-- from a callback.
-- @treturn int the number of pending items cancelled
function Dispatcher:stop()
  check_self(self, "stop")
  if self.stopped then
    return 0
  end
  self.stopped = true
  if active == self then
    active = nil
  end
  local copas = self.copas
  local cancelled, woken = 0, false
  if core.running() then
    if copas then
      -- A datagram resumes the reader wherever it waits for the socket;
      -- the reader then sees `stopped`, ends, and closes the socket.
      woken = pcall(wake)
    end
    cancelled = core.stop()
  end
  if not copas then
    -- (A descriptor dispatcher has no socket: core.stop closed its descriptor.)
    if self.socket then
      self.socket:close()
    end
  elseif not woken and copas.close then
    -- Copas 4 resumes a reader that waits on a socket closed this way.
    -- (Only when there was no datagram to send: a reader that is between
    -- two steps of copas.receive would wait on the closed socket forever.)
    copas.close(self.socket)
  end
  return cancelled
end

-- The utilities load on first use: `bgworker.pool`, `bgworker.dns`, ...
-- are `require "bgworker.pool"`, ... (each needs its native library, which
-- a program that only dispatches should not have to load).
local SUBMODULES = { pool = true, dns = true, await = true, ngx = true, luv = true, cqueues = true }

setmetatable(bgworker, {
  __index = function(t, name)
    if SUBMODULES[name] then
      local module = require("bgworker." .. name)
      rawset(t, name, module)
      return module
    end
  end,
})

return bgworker

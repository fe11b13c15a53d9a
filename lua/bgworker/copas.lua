--- Dispatch inside a Copas loop (Copas 1.2 from Debian, Copas 4.x from
-- LuaRocks): a Copas thread waits on the wake-up socket and runs the
-- callbacks.
--
--     local copas = require "copas"
--     local bgworker = require "bgworker"
--     copas.addthread(function()
--         local d = bgworker.new { loop = "copas" }
--         -- start utility libraries; their callbacks run in this loop
--     end)
--     copas.loop()
--
-- Callbacks may yield (do Copas I/O, sleep) on every Lua version. Without
-- `spawn` they run one after the other in the reader thread, so a callback
-- that waits delays the ones after it; with `spawn` each runs in a Copas
-- thread of its own. After `budget` callbacks, or 5 ms of them, the reader
-- lets the other Copas threads run, then goes on. With Copas 4, `d:stop()` lets `copas.loop()`
-- return, and (4.8 or later) `copas.exit()` stops the dispatcher.
--
-- Waiting (`bgworker.await`, `job:get`) suspends only the calling Copas
-- thread: with `copas.pause`/`copas.wakeup` on Copas 4, on a socket of its
-- own on older versions. Their timeouts, and timers, fire through the
-- core's alarm.
--
-- A dispatcher here has what every @{Dispatcher} has (`dispatch` raises:
-- Copas drives it). `Copas` below is the class of these dispatchers.
--
-- @module bgworker.copas

local args = require "bgworker.args"
local core = require "bgworker.core"
local dispatcher = require "bgworker.dispatcher"
local protect = require "bgworker.protect"
local signal = require "bgworker.signal"

local assert, error, pcall, require, setmetatable = assert, error, pcall, require, setmetatable
local tonumber, tostring, type = tonumber, tostring, type
local traceback = debug.traceback
local check_self = dispatcher.check_self

local M = {}

-- Wake-up datagrams carry no information; read at most this much of each.
local DATAGRAM = 16

local Copas = dispatcher.class("copas", { spawn = args.option.boolean })
-- The class of these dispatchers: the loop's adapter (bgworker.dispatcher).
M.class = Copas

-- ------------------------------------------------------------------------
-- Copas versions

-- Copas 1.x resumes a new thread with a nil socket before its arguments,
-- Copas 4.x with the arguments alone: a marker tells where they start.
local THREAD = {}

local function thread_main(first, fn, ...)
  if first ~= THREAD then
    return thread_main(fn, ...)
  end
  return fn(...)
end

local function addthread(copas, fn, ...)
  return copas.addthread(thread_main, THREAD, fn, ...)
end

-- Copas 4 on Lua 5.1 tells threads apart with coxpcall.running, which sees
-- through coxpcall's helper coroutines to the Copas thread; wakeup needs
-- that thread, so look at threads the same way.
local function copas_thread()
  local cox = not protect.native and package.loaded.coxpcall
  if cox and cox.running then
    return cox.running()
  end
  return coroutine.running()
end

local function major_version(copas)
  return tonumber(tostring(copas._VERSION):match("(%d+)%.")) or 1
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

-- ------------------------------------------------------------------------
-- The reader

-- The reader's socket as Copas sees it: it reads only while its dispatcher
-- runs the core's current run. A process forked after the dispatcher
-- started inherits the reader, whose reads would otherwise take the
-- parent's wake-ups; there the reader ends instead (see `reader`).
local Wakeups = {}
Wakeups.__index = Wakeups

function Wakeups:getfd()
  return self.socket:getfd()
end

function Wakeups.dirty()
  return false
end

function Wakeups:settimeout(timeout)
  return self.socket:settimeout(timeout)
end

function Wakeups:receive(size)
  local d = self.dispatcher
  if d.run == nil then
    -- Copas 1.x runs a new thread at once: the dispatcher is still
    -- starting. Wait for the socket as usual.
    return nil, "timeout"
  elseif not d:owns_run() then
    return nil, "closed"
  end
  return self.socket:receive(size)
end

function Wakeups:close()
  return self.socket:close()
end

-- Spawn mode: each callback in a Copas thread of its own. Copas reports
-- its errors to the thread's error handler, which passes them on.
local function spawned(self, f, ...)
  self.seterrorhandler(self.thread_errorhandler)
  return f(...)
end

-- The drain's item handler in spawn mode (see Dispatcher:drain).
local function spawn_item(self, f, ...)
  if f == nil then
    return false
  end
  addthread(self.copas, spawned, self, f, ...)
  return true
end

local discard = signal.discard_datagrams

local function reader(self)
  local copas, sock, wakeups = self.copas, self.socket, self.wakeups
  local receive = copas.receive
  local handle = self.spawn and spawn_item or nil
  local budget = self.budget
  while not self.stopped do
    local ok, err = receive(wakeups, DATAGRAM)
    if self.stopped then
      break
    end
    local lost = self:lost_run("bgworker.copas reader")
    if lost or sock:getfd() < 0 or (not ok and err ~= "timeout") then
      self:report(lost or "wake-up socket failed: " .. tostring(err or "closed"))
      self:stop()
      break
    end
    discard(sock)
    repeat
      local _, empty = self:drain(budget, handle)
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
  wakeups:close()
end

-- Copas 4.8+: one thread waits for copas.exit() and then stops the running
-- Copas dispatcher. (waitforexit raises when no copas.loop runs: then no
-- watch.)
local watching = false

local function exit_watch(call, waitforexit)
  local exiting = call(waitforexit)
  watching = false
  local d = dispatcher.current()
  if exiting and d and d.loop_name == "copas" then
    d:stop()
  end
end

function Copas.start(self, opts)
  local ok, copas = pcall(require, "copas")
  if not ok then
    return nil, copas
  end
  self.copas = copas
  self.spawn = opts.spawn or false
  if not protect.native and major_version(copas) >= 4 then
    -- Copas 4 on Lua 5.1 finds the running thread with coxpcall.running,
    -- which sees through coxpcall's coroutines only.
    self.call = protect.coxpcall(require "coxpcall")
  end
  local err
  self.socket, err = signal.start_udp(opts)
  if not self.socket then
    return nil, err
  end
  self.wakeups = setmetatable({ socket = self.socket, dispatcher = self }, Wakeups)
  if not copas.pause and not copas.sleep then
    self.nudge = setmetatable({ socket = self.socket, armed = false }, Nudge)
  end
  if self.spawn then
    self.seterrorhandler = copas.seterrorhandler or copas.setErrorHandler
    self.thread_errorhandler = function(e, co)
      self:report(e, type(co) == "thread" and traceback(co, tostring(e)) or nil)
    end
  end
  self.reader = addthread(copas, reader, self)
  if copas.waitforexit and not watching then
    watching = true
    addthread(copas, exit_watch, self.call, copas.waitforexit)
  end
  return true
end

--- Dispatch inside a running Copas loop: `bgworker.new { loop = "copas" }`.
-- @tparam[opt] table opts the common options (see `bgworker.new`), and
--   `spawn` (boolean): run each callback in a Copas thread of its own
-- @return a dispatcher; its field `reader` is the reader's Copas thread
-- @function new
M.new = dispatcher.constructor(Copas)

function Copas.before_stop(self, owned)
  -- A datagram resumes the reader wherever it waits for the socket; the
  -- reader then sees `stopped`, ends, and closes the socket.
  self.woken = owned and pcall(core.wake)
end

function Copas.after_stop(self)
  local copas = self.copas
  if not self.woken and copas.close then
    -- Copas 4 resumes a reader that waits on a socket closed this way.
    -- (Only when there was no datagram to send: a reader that is between
    -- two steps of copas.receive would wait on the closed socket forever.)
    copas.close(self.wakeups)
  end
end

--- A Copas reader is driven by Copas: `dispatch` raises.
function Copas:dispatch()
  local msg = check_self(self, "dispatch") or
    "dispatch: this dispatcher is driven by Copas; a select loop needs bgworker.new()"
  error(msg, 2)
end

--- A Copas reader is driven by Copas: `wait` raises.
function Copas:wait()
  local msg = check_self(self, "wait") or
    "wait: this dispatcher is driven by Copas; a select loop needs bgworker.new()"
  error(msg, 2)
end

-- ------------------------------------------------------------------------
-- Waiting

-- Copas 1.x waits on anything with getfd and closes the socket that
-- resumed a thread when that thread ends; a waker stands for its socket in
-- Copas's read set so that close does nothing: the socket goes back to the
-- pool for the next wait.
local Waker = {}
Waker.__index = Waker

function Waker:getfd()
  return self.socket:getfd()
end

function Waker:receive(size)
  return self.socket:receive(size)
end

function Waker.close()
end

-- Idle wakers kept for reuse: one per concurrent wait is made anyway.
local idle, nidle, MAX_IDLE = {}, 0, 8

local function take_waker()
  if nidle > 0 then
    local waker = idle[nidle]
    idle[nidle] = nil
    nidle = nidle - 1
    return waker
  end
  local socket = require "socket"
  local sock = assert((socket.udp4 or socket.udp)())
  assert(sock:setsockname("127.0.0.1", 0))
  -- Connected to itself: the kernel drops anyone else's datagrams.
  local ip, port = sock:getsockname()
  assert(sock:setpeername(ip, port))
  sock:settimeout(0)
  return setmetatable({ socket = sock }, Waker)
end

local function give_back(waker)
  discard(waker.socket)
  if nidle < MAX_IDLE then
    nidle = nidle + 1
    idle[nidle] = waker
  else
    waker.socket:close()
  end
end

-- Copas 1.x: the thread waits for a datagram on a waker of its own; resume
-- sends one (only while it waits, so a late wake never reaches a waker
-- that went back to the pool).
local function socket_suspender(copas)
  local waker, waiting = nil, false
  return {
    suspend = function()
      waker = waker or take_waker()
      waiting = true
      local ok, err = copas.receive(waker, 1)
      waiting = false
      if not ok and err ~= "timeout" then
        give_back(waker)
        waker = nil
        error("bgworker: wake-up socket of a wait failed: " .. tostring(err), 0)
      end
    end,
    resume = function()
      if waiting then
        waker.socket:send("!")
      end
    end,
    done = function()
      if waker then
        give_back(waker)
      end
    end,
  }
end

-- Copas 4: sleep until woken or the time is up.
local function sleeping_suspender(copas, co)
  return {
    timed = true,
    suspend = function(left)
      if left then copas.pause(left) else copas.pauseforever() end
    end,
    resume = function()
      copas.wakeup(co)
    end,
  }
end

function Copas:suspender()
  if not dispatcher.in_coroutine() then
    return nil, "with a Copas dispatcher, wait in a Copas thread (copas.addthread), not in the" ..
      " main program"
  end
  local copas = self.copas
  if copas.pauseforever and copas.wakeup then
    return sleeping_suspender(copas, copas_thread())
  end
  return socket_suspender(copas)
end

return M

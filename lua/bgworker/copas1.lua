-- compat: Copas 1.x (internal): this whole module.
--
-- What bgworker.copas does where Copas 1.x (Debian's lua-copas 1.2) lacks
-- Copas 4's `pause`, `pauseforever` and `wakeup`. bgworker.copas takes
-- these functions in place of its own Copas 4 ones (`COPAS4` there) when a
-- dispatcher starts in a Copas without `pauseforever`; what else Copas 1.x
-- needs is at the spots of bgworker.copas tagged like the first line of
-- this file (see the header of bgworker.copas for the grep that lists
-- them). Dropping Copas 1.x is deleting this module and those spots.
--
-- What Copas 1.x does that the code below works with:
--   * It only yields when a socket is not ready: no pause, no sleep.
--   * It waits on anything with `getfd`, and when a thread ends, closes
--     the socket that last resumed it.
--   * It keeps no set of its threads, and starts one with the handler
--     itself: nothing tells a thread from a coroutine of the program's. So
--     the first dispatcher's start wraps `copas.addthread` and
--     `copas.addserver`, which then record each thread they start (see
--     "Copas threads").
-- (Copas 2 and 3, untested, also come here: they have `copas.sleep`.)
--
-- Invariant: a waker (a thread's wake-up socket for one wait) is sent a
-- datagram only while its thread waits on it, so one that went back to the
-- pool of idle wakers gets none.

local runner = require "bgworker.runner"
local signal = require "bgworker.signal"

local assert, error, pairs, require, setmetatable, tostring, type = assert, error, pairs, require,
  setmetatable, tostring, type

local M = {}

-- ------------------------------------------------------------------------
-- Letting the other threads run

-- A nudge stands for the dispatcher's UDP socket in Copas's write set: its
-- first send reports "timeout", so copas.send yields; a UDP socket is
-- always writable, so Copas resumes the thread at its next step, after the
-- other ready threads ran.
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

-- ------------------------------------------------------------------------
-- Copas threads
--
-- A wait in a coroutine that Copas does not resume would hand Copas's
-- values to whoever does. Threads started by `copas.addthread` and
-- `copas.addserver` once a dispatcher started are recorded; a coroutine
-- that is not, while one that is (or a runner) resumes it, is a coroutine
-- of the program's: waiting there is refused. A coroutine that is not
-- recorded otherwise (a thread that started before the first dispatcher)
-- may wait, as before.

local threads = setmetatable({}, { __mode = "k" })

-- The Copas modules whose functions record their threads.
local recording = setmetatable({}, { __mode = "k" })

-- `handler`, recording the coroutine it runs in as it starts.
local function recorded(handler)
  return function(...)
    threads[coroutine.running()] = true
    return handler(...)
  end
end

local function record_threads(copas)
  if recording[copas] then
    return
  end
  recording[copas] = true
  local addthread, addserver = copas.addthread, copas.addserver
  function copas.addthread(thread, ...)
    if type(thread) ~= "thread" then
      thread = coroutine.create(thread)
    end
    threads[thread] = true
    return addthread(thread, ...)
  end
  function copas.addserver(server, handler, ...)
    return addserver(server, recorded(handler), ...)
  end
end

-- Can Copas resume `co`, where a wait is to be? Not a coroutine of the
-- program's that a Copas thread or a callback resumes. (Copas 1.x runs a
-- new thread at once, inside `copas.addthread`: one that a callback or a
-- thread adds is recorded before.)
function M.resumes(_, co)
  if threads[co] or runner.owns(co) then
    return true
  end
  for thread in pairs(threads) do
    if coroutine.status(thread) == "normal" then
      return false
    end
  end
  return not runner.resuming()
end

-- At the dispatcher's start (its socket made).
function M.setup(self)
  record_threads(self.copas)
  if not self.copas.sleep then
    self.nudge = setmetatable({ socket = self.socket, armed = false }, Nudge)
  end
end

-- Let the other Copas threads run, and come back.
function M.pause(self)
  if self.copas.sleep then
    self.copas.sleep(0)
  else
    nudge(self)
  end
end

-- The reader ends: Copas 1.x then closes the socket that resumed it last,
-- so make that our own, not one a callback was using.
function M.reader_ended(self)
  if self.nudge then
    nudge(self)
  end
end

-- A runner Copas took over (bgworker.copas's `adopt`) ends: Copas 1.x
-- would close the socket that resumed it last (a callback's own), so it
-- waits in a queue that Copas never wakes, and is collected.
local PARKED = { insert = function() end, push = function() end }

function M.retire_runner()
  coroutine.yield(true, PARKED)
end

-- Copas 1.x's loop never ends: the reader never rests (no `rest`), and
-- what keeps the loop alive does not matter.
function M.keep_alive() end

-- ------------------------------------------------------------------------
-- Waiting

-- A waker stands for a socket in Copas's read set so that Copas's close
-- does nothing: the socket goes back to the pool for the next wait.
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
  signal.discard_datagrams(waker.socket)
  if nidle < MAX_IDLE then
    nidle = nidle + 1
    idle[nidle] = waker
  else
    waker.socket:close()
  end
end

-- The calling thread waits for a datagram on a waker of its own; resume
-- sends one (only while it waits: see the invariant).
function M.suspender(self)
  local copas = self.copas
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

return M

--- Wait for a callback: suspend the running Copas thread until the callback
-- fires, then return what it was called with.
--
--     local await = require "bgworker.await"
--     local addresses, name = await(function(callback)
--         native.resolve(host, callback)
--     end)
--
-- `await(start [, dispatcher])` calls `start(callback)`, waits until
-- `callback(...)` is called (typically by a bgworker dispatcher, when a
-- utility library delivers), and returns those values. Calls after the
-- first are ignored.
--
-- How it waits:
--
-- * In a coroutine, with Copas loaded: only this coroutine is suspended.
--   With Copas 2 or later, through `copas.pauseforever` (or `sleep(-1)`)
--   and `copas.wakeup`. Copas 1.x has neither, and drops a thread that
--   yields anything but a socket to wait on: there the thread waits on a
--   UDP socket on 127.0.0.1, connected to itself, to which the callback
--   sends one datagram.
-- * Otherwise, with a `dispatcher` (from `bgworker.new()`): it runs
--   `dispatcher:wait()` until the callback has fired, so other callbacks
--   run meanwhile.
-- * Otherwise it raises an error, before calling `start`.
--
-- A callback run by a Copas dispatcher without `spawn` runs in the
-- dispatcher's reader thread: awaiting there stops the reader, so a
-- callback that must await needs `bgworker.copas{ spawn = true }`.
--
-- @module bgworker.await

local error, select, setmetatable, type = error, select, setmetatable, type
local unpack = table.unpack or unpack
local running = coroutine.running

-- Copas 4 on Lua 5.1 tells threads apart with coxpcall.running, which sees
-- through coxpcall's helper coroutines to the Copas thread; wakeup needs
-- that thread, so look at threads the same way.
local function copas_thread()
  local cox = _VERSION == "Lua 5.1" and not rawget(_G, "jit") and package.loaded.coxpcall
  if cox and cox.running then
    return cox.running()
  end
  return running()
end

local function in_coroutine()
  local co, main = running()
  return co ~= nil and not main
end

--------------------------------------------------------------------------
-- Copas 1.x: wait on a socket.

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

local idle, nidle = {}, 0
-- Idle wakers kept for reuse: one per concurrent wait is made anyway.
local MAX_IDLE = 8

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
  if nidle < MAX_IDLE then
    nidle = nidle + 1
    idle[nidle] = waker
  else
    waker.socket:close()
  end
end

-- Invariant: a waker in the pool has no datagram waiting. Its wait ends
-- by reading the one datagram its callback sends, and the callback sends
-- only while the wait is under way.
local function wait_on_socket(state, copas)
  local waker = take_waker()
  state.wake = function()
    assert(waker.socket:send("!"))
  end
  while not state.done do
    local ok, err = copas.receive(waker, 1)
    if not ok and err ~= "timeout" then
      error("bgworker.await: wake-up socket failed: " .. tostring(err), 0)
    end
  end
  give_back(waker)
end

--------------------------------------------------------------------------
-- Copas 2 and later: sleep until woken.

local function sleeper(copas)
  if copas.pauseforever and copas.wakeup then
    return copas.pauseforever
  end
  if copas.sleep and copas.wakeup then
    -- Copas 2 and 3: a negative time sleeps until woken.
    return function()
      copas.sleep(-1)
    end
  end
end

local function wait_asleep(state, copas, pause)
  local co = copas_thread()
  state.wake = function()
    copas.wakeup(co)
  end
  -- Anyone may wake the thread; only the callback ends the wait.
  while not state.done do
    pause()
  end
end

--------------------------------------------------------------------------

local function wait_dispatcher(state, dispatcher)
  while not state.done do
    if dispatcher:wait() == 0 and not state.done then
      error("bgworker.await: the dispatcher stopped before the callback was called", 0)
    end
  end
end

-- How this caller can wait: a wait function and its arguments after the
-- state, or nothing.
local function waiter(dispatcher)
  local copas = in_coroutine() and package.loaded.copas
  if copas then
    local pause = sleeper(copas)
    if pause then
      return wait_asleep, copas, pause
    end
    return wait_on_socket, copas
  end
  if dispatcher then
    return wait_dispatcher, dispatcher
  end
end

local function await(start, dispatcher)
  if type(start) ~= "function" then
    error("bad argument #1 to 'await' (function expected, got " .. type(start) .. ")", 2)
  end
  if dispatcher ~= nil and type(dispatcher) ~= "table" then
    error("bad argument #2 to 'await' (dispatcher expected, got " .. type(dispatcher) .. ")", 2)
  end
  local wait, a, b = waiter(dispatcher)
  if not wait then
    error("bgworker.await: not in a Copas thread, and no dispatcher to wait with", 2)
  end
  local state = { done = false }
  start(function(...)
    if state.done then
      return
    end
    state.done = true
    state.n, state.values = select("#", ...), { ... }
    if state.wake then
      state.wake()
    end
  end)
  if not state.done then
    wait(state, a, b)
  end
  return unpack(state.values, 1, state.n)
end

return await

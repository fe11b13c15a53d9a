-- Copas versions: Copas 4 (4.8+ for `copas.exit()`) and Copas 1.x. What
-- differs is in `COPAS4` below and its Copas 1.x counterpart,
-- bgworker.copas1, chosen once per dispatcher at its start. The other
-- spots that exist for Copas 1.x end with a comment tag, the way Copas tags
-- its own Lua 5.1 branches, and so does the first line of bgworker.copas1:
--     grep -n "compat: Copas 1.x" lua/
-- lists all the Copas 1.x code (and this line).
--
-- Invariant: the reader reads wake-ups only while its dispatcher owns the
-- core's run (`Wakeups`), so a forked child's copy never takes the
-- parent's.

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
-- Callbacks may wait, on every Lua version: `job:get`, `copas.pause`, Copas
-- socket calls. They run one after the other, and one that waits becomes a
-- Copas thread of its own until its callback returns, while the others go
-- on: it delays nothing but itself. After `budget` callbacks, or 5 ms of
-- them, the reader lets the other Copas threads run, then goes on.
--
-- With Copas 4, `copas.loop()` returns once the program's work is done,
-- without `d:stop()`: the reader waits for wake-ups only while something
-- is outstanding (a job, a lookup, a wait, pending items, a utility
-- library's handle that keeps the loop alive, or `d:ref()`), and rests
-- without keeping the loop alive otherwise. `copas.exit()` (Copas 4.8 or
-- later), which `copas.loop()` also calls when its work is done, stops the
-- dispatcher; `d:stop()` lets `copas.loop()` return even with work
-- outstanding. Copas 1.x's loop never returns.
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
local runner = require "bgworker.runner"
local signal = require "bgworker.signal"

local error, pcall, rawget, require, setmetatable = error, pcall, rawget, require, setmetatable
local tonumber, tostring, type = tonumber, tostring, type
local check_self = dispatcher.check_self
local getinfo, getupvalue = debug.getinfo, debug.getupvalue

local M = {}

-- Wake-up datagrams carry no information; read at most this much of each.
local DATAGRAM = 16

-- `spawn` ran each callback in a Copas thread of its own, so that one that
-- waits did not hold back the others: every callback is suspended on its
-- own now (bgworker.runner), and the option is refused with a message.
local Copas = dispatcher.class("copas", {
  spawn = function(fname, n, name, v)
    if v ~= nil then
      return args.bad(fname, n, name .. " is retired: every callback that waits is suspended on" ..
        " its own now, as spawn did; remove it")
    end
  end,
})
-- The class of these dispatchers: the loop's adapter (bgworker.dispatcher).
M.class = Copas

-- ------------------------------------------------------------------------
-- Copas versions

-- Copas 1.x resumes a new thread with a nil socket before its arguments,
-- Copas 4.x with the arguments alone: a marker tells where they start.
local THREAD = {}

local function thread_main(first, fn, ...)
  if first ~= THREAD then -- compat: Copas 1.x
    return thread_main(fn, ...)
  end
  return fn(...)
end

local function addthread(copas, fn, ...)
  return copas.addthread(thread_main, THREAD, fn, ...)
end

-- Copas 4 on Lua 5.1 tells threads apart with coxpcall.running, which sees
-- through coxpcall's helper coroutines to the Copas thread; wakeup needs
-- that thread, so look at threads the same way (and through
-- bgworker.protect's helpers too).
local function copas_thread()
  local co = protect.running()
  local cox = not protect.native and package.loaded.coxpcall
  if co and cox and cox.running then
    co = cox.running(co)
  end
  return co
end

local function major_version(copas)
  return tonumber(tostring(copas._VERSION):match("(%d+)%.")) or 1
end

-- What the dispatcher does where Copas versions differ, with Copas 4's
-- API; bgworker.copas1 has the same functions for Copas 1.x.
local COPAS4 = {}

-- At the dispatcher's start (its socket made): nothing to prepare.
function COPAS4.setup() end

-- Let the other Copas threads run, and come back.
function COPAS4.pause(self)
  self.copas.pause(0)
end

-- The reader ends: nothing to do.
function COPAS4.reader_ended() end

-- A runner Copas took over ends: Copas forgets it.
function COPAS4.retire_runner() end

-- Nothing keeps the loop alive: the reader stops reading the socket, which
-- would keep `copas.loop()` running, and sleeps without a wake-up time
-- (which does not), until something keeps the loop alive again
-- (`keep_alive`) or the dispatcher stops.
-- The dispatchers whose reader rests. (Copas holds a sleeping thread
-- weakly only: this holds the dispatcher meanwhile, as Copas does while
-- the reader waits for the socket.)
local resting = {}

function COPAS4.rest(self)
  resting[self] = true
  self.copas.pauseforever()
  resting[self] = nil
end

function COPAS4.keep_alive(self, alive)
  if alive then
    if resting[self] then
      self.copas.wakeup(self.reader)
    end
  elseif not (resting[self] or self.draining) and self:owns_run() then
    -- The reader waits for the socket: let it see that it may rest. (In a
    -- drain, it looks when the drain ends.)
    pcall(core.wake)
  end
end

-- Why a wait cannot work in a coroutine that is not a Copas thread.
local NOT_COPAS_THREAD = "this coroutine is not a Copas thread (a coroutine.wrap or" ..
  " coroutine.create of your own?): Copas cannot resume it; wait in a Copas thread" ..
  " (copas.addthread) or in the callback itself"

-- Coroutines found to be Copas threads (see `resumed_by_copas`).
local copas_threads = setmetatable({}, { __mode = "k" })

-- Copas's own set of the threads that `copas.addthread` made (Copas 4.1
-- and later keep one, `_threads`, to remove them): found among the
-- upvalues of `copas.addnamedthread`, and only read. False when this Copas
-- has none (or its names were stripped).
local registries = setmetatable({}, { __mode = "k" })

local function thread_registry(copas)
  local registry = registries[copas]
  if registry == nil then
    registry = false
    local add, i = copas.addnamedthread, 1
    while add do
      local name, value = getupvalue(add, i)
      if name == nil then
        break
      elseif name == "_threads" and type(value) == "table" then
        registry = value
        break
      end
      i = i + 1
    end
    registries[copas] = registry
  end
  return registry
end

-- Without that set: where a thread of `copas.addthread` starts, Copas's
-- function calls the handler with a tail call (Lua 5.2+ marks that frame,
-- 5.1 shows a "tail" frame below it); LuaJIT keeps no trace of it, so there
-- every thread passes.
local FRAME_INFO = _VERSION == "Lua 5.1" and "S" or "St"

local function started_by_addthread(co)
  local level, bottom = 0, nil
  while true do
    local info = getinfo(co, level, FRAME_INFO)
    if not info then break end
    bottom, level = info, level + 1
  end
  return bottom ~= nil and (bottom.istailcall or bottom.what == "tail" or rawget(_G, "jit") ~= nil)
end

-- Does Copas resume `co`? A thread of its own was made by
-- `copas.addthread` (in Copas's set of them, or else it looks so), or has a
-- name (a server's handlers); a runner of ours is one once it waits.
-- Anything else is a coroutine that some code of the program resumes, and
-- a wait there would hand Copas's values to that code. (Without Copas's
-- set, a heuristic: a coroutine of the program's whose function ends in a
-- tail call looks like a Copas thread, and on LuaJIT every one does.)
local function resumed_by_copas(copas, co)
  if copas_threads[co] or runner.owns(co) then
    return true
  end
  -- (Copas names every thing it is asked about, by default its tostring.)
  local name = copas.getthreadname(co)
  local found = name ~= nil and name ~= tostring(co)
  if not found then
    local registry = thread_registry(copas)
    if registry then
      found = registry[co] ~= nil
    else
      found = started_by_addthread(co)
    end
  end
  copas_threads[co] = found or nil
  return found
end

-- Can Copas resume `co`, where a wait is to be? Not when a callback
-- resumes it itself (a runner is "normal"); else see `resumed_by_copas`.
function COPAS4.resumes(self, co)
  if runner.resuming() and not runner.owns(co) then
    return false
  end
  return resumed_by_copas(self.copas, co)
end

-- The calling thread `co` sleeps until woken or the time is up.
function COPAS4.suspender(self, co)
  local copas = self.copas
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
  if d.run == nil then -- compat: Copas 1.x
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

local discard = signal.discard_datagrams

local watch_exit

local function reader(self)
  local receive, budget = self.copas.receive, self.budget
  local rest = self.api.rest
  while not self.stopped do
    if rest and not self:keeps_loop() then
      rest(self)
    else
      self:take_wakeups(receive, budget)
    end
  end
  self.api.reader_ended(self)
  self.wakeups:close()
end

-- Wait for a wake-up, and drain.
function Copas:take_wakeups(receive, budget)
  local sock = self.socket
  local ok, err = receive(self.wakeups, DATAGRAM)
  if self.stopped then
    return
  end
  local lost = self:lost_run("bgworker.copas reader")
  if lost or sock:getfd() < 0 or (not ok and err ~= "timeout") then
    self:report(lost or "wake-up socket failed: " .. tostring(err or "closed"))
    self:stop()
    return
  end
  discard(sock)
  if not self.watching_exit then
    self.watching_exit = watch_exit(self)
  end
  repeat
    local _, empty = self:drain(budget)
    if not empty then
      -- The instance stays armed: no datagram will come, so carry
      -- on draining after the others had their turn.
      self.api.pause(self)
    end
  until empty or self.stopped
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

-- Watch for copas.exit() (Copas 4.8+), unless an earlier copas.loop() left
-- Copas exiting: copas.step() drives it now, and the watch would stop this
-- dispatcher at once. Then the reader tries again at its wake-ups, for a
-- copas.loop() that starts later (it resets the exit). True once watching.
function watch_exit(self)
  local copas = self.copas
  if watching or not copas.waitforexit or copas.exiting() then
    return watching
  end
  watching = true
  addthread(copas, exit_watch, self.call, copas.waitforexit)
  return true
end

function Copas.start(self, opts)
  local ok, copas = pcall(require, "copas")
  if not ok then
    return nil, copas
  end
  self.copas = copas
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
  -- What the dispatcher does where Copas versions differ.
  self.api = COPAS4
  if not (copas.pauseforever and copas.wakeup) then -- compat: Copas 1.x
    self.api = require "bgworker.copas1"
  end
  self.api.setup(self)
  self.reader = addthread(copas, reader, self)
  self.watching_exit = watch_exit(self) or not copas.waitforexit
  return true
end

--- Dispatch inside a running Copas loop: `bgworker.new { loop = "copas" }`.
-- @tparam[opt] table opts the common options (see `bgworker.new`); `spawn`
--   is retired (every callback that waits is suspended on its own)
-- @return a dispatcher; its field `reader` is the reader's Copas thread
-- @function new
M.new = dispatcher.constructor(Copas)

function Copas.before_stop(self, owned)
  if resting[self] then
    -- A resting reader waits for no socket, but for this.
    self.copas.wakeup(self.reader)
    self.woken = true
    return
  end
  -- A datagram resumes the reader wherever it waits for the socket; the
  -- reader then sees `stopped`, ends, and closes the socket.
  self.woken = owned and pcall(core.wake)
end

function Copas.after_stop(self)
  local copas = self.copas
  if not self.woken and copas.close then -- compat: Copas 1.x (no copas.close)
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

-- A callback yielded to Copas from runner `co` (bgworker.runner): a socket
-- or a sleep and the Copas queue to wait in, which Copas's scheduler puts
-- the coroutine it resumed into. Do the same for the runner: Copas resumes
-- it from now on, as any of its threads.
function Copas.adopt(_, co, what, queue)
  if what ~= nil and type(queue) == "table" and queue.insert and queue.push then
    queue:insert(what)
    queue:push(what, co)
    return true
  end
  return false
end

function Copas:retire_runner()
  return self.api.retire_runner(self)
end

function Copas:keep_alive(alive)
  return self.api.keep_alive(self, alive)
end

function Copas:suspender()
  local co = copas_thread()
  if not co then
    return nil, "with a Copas dispatcher, wait in a Copas thread (copas.addthread), not in the" ..
      " main program"
  elseif not self.api.resumes(self, co) then
    return nil, NOT_COPAS_THREAD
  end
  return self.api.suspender(self, co)
end

return M

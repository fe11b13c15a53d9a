--- Deliver results from background threads into OpenResty (lua-nginx-module)
-- worker processes.
--
-- OpenResty's UDP cosocket cannot bind a port, so the reader uses the core's
-- greeting mode (docs/core.md): the native side binds 127.0.0.1, the reader
-- connects to it and sends it a secret token, and wake-ups come back on that
-- cosocket. The reader runs in one perpetual `ngx.timer.at` per worker;
-- callbacks run one after the other in a light thread it spawns, and may
-- wait: use cosockets, `ngx.sleep`, `job:get`. One that waits keeps that
-- light thread to itself, and the others go on in a new one.
--
--     init_worker_by_lua_block {
--         require("bgworker").new { loop = "ngx" }
--         workers = require("bgworker.pool").new { threads = 2 }
--     }
--
--     content_by_lua_block {
--         local job = workers:submit(work, n)
--         local ok, result = job:get(2)
--         if ok == nil then -- "timeout"
--             job:cancel()
--             return ngx.exit(504)
--         end
--         ngx.say(result)
--     }
--
-- Waiting (`bgworker.await`, `job:get`, `pool:run`, `dns.toip`) suspends
-- the request's light thread on an `ngx.semaphore`. See the topic
-- @{openresty.md} for the nginx settings, and examples/openresty/ for a
-- complete configuration.
--
-- A dispatcher here has what every @{Dispatcher} has (`dispatch` raises:
-- the reader dispatches). `Ngx` below is the class of these dispatchers.
--
-- @module bgworker.ngx

-- luacheck: read globals ngx

local args = require "bgworker.args"
local core = require "bgworker.core"
local dispatcher = require "bgworker.dispatcher"
local semaphore = require "ngx.semaphore"

local ngx = ngx
local exiting, sleep, spawn, timer_at = ngx.worker.exiting, ngx.sleep, ngx.thread.spawn,
  ngx.timer.at
local error, next, pcall, tostring = error, next, pcall, tostring
local floor = math.floor

local M = {}

--- Seconds the reader waits for a wake-up before it checks whether the worker
-- is exiting (nginx's own default socket read timeout). Only a fallback: the
-- exit watcher wakes it when the worker starts to exit, and the last waiting
-- request to leave an exiting worker wakes it too.
M.DEFAULT_TIMEOUT = 60

-- Wake-up datagrams carry no information; read at most this much of each.
local DATAGRAM = 16
-- The greeting crosses the loopback interface: it arrives within a few event
-- loop turns. The reader looks for it every GREETING_POLL seconds and sends
-- the token again every GREETING_RESEND (a datagram can be lost to a full
-- socket buffer, for instance under a flood of junk), until GREETING_TIMEOUT;
-- then it starts over with a new socket.
local GREETING_POLL, GREETING_RESEND, GREETING_TIMEOUT = 0.001, 0.05, 5
-- Pause between a failed reader session and the next, so a persistent fault
-- logs once a second rather than spinning.
local RESTART_DELAY = 1
-- The exit watcher is a timer that never expires in practice: nginx runs
-- pending timers early ("premature") when the worker starts to exit.
local WATCH_DELAY = 86400
-- A semaphore wait needs a timeout: a year stands for "until woken".
local FOREVER = 86400 * 365

local Ngx = dispatcher.class("ngx", { timeout = args.option.seconds })
-- The class of these dispatchers: the loop's adapter (bgworker.dispatcher).
M.class = Ngx

function Ngx.gettime()
  ngx.update_time()
  return ngx.now()
end

--- The error handler used when `opts.errorhandler` is not given: it logs
-- the traceback (which starts with the message) at level `ngx.ERR`.
-- @param err the error value
-- @param tb a traceback string, or nil
function M.default_errorhandler(err, tb)
  ngx.log(ngx.ERR, "bgworker.ngx: ", tb or tostring(err))
end
Ngx.default_errorhandler = M.default_errorhandler

-- This worker's reader, once started.
local reader

-- ------------------------------------------------------------------------
-- The reader

-- Requests and callbacks waiting (bgworker.await, job:get) keep an exiting worker's reader
-- running, since nginx lets in-flight requests finish; the last to leave
-- wakes it (see the suspender).
local function should_stop(self)
  return exiting() and next(self.waiters) == nil
end

-- Handle items until the queue is empty, letting the rest of the worker run
-- after each slice (`budget` callbacks, or 5 ms of them). False when told
-- to stop before the end.
local function drain_all(self)
  while true do
    local _, empty = self:drain(self.budget)
    if empty then
      return true
    end
    sleep(0)
    if should_stop(self) then
      return false
    end
  end
end

-- Greet the native side until it takes the greeting. Returns nothing when
-- it should stop, true once greeted, or false and a message.
local function greet(self, sock)
  local started = self.gettime()
  local sent = nil
  while not core.greeted() do
    if should_stop(self) then
      return nil
    end
    local now = self.gettime()
    if now - started > GREETING_TIMEOUT then
      return false, "the native side did not take the greeting"
    end
    if not sent or now - sent >= GREETING_RESEND then
      local ok, err = sock:send(self.token)
      if not ok then
        return false, "cannot greet the native side: " .. tostring(err)
      end
      sent = now
    end
    sleep(GREETING_POLL)
  end
  return true
end

-- One life of the wake-up channel: greet, then receive and drain until the
-- worker exits. Returns nothing when it should stop, or an error message.
local function session(self)
  local sock = ngx.socket.udp()
  self.socket = sock
  local ok, err = sock:setpeername(self.host, self.port)
  if not ok then
    return "cannot connect to the native side: " .. tostring(err)
  end
  ok, err = greet(self, sock)
  if not ok then
    return err
  end
  -- Items delivered before the greeting sent no wake-up.
  if not drain_all(self) then
    return
  end
  sock:settimeout(self.timeout_ms)
  while true do
    local data, rerr = sock:receive(DATAGRAM)
    if should_stop(self) then
      return
    end
    if data then
      -- Each datagram is followed by a drain, so none can announce an item
      -- that an earlier drain left behind.
      if not drain_all(self) then
        return
      end
    elseif rerr ~= "timeout" then
      return "wake-up socket failed: " .. tostring(rerr)
    end
  end
end

-- Start the core in greeting mode; the session greets it.
local function start_core(self)
  local ok, host, port, token = pcall(core.start_greeting, self.start_opts)
  if not ok then
    return nil, host
  end
  self.host, self.port, self.token = host, port, token
  self:adopt_run()
  return true
end

-- Cancels what is still queued: with the socket gone, nobody would run it.
local function close_session(self)
  if self.socket then
    self.socket:close()
    self.socket = nil
  end
  if self:owns_run() then
    core.stop()
  end
end

local function run(premature, self)
  if not premature then
    while not should_stop(self) and not self.stopped do
      -- session returns early only to stop, or with a message.
      local _, err, tb = self.call(session, self)
      close_session(self)
      if should_stop(self) or self.stopped then
        break
      end
      self:report("reader restarts after: " .. tostring(err), tb)
      sleep(RESTART_DELAY)
      local ok, serr = start_core(self)
      if not ok then
        self:report("reader cannot restart: " .. tostring(serr))
        break
      end
    end
  end
  self:stop()
end

-- Runs early, when the worker starts to exit, and wakes the reader from its
-- receive so that it sees the news now rather than at its next timeout.
local function watch(premature, self)
  if self.stopped then
    return
  end
  if premature then
    if self:owns_run() then
      core.wake()
    end
  else
    timer_at(WATCH_DELAY, watch, self)
  end
end

function Ngx.start(self, opts)
  if reader and not reader.stopped then
    return nil, "the reader is already started in this worker"
  end
  self.start_opts = opts.capacity and { capacity = opts.capacity } or nil
  self.timeout_ms = floor((opts.timeout or M.DEFAULT_TIMEOUT) * 1000)
  self.spare_suspenders = {}
  local ok, err = start_core(self)
  if not ok then
    return nil, err
  end
  ok, err = timer_at(WATCH_DELAY, watch, self)
  if ok then
    ok, err = timer_at(0, run, self)
  end
  if not ok then
    core.stop()
    return nil, "cannot create a timer: " .. tostring(err)
  end
  reader = self
  return true
end

--- Start this worker's reader: `bgworker.new { loop = "ngx" }`. Call it once
-- per worker, from `init_worker_by_lua*`; it returns at once, and the reader
-- runs in a timer.
--
-- The reader stops when the worker exits (reload, quit) and no request is
-- waiting any more; what is still queued then is cancelled. If its socket
-- fails, it reports the error, cancels what is queued, and starts over with
-- a new one a second later.
--
-- @tparam[opt] table opts the common options (see `bgworker.new`; the
--   default error handler logs at level `ngx.ERR`), and `timeout` (seconds):
--   how long the reader waits for a wake-up before it checks whether the
--   worker exits; 60 by default. Each such timeout logs "lua udp socket read
--   timed out" unless `lua_socket_log_errors off`.
-- @return the dispatcher
-- @function new
M.new = dispatcher.constructor(Ngx)

function Ngx.before_stop(self)
  if self.socket then
    -- Wakes the reader's receive: it sees `stopped` and ends.
    pcall(core.wake)
  end
end

--- The reader dispatches: `dispatch` raises.
function Ngx:dispatch()
  local msg = dispatcher.check_self(self, "dispatch") or
    "dispatch: this dispatcher is driven by its reader, in a timer"
  error(msg, 2)
end

-- ------------------------------------------------------------------------
-- Waiting

-- Runners here are light threads: `ngx.thread.spawn` runs one at once
-- until it ends or waits (a cosocket, `ngx.sleep`, a semaphore: nginx's
-- yields, which no plain coroutine of ours could take), then returns.
local function runner_thread(self, body, slice)
  body(self, slice)
  slice.finished = true
end

function Ngx:run_in_runner(body, slice)
  slice.finished = false
  local ok, err = spawn(runner_thread, self, body, slice)
  if not ok then
    self:report("bgworker.ngx: cannot spawn a light thread for callbacks: " .. tostring(err))
    return true
  end
  return slice.finished
end

-- Suspenders whose wait is over, kept for the next waits (at most
-- SPARE_SUSPENDERS): a semaphore (a cdata with a finaliser) and three
-- closures per wait cost more than the rest of a request's wait. A resume
-- that comes after its wait is over posts to a semaphore that another wait
-- may use by then: that wait returns early once and waits again, as a
-- waiter does after any early return (bgworker.waiter).
local SPARE_SUSPENDERS = 64

function Ngx:suspender()
  local spare = self.spare_suspenders
  local n = #spare
  if n > 0 then
    local suspender = spare[n]
    spare[n] = nil
    return suspender
  end
  local sema = semaphore.new()
  local suspender
  suspender = {
    timed = true,
    suspend = function(left)
      local ok, err = sema:wait(left or FOREVER)
      if not ok and err ~= "timeout" then
        error(err, 0)
      end
    end,
    resume = function()
      sema:post(1)
    end,
    done = function()
      if #spare < SPARE_SUSPENDERS then
        spare[#spare + 1] = suspender
      end
      -- The reader of an exiting worker goes on while requests wait; the
      -- last one to leave wakes it to stop, or it would hold the worker
      -- until its read timeout.
      if should_stop(self) and self:owns_run() then
        core.wake()
      end
    end,
  }
  return suspender
end

-- An `ngx.timer.at` timer: `fn()` runs in protected mode after `seconds`.
-- (nginx timers cannot be cancelled: a cancelled one fires and does nothing.)
function Ngx:timer(seconds, fn)
  local cancelled = false
  local ok, err = timer_at(seconds, function(premature)
    if not premature and not cancelled then
      self:call_reporting(fn)
    end
  end)
  if not ok then
    error("bgworker.ngx: cannot create a timer: " .. tostring(err), 0)
  end
  return {
    cancel = function()
      cancelled = true
    end,
  }
end

return M

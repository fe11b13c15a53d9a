--- Deliver results from background threads into OpenResty (lua-nginx-module)
-- worker processes.
--
-- OpenResty's UDP cosocket cannot bind a port, so the reader uses the core's
-- greeting mode (docs/core.md): the native side binds 127.0.0.1, the reader
-- connects to it and sends it a secret token, and wake-ups come back on that
-- cosocket. The reader runs in one perpetual `ngx.timer.at` per worker;
-- callbacks run in that timer's light thread, one after the other, so they
-- may use cosockets and `ngx.sleep` (and delay the callbacks after them while
-- they wait).
--
--     init_by_lua_block {
--         require "bgworker.ngx"
--     }
--     init_worker_by_lua_block {
--         require("bgworker.ngx").start()
--     }
--
--     content_by_lua_block {
--         local bgngx = require "bgworker.ngx"
--         local ticker = require "bgworker_ticker"
--         local values = {}
--         local result, err, job = bgngx.await(function(done)
--             return ticker.start(3, 10, function(v)
--                 values[#values + 1] = v
--                 if v == 3 then done(values) end
--             end)
--         end, 5)
--     }
--
-- See docs/openresty.md for the nginx settings.
--
-- @module bgworker.ngx

-- luacheck: read globals ngx

local core = require "bgworker.core"
local drain = require "bgworker.drain"
local semaphore = require "ngx.semaphore"

local ngx = ngx
local exiting, sleep, timer_at = ngx.worker.exiting, ngx.sleep, ngx.timer.at
local error, pcall, select, tostring, type, unpack = error, pcall, select, tostring, type, unpack
local floor, huge = math.floor, math.huge
local running = coroutine.running

local bgngx = {}

--- Items the reader handles before it lets requests and other timers run.
bgngx.DEFAULT_BUDGET = drain.DEFAULT_BUDGET

--- Seconds the reader waits for a wake-up before it checks whether the worker
-- is exiting (nginx's own default socket read timeout). The exit watcher
-- wakes it at once, so this is only a fallback.
bgngx.DEFAULT_TIMEOUT = 60

-- Wake-up datagrams carry no information; read at most this much of each.
local DATAGRAM = 16
-- The greeting crosses the loopback interface: it arrives within a few event
-- loop turns, or something is wrong and the reader starts over.
local GREETING_POLL, GREETING_TRIES = 0.001, 1000
-- Pause between a failed reader session and the next, so a persistent fault
-- logs once a second rather than spinning.
local RESTART_DELAY = 1
-- The exit watcher is a timer that never expires in practice: nginx runs
-- pending timers early ("premature") when the worker starts to exit.
local WATCH_DELAY = 86400

-- This worker's reader, once started.
local reader
-- Requests waiting in `await`: an exiting worker keeps its reader running
-- for them, since nginx lets in-flight requests finish.
local waiters = 0

--- The error handler used when `opts.errorhandler` is not given: it logs
-- the traceback (which starts with the message) at level `ngx.ERR`.
-- @param err the error value
-- @param tb a traceback string, or nil
function bgngx.default_errorhandler(err, tb)
  ngx.log(ngx.ERR, "bgworker.ngx: ", tb or tostring(err))
end

--------------------------------------------------------------------------
-- The reader

local function should_stop()
  return exiting() and waiters == 0
end

-- Handle items until the queue is empty, letting the rest of the worker run
-- after each `budget` of them. False when told to stop before the end.
local function drain_all(self)
  while true do
    local _, empty = drain.run(self, self.budget)
    if empty then
      return true
    end
    sleep(0)
    if should_stop() then
      return false
    end
  end
end

-- One life of the wake-up channel: greet, then receive and drain until the
-- worker exits. Returns nothing when it should stop, or an error message.
local function session(self)
  local host, port, token = core.start_greeting(self.start_opts)
  local sock = ngx.socket.udp()
  self.socket = sock
  local ok, err = sock:setpeername(host, port)
  if ok then
    ok, err = sock:send(token)
  end
  if not ok then
    return "cannot greet the native side: " .. tostring(err)
  end
  local tries = 0
  while not core.greeted() do
    if should_stop() then
      return
    end
    tries = tries + 1
    if tries > GREETING_TRIES then
      return "the native side did not take the greeting"
    end
    sleep(GREETING_POLL)
  end
  -- Items delivered before the greeting sent no wake-up.
  if not drain_all(self) then
    return
  end
  sock:settimeout(self.timeout_ms)
  while true do
    local data, rerr = sock:receive(DATAGRAM)
    if should_stop() then
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

local function close_session(self)
  if self.socket then
    self.socket:close()
    self.socket = nil
  end
  -- Cancels what is still queued: with the socket gone, nobody would run it.
  core.stop()
end

local function run(premature, self)
  if not premature then
    self.thread = running()
    while not should_stop() do
      -- session returns early only to stop, or with a message.
      local _, err, tb = self.call(session, self)
      close_session(self)
      if should_stop() then
        break
      end
      drain.report(self, "reader restarts after: " .. tostring(err), tb)
      sleep(RESTART_DELAY)
    end
  end
  self.thread = nil
  self.stopped = true
end

-- Runs early, when the worker starts to exit, and wakes the reader from its
-- receive so that it sees the news now rather than at its next timeout.
local function watch(premature, self)
  if self.stopped then
    return
  end
  if premature then
    if core.running() then
      core.wake()
    end
  else
    timer_at(WATCH_DELAY, watch, self)
  end
end

--------------------------------------------------------------------------
-- API

local function argerror(fname, n, msg)
  error(("bad argument #%d to 'bgworker.ngx.%s' (%s)"):format(n, fname, msg), 3)
end

local OPTIONS = { capacity = true, budget = true, timeout = true, errorhandler = true }

--- Start this worker's reader. Call it once per worker, from
-- `init_worker_by_lua*`; it returns at once, and the reader runs in a timer.
--
-- The reader stops when the worker exits (reload, quit) and no request is
-- waiting in `await` any more; what is still queued then is cancelled. If its
-- socket fails, it logs the error, cancels what is queued, and starts over
-- with a new one a second later.
--
-- @tparam[opt] table opts
--   `capacity` (positive integer): bound the queue; by default unbounded.
--   `budget` (positive integer): items handled before the reader lets
--   requests and other timers run (`ngx.sleep(0)`); 1000 by default.
--   `timeout` (seconds): how long the reader waits for a wake-up before it
--   checks whether the worker exits; 60 by default. Each such timeout logs
--   "lua udp socket read timed out" unless `lua_socket_log_errors off`.
--   `errorhandler` (function): called as `errorhandler(err, traceback)` for
--   each callback that raised an error, each item whose decode failed, and
--   each reader restart; by default logs at level `ngx.ERR`.
function bgngx.start(opts)
  local self = {}
  opts = drain.init(self, "bgworker.ngx.start", opts, OPTIONS)
  if opts.capacity ~= nil and not drain.is_count(opts.capacity) then
    argerror("start", 1, "opts.capacity must be a positive integer, got " ..
      tostring(opts.capacity))
  end
  local timeout = opts.timeout
  if timeout ~= nil and not (type(timeout) == "number" and timeout >= 0.001 and timeout < huge) then
    argerror("start", 1, "opts.timeout must be a number of seconds >= 0.001, got " ..
      tostring(timeout))
  end
  if reader then
    error("bgworker.ngx.start: the reader is already started in this worker", 2)
  end
  if core.running() then
    error("bgworker.ngx.start: bgworker.core is already started in this Lua state" ..
      " (by another dispatcher)", 2)
  end
  self.start_opts = opts.capacity and { capacity = opts.capacity } or nil
  self.timeout_ms = floor((timeout or bgngx.DEFAULT_TIMEOUT) * 1000)
  self.errorhandler = opts.errorhandler or bgngx.default_errorhandler
  local ok, err = timer_at(WATCH_DELAY, watch, self)
  if ok then
    ok, err = timer_at(0, run, self)
    -- A watcher with no reader ends the next time it runs.
    self.stopped = not ok
  end
  if not ok then
    error("bgworker.ngx.start: cannot create a timer: " .. tostring(err), 2)
  end
  reader = self
end

local function pack(...)
  return { n = select("#", ...), ... }
end

--- Wait, without blocking the worker, for a result from a background thread.
--
-- Calls `start(done)`, which starts the background work and arranges for a
-- callback to call `done(...)` with the result; then waits until `done` is
-- called, or `timeout` seconds passed. Only the first call of `done` counts.
-- What `start` returns (a ticker, a job) stays referenced while `await`
-- waits, so it is not garbage-collected (which stops many jobs), and is
-- returned after a timeout, so the caller can stop it.
--
-- For request handlers and timers (any context where `ngx.semaphore` can
-- wait), not for callbacks, which run in the reader: they would wait for
-- themselves.
--
-- @tparam function start called as `start(done)`
-- @tparam number timeout seconds
-- @return the values passed to `done`; or `nil, "timeout", job` (`job`:
-- what `start` returned); or `nil, "exiting"` when the worker exits and the
-- reader has stopped
function bgngx.await(start, timeout)
  if type(start) ~= "function" then
    argerror("await", 1, "function expected, got " .. type(start))
  end
  if type(timeout) ~= "number" or timeout < 0 then
    argerror("await", 2, "timeout must be a non-negative number of seconds, got " ..
      tostring(timeout))
  end
  if not reader then
    error("bgworker.ngx.await: no reader in this worker; call bgworker.ngx.start()" ..
      " from init_worker_by_lua*", 2)
  end
  if reader.stopped then
    return nil, "exiting"
  end
  if reader.thread and running() == reader.thread then
    error("bgworker.ngx.await: called from a callback, which runs in the reader:" ..
      " it would wait for itself", 2)
  end
  local sema = semaphore.new()
  local results
  local function done(...)
    if not results then
      results = pack(...)
      sema:post(1)
    end
  end
  local job = start(done)
  waiters = waiters + 1
  local called, ok, err = pcall(sema.wait, sema, timeout)
  waiters = waiters - 1
  if waiters == 0 and reader.thread and exiting() and core.running() then
    -- The reader may be waiting only for us to leave.
    core.wake()
  end
  if not called then
    error(ok, 2) -- a context where ngx.semaphore cannot wait
  end
  if not ok then
    return nil, err, job
  end
  return unpack(results, 1, results.n)
end

return bgngx

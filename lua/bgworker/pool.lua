--- Run Lua functions on background threads, as jobs you can wait for with
-- a timeout, cancel, and watch.
--
-- A pool is a set of OS threads, each with a Lua state of its own (of this
-- state's Lua version, with the standard libraries, and `package.path` and
-- `package.cpath` as they were here when the pool was made). A job is a
-- function and its arguments; a worker runs it, and its outcome comes back
-- through the running bgworker dispatcher (see `bgworker.new`), in any loop.
--
--     local pool = require("bgworker.pool").new { threads = 2 }
--     local job = pool:submit(function(n)
--         local progress = require("bgworker.worker").progress
--         local s = 0
--         for i = 1, n do
--             s = s + i
--             if i % 1e7 == 0 then progress(i / n) end
--         end
--         return s
--     end, 1e8)
--     job:on_progress(function(done) print(("%d%%"):format(done * 100)) end)
--     job:on_done(function(ok, sum) print("done:", ok, sum) end)  -- once, as get returns
--     local ok, sum = job:get(5)      -- true, sum | false, err, traceback | nil, "timeout"
--     if ok == nil then job:cancel() end
--
-- `job:get` waits wherever `bgworker.await` can: only the calling coroutine
-- in a Copas thread, a coroutine of a select or luv loop, a cqueues
-- coroutine or an OpenResty request; outside any coroutine, with a select
-- dispatcher, it blocks while running that dispatcher.
--
-- The job's function is either a Lua function, moved with `string.dump` (so
-- it sees the worker's globals, not this state's) with copies of its
-- upvalues, or a string "module.function", which the worker requires.
-- Each worker keeps its state between jobs: required modules stay loaded.
--
-- Arguments, results, error values and progress values cross by copy; which
-- values can is said once, in the topic @{jobs.md} ("A job's function and
-- its values"). An argument that cannot is refused by `submit`, naming it;
-- a result that cannot fails the job with a message.
--
-- In a job, `require "bgworker.worker"` gives `progress(...)` (values for
-- the job's `on_progress` handler, in order, before its outcome; at most
-- `PROGRESS_IN_FLIGHT` (64) of a job's progress items wait to be dispatched
-- at a time: beyond that `progress` waits, so a job that reports faster than
-- the loop drains is slowed, not buffered without bound), `receive()` (the
-- next message that `job:send` queued for the job) and `cancelled()`
-- (true once the job was cancelled, for jobs that check): see
-- @{bgworker.worker}, and the topic @{jobs.md} for the whole story.
--
-- @module bgworker.pool

local args = require "bgworker.args"
local core = require "bgworker.core"
local dispatcher = require "bgworker.dispatcher"
local drain = require "bgworker.drain"
local waiting = require "bgworker.waiter"
local native = require "bgworker.pool_native"
local protect = require "bgworker.protect"

local error, getmetatable, package, pairs, select, setmetatable, tostring, type =
  error, getmetatable, package, pairs, select, setmetatable, tostring, type
local floor, huge = math.floor, math.huge
local unpack = dispatcher.unpack
local running = core.running

local pool = {}

--- Most threads a pool may have.
pool.MAX_THREADS = 1024

--- Progress items of one job that may wait to be dispatched at a time.
pool.PROGRESS_IN_FLIGHT = native.PROGRESS_IN_FLIGHT

--- Messages (`job:send`) that may wait for one job at a time; `send`
-- refuses more.
pool.MESSAGES_QUEUED = native.MESSAGES_QUEUED

--- Most values a job may return, or `progress` send at once: as many as
-- this state can spread on its stack for a callback or `get` (7900 on Lua
-- 5.1 and LuaJIT, 100000 on later versions). A job that returns more fails
-- with a message; `progress` raises.
pool.MAX_VALUES = native.MAX_VALUES

--- Seconds `close()` waits by default for running jobs to stop. (A pool
-- that is collected, or whose Lua state closes, does not wait.)
pool.CLOSE_TIMEOUT = native.CLOSE_TIMEOUT

local Pool = {}
Pool.__index = Pool

local Job = {}
Job.__index = Job

local function pack(...)
  return { n = select("#", ...), ... }
end

-- The outcome of every job done without results.
local DONE = pack(true)

-- The outcome of every job cancelled.
local CANCELLED = pack(false, "cancelled")

-- ------------------------------------------------------------------------
-- Pools

local function check_pool(self, method)
  if getmetatable(self) ~= Pool then
    return args.bad_self(method, "pool expected, got " .. type(self) .. "; call it as pool:" .. method .. "()")
  end
end

local function check_threads(fname, threads)
  if type(threads) ~= "number" or threads < 1 or threads > pool.MAX_THREADS or
      threads ~= floor(threads) or threads == huge then
    return args.bad(fname, 1, ("opts.threads must be an integer in 1..%d, got %s"):format(
      pool.MAX_THREADS, args.describe(threads)))
  end
end

local OPTIONS = {
  threads = function(fname, _, _, v) return check_threads(fname, v) end,
  init = function(fname, n, name, v)
    local why = native.refusal(v)
    if why then
      return args.bad(fname, n, name .. ": " .. why)
    end
  end,
  init_timeout = args.option.seconds,
  jit = args.option.boolean,
}

-- A job is a list (made once per job: cheaper than a record) of:
local POOL, ID, STATE, CALLBACK, OUTCOME, PROGRESS, WAITERS = 1, 2, 3, 4, 5, 6, 7
-- its pool, its id, "queued" (until it ends: then "done", "failed" or
-- "cancelled"), its callback (`on_done`'s; true once it was called or
-- owed its call), its outcome (packed: true, results... | false, err,
-- traceback), its progress handler and the waiters of `get` (made by the
-- first that has to wait); false where there is none.

-- Hand an error of a callback to the running dispatcher's error handler.
local function report(err, tb)
  local d = dispatcher.current()
  if d then
    d:report(err, tb)
  else
    dispatcher.default_errorhandler(err, tb)
  end
end

-- The callbacks owed a call (each packed with its arguments, by the order
-- they became owed): the running dispatcher runs them at its next drain.
-- A dispatcher that stops drops its deferred calls, and none may run now:
-- then the next dispatcher to start defers them again (see the start hook
-- below). Whichever call comes first runs a callback; it is no longer owed
-- then, so each runs exactly once.
local owed, owed_count = {}, 0

local function call_owed(call)
  if owed[call] then
    owed[call] = nil
    return call[1](unpack(call, 2, call.n))
  end
end

-- Call a job's callback where callbacks run: at the next drain of the
-- running dispatcher, or of the next one (a cancellation, from the caller
-- of cancel or close; a callback given to a job that already ended).
local function call_later(f, ...)
  local call = pack(f, ...)
  owed_count = owed_count + 1
  owed[call] = owed_count
  local d = dispatcher.current()
  if d then
    d:defer(call_owed, call)
  end
end

-- A job is outstanding from its submit to its outcome, and while any is,
-- the pool holds a dispatcher (the one running when the first began, or
-- started since): the dispatcher keeps its loop alive for them
-- (bgworker.dispatcher, "Keeping the loop alive").
local function hold_for(self, d)
  self.held = d
  if d then
    d:hold()
  end
end

local function one_less_outstanding(self)
  local n = self.outstanding - 1
  self.outstanding = n
  if n == 0 then
    local d = self.held
    self.held = nil
    if d then
      d:unhold()
    end
  end
end

-- A job was cancelled while it ran: once the grace is over, retire its
-- worker if it is still in the job's code, and start one in its place
-- (pool_native's `retire_stuck`). On a timer of the running dispatcher;
-- without one, at the pool's next cancel.
local function retire_if_stuck(self)
  local d = dispatcher.current()
  if d then
    d:timer(native.RETIRE_GRACE, function()
      if not self.closed then
        self.native:retire_stuck()
      end
    end)
  else
    self.native:retire_stuck()
  end
end

-- The job ended with `outcome`: keep it, wake its waiters, forget it in
-- the pool, and call its callback, now (`now`: we are handling the
-- pool's events) or later.
local function finish(job, status, outcome, now)
  job[STATE], job[OUTCOME] = status, outcome
  local self = job[POOL]
  self.jobs[job[ID]] = nil
  one_less_outstanding(self)
  local waiters = job[WAITERS]
  if waiters then
    job[WAITERS] = false
    for waiter in pairs(waiters) do
      waiter:wake()
    end
  end
  local callback = job[CALLBACK]
  if callback and callback ~= true then
    job[CALLBACK] = true
    if not now then
      call_later(callback, unpack(outcome, 1, outcome.n))
    elseif outcome == DONE then
      callback(true)
    else
      callback(unpack(outcome, 1, outcome.n))
    end
  end
end

local ENDED = { done = true, failed = true, cancelled = true }

-- Wait with `waiter` for the job's outcome: `get`'s results.
local function wait_outcome(job, waiter, timeout)
  if not ENDED[job[STATE]] then
    local waiters = job[WAITERS] or {}
    job[WAITERS] = waiters
    waiters[waiter] = true
    local ok, reason = waiter:wait(timeout)
    if job[WAITERS] then
      job[WAITERS][waiter] = nil
    end
    if not ok then
      return nil, reason
    end
  end
  local outcome = job[OUTCOME]
  return unpack(outcome, 1, outcome.n)
end

-- The backlog: the pool's events not yet handled, from `head` to `tail`
-- (excluded), each a pair of the native pool's `on_events`, `id` in the
-- backlog itself and `value` in `backlog.values`: the outcome of job `id`,
-- `true` (done, no results) or packed, or `false` (its outcome was dropped
-- unread, while no dispatcher ran: it ended as cancelled); or a progress of
-- job `-id`, its packed values. `depth` counts the runs in progress: a callback that
-- dispatches runs the backlog too (the events it needs may be there), and
-- only the outermost run puts an empty backlog's indices back to 1, so
-- that they only grow while any run is in progress.
--
-- Handle the events in order until there are none (also those that
-- callbacks add meanwhile) or the running drain's slice is over: each
-- event counts as a callback of the slice (a carrier brings up to 32), and
-- what is left waits for `run_events` at the start of the next slice
-- (`Slice:carry_over`). Jobs that ended meanwhile are no longer in `jobs`:
-- their events go nowhere. An event leaves the backlog before its callback
-- runs, so a callback that raises takes only itself.
local run_events

-- A run of the backlog is over: forget its indices once no run is left and
-- the backlog is empty.
local function leave_backlog(backlog)
  local depth = backlog.depth - 1
  backlog.depth = depth
  if depth == 0 and backlog.head == backlog.tail then
    backlog.head, backlog.tail = 1, 1
  end
end

local function run_backlog(self, slice)
  local backlog, jobs = self.backlog, self.jobs
  local values = backlog.values
  backlog.depth = backlog.depth + 1
  if slice then
    -- A callback that waits displaces the slice's runner: the next runner
    -- runs the rest (bgworker.drain, "Displacement").
    slice:enter(run_events, self)
  end
  local i = backlog.head
  while i < backlog.tail do
    -- Run up to `stop` (outside a drain: all), then count what ran in the
    -- slice (and what nested runs took meanwhile): no count on the way,
    -- this is the hot path.
    local stop = backlog.tail
    if slice then
      if slice.displaced then
        -- A callback of this run waited: the rest was handed on.
        leave_backlog(backlog)
        return
      end
      if slice.calls >= slice.checkpoint and slice:room() == 0 then
        slice:leave(self)
        leave_backlog(backlog)
        slice:carry_over(run_events, self)
        return
      end
      local checkpoint = i + slice.checkpoint - slice.calls
      if checkpoint < stop then
        stop = checkpoint
      end
    end
    local from = i
    backlog.batch = i
    while i < stop do
      local id, value = backlog[i], values[i]
      backlog[i], values[i] = nil, nil
      backlog.head = i + 1
      if id > 0 then
        local job = jobs[id]
        if job and value == true then
          finish(job, "done", DONE, true)
        elseif job and value == false then
          finish(job, "cancelled", CANCELLED, true)
        elseif job then
          finish(job, value[1] and "done" or "failed", value, true)
        end
      else
        local job = jobs[-id]
        local handler = job and job[PROGRESS]
        if handler then
          handler(unpack(value, 1, value.n))
        end
      end
      i = backlog.head
      if slice and slice.displaced then
        break
      end
    end
    if slice then
      slice.calls = slice.calls + (i - from)
    end
  end
  if slice and not slice.displaced then
    slice:leave(self)
  end
  leave_backlog(backlog)
end

-- Run the backlog in the running drain's slice (none outside a drain: then
-- all of it), in one protected call per batch rather than one per
-- callback; after an error (reported as the dispatcher reports the errors
-- of the callbacks it calls) the rest goes on.
function run_events(self)
  local slice = drain.slice()
  -- The dispatcher's own protected call: Copas 4 on Lua 5.1 sees through
  -- coxpcall's coroutines only (bgworker.copas).
  local d = dispatcher.current()
  local call = d and d.call or protect.call
  repeat
    local ok, err, tb = call(run_backlog, self, slice)
    if not ok then
      report(err, tb)
      local backlog = self.backlog
      if slice and not slice.displaced then
        -- Count the events of the batch that raised (at least the one that
        -- raised: handlers that all raise must end a slice too), and look
        -- at the clock before the next one.
        slice.calls = slice.calls + (backlog.head - backlog.batch)
        slice.checkpoint = slice.calls
      end
      -- The run that raised is over (a nested one ended in its own call).
      leave_backlog(backlog)
      if slice and slice.displaced then
        -- Raised after a wait: the rest was handed on.
        return
      end
    end
  until ok
end

-- The native pool's `on_events`: add the events, the `n` values of
-- `events` as pairs, to the backlog and handle it.
local function handle_events(self, events, n)
  local backlog = self.backlog
  local values, tail = backlog.values, backlog.tail
  for i = 1, n, 2 do
    backlog[tail], values[tail] = events[i], events[i + 1]
    tail = tail + 1
  end
  backlog.tail = tail
  run_events(self)
end

-- Pools of this state that may have lost outcomes while no dispatcher ran:
-- each new dispatcher asks them for those, which then reach it as events.
local live = setmetatable({}, { __mode = "k" })

dispatcher.on_start("bgworker.pool", function()
  local d = dispatcher.current()
  if next(owed) ~= nil then
    local calls = {}
    for call in pairs(owed) do
      calls[#calls + 1] = call
    end
    table.sort(calls, function(a, b) return owed[a] < owed[b] end)
    for i = 1, #calls do
      d:defer(call_owed, calls[i])
    end
  end
  for p in pairs(live) do
    if not p.closed then
      p.native:notify_lost()
    end
    if p.outstanding > 0 then
      hold_for(p, d)
    end
  end
end)

-- An object whose collection calls `fn()`: a userdata on Lua 5.1 and
-- LuaJIT, whose tables have no finalisers.
local function on_collect(fn)
  if newproxy then
    local sentinel = newproxy(true)
    getmetatable(sentinel).__gc = fn
    return sentinel
  end
  return setmetatable({}, { __gc = fn })
end

-- A pool's finaliser: every job not yet ended is cancelled, as by close
-- (whose callbacks run at the next drain). It holds the jobs, and through
-- them the pool, only from the sentinel: the pool is collected together
-- with it.
local function cancel_on_collect(jobs)
  return on_collect(function()
    for _, job in pairs(jobs) do
      finish(job, "cancelled", CANCELLED)
    end
  end)
end

-- What `new` raises for `err`, a worker's init's error (copied, as a job's
-- is), with `tb`, the worker's traceback, if any, and at what level: a
-- string becomes a message with the traceback, blamed on `new`'s caller;
-- another value stays itself (level 0: Lua 5.1 and 5.2 would make a number
-- a string), and a table (which had no metatable: none crosses) gets a
-- `__tostring` that tells that message, for whoever prints it.
local function init_error(err, tb)
  local message = "bgworker.pool.new: init failed in a worker: " .. tostring(err) ..
    (tb and "\n" .. tostring(tb) or "")
  if type(err) == "string" then
    return message, 2
  elseif type(err) == "table" then
    setmetatable(err, { __tostring = function() return message end })
  end
  return err, 0
end

--- Make a pool.
-- @tparam[opt] table opts
--   `threads` (integer in 1..MAX_THREADS): how many worker threads; by
--   default as many as the system runs at once.
--   `init` (a function or "module.function", as a job's): runs once in each
--   worker before any job, to load modules or set globals. If it raises in
--   a worker, `new` raises that error and no thread is left behind: a
--   string error as a message with the worker's traceback; any other value
--   as itself (copied as a job's error value is), a table with a
--   `__tostring` that gives that message and traceback.
--   `init_timeout` (seconds, 30 by default): how long `new` waits for the
--   workers' `init`.
--   `jit` (boolean, LuaJIT only; true by default): LuaJIT's JIT compiler
--   in the workers, as every peer runs it. Compiled code runs no debug
--   hooks, so a cancel cannot stop a compiled loop: its worker is retired
--   and replaced (see `job:cancel`), and the loop burns a core until the
--   process exits. `jit = false` runs the interpreter, which every cancel
--   reaches.
-- @return the pool
function pool.new(opts)
  local msg
  opts, msg = args.options("bgworker.pool.new", 1, opts, OPTIONS)
  if not opts then error(msg, 2) end
  local threads = opts.threads or native.cpus
  -- LuaJIT: the JIT stays off in the workers unless asked for (see above).
  local jit_option
  if rawget(_G, "jit") then
    jit_option = opts.jit ~= false
  end
  local self = setmetatable({
    threads = floor(threads), closed = false,
    -- Live jobs by id, and events to handle (see run_backlog).
    jobs = {}, backlog = { head = 1, tail = 1, depth = 0, batch = 1, values = {} },
    -- Jobs not yet ended, and the dispatcher held for them (see hold_for).
    outstanding = 0, held = nil,
  }, Pool)
  -- The native pool calls back through a weak reference, so that a pool
  -- nobody references is collected (and closed).
  local ref = setmetatable({ self }, { __mode = "v" })
  local handle, err, tb = native.new {
    threads = floor(threads),
    path = package.path,
    cpath = package.cpath,
    init = opts.init,
    init_timeout = opts.init_timeout,
    jit = jit_option,
    on_events = function(events, n)
      local pool_ = ref[1]
      if pool_ then
        handle_events(pool_, events, n)
      end
    end,
  }
  if not handle then
    error(init_error(err, tb))
  end
  self.native = handle
  self.finaliser = cancel_on_collect(self.jobs)
  live[self] = true
  return self
end

-- Why no job can be queued now, if none can: for `submit` and `run`.
local function cannot_queue(self, fname)
  if self.closed then
    return fname .. ": the pool is closed"
  end
  if not running() then
    return select(2, dispatcher.current_for(fname))
  end
end

-- Why the native `queue` queued no job (it returned `nil, position,
-- message`): fn (`position` 0) or an argument (from 1, fn's first) that
-- cannot go to a worker, or, with `position` false, a pool this process
-- may not use (a fork's child). `...`: fn's arguments.
local function refusal(fname, position, message, ...)
  if not position then
    return fname .. ": " .. message
  end
  -- A last function is most likely meant as the callback: say how to give one.
  if position > 0 and position == select("#", ...) and type((select(position, ...))) == "function" then
    message = message .. "; give a callback with job:on_done"
  end
  return args.bad(fname, position + 1, message)
end

-- The job the native `queue` queued as `id`, listed.
local function add_job(self, id)
  local job = setmetatable({ self, id, "queued", false, false, false, false }, Job)
  self.jobs[id] = job
  local n = self.outstanding + 1
  self.outstanding = n
  if n == 1 then
    hold_for(self, dispatcher.current())
  end
  return job
end

--- Run `fn(...)` on a worker.
-- @param fn a Lua function (its upvalues are copied, as its arguments are:
--   see the topic @{jobs.md}), or a string "module.function"
-- @param ... fn's arguments, values that can cross (see the topic
--   @{jobs.md}); a function among them is refused like any value that
--   cannot cross. The job's callback is given with `job:on_done`.
-- @return the job
-- @usage pool:submit(fn, a, b):on_done(function(ok, ...) end)
function Pool:submit(fn, ...)
  -- The tests inline, the messages from functions: no call on the way of
  -- a job that is queued.
  if getmetatable(self) ~= Pool then error(check_pool(self, "submit"), 2) end
  if self.closed or not running() then error(cannot_queue(self, "submit"), 2) end
  local id, position, message = self.native:queue(fn, ...)
  if not id then error(refusal("submit", position, message, ...), 2) end
  return add_job(self, id)
end

--- Run `fn(...)` on a worker and wait for it: `submit` and `job:get()`.
-- @param fn as for `submit`
-- @param ... fn's arguments
-- @return as `pcall`: `true` and fn's results, or `false`, the error and a
-- traceback (`false, "cancelled"` for a job that was cancelled); or nil
-- and "stopped" when the dispatcher stopped first. For a timeout, use
-- `pool:submit(fn, ...):get(timeout)`.
function Pool:run(fn, ...)
  local msg = check_pool(self, "run")
  if msg then error(msg, 2) end
  local waiter, why = waiting.for_caller("run")
  if not waiter then error(why, 2) end
  local why_not = cannot_queue(self, "run")
  if why_not then error(why_not, 2) end
  local id, position, message = self.native:queue(fn, ...)
  if not id then error(refusal("run", position, message, ...), 2) end
  return wait_outcome(add_job(self, id), waiter)
end

--- Cancel the queued jobs, ask the running ones to stop, and wait at most
-- `timeout` seconds for the workers to end; workers that do not end by
-- then are left to finish on their own (their outcomes are dropped).
-- Every job not yet ended is cancelled: its callback gets `false,
-- "cancelled"`. Closing a closed pool does nothing. A pool that is garbage
-- collected, or whose Lua state closes, is closed the same way without
-- waiting.
-- @tparam[opt] number timeout seconds; `CLOSE_TIMEOUT` by default
-- @return true when every worker ended; false, "timeout" otherwise
function Pool:close(timeout)
  local msg = check_pool(self, "close") or args.seconds("close", 1, "timeout", timeout, true)
  if msg then error(msg, 2) end
  if self.closed then
    return true
  end
  self.closed = true
  local ok, err = self.native:close(timeout or pool.CLOSE_TIMEOUT)
  for _, job in pairs(self.jobs) do
    finish(job, "cancelled", CANCELLED)
  end
  return ok, err
end

-- Lua 5.4: `local p <close> = pool.new()`.
function Pool:__close()
  self:close()
end

--- Counters of the pool, consistent with each other at every moment:
-- `queued + running + done + failed + cancelled == submitted`.
-- @treturn table `threads` (those that serve: fewer than asked for when a
-- replacement's init failed, see @{jobs.md}), `abandoned` (workers retired
-- by a cancel they did not heed, still in that job's code, or given up in
-- their init), `submitted`, `queued`, `running` (taken by a worker,
-- outcome not yet received here), `done`, `failed`, `cancelled`;
-- `wait_mean`, `wait_max` (seconds a job waited in the queue) and
-- `run_mean`, `run_max` (seconds a job ran)
function Pool:stats()
  local msg = check_pool(self, "stats")
  if msg then error(msg, 2) end
  return self.native:stats()
end

-- ------------------------------------------------------------------------
-- Jobs

local function check_job(self, method)
  if getmetatable(self) ~= Job then
    return args.bad_self(method, "job expected, got " .. type(self) .. "; call it as job:" ..
      method .. "()")
  end
end

--- The job's state: "queued", "running", "done", "failed" or "cancelled".
-- A job is "done" or "failed" once its outcome reached this Lua state.
function Job:status()
  local msg = check_job(self, "status")
  if msg then error(msg, 2) end
  if ENDED[self[STATE]] then
    return self[STATE]
  end
  local native_status = self[POOL].native:status(self[ID])
  return native_status == "queued" and "queued" or "running"
end

--- Cancel the job: a queued job never runs; a running one is stopped (a Lua
-- loop within milliseconds, through a debug hook), and its outcome is
-- dropped. The callback gets `false, "cancelled"`, and waiting `get`s
-- return that, at once. A running job that has not stopped 0.25 s later
-- (`RETIRE_GRACE`: code the hook cannot reach, such as a call blocked in C
-- or a loop LuaJIT compiled) has its worker retired: a new worker takes its
-- place, so the pool has all its threads again, and the old one takes no
-- other job and ends when its code returns (`stats().abandoned` counts it
-- until then).
-- @treturn boolean true when the job will now never produce a result; false
-- when it had already ended (its outcome may still be on its way here: then
-- the callback and `get` see that outcome)
function Job:cancel()
  local msg = check_job(self, "cancel")
  if msg then error(msg, 2) end
  local p = self[POOL]
  local cancelled = not ENDED[self[STATE]] and p.native:cancel(self[ID])
  if not cancelled then
    -- Ended here, or its outcome is on its way: it comes as it is.
    return false
  end
  if cancelled == "running" then
    retire_if_stuck(p)
  end
  finish(self, "cancelled", CANCELLED)
  return true
end


--- Send a message to the job: values that the job takes, in the order
-- sent, with `require("bgworker.worker").receive()`. They are copied as
-- arguments are (a change in the worker is not seen here). A job that is
-- still queued gets them once it starts. Messages it has not taken when it
-- ends are dropped. At most `MESSAGES_QUEUED` (64) wait for a job at a
-- time: `send` never waits, it refuses more.
-- @param ... the values (a value that cannot be copied raises, naming it)
-- @treturn boolean true when queued for the job
-- @treturn[opt] string when not: `"ended"` (the job returned, failed or was
-- cancelled, or its pool closed: nothing will receive it) or `"full"`
function Job:send(...)
  local msg = check_job(self, "send")
  if msg then error(msg, 2) end
  if ENDED[self[STATE]] then
    return false, "ended"
  end
  local sent, why, message = self[POOL].native:send(self[ID], ...)
  if sent == nil then
    error(args.bad("send", why, message), 2)
  end
  return sent, why
end

--- Wait for the job's outcome (see `bgworker.await` for where a caller can
-- wait). Several callers may wait for one job, and `get` may be called
-- again after a timeout, or after the job ended.
-- @tparam[opt] number timeout seconds; by default no limit
-- @return `true` and the job's results; `false`, the error and a
-- traceback; `false, "cancelled"`; or, with the job still running, `nil,
-- "timeout"` or `nil, "stopped"` (the dispatcher stopped first)
function Job:get(timeout)
  local msg = check_job(self, "get") or args.seconds("get", 1, "timeout", timeout, true)
  if msg then error(msg, 2) end
  if ENDED[self[STATE]] then
    return wait_outcome(self)
  end
  local waiter, why = waiting.for_caller("get")
  if not waiter then error(why, 2) end
  return wait_outcome(self, waiter, timeout)
end

--- Call `callback` once, on this thread in the dispatcher's loop, with
-- what `get` returns once the job ended: `true, results...`, `false, err,
-- traceback` or `false, "cancelled"`. Given after the job ended, it runs at
-- the dispatcher's next drain, never inside `on_done` (while no dispatcher
-- runs, when the next one starts). A job has one callback: a second
-- `on_done` raises.
-- @tparam function callback
-- @return the job
-- @usage pool:submit(fn, a):on_done(function(ok, ...) end)
function Job:on_done(callback)
  if getmetatable(self) ~= Job or type(callback) ~= "function" then
    error(check_job(self, "on_done") or args.typed("on_done", 1, "callback", callback, "function"), 2)
  end
  if self[CALLBACK] then
    error("on_done: the job has its callback already (a job has one)", 2)
  end
  if ENDED[self[STATE]] then
    self[CALLBACK] = true
    local outcome = self[OUTCOME]
    call_later(callback, unpack(outcome, 1, outcome.n))
  else
    self[CALLBACK] = callback
  end
  return self
end

--- Call `fn(...)` on this thread for each `progress(...)` of the job, in
-- order, all before the job's callback and `get` return. Replaces the
-- handler set before; nil removes it.
-- @return the job
function Job:on_progress(fn)
  local msg = check_job(self, "on_progress") or args.typed("on_progress", 1, "handler", fn,
    "function", true)
  if msg then error(msg, 2) end
  self[PROGRESS] = fn or false
  return self
end

-- The pools of this state that are not closed, as a set: for
-- bgworker.busted, which closes those that a test made.
function pool.open_pools()
  local set = {}
  for p in pairs(live) do
    if not p.closed then
      set[p] = true
    end
  end
  return set
end

return pool

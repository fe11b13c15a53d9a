-- Waiters: how `bgworker.await`, `job:get`, `pool:run` and `dns.toip`
-- suspend their caller until a result comes (internal).
--
-- A waiter suspends its caller until `wake()` or a timeout. Each loop's
-- adapter gives a suspender for the caller's context (`d:suspender()`, see
-- bgworker.dispatcher): `suspend(left)` returns after `resume()` was
-- called, or (when the suspender has `timed`) after `left` seconds; it may
-- also return early. Its `done()`, if any, runs once the wait is over. The
-- waiter loops until its condition holds. Loops whose suspenders cannot
-- time out get a timer (`d:timer`) instead.
--
-- Invariants:
--   * Every wait ends: woken, timed out, or, when the dispatcher stops
--     (its `stop` resumes each waiter in `d.waiters`), with "stopped".
--   * Only the first `wake` of a waiter counts, whether it comes before
--     the wait or during it.

local dispatcher = require "bgworker.dispatcher"
local runner = require "bgworker.runner"

local setmetatable, tostring = setmetatable, tostring

local M = {}

local Waiter = {}
Waiter.__index = Waiter

-- A waiter of dispatcher `d` for the caller, or nil and why `d` cannot
-- suspend it here (a message for the public function to raise).
local function new(d)
  local suspender, msg = d:suspender()
  if not suspender then
    return nil, msg
  end
  local waiter = setmetatable({ dispatcher = d, woken = false, timed_out = false }, Waiter)
  waiter.resume = suspender.resume
  waiter.suspend = suspender.suspend
  waiter.timed = suspender.timed
  waiter.done = suspender.done
  return waiter
end

-- The running dispatcher's waiter for the caller, or nil and why the
-- caller cannot wait now (the message of an error for `fname` to raise).
function M.for_caller(fname)
  local d, none = dispatcher.current_for(fname)
  if not d then
    return nil, none
  end
  local waiter, why = new(d)
  if not waiter then
    return nil, fname .. ": " .. why
  end
  return waiter
end

-- Wait until `wake()` was called, or `timeout` seconds passed. Returns
-- true when woken; nil, "timeout"; or nil, "stopped" when the dispatcher
-- stopped first.
function Waiter:wait(timeout)
  local d = self.dispatcher
  if self.woken then
    return true
  end
  if d.stopped then
    return nil, "stopped"
  end
  local gettime = d.gettime
  local deadline = timeout and gettime() + timeout
  local timer
  if timeout and not self.timed then
    timer = d:timer(timeout, function()
      self.timed_out = true
      self.resume()
    end)
  end
  d.waiters[self] = true
  -- The loop stays alive for the wait (bgworker.dispatcher, "Keeping the
  -- loop alive"): what it waits for may come from a thread that does not
  -- keep it alive by itself.
  d:hold()
  while not (self.woken or self.timed_out or d.stopped) do
    local left
    if deadline then
      left = deadline - gettime()
      if left <= 0 then
        self.timed_out = true
        break
      end
    end
    self.suspend(left)
  end
  d.waiters[self] = nil
  d:unhold()
  if timer then
    timer:cancel()
  end
  if self.done then
    self.done()
  end
  if self.woken then
    return true
  elseif self.timed_out then
    return nil, "timeout"
  end
  return nil, "stopped"
end

-- End the wait (now, or before it starts). Only the first call counts.
function Waiter:wake()
  if not self.woken then
    self.woken = true
    self.resume()
  end
end

-- A suspender for coroutine `co` of a loop with no scheduler of its own
-- (select, luv), which dispatcher `d` resumes: `suspend` yields (WAIT from
-- a runner, which the drain then leaves to this wait: bgworker.runner),
-- `resume` resumes the coroutine at the next drain (at once once stopped),
-- and only if it is still suspended in this wait: a coroutine that
-- something else resumed meanwhile, and that now waits for something
-- else, is left alone.
function M.resuming_suspender(d, co)
  local waiting = false
  local mark = runner.owns(co) and runner.WAIT or nil
  local function resume_now()
    if waiting then
      local ok, err = coroutine.resume(co)
      if not ok then
        d:report(err, debug.traceback(co, tostring(err)))
      end
    end
  end
  return {
    suspend = function()
      waiting = true
      coroutine.yield(mark)
      waiting = false
    end,
    resume = function()
      if d.stopped then
        resume_now()
      else
        d:defer(resume_now)
      end
    end,
  }
end

return M

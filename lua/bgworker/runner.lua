-- Runners: the coroutines a dispatcher's drains run in, so that any
-- callback may wait (internal).
--
-- A drain runs in a runner, a coroutine of ours that bgworker.drain resumes
-- with one slice's work. Callbacks are called straight from it: a callback
-- that does not wait costs no coroutine switch. A callback that waits
-- (`job:get`, `copas.pause`, a Copas socket call, `cqueues.sleep`) yields,
-- and so suspends its runner. The runner is then *displaced*: it is left to
-- whoever ends the wait, and the drain goes on in a fresh runner, with the
-- other items and the other outcomes of the same batch. Once the waiting
-- callback returns, its runner takes no further work (its slice says it
-- was displaced: see bgworker.drain) and ends.
--
-- Who resumes a displaced runner depends on what its callback waits for:
--   * a waiter of bgworker.waiter's `resuming_suspender` (select, luv)
--     yields WAIT; the dispatcher resumes the runner itself, at a drain;
--   * anything else is a yield to the loop's scheduler, and the loop's
--     adapter takes the runner over (`adopt`: Copas enqueues it as one of
--     its threads, cqueues wraps it in a controller's coroutine);
--   * a loop without a scheduler of its own passes the yield through to
--     whoever resumed the drain, as a callback's yield always went, and
--     the runner is not displaced: a callback that yields to code outside
--     bgworker cannot be left to anyone else.
--
-- Invariants:
--   * A runner runs one slice at a time and is resumed by one owner at a
--     time: the drain until its first yield, then (displaced) the waiter or
--     the loop that it yielded to, never the drain again.
--   * Only finished runners are reused: a runner goes back to `idle` when
--     its body returned without a yield that displaced it.
--   * Every yield is either answered by whoever it went to or reported:
--     a yield that nothing can resume (no adapter takes it, and the drain
--     runs outside any coroutine) is an error for the error handler, not a
--     silent hang.

local protect = require "bgworker.protect"

local create, resume, yield, status = coroutine.create, coroutine.resume, coroutine.yield,
  coroutine.status
local traceback = debug.traceback
local pairs, setmetatable, tostring = pairs, setmetatable, tostring

local M = {}

-- What a waiter that the dispatcher resumes yields (see
-- bgworker.waiter's `resuming_suspender`).
M.WAIT = setmetatable({}, { __tostring = function() return "bgworker.runner.WAIT" end })

-- What a runner yields when its body returned in place: it is free again.
local FINISHED = {}

-- Runners that finished, for the next drain. A few suffice: one per drain
-- in progress at once (a callback that dispatches nests one).
local idle, nidle, MAX_IDLE = {}, 0, 4

-- Every runner, to tell them from other coroutines.
local runners = setmetatable({}, { __mode = "k" })

--- Is `co` a runner?
function M.owns(co)
  return runners[co] == true
end

--- Is a runner resuming another coroutine now (its status "normal")? Then
-- the running coroutine, if not a runner, is one that a callback made and
-- resumes itself.
function M.resuming()
  for co in pairs(runners) do
    if status(co) == "normal" then
      return true
    end
  end
  return false
end

-- A runner's body: `body(d, a, b)` returns true when it ran in place,
-- false when it was displaced. A displaced runner ends here, after telling
-- its loop (`retire_runner`: Copas 1.x must not see it end).
local function main(body, d, a, b)
  while body(d, a, b) do
    body, d, a, b = yield(FINISHED)
  end
  return d:retire_runner()
end

local after_resume

-- What to do with a runner's yield: FINISHED (free again), WAIT (left to
-- its waiter), one the adapter takes over, or one passed through.
-- Returns true when the body ran in place, false when it was displaced.
local function settle(d, co, ok, first, ...)
  if not ok then
    -- Only bgworker's own code runs unprotected in a runner.
    d:report(first, traceback(co, tostring(first)))
    return true
  end
  if first == FINISHED then
    if nidle < MAX_IDLE then
      nidle = nidle + 1
      idle[nidle] = co
    end
    return true
  end
  if status(co) == "dead" then
    return true
  end
  if first == M.WAIT or d:adopt(co, first, ...) then
    return false
  end
  if protect.running() == nil then
    d:report("bgworker: a callback yielded (" .. tostring(first) .. "), but nothing here" ..
      " resumes it: wait with job:get, bgworker.await or your loop's own calls")
    return false
  end
  -- Pass the yield to whoever resumed the drain, and its answer back.
  return after_resume(d, co, yield(first, ...))
end

function after_resume(d, co, ...)
  return settle(d, co, resume(co, ...))
end

--- Run `body(d, a, b)` in a runner. Returns true when it ran in place
-- (to its end, in this call), false when a callback suspended the runner
-- and left it to its waiter or its loop: then `body` must see, once
-- resumed, that it was displaced, and return false.
function M.run(d, body, a, b)
  local co
  if nidle > 0 then
    co = idle[nidle]
    idle[nidle] = nil
    nidle = nidle - 1
  else
    co = create(main)
    runners[co] = true
  end
  return settle(d, co, resume(co, body, d, a, b))
end

return M

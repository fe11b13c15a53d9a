-- The loop adapter interface (internal): the loops bgworker knows, what
-- each one's adapter supplies, and the check of it.
--
-- A loop is a module `bgworker.<name>` whose field `class` is its adapter:
-- a class made by `bgworker.dispatcher.class(name, options)` (the base's
-- methods, and the options the loop takes beyond the common ones) with the
-- fields below. Adding a loop is writing its module and adding its name to
-- LOOPS: `bgworker.new { loop = name }` and `bgworker.<name>` find it
-- there, and `load(name)` checks its adapter when it first loads it.
--
-- The adapter's fields (the loop's own, or the base's default):
--   start(self, opts)   Required. Start the core with a wake-up signal the
--                       loop can wait on (bgworker.signal, or one of the
--                       core's own modes) and the loop's side of it, which
--                       drains (`self:drain`, `self:drain_and_rewake`: see
--                       bgworker.drain) when the signal is up. `opts` are
--                       the checked options. Returns true, or nil and a
--                       message, with the core left stopped.
--   suspender(self)     Required. How the caller is suspended in this loop
--                       (see bgworker.waiter), or nil and why it cannot wait
--                       here, for the waiting function's error.
--   gettime()           The loop's clock, in seconds, for the deadlines of
--                       waits. Default: the core's monotonic clock.
--   timer(self, seconds, fn)  Call `fn()` after `seconds`, in protected mode
--                       (`call_reporting`); returns a timer with `cancel()`.
--                       Default: bgworker.timers, whose deadlines raise the
--                       signal through the core's alarm and run at drains.
--   default_errorhandler(err, tb)  Used without `opts.errorhandler`.
--                       Default: the base's (stderr).
--   before_stop(self, owned), after_stop(self)  Around `core.stop()` in
--                       `stop` (`owned`: the dispatcher still owns the
--                       core's run): let go of the signal. Default: nothing.
--   before_dispatch(self)  Before the drain of `dispatch`. Default: nothing.
--   run_in_runner(self, body, slice)  Run the drain's `body(self, slice)`
--                       in a runner; true when it ran in place, false when
--                       a callback that waits displaced the runner.
--                       Default: bgworker.runner's coroutines.
--   adopt(self, co, ...)  A callback in runner `co` (bgworker.runner) yielded
--                       `...` to the loop's scheduler: make the scheduler
--                       resume `co` as one of its own, and return true; or
--                       false, and the yield passes through to whoever
--                       resumed the drain. Default: false.
--   retire_runner(self)  Runs last in a displaced runner, once its callback
--                       returned. Default: nothing (the runner ends).
--   keep_alive(self, alive)  Whether the dispatcher keeps the loop alive
--                       now (see bgworker.dispatcher, "Keeping the loop
--                       alive"), for loops that end when their work is
--                       done. Called for each change, also inside a drain:
--                       a loop that learns it in its drain's own callbacks
--                       may wait for the drain's end, and call
--                       `check_alive()` then. Default: nothing (a loop
--                       that never ends by itself).
-- A loop may also override public methods (`dispatch`) and add its own.
--
-- Invariant: every loop of LOOPS has an adapter with all the fields of
-- FIELDS, checked once, when `load` first loads it.

local error, pairs, require, setmetatable, type = error, pairs, require, setmetatable, type

local M = {}

-- The loops, in the order `opts.loop`'s message lists them.
M.LOOPS = { "select", "copas", "luv", "cqueues", "ngx" }

-- The adapter's fields: true where the loop must supply it, false where
-- the base has a default.
M.FIELDS = {
  start = true,
  suspender = true,
  gettime = false,
  timer = false,
  default_errorhandler = false,
  before_stop = false,
  after_stop = false,
  before_dispatch = false,
  run_in_runner = false,
  adopt = false,
  retire_runner = false,
  keep_alive = false,
}

-- Every class the base made, to tell dispatchers apart from other tables.
local classes = setmetatable({}, { __mode = "k" })

-- Count `class` as made by the base's `class` (which calls this).
function M.made(class)
  classes[class] = true
end

-- Was `class` made by the base's `class`?
function M.is_class(class)
  return classes[class] == true
end

-- Nothing, or what is wrong with `class` as the adapter of loop `name`.
function M.check(class, name)
  if not classes[class] or class.loop_name ~= name then
    return ("loop %q: its module's `class` is not a class made by class(%q)"):format(name, name)
  end
  for field in pairs(M.FIELDS) do
    if type(class[field]) ~= "function" then
      return ("loop %q: its adapter has no function %s"):format(name, field)
    end
  end
end

-- The adapters checked so far.
local checked = setmetatable({}, { __mode = "k" })

-- The class of loop `name` (one of LOOPS), from its module (loaded on first
-- use); its adapter is checked the first time.
function M.load(name)
  local class = require("bgworker." .. name).class
  if not checked[class] then
    local msg = M.check(class, name)
    if msg then error("bgworker: " .. msg, 2) end
    checked[class] = true
  end
  return class
end

return M

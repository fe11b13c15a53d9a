--- Draining the queue: the part every dispatcher shares.
--
-- A dispatcher, whatever it waits on (a UDP socket, an eventfd in a luv
-- loop, a cqueues controller), does the same once it is woken: take items
-- with `core.poll()` until the queue is empty or its budget is spent, call
-- each callback in protected mode, hand each error to its error handler,
-- and, if the budget ran out first, make sure it is woken again.
--
-- The functions here work on a *dispatcher table* with these fields:
--
--   * `call`: a protected caller, `call(f, ...) -> true, ... | false, err, tb`
--     (`bgworker.protect.call`, or one made by `protect.coxpcall`);
--   * `errorhandler`: called as `errorhandler(err, traceback)`;
--   * `stopped`: set to true by the dispatcher's `stop`; a drain ends after
--     the item during which it became true.
--
-- `drain.init(self, fname, opts, known)` fills them in from the usual options.
--
-- @module bgworker.drain

local core = require "bgworker.core"
local protect = require "bgworker.protect"

local poll, wake = core.poll, core.wake
local error, getmetatable, ipairs, pairs, pcall, tostring, type = error, getmetatable, ipairs,
  pairs, pcall, tostring, type
local floor, huge = math.floor, math.huge

local drain = {}

--- Items a dispatcher handles before it lets others run, by default.
drain.DEFAULT_BUDGET = 1000

--- The error handler used when `opts.errorhandler` is not given: it writes
-- the traceback (which starts with the message) to stderr.
-- @param err the error value
-- @param tb a traceback string, or nil
function drain.default_errorhandler(err, tb)
  io.stderr:write("bgworker: ", tb or tostring(err), "\n")
end

--- Hand one error to the dispatcher's error handler. An error handler that
-- raises is reported, with the original error, by the default handler.
-- @param self a dispatcher table
-- @param err the error value
-- @param tb a traceback string, or nil
function drain.report(self, err, tb)
  local ok, herr = pcall(self.errorhandler, err, tb)
  if not ok then
    drain.default_errorhandler("error in errorhandler: " .. tostring(herr))
    drain.default_errorhandler(err, tb)
  end
end

-- Hot path: no tables, no closures, and one protected call per batch rather
-- than per item; after an error, a new batch goes on where the failed one
-- stopped.

-- The default way to handle an item: call its callback with its arguments.
-- `poll` returned nothing when `f` is nil: the queue is empty.
local function call_item(_, f, ...)
  if f == nil then
    return false
  end
  f(...)
  return true
end

-- Handle items until the queue is empty or self.count reaches limit. Counts
-- each item in self.count before handling it, so an item that raised counts
-- too. Returns true when the queue was found empty (or the dispatcher
-- stopped): then no wake-up is owed.
local function batch(self, limit, handle)
  local n = self.count
  while n < limit do
    n = n + 1
    self.count = n
    if not handle(self, poll()) then
      self.count = n - 1
      return true
    end
    if self.stopped then
      return true
    end
  end
  return false
end

--- Handle up to `limit` items, in batches under `self.call`, and report
-- errors (a callback's, or a failed decode's) to the error handler.
-- @param self a dispatcher table
-- @tparam int limit the most items to handle
-- @tparam[opt] function handle `handle(self, f, ...)` handles one item
-- (`f` nil: the queue is empty; return false then, true otherwise); by
-- default it calls `f(...)`
-- @treturn int the number of items handled (errors included)
-- @treturn boolean `true` when the drain ended with an empty poll (or a
-- stop), so no wake-up is owed; `false` when `limit` ran out first
function drain.run(self, limit, handle)
  handle = handle or call_item
  -- Saved and restored, for a callback that dispatches.
  local saved = self.count
  self.count = 0
  local empty
  repeat
    local ok, res, tb = self.call(batch, self, limit, handle)
    if ok then
      empty = res
    else
      drain.report(self, res, tb)
      if self.stopped then
        empty = true
      elseif self.count >= limit then
        empty = false
      end
    end
  until empty ~= nil
  local n = self.count
  self.count = saved
  return n, empty
end

--- `run`, then, if `limit` ran out before the queue was empty, `core.wake()`:
-- the instance stays armed, so no deliver would signal again, and the wake
-- keeps the signal up (a datagram, or a readable descriptor) so that the
-- dispatcher's loop comes back for the rest after the others had a turn.
-- @param self a dispatcher table
-- @tparam int limit the most items to handle
-- @tparam[opt] function handle as for `run`
-- @treturn int the number of items handled
-- @treturn boolean whether the queue was found empty (or the dispatcher
-- stopped)
function drain.batch(self, limit, handle)
  local n, empty = drain.run(self, limit, handle)
  if not empty and not self.stopped and core.running() then
    wake()
  end
  return n, empty
end

--------------------------------------------------------------------------
-- Options

local function argerror(level, fname, msg)
  error(("bad argument #1 to '%s' (%s)"):format(fname, msg), level + 1)
end

--- Is `v` an integer >= 1?
function drain.is_count(v)
  return type(v) == "number" and v >= 1 and v < huge and v == floor(v)
end

--- Check an options table and fill in a dispatcher table from it: `budget`,
-- `errorhandler`, `call`, `count` and `stopped`. Raises an argument error
-- naming `fname` for an unknown option or a bad value.
-- @param self the dispatcher table to fill in
-- @tparam string fname the public function's name, for messages
-- @param opts the caller's options (a table or nil)
-- @tparam table known the accepted option names as keys; `capacity`,
-- `budget`, `errorhandler` and `kind` are checked here, others by the caller
-- @tparam[opt=2] int level the stack level to blame, as `error` counts it
-- in the caller of init (2: the caller's caller)
-- @treturn table `opts`, or an empty table when it was nil
function drain.init(self, fname, opts, known, level)
  level = (level or 2) + 1
  if opts == nil then
    opts = {}
  elseif type(opts) ~= "table" then
    argerror(level, fname, "options table expected, got " .. type(opts))
  end
  for k in pairs(opts) do
    if not known[k] then
      argerror(level, fname, "unknown option '" .. tostring(k) .. "'")
    end
  end
  for _, name in ipairs { "capacity", "budget" } do
    if opts[name] ~= nil and not drain.is_count(opts[name]) then
      argerror(level, fname, ("opts.%s must be a positive integer, got %s"):format(name,
        tostring(opts[name])))
    end
  end
  local kind = opts.kind
  if kind ~= nil and kind ~= "eventfd" and kind ~= "pipe" then
    argerror(level, fname, 'opts.kind must be "eventfd" or "pipe", got ' .. tostring(kind))
  end
  if opts.errorhandler ~= nil and type(opts.errorhandler) ~= "function" then
    argerror(level, fname, "opts.errorhandler must be a function, got " ..
      tostring(opts.errorhandler))
  end
  self.budget = opts.budget or drain.DEFAULT_BUDGET
  self.errorhandler = opts.errorhandler or drain.default_errorhandler
  self.call = protect.call
  self.count = 0
  self.stopped = false
  return opts
end

--------------------------------------------------------------------------
-- Descriptor dispatchers (bgworker.luv, bgworker.cqueues)

--- The options of the dispatchers that wait on a descriptor.
drain.FD_OPTIONS = { capacity = true, budget = true, errorhandler = true, kind = true }

--- Start the core with `core.start_fd` for options already checked (by
-- `init`), and set `self.fd`, the descriptor to wait on.
-- @param self the dispatcher table
-- @tparam string fname the public function's name, for messages
-- @tparam table opts the checked options: `capacity` and `kind` are used
-- @tparam[opt=2] int level the stack level to blame, as `error` counts it in
-- the caller of open_fd (2: the caller's caller)
function drain.open_fd(self, fname, opts, level)
  level = (level or 2) + 1
  if core.running() then
    error(fname .. ": bgworker.core is already started in this Lua state;" ..
      " stop its dispatcher first", level)
  end
  local ok, fd = pcall(core.start_fd, {
    capacity = opts.capacity and floor(opts.capacity) or nil,
    kind = opts.kind,
  })
  if not ok then
    error(fname .. ": cannot start: " .. tostring(fd), level)
  end
  self.fd = fd
end

--- Check `opts` against `FD_OPTIONS`, fill in `self` (as `init` does) and
-- start the core with `open_fd`.
-- @param self the dispatcher table to fill in
-- @tparam string fname the public function's name, for messages
-- @param opts the caller's options (see `init`), or nil
-- @treturn table the options (never nil)
function drain.start_fd(self, fname, opts)
  -- Errors blame the caller of start_fd's caller (bgworker.luv.start, ...).
  opts = drain.init(self, fname, opts, drain.FD_OPTIONS, 3)
  drain.open_fd(self, fname, opts, 3)
  return opts
end

--- The class of a descriptor dispatcher, with the methods `dispatch` and
-- `stop` that bgworker.luv and bgworker.cqueues share:
--
--   * `d:dispatch([max])` runs the callbacks of waiting items now, without
--     waiting: at most `max` (default: the budget); if `max` runs out first
--     the descriptor stays readable, so the rest is not forgotten. Returns
--     the number of items handled (callbacks run, including those that
--     raised, and items whose decode failed).
--   * `d:stop()` calls `forget(d)`, so that the loop lets go of the
--     descriptor, then stops the core, which closes it, refuses further
--     items and frees the pending ones without running them. Safe inside a
--     callback; stopping a stopped dispatcher does nothing. Returns the
--     number of pending items cancelled.
--
-- @tparam string what the loop's name, for messages ("luv dispatcher
-- expected")
-- @tparam function forget `forget(d)`, run once by the first `stop`
-- @treturn table the class: the metatable of the dispatchers, and their
-- `__index`, to which the module adds its own methods
-- @treturn function `check_self(self, method)`, for those methods: an
-- argument error blaming the method's caller when `self` is not one of
-- these dispatchers
function drain.fd_class(what, forget)
  local Dispatcher = {}
  Dispatcher.__index = Dispatcher

  local function check_self(self, method)
    if getmetatable(self) ~= Dispatcher then
      error(("bad argument #1 to '%s' (%s dispatcher expected, got %s; call it as" ..
        " dispatcher:%s())"):format(method, what, type(self), method), 3)
    end
  end

  function Dispatcher:dispatch(limit)
    check_self(self, "dispatch")
    if limit ~= nil and not drain.is_count(limit) then
      error("bad argument #2 to 'dispatch' (max must be a positive integer, got " ..
        tostring(limit) .. ")", 2)
    end
    if self.stopped then
      return 0
    end
    return (drain.batch(self, limit or self.budget))
  end

  function Dispatcher:stop()
    check_self(self, "stop")
    if self.stopped then
      return 0
    end
    self.stopped = true
    -- The descriptor is closed by core.stop(): the loop must forget it first.
    forget(self)
    if core.running() and core.fd() == self.fd then
      return core.stop()
    end
    return 0
  end

  return Dispatcher, check_self
end

return drain

-- Argument checks shared by bgworker's public functions (internal).
--
-- Every check returns nothing when the value is good, or the message of a
-- "bad argument" error naming the public function and the argument. Only
-- the public function raises it, at level 2, so the error points at the
-- line of the program that called it, whatever module the check lives in:
--
--     local msg = args.count("dispatch", 1, "max", max, true)
--     if msg then error(msg, 2) end
--
-- A method counts its arguments as its caller writes them, without self, as
-- Lua's own methods do: `job:get(-1)` has a bad argument #1, and a bad self
-- (`job.get(-1)`) is `bad_self`'s "calling 'get' on bad self (...)".

local floor, huge = math.floor, math.huge
local pairs, tostring, type = pairs, tostring, type

local args = {}

--- "bad argument #n to 'fname' (msg)".
function args.bad(fname, n, msg)
  return ("bad argument #%d to '%s' (%s)"):format(n, fname, msg)
end

--- "calling 'method' on bad self (msg)", Lua's words for a method called
-- on something else than its object (`job.get()` for `job:get()`).
function args.bad_self(method, msg)
  return ("calling '%s' on bad self (%s)"):format(method, msg)
end

--- What was passed, for "got ...": numbers, booleans and (quoted) strings
-- by value, anything else by type.
function args.describe(v)
  local t = type(v)
  if t == "string" then
    return ("%q"):format(v)
  elseif t == "number" or t == "boolean" then
    return tostring(v)
  end
  return t
end

--- Is `v` an integer >= 1?
function args.is_count(v)
  return type(v) == "number" and v >= 1 and v < huge and v == floor(v)
end

--- A positive integer (or nil when `optional`).
function args.count(fname, n, name, v, optional)
  if (v == nil and optional) or args.is_count(v) then
    return nil
  end
  return args.bad(fname, n, name .. " must be a positive integer, got " .. args.describe(v))
end

--- A number of seconds >= 0 (or nil when `optional`).
function args.seconds(fname, n, name, v, optional)
  if (v == nil and optional) or (type(v) == "number" and v >= 0 and v == v) then
    return nil
  end
  return args.bad(fname, n, name .. " must be a non-negative number of seconds, got " ..
    args.describe(v))
end

--- A value of Lua type `t` (or nil when `optional`).
function args.typed(fname, n, name, v, t, optional)
  if (v == nil and optional) or type(v) == t then
    return nil
  end
  return args.bad(fname, n, ("%s must be a %s, got %s"):format(name, t, args.describe(v)))
end

--- Check an options table (argument #n of fname) against `spec`, a table
-- from option name to a check `check(fname, n, "opts.name", value)` that
-- returns a message or nothing. Returns the options (an empty table for
-- nil), or nil and a message.
function args.options(fname, n, opts, spec)
  if opts == nil then
    return {}
  elseif type(opts) ~= "table" then
    return nil, args.bad(fname, n, "options table expected, got " .. type(opts))
  end
  for k, v in pairs(opts) do
    local check = spec[k]
    if not check then
      return nil, args.bad(fname, n, "unknown option '" .. tostring(k) .. "'")
    end
    local msg = check(fname, n, "opts." .. tostring(k), v)
    if msg then
      return nil, msg
    end
  end
  return opts
end

--- Option checks, for `options` specs.
args.option = {}

function args.option.count(fname, n, name, v)
  return args.count(fname, n, name, v, true)
end

function args.option.seconds(fname, n, name, v)
  return args.seconds(fname, n, name, v, true)
end

function args.option.boolean(fname, n, name, v)
  return args.typed(fname, n, name, v, "boolean", true)
end

function args.option.string(fname, n, name, v)
  return args.typed(fname, n, name, v, "string", true)
end

function args.option.func(fname, n, name, v)
  return args.typed(fname, n, name, v, "function", true)
end

--- A check that accepts one of `values` (strings), or nil.
function args.option.one_of(values)
  local text = '"' .. table.concat(values, '", "') .. '"'
  local set = {}
  for _, v in ipairs(values) do
    set[v] = true
  end
  return function(fname, n, name, v)
    if v ~= nil and not set[v] then
      return args.bad(fname, n, ("%s must be one of %s, got %s"):format(name, text, args.describe(v)))
    end
  end
end

--- A check that accepts anything (the caller checks it).
function args.option.any()
end

return args

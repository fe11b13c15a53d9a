--- Name resolution off the Lua thread.
--
-- Names are resolved with the system's `getaddrinfo` (so `/etc/hosts`, DNS,
-- and whatever else the system is set up for) on background threads of
-- `bgworker.dns_native`, and the answers come back through the running
-- dispatcher (see `bgworker.new`), in any loop.
--
--     local dns = require "bgworker.dns"
--     dns.resolve("example.org", function(addresses, name_or_err) ... end)
--     -- LuaSocket's conventions, waiting only in the caller (a Copas thread,
--     -- a coroutine, an OpenResty request; or blocking in a select loop):
--     local ip, resolved = dns.toip("example.org", 2)
--
-- A lookup that timed out is cancelled: its thread never calls back, and
-- one that has not started yet never runs. At most 16 lookups run at once,
-- the others wait for a thread; a lookup given up on (timed out) no longer
-- counts, also while its thread is still waiting for a resolver that does
-- not answer, so it never holds up later lookups. Each Lua state has at
-- most 64 lookup threads, those still finishing lookups given up on
-- included: past that, lookups wait until one of them ends.
--
-- @module bgworker.dns

local args = require "bgworker.args"
local core = require "bgworker.core"
local dispatcher = require "bgworker.dispatcher"
local native = require "bgworker.dns_native"
local waiting = require "bgworker.waiter"

local error, select = error, select

local dns = {}

-- Nothing, or why `host` cannot be looked up.
local function check_host(fname, host)
  local msg = args.typed(fname, 1, "host", host, "string")
  if msg then
    return msg
  end
  if host:find("\0", 1, true) then
    return args.bad(fname, 1, "host name contains a NUL byte")
  end
end

-- Look `host` up and call `callback(addresses, name)` or
-- `callback(nil, message)` once; after `timeout` seconds (if given),
-- `callback(nil, "timeout")` and the lookup is cancelled. Returns a
-- function that gives up the lookup without a callback, or nil and the
-- message of an error for `fname` to raise.
local function lookup(fname, host, callback, timeout)
  -- Without a dispatcher the answer would never be delivered.
  local d, why = dispatcher.current_for(fname)
  if not d then
    return nil, why
  end
  local token = core.token()
  local timer
  -- The first of the answer, the timeout and giving up ends the lookup:
  -- each cancels the token to win. The answer with token:cancel(), its
  -- lookup being over; the others with native.cancel, which gives its
  -- place to the lookups waiting for a thread, while its own may stay in
  -- getaddrinfo for long.
  local function ends(cancel)
    if cancel(token) then
      if timer then
        timer:cancel()
      end
      d:unhold()
      return true
    end
    return false
  end
  if timeout then
    timer = d:timer(timeout, function()
      if ends(native.cancel) then
        callback(nil, "timeout")
      end
    end)
  end
  native.resolve(host, function(...)
    if ends(token.cancel) then
      callback(...)
    end
  end, token)
  -- The dispatcher keeps its loop alive until the lookup ends (see
  -- bgworker.dispatcher, "Keeping the loop alive"): once it began (the
  -- answer comes in a drain, after this).
  d:hold()
  return function()
    ends(native.cancel)
  end
end

--- Resolve a name in the background.
-- @tparam string host a host name, or a numeric IPv4 or IPv6 address
-- @tparam function callback called by the dispatcher as
-- `callback(addresses, name)`: a list of address strings (IPv4 ones first,
-- then IPv6, each once) and the canonical name; or `callback(nil, err)`
-- with LuaSocket's message ("host not found" for a name that does not
-- resolve), or "timeout"
-- @tparam[opt] number timeout seconds; by default no limit
function dns.resolve(host, callback, timeout)
  local msg = check_host("resolve", host) or
    args.typed("resolve", 2, "callback", callback, "function") or
    args.seconds("resolve", 3, "timeout", timeout, true)
  if not msg then
    msg = select(2, lookup("bgworker.dns.resolve", host, callback, timeout))
  end
  if msg then error(msg, 2) end
end

--- LuaSocket's `socket.dns.toip`, without blocking the loop: only the caller
-- waits (see `bgworker.await` for where it can wait).
--
-- Unlike LuaSocket's, it also reports IPv6 addresses, after the IPv4 ones;
-- `alias` is always empty (`getaddrinfo` reports no aliases), and a numeric
-- address is not looked up in reverse: its `name` is the address itself.
-- @tparam string host a host name, or a numeric IPv4 or IPv6 address
-- @tparam[opt] number timeout seconds; by default no limit
-- @return the first address, and `{name = ..., alias = {}, ip = {...}}`;
-- or nil and an error message ("timeout" when the time ran out, "stopped"
-- when the dispatcher stopped first)
function dns.toip(host, timeout)
  local msg = check_host("toip", host) or args.seconds("toip", 2, "timeout", timeout, true)
  if msg then error(msg, 2) end
  local waiter, why = waiting.for_caller("bgworker.dns.toip")
  if not waiter then error(why, 2) end
  local addresses, name
  local give_up, err = lookup("bgworker.dns.toip", host, function(a, n)
    addresses, name = a, n
    waiter:wake()
  end)
  if not give_up then error(err, 2) end
  local ok, reason = waiter:wait(timeout)
  if not ok then
    give_up()
    return nil, reason
  end
  if not addresses then
    return nil, name
  end
  return addresses[1], { name = name, alias = {}, ip = addresses }
end

return dns

--- Name resolution off the Lua thread.
--
-- Names are resolved with the system's `getaddrinfo` (so `/etc/hosts`, DNS,
-- and whatever else the system is set up for) on background threads of
-- `bgworker.dns_native`, and the answers come back through bgworker: a
-- dispatcher (`bgworker.new()` or `bgworker.copas()`) must be running.
--
--     local dns = require "bgworker.dns"
--     dns.resolve("example.org", function(addresses, name_or_err) ... end)
--     -- in a Copas thread, LuaSocket's conventions; only this thread waits:
--     local ip, resolved = dns.toip("example.org")
--
-- @module bgworker.dns

local core = require "bgworker.core"
local native = require "bgworker.dns_native"
local await = require "bgworker.await"

local error, type = error, type

local dns = {}

-- `level` as for error(), counted from the function that calls check.
local function check_host(fname, host, level)
  if type(host) ~= "string" then
    error(("bad argument #1 to '%s' (string expected, got %s)"):format(fname, type(host)), level + 1)
  end
  if host:find("\0", 1, true) then
    error(("bad argument #1 to '%s' (host name contains a NUL byte)"):format(fname), level + 1)
  end
  if not core.running() then
    -- Without a dispatcher the answer would never be delivered.
    error(("bgworker.dns.%s: no bgworker dispatcher is running;"):format(fname) ..
      " start one with bgworker.new() or bgworker.copas()", level + 1)
  end
end

--- Resolve a name in the background.
-- @tparam string host a host name, or a numeric IPv4 or IPv6 address
-- @tparam function callback called by the dispatcher as
-- `callback(addresses, name)`: a list of address strings (IPv4 ones first,
-- then IPv6, each once) and the canonical name; or `callback(nil, err)`
-- with LuaSocket's message ("host not found" for a name that does not
-- resolve)
function dns.resolve(host, callback)
  check_host("resolve", host, 2)
  if type(callback) ~= "function" then
    error("bad argument #2 to 'resolve' (function expected, got " .. type(callback) .. ")", 2)
  end
  native.resolve(host, callback)
end

--- LuaSocket's `socket.dns.toip`, without blocking the loop: in a Copas
-- thread only that thread waits (see `bgworker.await`). Outside one, pass
-- the dispatcher of a `bgworker.new()` to wait with.
--
-- Unlike LuaSocket's, it also reports IPv6 addresses, after the IPv4 ones;
-- `alias` is always empty (`getaddrinfo` reports no aliases), and a numeric
-- address is not looked up in reverse: its `name` is the address itself.
-- @tparam string host a host name, or a numeric IPv4 or IPv6 address
-- @param[opt] dispatcher a `bgworker.new()` dispatcher, for waiting outside
-- a Copas thread
-- @return the first address, and `{name = ..., alias = {}, ip = {...}}`;
-- or nil and an error message
function dns.toip(host, dispatcher)
  check_host("toip", host, 2)
  local addresses, name = await(function(callback)
    native.resolve(host, callback)
  end, dispatcher)
  if not addresses then
    return nil, name
  end
  return addresses[1], { name = name, alias = {}, ip = addresses }
end

return dns

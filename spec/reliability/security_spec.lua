-- Loopback only: the wake sockets are bound to 127.0.0.1, as the kernel
-- sees them (/proc/net/udp), and connected, so that nobody else's datagram
-- reaches the reader. (Foreign datagrams of every size, from another port
-- and from another loopback address, are in input_spec.lua.)

local bgworker = require "bgworker"
local core = require "bgworker.core"
local socket = require "socket"
local support = require "support"

local LOOPBACK = "0100007F" -- 127.0.0.1 as /proc/net/udp writes it

-- The entries of /proc/net/udp (or udp6) whose local port is `port`.
local function sockets_on(port, file)
  local found = {}
  for line in io.lines(file or "/proc/net/udp") do
    local lip, lport, rip, rport = line:match("^%s*%d+:%s+(%x+):(%x+)%s+(%x+):(%x+)")
    if lip and tonumber(lport, 16) == port then
      found[#found + 1] = { ip = lip, remote_ip = rip, remote_port = tonumber(rport, 16) }
    end
  end
  return found
end

local function assert_bound(port, remote_port)
  local found = sockets_on(port)
  assert.equal(1, #found, "UDP sockets on port " .. port)
  assert.equal(LOOPBACK, found[1].ip, "bound to 127.0.0.1")
  if remote_port then
    assert.same({ LOOPBACK, remote_port }, { found[1].remote_ip, found[1].remote_port }, "connected")
  else
    assert.equal(0, found[1].remote_port, "not connected")
  end
  local v6 = io.open("/proc/net/udp6")
  if v6 then
    v6:close()
    assert.same({}, sockets_on(port, "/proc/net/udp6"), "an IPv6 socket on port " .. port)
  end
end

local function has_ss()
  local p = io.popen("command -v ss 2>/dev/null")
  local path = p:read("*l")
  p:close()
  return path ~= nil and path ~= ""
end

describe("security", function()
  if not io.open("/proc/net/udp") then
    pending("needs /proc/net/udp (Linux)")
    return
  end

  after_each(support.stop_core)

  it("binds a dispatcher's sockets to 127.0.0.1 and connects them to each other", function()
    local d = bgworker.new()
    local host, sender_port = core.sender()
    local _, reader_port = d.socket:getsockname()
    reader_port = tonumber(reader_port)
    assert.equal("127.0.0.1", host)
    assert_bound(sender_port, reader_port)
    assert_bound(reader_port, sender_port)
    if has_ss() then
      local p = io.popen("ss -uan 2>/dev/null")
      local listing = p:read("*a")
      p:close()
      assert.matches("127%.0%.0%.1:" .. sender_port .. "%s+127%.0%.0%.1:" .. reader_port, listing)
    end
    d:stop()
    assert.same({}, sockets_on(sender_port), "the sender outlived stop()")
  end)

  it("binds the greeting socket to 127.0.0.1 and connects it to the greeter with the token only", function()
    local host, port, token = core.start_greeting()
    assert.equal("127.0.0.1", host)
    assert_bound(port)
    local stranger, stranger_port = support.udp_socket()
    local greeter, greeter_port = support.udp_socket()
    assert(stranger:sendto("not the token", host, port))
    assert(stranger:sendto(token .. "x", host, port))
    socket.sleep(0.02)
    assert.is_false(core.greeted())
    assert_bound(port)
    assert(greeter:sendto(token, host, port))
    assert.is_true(support.eventually(core.greeted, 5))
    assert_bound(port, greeter_port)
    assert.are_not.equal(stranger_port, greeter_port)
    core.stop()
    stranger:close()
    greeter:close()
  end)
end)

-- Wake-up signals: how the core tells a loop that items are waiting
-- (internal). Each loop's adapter starts the core with one of these in its
-- `start` (see bgworker.dispatcher), or with one of the core's own modes
-- (the OpenResty reader greets the core instead, docs/core.md).
--
-- Invariants:
--   * Only the core's sender reaches a wake-up socket: it is bound to
--     127.0.0.1 and connected back to the sender, so the kernel drops
--     anyone else's datagrams.
--   * A start that fails leaves the core stopped and nothing open.

local core = require "bgworker.core"

local pcall, require, tonumber = pcall, require, tonumber
local floor = math.floor

local M = {}

-- The core's capacity option, from the checked options.
local function capacity(opts)
  return opts.capacity and { capacity = floor(opts.capacity) } or nil
end

-- Start the core with wake-up datagrams to a new UDP socket on 127.0.0.1,
-- connected back to the core's sender so that nobody else's datagrams reach
-- it. Returns the socket, or nil and a message.
function M.start_udp(opts)
  local socket = require "socket"
  local sock, err = (socket.udp4 or socket.udp)()
  if not sock then
    return nil, err
  end
  sock:settimeout(0)
  local ok
  ok, err = sock:setsockname("127.0.0.1", 0)
  if ok then
    local _, port = sock:getsockname()
    ok, err = pcall(core.start, tonumber(port), capacity(opts))
    if ok then
      ok, err = sock:setpeername(core.sender())
      if not ok then
        core.stop()
      end
    end
  end
  if not ok then
    sock:close()
    return nil, err
  end
  return sock
end

-- Read every wake-up datagram waiting on `sock`, without blocking: they
-- carry no information. (LuaSocket 3.0's receive on a closed UDP socket
-- returns "": stop there.)
function M.discard_datagrams(sock)
  while sock:receive(16) and sock:getfd() >= 0 do
  end
end

-- Start the core with a descriptor signal (`opts.kind`: "eventfd" or
-- "pipe"; by default the system's). Returns the descriptor, or nil and a
-- message.
function M.start_fd(opts)
  local kind = opts.kind
  if kind == "udp" then
    kind = nil
  end
  local ok, fd = pcall(core.start_fd, { capacity = capacity(opts) and floor(opts.capacity), kind = kind })
  if not ok then
    return nil, fd
  end
  return fd
end

return M

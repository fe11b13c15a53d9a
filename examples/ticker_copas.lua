-- The example run by `make demo-ticker`: a native library's background
-- thread (the C ticker, examples/c/ticker.c) delivers values into a Copas
-- loop.
--
-- While the ticker's thread sleeps between values, the loop is free: a
-- second Copas thread answers TCP requests all along, and the ticker's
-- callbacks themselves make such requests (a callback may yield).

local copas = require "copas"
local socket = require "socket"
local bgworker = require "bgworker"
local ticker = require "bgworker_ticker"

local TICKS, INTERVAL_MS = 5, 200

-- A tiny TCP service in the same loop: it answers each line in upper case.
local server = assert(socket.bind("127.0.0.1", 0))
local _, port = server:getsockname()
copas.addserver(server, function(client)
  while true do
    local line = copas.receive(client, "*l")
    if not line then return end
    copas.send(client, line:upper() .. "\n")
  end
end)

-- A request to that service, with Copas I/O: it yields to the loop.
local function shout(text)
  local c = socket.tcp()
  c:settimeout(0)
  copas.connect(c, "127.0.0.1", tonumber(port))
  copas.send(c, text .. "\n")
  local reply = copas.receive(c, "*l")
  c:close()
  return reply
end

local t0 = socket.gettime()
local dispatcher

copas.addthread(function()
  dispatcher = bgworker.new { loop = "copas" }
  print(("%s: dispatching in a Copas loop"):format(bgworker._VERSION))
  local t
  t = ticker.start(TICKS, INTERVAL_MS, function(value)
    local reply = shout(("tick %d of %d"):format(value, TICKS))
    print(("%6.3f s  %s"):format(socket.gettime() - t0, reply))
    if value == TICKS then
      t:stop()
      dispatcher:stop()
    end
  end)
end)

-- Copas 1.x (Debian's) has a copas.loop that never returns, so step the
-- loop until the dispatcher's reader thread has ended.
repeat
  copas.step(1)
until dispatcher and coroutine.status(dispatcher.reader) == "dead"
if copas.removeserver then copas.removeserver(server) else server:close() end
print("done")

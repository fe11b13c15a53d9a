-- bgworker.ngx's greeting under a flood of junk datagrams, outside nginx:
-- the module runs against a stand-in for the few ngx functions the reader
-- uses (its UDP cosocket is a LuaSocket socket, ngx.sleep blocks), so that
-- a test can fill the native side's socket before the reader greets it.
-- The real module in a real nginx is tested by spec/nginx/nginx_test.lua.

local core = require "bgworker.core"
local socket = require "socket"
local support = require "support"

-- A UDP cosocket made of a LuaSocket socket.
local function cosocket()
  local s = assert(socket.udp())
  return {
    setpeername = function(_, host, port) return s:setpeername(host, port) end,
    send = function(_, data) return s:send(data) end,
    settimeout = function(_, ms) s:settimeout(ms / 1000) end,
    receive = function(_, size) return s:receive(size) end,
    close = function() return s:close() end,
  }
end

describe("bgworker.ngx's reader", function()
  local saved = {}

  setup(function()
    support.stop_core()
    saved.ngx = rawget(_G, "ngx")
    saved.module = package.loaded["bgworker.ngx"]
    saved.semaphore = package.loaded["ngx.semaphore"]
  end)

  teardown(function()
    rawset(_G, "ngx", saved.ngx)
    package.loaded["bgworker.ngx"] = saved.module
    package.loaded["ngx.semaphore"] = saved.semaphore
    support.stop_core()
  end)

  it("greets the native side although junk filled its socket first", function()
    local timers, greeted = {}, false
    local real_greeted = core.greeted
    finally(function() core.greeted = real_greeted end)
    core.greeted = function()
      greeted = greeted or real_greeted()
      return greeted
    end
    rawset(_G, "ngx", {
      -- The worker "exits" once greeted: the reader then stops.
      worker = { exiting = function() return greeted end },
      sleep = socket.sleep,
      now = core.now,
      update_time = function() end,
      timer = { at = function(delay, fn, ...)
        timers[#timers + 1] = { delay = delay, fn = fn, args = { ... } }
        return true
      end },
      socket = { udp = cosocket },
      -- Callbacks run in a light thread: here, at once (none waits).
      thread = { spawn = function(fn, ...)
        fn(...)
        return true
      end },
      log = function() end,
      ERR = 4,
    })
    package.loaded["ngx.semaphore"] = { new = function() error("not used here") end }
    -- Loaded again, with this ngx: bgworker.new takes the module loaded now.
    package.loaded["bgworker.ngx"] = nil

    local errors, handler = support.collector()
    local d = require("bgworker").new { loop = "ngx", errorhandler = handler, timeout = 0.05 }
    -- Fill the native side's receive buffer with junk from a stranger on
    -- loopback: the kernel drops what comes while it is full, such as a
    -- token sent only once.
    local host, port = core.sender()
    local stranger = assert(socket.udp())
    local junk = string.rep("x", 1024)
    for _ = 1, 4000 do stranger:sendto(junk, host, port) end
    -- The kernel takes one more datagram while the buffer is just below its
    -- limit: these make sure it is over it.
    for _ = 1, 10 do stranger:sendto("x", host, port) end
    stranger:close()

    -- Run the reader's timer (the last one made: the first is the exit watch).
    local reader = timers[#timers]
    assert.equals(0, reader.delay)
    reader.fn(false, table.unpack and table.unpack(reader.args) or unpack(reader.args))
    assert.is_true(greeted, "the reader never got its greeting through")
    assert.same({}, errors)
    assert.is_true(d.stopped)
  end)
end)

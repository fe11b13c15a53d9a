-- Run by spec/busted_spec.lua (Copas 4): an error in another Copas thread
-- or in a server's handler that the test started fails the test; the next
-- test finds none of their threads or servers left.

local async = require("bgworker.busted").async
local copas = require "copas"
local socket = require "socket"

-- What the first two tests leave for the third to look at.
local leftover_ran, leftover_port

it("fails at an error of a Copas thread it added", async(function()
  copas.addthread(function()
    copas.pause(0.05)
    error("the thread's own message")
  end)
  copas.addthread(function()
    copas.pause(0.5)
    leftover_ran = true
  end)
  copas.pause(1)
end, { loop = "copas" }))

it("fails at an error of a server handler it added", async(function()
  local server = assert(socket.bind("127.0.0.1", 0))
  leftover_port = select(2, server:getsockname())
  copas.addserver(server, function() error("the handler's own message") end)
  local client = copas.wrap(socket.tcp())
  client:connect("127.0.0.1", leftover_port)
  copas.pause(1)
end, { loop = "copas" }))

it("finds none of their threads and servers left", async(function()
  copas.pause(0.7)
  assert.is_nil(leftover_ran, "a thread of the first test ran on")
  local client = socket.tcp()
  client:settimeout(1)
  assert.is_nil(client:connect("127.0.0.1", leftover_port), "the second test's server still accepts")
  client:close()
end, { loop = "copas" }))

-- The state closes with items pending whose free_data lives in a utility
-- library loaded after bgworker.core. lua_close unloads that library; the
-- pending items must be freed before it goes (DESIGN: "No calls into
-- unloaded code"). Only a separate process shows it: in this one the
-- library stays loaded by the spec's own state.

local support = require "support"

describe("closing the Lua state", function()
  it("frees pending items while their utility library is still loaded", function()
    local status, output = support.run_lua [[
      local core = require "bgworker.core"
      local socket = require "socket"
      local reader = assert(socket.udp())
      assert(reader:setsockname("127.0.0.1", 0))
      local _, port = reader:getsockname()
      core.start(port)
      -- Loaded after the core, so unloaded before it at lua_close.
      local testutil = require "bgworker_testutil"
      testutil.join(testutil.produce{producers = 2, items = 1000, callback = function() end})
      assert(core.pending() == 2000, "items should be pending at exit")
      print("pending " .. core.pending())
    ]]
    assert.matches("pending 2000", output)
    assert.are.equal(0, status, "the interpreter crashed at lua_close:\n" .. output)
  end)

  it("frees them before the library goes also when a guard older than the library is still held", function()
    -- The guard is collected at lua_close after the library's unloading
    -- has begun (finalisers run newest first): it must find nothing left
    -- to free.
    local status, output = support.run_lua [[
      local core = require "bgworker.core"
      local socket = require "socket"
      local reader = assert(socket.udp())
      assert(reader:setsockname("127.0.0.1", 0))
      local _, port = reader:getsockname()
      core.start(port)
      guard = core.guard()
      local testutil = require "bgworker_testutil"
      testutil.join(testutil.produce{producers = 2, items = 1000, callback = function() end})
      print("pending " .. core.pending())
    ]]
    assert.matches("pending 2000", output)
    assert.are.equal(0, status, "the interpreter crashed at lua_close:\n" .. output)
  end)
end)

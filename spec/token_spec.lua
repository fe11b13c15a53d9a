-- Cancellation tokens: core.token() in Lua, and bgw_api.token_get,
-- token_cancelled and token_release from a C library
-- (spec/native/tokentest.c), which asks from threads of its own.

local core = require "bgworker.core"
local support = require "support"
local tokentest = require "bgworker_tokentest"

describe("core.token", function()
  it("is cancelled once, and says so", function()
    local token = core.token()
    assert.is_false(token:cancelled())
    assert.is_true(token:cancel())
    assert.is_false(token:cancel())
    assert.is_true(token:cancelled())
  end)

  it("makes tokens apart from each other", function()
    local a, b = core.token(), core.token()
    a:cancel()
    assert.is_false(b:cancelled())
  end)

  it("refuses a method call on anything else", function()
    local token = core.token()
    local ok, err = pcall(function() token.cancel({}) end)
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'cancel' %(token expected, got table", err)
  end)
end)

describe("bgw_api tokens from C", function()
  it("see a cancel from another thread, through their own reference", function()
    local token = core.token()
    local holder = tokentest.hold(token)
    assert.is_false(holder:cancelled())
    token:cancel()
    assert.is_true(holder:cancelled())
    holder:release()
    holder:release()
  end)

  it("keep the token alive when Lua drops it", function()
    local holder = tokentest.hold(core.token())
    collectgarbage()
    collectgarbage()
    assert.is_false(holder:cancelled(), "collecting a token cancels nothing")
    holder:release()
  end)

  it("are not made from other values", function()
    for _, value in ipairs { 1, "token", {}, io.stdout, print } do
      assert.is_nil(tokentest.hold(value), tostring(value))
    end
    assert.is_nil(tokentest.hold(nil))
    assert.is_true(tokentest.null(), "NULL is not cancelled, and its release is ignored")
  end)

  it("are cancelled when their Lua state closes", function()
    support.fresh_state([[
      local tokentest = require "bgworker_tokentest"
      assert(tokentest.keep(core.token()))
    ]])
    assert.is_true(tokentest.kept_cancelled())
  end)
end)

-- PUC Lua 5.1 and LuaJIT speak the same C API, so a build for one loads in
-- the other; each library refuses the wrong runtime when it opens, with a
-- message that names the build to install (bgworker_ffi::runtime). The
-- Makefile builds both before the specs of either, and before rock-check.

local support = require "support"

local in_luajit = type(rawget(_G, "jit")) == "table"

describe("a build for the other runtime", function()
  if _VERSION ~= "Lua 5.1" then
    -- A question for Lua 5.1 and LuaJIT only: the other versions' C APIs
    -- differ, and the loader tells their builds apart.
    return
  end

  -- The other runtime's build of this checkout (the specs run from its
  -- root, also against an installed rock: scripts/rock-check).
  local other = in_luajit and "5.1" or "jit"
  local other_build = "build/" .. other
  local function must_exist(path)
    local file = io.open(path)
    assert(file, path .. " is missing: make builds it before these specs (build-" .. other .. ")")
    file:close()
  end
  local expected = in_luajit and "this build is for PUC Lua 5.1, but LuaJIT loaded it; install bgworker's LuaJIT rock"
    or "this build is for LuaJIT, but PUC Lua 5.1 loaded it; install bgworker's Lua 5.1 rock"

  -- As a user meets it: the other build first on package.cpath.
  for _, module in ipairs { "bgworker", "bgworker.pool", "bgworker.dns" } do
    it("is refused when a program requires " .. module .. ", saying what to install", function()
      must_exist(other_build .. "/bgworker/core.so")
      local status, output = support.run_lua(([[
        package.cpath = %q .. "/?.so;" .. package.cpath
        local ok, err = pcall(require, %q)
        print(ok, err)
      ]]):format(other_build, module), 30)
      assert.equals(0, status, output)
      assert.matches("^false\tbgworker.core: " .. expected:gsub("%p", "%%%0"), output)
    end)
  end

  if in_luajit then
    -- (The LuaJIT build of the pool does not load in PUC Lua 5.1 at all:
    -- it links LuaJIT's luaopen_bit, and the loader says so.)
    it("is refused by bgworker.pool_native itself", function()
      local path = other_build .. "/bgworker/pool_native.so"
      must_exist(path)
      local open, err = package.loadlib(path, "luaopen_bgworker_pool_native")
      assert(open, ("%s: %s (make builds it before these specs)"):format(path, tostring(err)))
      local ok, message = pcall(open)
      assert.is_false(ok)
      assert.truthy(tostring(message):find("bgworker.pool_native: " .. expected, 1, true), tostring(message))
    end)
  end

  it("is not refused by this run's own build", function()
    local status, output = support.run_lua([[
      local core = require "bgworker.core"
      local pool = require "bgworker.pool"
      print(type(core.start), type(pool.new))
    ]], 30)
    assert.equals(0, status, output)
    assert.matches("function\tfunction", output)
  end)
end)

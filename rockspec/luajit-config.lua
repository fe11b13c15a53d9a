-- LuaRocks config for installing into a LuaJIT tree on Debian (packages
-- luajit2 + libluajit2-5.1-dev, or luajit + libluajit-5.1-dev). Use it with
-- --lua-version=5.1:
--
--   LUAROCKS_CONFIG=rockspec/luajit-config.lua \
--     luarocks --lua-version=5.1 --tree=TREE make --deps-mode=none rockspec/bgworker-scm-1.rockspec
--
-- LuaJIT speaks the Lua 5.1 API, so its rocks live in lib/lua/5.1 and
-- share/lua/5.1 of the tree: keep LuaJIT and Lua 5.1 in separate trees, as
-- their bgworker/core.so differ. rockspec/bgworker-scm-1.rockspec builds the
-- core with cargo feature "luajit" because the interpreter below is LuaJIT.
lua_version = "5.1"
lua_interpreter = "luajit"
variables = {
  LUA_DIR = "/usr",
  LUA_BINDIR = "/usr/bin",
  LUA_INCDIR = "/usr/include/luajit-2.1",
}

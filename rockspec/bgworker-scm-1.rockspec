-- Install from a source checkout (run from its top directory); cargo builds
-- the core for the Lua that LuaRocks targets:
--
--   luarocks --lua-version=5.4 --tree=TREE make --deps-mode=none rockspec/bgworker-scm-1.rockspec
--
-- (5.1, 5.2 and 5.3 likewise). For LuaJIT, name it in a config file:
--
--   LUAROCKS_CONFIG=rockspec/luajit-config.lua \
--     luarocks --lua-version=5.1 --tree=TREE make --deps-mode=none rockspec/bgworker-scm-1.rockspec
--
-- --deps-mode=none is for machines that cannot reach a rocks server and have
-- luasocket from elsewhere (Debian's lua-socket is not a registered rock).
-- See rockspec/README.md.
rockspec_format = "3.0"
package = "bgworker"
version = "scm-1"

source = {
   url = "git+https://example.invalid/bgworker.git", -- placeholder until a public repository; `luarocks make` does not fetch
}

description = {
   summary = "Deliver results from background threads of native libraries into a single-threaded Lua state",
   detailed = [[
bgworker lets native libraries (C, Rust, ...) hand results from their
background threads to a Lua state, which collects them at a safe point of its
own event loop (Copas, socket.select, OpenResty). The native core is written
in Rust; utility libraries use the C API declared in include/bgworker.h, which
this rock installs in its rock directory (include/bgworker.h).
]],
   license = "MIT",
   labels = { "threads", "async", "ffi", "copas" },
}

dependencies = {
   "lua >= 5.1, < 5.5",
   "luasocket",
}

build = {
   type = "command",
   -- scripts/rock-build picks the cargo feature (lua51 ... lua54, luajit)
   -- from $(LUA), falling back to $(LUA_INCDIR); set BGWORKER_CARGO_FEATURE
   -- to override. Needs cargo on PATH.
   build_command = [[sh scripts/rock-build build "$(LUA)" "$(LUA_INCDIR)"]],
   install_command = [[sh scripts/rock-build install "$(LUA)" "$(LUA_INCDIR)" "$(LIBDIR)" "$(LUADIR)" "$(PREFIX)"]],
}

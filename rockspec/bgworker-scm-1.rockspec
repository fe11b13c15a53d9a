-- Install from a source checkout (run from its top directory); cargo builds
-- the core for the Lua that LuaRocks targets:
--
--   luarocks --lua-version=5.4 --tree=TREE make rockspec/bgworker-scm-1.rockspec
--
-- (5.1, 5.2 and 5.3 likewise). For LuaJIT, name it in a config file:
--
--   LUAROCKS_CONFIG=rockspec/luajit-config.lua \
--     luarocks --lua-version=5.1 --tree=TREE make rockspec/bgworker-scm-1.rockspec
--
-- Needs Rust 1.88 or newer (cargo on PATH). Without a rocks server to fetch
-- luasocket from, add --deps-mode=none or declare the system's luasocket
-- (rockspec/README.md). Apart from `version` and `source` it is the same as
-- the release rockspec bgworker-<version>-1.rockspec (scripts/rock-check
-- compares them).
rockspec_format = "3.0"
package = "bgworker"
version = "scm-1"

source = {
   -- Placeholder repository until bgworker is published; `luarocks make`
   -- builds the checkout it runs in and fetches nothing.
   url = "git+https://github.com/bgworker/bgworker.git",
   branch = "main",
}

description = {
   summary = "Deliver results from background threads of native libraries into a single-threaded Lua state",
   detailed = [[
bgworker lets native libraries (C, Rust, ...) hand results from their
background threads to a Lua state, which collects them at a safe point of its
own event loop (Copas, socket.select, OpenResty, luv, cqueues). The native
core is written in Rust; utility libraries use the C API declared in
include/bgworker.h, which this rock installs in its rock directory
(include/bgworker.h).

Platforms: Linux only. Tested: x86_64 with glibc, on Lua 5.1, 5.2, 5.3, 5.4
and LuaJIT. Untested: other Linux architectures, musl. Not supported (LuaRocks
refuses them): macOS (the core calls getrandom, which macOS lacks, and the
build expects .so libraries), the BSDs (no eventfd: the pipe fallback is
untested) and Windows (POSIX only).

Building from source needs Rust 1.88 or newer (cargo); binary rocks need no
Rust.
]],
   homepage = "https://github.com/bgworker/bgworker",
   license = "MIT",
   labels = { "threads", "async", "ffi", "copas" },
}

supported_platforms = { "linux" }

dependencies = {
   "lua >= 5.1, < 5.5",
   "luasocket",
}

build = {
   type = "command",
   -- scripts/rock-build checks for cargo (Rust >= rust-version of Cargo.toml),
   -- picks the cargo feature (lua51 ... lua54, luajit) from $(LUA), falling
   -- back to $(LUA_INCDIR), builds the workspace and installs its Lua modules
   -- (scripts/rust-modules), the Lua files and include/bgworker.h.
   build_command = [[sh scripts/rock-build build "$(LUA)" "$(LUA_INCDIR)"]],
   install_command = [[sh scripts/rock-build install "$(LUA)" "$(LUA_INCDIR)" "$(LIBDIR)" "$(LUADIR)" "$(PREFIX)"]],
}

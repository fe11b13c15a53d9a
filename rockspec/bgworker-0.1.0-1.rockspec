-- The release rockspec of bgworker 0.1.0. `make dist` packs it into a source
-- rock (dist/src/) and one binary rock per Lua version (dist/<ver>/), which
-- installs without Rust:
--
--   luarocks --lua-version=5.4 install --only-server=dist/5.4 bgworker
--
-- Building from the source rock needs Rust 1.88 or newer (cargo on PATH).
-- rockspec/README.md has LuaJIT, offline installs and what gets installed.
-- Apart from `version` and `source` it is the same as bgworker-scm-1.rockspec
-- (scripts/rock-check compares them).
rockspec_format = "3.0"
package = "bgworker"
version = "0.1.0-1"

source = {
   -- Placeholder repository until bgworker is published; the source rock made
   -- by `make dist` carries the source, so installing it fetches nothing.
   url = "git+https://github.com/bgworker/bgworker.git",
   tag = "v0.1.0",
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

# bgworker build and test entry points. `make demo` and `make test` are the
# README's two commands: each installs what is missing first.

LUA_VERSIONS := 5.1 5.2 5.3 5.4 jit
# Copas from Debian exists for Lua 5.1 (and so LuaJIT) and 5.2 only.
CARGO ?= cargo
CC ?= gcc
CFLAGS ?= -O2 -g -Wall -Wextra -Werror -std=c11
BUILD := build

lua_bin      = $(if $(filter jit,$(1)),luajit,lua$(1))
lua_incdir   = $(if $(filter jit,$(1)),/usr/include/luajit-2.1,/usr/include/lua$(1))
cargo_feature = $(if $(filter jit,$(1)),luajit,lua$(subst .,,$(1)))

.PHONY: all setup build demo demo-ticker test check lint specs cargo-test rock-check clean $(addprefix build-,$(LUA_VERSIONS)) $(addprefix specs-,$(LUA_VERSIONS))

all: build

setup:
	@bash scripts/setup-deps

build: $(addprefix build-,$(LUA_VERSIONS))

# C utility libraries, as <Lua module>:<source>: built per Lua version into
# build/<ver>/<module>.so, against include/bgworker.h only.
C_MODULES := bgworker_ticker:examples/c/ticker.c answer:examples/c/answer.c \
  bgworker_testutil:spec/native/testutil.c bgworker_bench:bench/native/bench.c

define c_module
build-$(1): $(BUILD)/$(1)/$(2).so

$(BUILD)/$(1)/$(2).so: $(3) include/bgworker.h
	@mkdir -p $$(@D)
	$(CC) $(CFLAGS) -fPIC -shared -pthread -Iinclude -I$(call lua_incdir,$(1)) -o $$@ $$<
endef
$(foreach v,$(LUA_VERSIONS),$(foreach m,$(C_MODULES),\
  $(eval $(call c_module,$(v),$(word 1,$(subst :, ,$(m))),$(word 2,$(subst :, ,$(m)))))))

# One cargo target directory per Lua version, so switching versions never rebuilds.
define build_version
build-$(1): $(BUILD)/$(1)/bgworker/core.so

$(BUILD)/$(1)/bgworker/core.so: FORCE
	$(CARGO) build --release --quiet --workspace --features $(call cargo_feature,$(1)),module --target-dir target/lua-$(1)
	@mkdir -p $$(@D)
	# A new file, not an overwrite: a running Lua may have the old one mapped.
	cp target/lua-$(1)/release/libbgworker.so $$@.tmp && mv $$@.tmp $$@

specs-$(1): build-$(1)
	LUA_PATH="lua/?.lua;lua/?/init.lua;spec/?.lua;;" LUA_CPATH="$(BUILD)/$(1)/?.so;;" \
	BGWORKER_LUA="$(call lua_bin,$(1))" BGWORKER_BUILD="$(BUILD)/$(1)" \
	$(call lua_bin,$(1)) /usr/bin/busted spec
endef
$(foreach v,$(LUA_VERSIONS),$(eval $(call build_version,$(v))))

FORCE:

# A Copas server under load, with its work done inline and then with
# bgworker.pool and bgworker.dns (examples/demo.lua).
demo: setup build-jit
	LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="$(BUILD)/jit/?.so;;" luajit examples/demo.lua

# The C ticker's background thread delivering into a Copas loop.
demo-ticker: setup build-5.1
	LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="$(BUILD)/5.1/?.so;;" lua5.1 examples/ticker_copas.lua

specs: $(addprefix specs-,$(LUA_VERSIONS))

cargo-test:
	$(CARGO) test --quiet -p bgworker
	RUSTFLAGS="--cfg loom" $(CARGO) test --quiet --release --target-dir target/loom --lib loom

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --quiet --all-targets -- -D warnings
	$(CARGO) clippy --quiet --features lua54,module --target-dir target/lua-5.4 -- -D warnings
	luacheck --quiet lua spec examples bench

# Install the rock with luarocks into temporary trees (5.4, LuaJIT) and run
# the specs against the installed rock.
rock-check: build-5.4 build-jit
	bash scripts/rock-check 5.4 jit

test: setup lint cargo-test specs rock-check

# The Lua API reference (LDoc) in build/docs.
docs:
	ldoc .

clean:
	rm -rf $(BUILD) target

# --- Benchmarks and reliability suite (issue 4; bench/README.md, spec/reliability/README.md) ---
BENCH_LUA ?= 5.4 jit

.PHONY: bench leakcheck

bench: setup $(addprefix build-,$(BENCH_LUA))
	BENCH_LUA="$(BENCH_LUA)" BENCH_BUILD="$(BUILD)" lua5.4 bench/bench.lua

# Every spec under memcheck on Lua 5.4, the reliability specs at small sizes.
# No suppressions: nothing is lost outside our code either (spec/reliability/README.md).
leakcheck: setup build-5.4
	LUA_PATH="lua/?.lua;lua/?/init.lua;spec/?.lua;;" LUA_CPATH="$(BUILD)/5.4/?.so;;" \
	BGWORKER_LUA=lua5.4 BGWORKER_BUILD="$(BUILD)/5.4" BGWORKER_SMALL=1 \
	valgrind --quiet --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=1 \
		--num-callers=40 lua5.4 /usr/bin/busted spec

# The reliability specs run in `specs` (all of spec/); the leak check after them.
test: leakcheck
# --- end of issue 4 block ---

# --- Rust utility libraries of the workspace (issue 3: crates/bgworker-util, crates/bgworker-dns) ---
# The core's rule above builds every cdylib of the workspace (--workspace).
# Each is listed as <library stem>:<Lua module path> and installed as
# build/<ver>/<Lua module path>.so.
RUST_MODULES := bgworker_dns:bgworker/dns_native

define rust_module
build-$(1): $(BUILD)/$(1)/$(3).so

$(BUILD)/$(1)/$(3).so: $(BUILD)/$(1)/bgworker/core.so
	@mkdir -p $$(@D)
	cp target/lua-$(1)/release/lib$(2).so $$@.tmp && mv $$@.tmp $$@
endef
$(foreach v,$(LUA_VERSIONS),$(foreach m,$(RUST_MODULES),\
  $(eval $(call rust_module,$(v),$(word 1,$(subst :, ,$(m))),$(word 2,$(subst :, ,$(m)))))))

# Tests and lint of the utility crates: an embedded Lua 5.4 for the tests;
# clippy also with `module`, which compiles the luaopen entry points.
RUST_UTIL_CRATES := -p bgworker-util -p bgworker-dns
.PHONY: cargo-test-util lint-util
cargo-test: cargo-test-util
lint: lint-util

cargo-test-util:
	$(CARGO) test --quiet $(RUST_UTIL_CRATES) --features lua54,vendored

lint-util:
	$(CARGO) clippy --quiet $(RUST_UTIL_CRATES) --all-targets --features lua54,vendored -- -D warnings
	$(CARGO) clippy --quiet $(RUST_UTIL_CRATES) --all-targets --features lua54,module --target-dir target/lua-5.4 -- -D warnings
# --- end of issue 3 block ---

# --- bgworker.pool (crates/bgworker-pool): its cdylib as build/<ver>/bgworker_pool.so, by the rule above ---
$(foreach v,$(LUA_VERSIONS),$(eval $(call rust_module,$(v),bgworker_pool,bgworker_pool)))

.PHONY: cargo-test-pool lint-pool bench-pool
cargo-test: cargo-test-pool
lint: lint-pool

# Inline vs bgworker.pool vs luv's uv.new_work, on every Lua version.
bench-pool: build
	$(foreach v,$(LUA_VERSIONS),LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="$(BUILD)/$(v)/?.so;;" \
	  $(call lua_bin,$(v)) bench/pool.lua &&) true

cargo-test-pool:
	$(CARGO) test --quiet -p bgworker-pool --features lua54,vendored

lint-pool:
	$(CARGO) clippy --quiet -p bgworker-pool --all-targets --features lua54,vendored -- -D warnings
	$(CARGO) clippy --quiet -p bgworker-pool --all-targets --features lua54,module --target-dir target/lua-5.4 -- -D warnings
# --- end of bgworker.pool block ---

# --- OpenResty integration test (issue 5: lua/bgworker/ngx.lua, docs/openresty.md) ---
# A real nginx with lua-nginx-module runs the LuaJIT build: see spec/nginx/nginx_test.lua.
.PHONY: nginx-test
test: nginx-test

nginx-test: build-jit
	BGWORKER_ROOT="$(CURDIR)" BGWORKER_BUILD="$(CURDIR)/$(BUILD)/jit" luajit /usr/bin/busted spec/nginx/nginx_test.lua
# --- end of issue 5 block ---

# bgworker build and test entry points. `make demo` and `make test` are the
# README's two commands: each installs what is missing first.

LUA_VERSIONS := 5.1 5.2 5.3 5.4 jit
CARGO ?= cargo
CC ?= gcc
CFLAGS ?= -O2 -g -Wall -Wextra -Werror -std=c11
BUILD := build
comma := ,

lua_bin       = $(if $(filter jit,$(1)),luajit,lua$(1))
lua_incdir    = $(if $(filter jit,$(1)),/usr/include/luajit-2.1,/usr/include/lua$(1))
cargo_feature = $(if $(filter jit,$(1)),luajit,lua$(subst .,,$(1)))
# Run $(2) with Lua $(1), finding our Lua files and build/<ver>/ modules.
with_lua      = LUA_PATH="lua/?.lua;lua/?/init.lua;spec/?.lua;;" LUA_CPATH="$(BUILD)/$(1)/?.so;;" \
                BGWORKER_LUA="$(call lua_bin,$(1))" BGWORKER_BUILD="$(BUILD)/$(1)" $(2)

.PHONY: all setup build demo demo-ticker docs test lint specs cargo-test rock-check nginx-test \
        leakcheck soak bench bench-pool clean FORCE \
        $(addprefix build-,$(LUA_VERSIONS)) $(addprefix specs-,$(LUA_VERSIONS))

all: build

setup:
	@bash scripts/setup-deps

# ---------------------------------------------------------------------------
# Building: everything per Lua version into build/<ver>/.

build: $(addprefix build-,$(LUA_VERSIONS))

# The cargo workspace: the core and the utility libraries built with
# crates/bgworker-util, as <library stem>:<Lua module path>, listed in
# scripts/rust-modules (which scripts/rock-build installs too). One cargo
# target directory per Lua version, so switching versions never rebuilds.
RUST_MODULES := $(shell cat scripts/rust-modules)

# C utility libraries, as <Lua module>:<source>, against include/bgworker.h only.
C_MODULES := bgworker_ticker:examples/c/ticker.c answer:examples/c/answer.c \
             bgworker_testutil:spec/native/testutil.c bgworker_bench:bench/native/bench.c

define lua_version
$(BUILD)/$(1)/.cargo: FORCE
	$(CARGO) build --release --quiet --workspace --features $(call cargo_feature,$(1)),module --target-dir target/lua-$(1)
	@mkdir -p $$(@D) && touch $$@

specs-$(1): build-$(1)
	$(call with_lua,$(1),$(call lua_bin,$(1)) /usr/bin/busted spec)
endef

# A new file, not an overwrite: a running Lua may have the old one mapped.
define rust_module
build-$(1): $(BUILD)/$(1)/$(3).so

$(BUILD)/$(1)/$(3).so: $(BUILD)/$(1)/.cargo
	@mkdir -p $$(@D)
	cp target/lua-$(1)/release/lib$(2).so $$@.tmp && mv $$@.tmp $$@
endef

define c_module
build-$(1): $(BUILD)/$(1)/$(2).so

$(BUILD)/$(1)/$(2).so: $(3) include/bgworker.h
	@mkdir -p $$(@D)
	$(CC) $(CFLAGS) -fPIC -shared -pthread -Iinclude -I$(call lua_incdir,$(1)) -o $$@ $$<
endef

pair = $(word $(1),$(subst :, ,$(2)))
$(foreach v,$(LUA_VERSIONS),\
  $(eval $(call lua_version,$(v)))\
  $(foreach m,$(RUST_MODULES),$(eval $(call rust_module,$(v),$(call pair,1,$(m)),$(call pair,2,$(m)))))\
  $(foreach m,$(C_MODULES),$(eval $(call c_module,$(v),$(call pair,1,$(m)),$(call pair,2,$(m))))))

FORCE:

# The Lua API reference (LDoc) in build/docs.
docs:
	ldoc .

# ---------------------------------------------------------------------------
# Demos

# A Copas server under load, with its work done inline and then with
# bgworker.pool and bgworker.dns (examples/demo.lua).
demo: setup build-jit
	$(call with_lua,jit,luajit examples/demo.lua)

# The C ticker's background thread delivering into a Copas loop.
demo-ticker: setup build-5.1
	$(call with_lua,5.1,lua5.1 examples/ticker_copas.lua)

# ---------------------------------------------------------------------------
# Tests: `make test` is what CI runs.

test: setup lint cargo-test specs rock-check nginx-test leakcheck

# The crates' own Lua tests embed a Lua 5.4 (`vendored`); clippy also checks
# the `module` build, which compiles the luaopen entry points.
UTIL_CRATES := -p bgworker-util -p bgworker-dns -p bgworker-pool

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --quiet --all-targets -- -D warnings
	$(CARGO) clippy --quiet --workspace --all-targets --features lua54,module --target-dir target/lua-5.4 -- -D warnings
	$(CARGO) clippy --quiet $(UTIL_CRATES) --all-targets --features lua54,vendored -- -D warnings
	luacheck --quiet lua spec examples bench

# bgworker-util's tests include the ABI layout test, which compiles
# spec/native/abi_layout.c against include/bgworker.h (and so lua.h).
cargo-test:
	$(CARGO) test --quiet -p bgworker
	BGWORKER_LUA_INCDIR=$(call lua_incdir,5.4) $(CARGO) test --quiet $(UTIL_CRATES) --features lua54,vendored
	RUSTFLAGS="--cfg loom" $(CARGO) test --quiet --release --target-dir target/loom --lib loom

specs: $(addprefix specs-,$(LUA_VERSIONS))

# Install the rock with luarocks into temporary trees (5.4, LuaJIT) and run
# the specs against the installed rock.
rock-check: build-5.4 build-jit
	bash scripts/rock-check 5.4 jit

# A real nginx with lua-nginx-module runs the LuaJIT build: spec/nginx/nginx_test.lua.
nginx-test: build-jit
	BGWORKER_ROOT="$(CURDIR)" BGWORKER_BUILD="$(CURDIR)/$(BUILD)/jit" luajit /usr/bin/busted spec/nginx/nginx_test.lua

# Every spec under memcheck on Lua 5.4, the reliability specs at small sizes.
# No suppressions: nothing is lost outside our code either (spec/reliability/README.md).
leakcheck: setup build-5.4
	$(call with_lua,5.4,BGWORKER_SMALL=1 valgrind --quiet --leak-check=full \
	  --errors-for-leak-kinds=definite$(comma)indirect --error-exitcode=1 --num-callers=40 lua5.4 /usr/bin/busted spec)

# 2-3 minutes of 4 producers into a bounded queue: exactly once and in order,
# stats consistent, RSS sampled (spec/reliability/soak.lua). Not in `make
# test`; its last figures are in bench/README.md ("Soak").
SOAK_LUA ?= 5.4
SOAK_SECONDS ?= 150

soak: setup build-$(SOAK_LUA)
	$(call with_lua,$(SOAK_LUA),SOAK_SECONDS=$(SOAK_SECONDS) $(call lua_bin,$(SOAK_LUA)) spec/reliability/soak.lua)

# ---------------------------------------------------------------------------
# Benchmarks (bench/README.md)

BENCH_LUA ?= 5.4 jit

bench: setup $(addprefix build-,$(BENCH_LUA))
	BENCH_LUA="$(BENCH_LUA)" BENCH_BUILD="$(BUILD)" lua5.4 bench/bench.lua

# Inline vs bgworker.pool vs luv's uv.new_work, on every Lua version.
bench-pool: build
	$(foreach v,$(LUA_VERSIONS),$(call with_lua,$(v),$(call lua_bin,$(v)) bench/pool.lua) &&) true

clean:
	rm -rf $(BUILD) target

# bgworker build and test entry points. `make demo` and `make test` are the
# README's two commands: each installs what is missing first.

LUA_VERSIONS := 5.1 5.2 5.3 5.4 jit
CARGO ?= cargo
CC ?= gcc
CFLAGS ?= -O2 -g -Wall -Wextra -Werror -std=c11
BUILD := build
comma := ,
# The busted script, which every spec run starts with the interpreter of its
# Lua version (`lua5.1 $(BUSTED) spec`): a path, not a command name.
BUSTED ?= /usr/bin/busted

lua_bin       = $(if $(filter jit,$(1)),luajit,lua$(1))
lua_api       = $(if $(filter jit,$(1)),5.1,$(1))
lua_incdir    = $(if $(filter jit,$(1)),/usr/include/luajit-2.1,/usr/include/lua$(1))
cargo_feature = $(if $(filter jit,$(1)),luajit,lua$(subst .,,$(1)))
# Run $(2) with Lua $(1), finding our Lua files and build/<ver>/ modules, and
# first the Lua modules of the rocks tree $(3) if given.
with_lua      = LUA_PATH="$(if $(3),$(3)/share/lua/$(call lua_api,$(1))/?.lua;$(3)/share/lua/$(call lua_api,$(1))/?/init.lua;)lua/?.lua;lua/?/init.lua;spec/?.lua;;" \
                LUA_CPATH="$(BUILD)/$(1)/?.so;;" \
                BGWORKER_LUA="$(call lua_bin,$(1))" BGWORKER_BUILD="$(BUILD)/$(1)" $(2)

# Lua rocks for the tests come from ROCKS_SERVER, a LuaRocks server folder or
# URL: ../shared/rocks beside the checkout when it exists, else empty, which
# means the servers LuaRocks is configured with (the public one for a user).
ROCKS_SERVER ?= $(if $(wildcard ../shared/rocks/manifest),$(abspath ../shared/rocks))
# Copas 4 is installed with luarocks into one tree per Lua version,
# build/rocks/<ver>/ (scripts/copas-tree), and comes first on LUA_PATH in
# every spec run (with_copas4). Debian's Copas 1.x (lua-copas) is what the
# Lua versions COPAS1_LUA find without that tree: the spec files of
# COPAS1_SPECS run a second time against it there. They are those with Copas
# tests (support.needs_copas), and loop_contract_spec.lua, whose loops
# (spec/loops.lua) include Copas: a new such file goes in the list. The
# specs check that they got the Copas they expect: BGWORKER_COPAS_VERSION.
COPAS_VERSION := 4.11.0
COPAS1_LUA := 5.1 5.2 jit
COPAS1_SPECS := $(addprefix spec/,await_spec.lua busted_spec.lua copas_spec.lua dns_spec.lua loop_contract_spec.lua pool_closures_spec.lua pool_spec.lua process_spec.lua)
copas_tree = $(BUILD)/rocks/$(1)
with_copas4 = $(call with_lua,$(1),BGWORKER_COPAS_VERSION=$(COPAS_VERSION) $(2),$(call copas_tree,$(1)))

.PHONY: all setup build dist demo demo-ticker docs test lint specs examples cargo-test rock-check \
        nginx-test leakcheck soak copas-suite bench bench-openresty bench-pool clean FORCE \
        $(addprefix build-,$(LUA_VERSIONS)) $(addprefix specs-,$(LUA_VERSIONS)) \
        $(addprefix examples-,$(LUA_VERSIONS)) \
        $(addprefix copas-,$(LUA_VERSIONS)) $(addprefix specs-copas1-,$(COPAS1_LUA))

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
             bgworker_testutil:spec/native/testutil.c bgworker_tokentest:spec/native/tokentest.c \
             bgworker_bench:bench/native/bench.c

# Test libraries that are no Lua module: a child interpreter preloads them
# (LD_PRELOAD), as <library>:<source>. Built the same way, beside the others.
PRELOADS := bgworker_stalldns:spec/native/stalldns.c

define lua_version
$(BUILD)/$(1)/.cargo: FORCE
	$(CARGO) build --release --quiet --workspace --features $(call cargo_feature,$(1)),module --target-dir target/lua-$(1)
	@mkdir -p $$(@D) && touch $$@

specs-$(1): build-$(1) copas-$(1)
	$(call with_copas4,$(1),$(call lua_bin,$(1)) $(BUSTED) spec)

examples-$(1): build-$(1) copas-$(1)
	$(call with_lua,$(1),BGWORKER_COPAS4_TREE=$(call copas_tree,$(1)) BGWORKER_COPAS_VERSION=$(COPAS_VERSION) \
	  $(call lua_bin,$(1)) $(BUSTED) spec/examples_test.lua)

copas-$(1):
	ROCKS_SERVER="$(ROCKS_SERVER)" COPAS_VERSION=$(COPAS_VERSION) bash scripts/copas-tree $(1) $(call copas_tree,$(1))
endef

# LuaJIT and PUC Lua 5.1 each refuse the other's build at load time: their
# specs load both (spec/runtime_spec.lua).
specs-5.1: build-jit
specs-jit: build-5.1

define copas1_version
specs-copas1-$(1): build-$(1)
	$(call with_lua,$(1),BGWORKER_COPAS_VERSION=1 $(call lua_bin,$(1)) $(BUSTED) $(COPAS1_SPECS))
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
  $(foreach m,$(C_MODULES) $(PRELOADS),$(eval $(call c_module,$(v),$(call pair,1,$(m)),$(call pair,2,$(m))))))
$(foreach v,$(COPAS1_LUA),$(eval $(call copas1_version,$(v))))

FORCE:

# ---------------------------------------------------------------------------
# The release (rockspec/README.md): dist/src/ holds the source rock, dist/<ver>/
# the binary rock for each Lua version of DIST_LUA, each a LuaRocks server folder.
DIST_LUA ?= $(LUA_VERSIONS)

dist: setup
	bash scripts/dist $(DIST_LUA)

# The Lua API reference (LDoc, config.ld) in build/docs. Anything LDoc says
# beyond its two usual lines (a warning, a Markdown processor it lacks)
# fails the target.
docs: setup
	@rm -rf $(BUILD)/docs && mkdir -p $(BUILD)
	@ldoc --fatalwarnings . >$(BUILD)/ldoc.log 2>&1; status=$$?; \
	  if grep -v -e '^reading configuration from config.ld$$' -e '^output written to ' $(BUILD)/ldoc.log >&2 \
	    || [ $$status -ne 0 ]; then echo "make docs: ldoc warned or failed (above)" >&2; exit 1; fi
	@echo "make docs: build/docs/index.html"

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

test: setup lint docs cargo-test specs examples rock-check nginx-test leakcheck

# The crates of the cargo workspace: the core (bgworker, at the top) and
# crates/<name>. A new crate goes here. Their tests embed a Lua 5.4
# (`vendored`); clippy also checks the core without Lua, and the `module`
# build, which compiles the luaopen entry points. The `loom` models are in
# the crates whose sources say `cfg(loom)`.
CRATES := bgworker bgworker-ffi bgworker-util bgworker-dns bgworker-pool bgworker-process
crate_dir = $(if $(filter bgworker,$(1)),.,crates/$(1))
cargo_packages = $(addprefix -p ,$(1))
LOOM_CRATES = $(foreach c,$(CRATES),$(if $(shell grep -rl 'cfg(loom)' $(call crate_dir,$(c))/src),$(c)))

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --quiet --all-targets -- -D warnings
	$(CARGO) clippy --quiet --workspace --all-targets --features lua54,module --target-dir target/lua-5.4 -- -D warnings
	$(CARGO) clippy --quiet $(call cargo_packages,$(CRATES)) --all-targets --features lua54,vendored -- -D warnings
	luacheck --quiet lua spec examples bench
	lua5.4 scripts/check-indent.lua $$(git ls-files '*.lua')

# bgworker-util's tests include the ABI layout test, which compiles
# spec/native/abi_layout.c against include/bgworker.h (and so lua.h).
cargo-test:
	BGWORKER_LUA_INCDIR=$(call lua_incdir,5.4) $(CARGO) test --quiet $(call cargo_packages,$(CRATES)) --features lua54,vendored
	RUSTFLAGS="--cfg loom" $(CARGO) test --quiet --release --target-dir target/loom $(call cargo_packages,$(LOOM_CRATES)) --lib loom

specs: $(addprefix specs-,$(LUA_VERSIONS)) $(addprefix specs-copas1-,$(COPAS1_LUA))

# Smoke runs of examples/ and of the README's first program on every Lua
# version, each with the loops it has (spec/examples_test.lua); on LuaJIT
# the OpenResty example in a real nginx.
examples: $(addprefix examples-,$(LUA_VERSIONS))

# Install the rocks of `make dist` with luarocks into fresh trees and run the
# specs against them: each binary rock with no cargo on PATH, the source rock
# for SOURCE_ROCK_LUA (built with cargo, offline); the source rock without
# cargo must fail with a clear message (scripts/rock-check).
SOURCE_ROCK_LUA ?= 5.4 jit

rock-check: dist $(addprefix build-,$(DIST_LUA))
	ROCKS_SERVER="$(ROCKS_SERVER)" COPAS_VERSION=$(COPAS_VERSION) BUSTED="$(BUSTED)" \
	  bash scripts/rock-check --binary "$(DIST_LUA)" --source "$(SOURCE_ROCK_LUA)"

# A real nginx with lua-nginx-module runs the LuaJIT build: spec/nginx/nginx_test.lua.
nginx-test: build-jit
	BGWORKER_ROOT="$(CURDIR)" BGWORKER_BUILD="$(CURDIR)/$(BUILD)/jit" luajit $(BUSTED) spec/nginx/nginx_test.lua

# Every spec under memcheck on Lua 5.4, the reliability specs at small sizes.
# No suppressions: nothing is lost outside our code either (spec/reliability/README.md).
# --fair-sched=yes: valgrind runs one thread at a time, and its default lock
# lets a thread that spins (a `while true do end` job) starve the others for
# tens of seconds; the fair scheduler hands the lock round in turn.
leakcheck: setup build-5.4 copas-5.4
	$(call with_copas4,5.4,BGWORKER_SMALL=1 valgrind --quiet --fair-sched=yes --leak-check=full --show-leak-kinds=definite$(comma)indirect \
	  --errors-for-leak-kinds=definite$(comma)indirect --error-exitcode=1 --num-callers=40 lua5.4 $(BUSTED) spec)

# 2-3 minutes of 4 producers into a bounded queue: exactly once and in order,
# stats consistent, RSS sampled (spec/reliability/soak.lua). Not in `make
# test`; its last figures are in bench/README.md ("Soak").
SOAK_LUA ?= 5.4
SOAK_SECONDS ?= 150

soak: setup build-$(SOAK_LUA)
	$(call with_lua,$(SOAK_LUA),SOAK_SECONDS=$(SOAK_SECONDS) $(call lua_bin,$(SOAK_LUA)) spec/reliability/soak.lua)

# Copas's own test suite, each test plain and with a bgworker dispatcher and
# an idle pool in the program, which must not keep it from passing or ending
# (scripts/copas-suite). Not in `make test`: it needs a checkout of
# lunarmodules/copas at v4_11_0, COPAS_TESTS=dir, which CI does not have.
copas-suite: build-5.4 copas-5.4
	LUA=lua5.4 scripts/copas-suite $(COPAS_TESTS)

# ---------------------------------------------------------------------------
# Benchmarks (bench/README.md)

BENCH_LUA ?= 5.4 jit

bench: setup $(addprefix build-,$(BENCH_LUA)) $(addprefix copas-,$(BENCH_LUA))
	BENCH_LUA="$(BENCH_LUA)" BENCH_BUILD="$(BUILD)" lua5.4 bench/bench.lua

# Inline vs bgworker.pool vs luv's uv.new_work, on every Lua version.
# bgworker.pool against ngx.run_worker_thread in a real nginx (issue 18).
bench-openresty: setup build-jit
	BENCH_BUILD="$(CURDIR)/$(BUILD)/jit" luajit bench/openresty.lua

bench-pool: build
	$(foreach v,$(LUA_VERSIONS),$(call with_lua,$(v),$(call lua_bin,$(v)) bench/pool.lua) &&) true

clean:
	rm -rf $(BUILD) target dist

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

.PHONY: all setup build demo test check lint specs cargo-test rock-check clean $(addprefix build-,$(LUA_VERSIONS)) $(addprefix specs-,$(LUA_VERSIONS))

all: build

setup:
	@bash scripts/setup-deps

build: $(addprefix build-,$(LUA_VERSIONS))

# One cargo target directory per Lua version, so switching versions never rebuilds.
define build_version
build-$(1): $(BUILD)/$(1)/bgworker/core.so $(BUILD)/$(1)/bgworker_ticker.so $(BUILD)/$(1)/bgworker_testutil.so

$(BUILD)/$(1)/bgworker/core.so: FORCE
	$(CARGO) build --release --quiet --features $(call cargo_feature,$(1)),module --target-dir target/lua-$(1)
	@mkdir -p $$(@D)
	# A new file, not an overwrite: a running Lua may have the old one mapped.
	cp target/lua-$(1)/release/libbgworker.so $$@.tmp && mv $$@.tmp $$@

$(BUILD)/$(1)/bgworker_ticker.so: examples/c/ticker.c include/bgworker.h
	@mkdir -p $$(@D)
	$(CC) $(CFLAGS) -fPIC -shared -pthread -Iinclude -I$(call lua_incdir,$(1)) -o $$@ $$<

$(BUILD)/$(1)/bgworker_testutil.so: spec/native/testutil.c include/bgworker.h
	@mkdir -p $$(@D)
	$(CC) $(CFLAGS) -fPIC -shared -pthread -Iinclude -I$(call lua_incdir,$(1)) -o $$@ $$<

specs-$(1): build-$(1)
	LUA_PATH="lua/?.lua;lua/?/init.lua;spec/?.lua;;" LUA_CPATH="$(BUILD)/$(1)/?.so;;" \
	BGWORKER_LUA="$(call lua_bin,$(1))" BGWORKER_BUILD="$(BUILD)/$(1)" \
	$(call lua_bin,$(1)) /usr/bin/busted spec
endef
$(foreach v,$(LUA_VERSIONS),$(eval $(call build_version,$(v))))

FORCE:

demo: setup build-5.1
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

clean:
	rm -rf $(BUILD) target

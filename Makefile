# Tide build.  `make` installs missing Debian packages (scripts/deps.sh),
# then builds bin/tide.  `make test`, `make demo`, `make bench`, `make clean`.

.DEFAULT_GOAL := all
CC      ?= cc
OPT     ?= -O2
# libcrypto and libgcrypt: their headers only; engine/crypto.c loads them on
# first use, so processes that never encrypt (most workers) do not map them.
PKGS    := luajit libuv libzmq libsodium libedit sqlite3 libcrypto libgcrypt

# The packages' flags live in build/config.mk, which make remakes before it
# builds anything: its rule runs scripts/deps.sh first, then pkg-config.  When
# its text changes (a fresh clone, packages just installed, another LuaJIT
# flavour), make reads every makefile again, so the flags and the parse-time
# probes below (clang, libuv in engine/http.mk) see the installed packages and
# the first `make demo` on a bare machine builds.  The file keeps its date
# when nothing changed, so a `make` with everything present costs one
# deps.sh check and no restart.  `make clean` alone needs no packages.
ifneq ($(if $(MAKECMDGOALS),$(filter-out clean,$(MAKECMDGOALS)),all),)
include build/config.mk
endif
# The layers (DESIGN §8): engine/ knows nothing of Lua or tensors, gpu/
# nothing of Lua; lua/ binds both to LuaJIT; cmd/ is the `tide` command.
# Each layer compiles with only the include paths it may use (CORE_CFLAGS
# plus its own -I), so an include across the line fails the build; CFLAGS
# (every path) is for the test and tool binaries that span layers.
CORE_CFLAGS := $(OPT) -g -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Werror -fno-strict-aliasing \
               $(PKG_CFLAGS)
CFLAGS  := $(CORE_CFLAGS) -Iengine -Ilua -Igpu
LDLIBS  := $(PKG_LIBS) -lm -lpthread -ldl
LDFLAGS := -Wl,-E

ENGINE_SRCS := $(wildcard engine/*.c)
LUA_SRCS    := $(wildcard lua/*.c)
CMD_SRCS    := $(wildcard cmd/*.c)
GPU_SRCS    :=
EXTRA_OBJS  :=
TEST_DEPS   :=
# Optional fragments add sources and libraries (gpu layer, http ingress).
-include gpu/gpu.mk
-include engine/http.mk

SRCS := $(ENGINE_SRCS) $(LUA_SRCS) $(GPU_SRCS) $(CMD_SRCS)
OBJS := $(patsubst %.c,build/obj/%.o,$(SRCS))
ENGINE_OBJS := $(patsubst %.c,build/obj/%.o,$(ENGINE_SRCS))
LIB_OBJS := $(filter-out $(patsubst %.c,build/obj/%.o,$(CMD_SRCS)),$(OBJS))

.PHONY: all deps test demo bench clean lint ctest luatest check-bare chaos FORCE
all: bin/tide

deps:
	@sh scripts/deps.sh

# pkg-config's own message names a package still missing; the build stops
# there rather than at the first #include.
build/config.mk: FORCE
	@sh scripts/deps.sh
	@mkdir -p build
	@cflags=$$(pkg-config --cflags $(PKGS)) && libs=$$(pkg-config --libs $(filter-out libcrypto libgcrypt,$(PKGS))) && \
	  { echo "PKG_CFLAGS := $$cflags"; echo "PKG_LIBS := $$libs"; \
	    echo "# clang: $$(command -v clang)"; } >$@.tmp
	@if cmp -s $@.tmp $@; then rm -f $@.tmp; else mv $@.tmp $@; fi

# Every layer's header, for the dependency lists below.
HDRS := $(wildcard engine/*.h lua/*.h gpu/*.h)

bin/tide: $(OBJS) $(EXTRA_OBJS)
	@sh scripts/check-layers.sh
	@mkdir -p bin
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

build/obj/engine/%.o: engine/%.c $(HDRS) build/config.mk
	@mkdir -p $(dir $@)
	$(CC) $(CORE_CFLAGS) -Iengine $(ENGINE_CFLAGS) -c -o $@ $<

build/obj/gpu/%.o: gpu/%.c $(HDRS) build/config.mk
	@mkdir -p $(dir $@)
	$(CC) $(CORE_CFLAGS) -Iengine -Igpu -c -o $@ $<

build/obj/%.o: %.c $(HDRS) build/config.mk
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

# cmd/'s private header (cmd/cmd.h), for its own objects only.
$(patsubst %.c,build/obj/%.o,$(CMD_SRCS)): $(wildcard cmd/*.h)

# The engine alone, as a library: its C tests (build/ctest-engine) link
# with it and the system libraries it needs, without LuaJIT or the tensors.
build/libtide_engine.a: $(ENGINE_OBJS)
	@rm -f $@
	ar rcs $@ $^
ENGINE_LIBS = $(shell pkg-config --libs libuv libzmq libsodium sqlite3) -lm -lpthread -ldl

# C unit tests: one binary per build flavour (plain, asan+ubsan), each test
# run in its own process with a timeout by tests/c/runner.c.
CTEST_SRCS := $(wildcard tests/c/test-*.c) tests/c/runner.c
build/ctest: $(CTEST_SRCS) $(LIB_OBJS) $(EXTRA_OBJS) $(wildcard tests/c/*.h)
	$(CC) $(CFLAGS) -Itests/c $(LDFLAGS) -o $@ $(CTEST_SRCS) $(LIB_OBJS) $(EXTRA_OBJS) $(LDLIBS)

# The engine's own tests, compiled and linked with the engine layer only.
CTEST_ENGINE_SRCS := tests/c/test-core.c tests/c/test-obj.c tests/c/test-sched.c tests/c/test-pg.c \
                     tests/c/test-lineage.c tests/c/test-msgs.c tests/c/test-http.c tests/c/runner.c
build/ctest-engine: $(CTEST_ENGINE_SRCS) build/libtide_engine.a $(EXTRA_OBJS) $(wildcard tests/c/*.h)
	$(CC) $(CORE_CFLAGS) $(ENGINE_CFLAGS) -DTD_TEST_ENGINE_ONLY -Iengine -Itests/c -o $@ \
	  $(CTEST_ENGINE_SRCS) build/libtide_engine.a $(EXTRA_OBJS) $(ENGINE_LIBS)

ASAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
build/ctest-asan: $(CTEST_SRCS) $(SRCS) $(wildcard tests/c/*.h) build/config.mk
	$(CC) $(CFLAGS) $(ASAN) -O1 -Itests/c $(LDFLAGS) -o $@ $(CTEST_SRCS) \
	  $(filter-out $(CMD_SRCS),$(SRCS)) $(EXTRA_OBJS) $(LDLIBS)

# libFuzzer target over the node's message handling and the value decoder.
ifneq ($(shell command -v clang 2>/dev/null),)
TEST_DEPS += build/fuzz-node
endif
NODE_FUZZ_SRCS := tests/fuzz/fuzz_node.c engine/node.c engine/obj.c engine/sched.c engine/task.c engine/pg.c engine/transfer.c engine/lineage.c engine/actor.c engine/workers.c engine/cluster.c engine/introspect.c engine/worklog.c engine/timeline.c engine/term.c engine/why.c engine/util.c engine/store.c engine/spill.c engine/chan.c \
                  engine/proto.c engine/persist.c engine/pkg.c engine/workdir.c engine/dplane.c engine/aead.c engine/crypto.c lua/ser.c
build/fuzz-node: $(NODE_FUZZ_SRCS) $(wildcard engine/*.h lua/*.h)
	@mkdir -p build
	clang -g -O1 -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Werror -fsanitize=fuzzer,address,undefined \
	  -fno-sanitize-recover=undefined -Iengine -Ilua $(shell pkg-config --cflags luajit) \
	  -o $@ $(NODE_FUZZ_SRCS) $(shell pkg-config --libs luajit sqlite3 libsodium) -lm -ldl

# The whole engine under ASan+UBSan, for the Lua suites (tests/sh/asan_lua_test.sh).
TEST_DEPS += build/asan/tide
build/asan/tide: $(SRCS) $(EXTRA_OBJS) $(wildcard engine/*.h lua/*.h gpu/*.h) build/config.mk
	@mkdir -p build/asan
	$(CC) $(CFLAGS) $(ASAN) -O1 $(LDFLAGS) -o $@ $(SRCS) $(EXTRA_OBJS) $(LDLIBS)

test: all build/ctest build/ctest-engine build/ctest-asan $(TEST_DEPS)
	@sh scripts/deps.sh test
	@sh tests/run.sh

# The flagship: train, batch-generate, serve, fine-tune (about a minute on
# 2 cores; tests/sh/genai_test.sh runs its short mode under make test).
demo: all
	bin/tide run examples/genai.lua

# Ten minutes of kill -9 under checked work (a short run is in make test).
chaos: all
	sh tests/chaos/chaos.sh $${CHAOS_SECONDS:-600}

bench: all build/bench-http
	bin/tide bench

# A fresh clone's first `make demo` with three build packages removed
# (root only; they are installed again).  Run by .ci/run.
check-bare:
	@sh scripts/check-bare.sh

lint:
	sh scripts/check-layers.sh
	sh scripts/check-sizes.sh
	sh scripts/check-format.sh $${BASE:-HEAD~1}
	cppcheck -q --error-exitcode=1 --enable=warning,performance engine lua gpu cmd
	luacheck -q stdlib examples tests/lua

clean:
	rm -rf build bin/tide


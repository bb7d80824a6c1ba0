# HTTP ingress build fragment, included by the top Makefile.
# llhttp comes from Debian's node-llhttp as C sources, compiled here (not
# vendored) into build/llhttp/ and linked into bin/tide and the C tests.
# Also builds the libFuzzer target run by tests/sh/http_fuzz_test.sh and the
# load generator in bench/http/.

# The ingress itself (split by concept behind engine/http_int.h); the
# binaries that link it alone add engine/util.c (td.h's buffers and codes).
HTTP_SRCS := engine/http.c engine/http_parse.c engine/http_respond.c
HTTP_HDRS := engine/http.h engine/http_int.h

LLHTTP_DIR  ?= /usr/share/llhttp
LLHTTP_INC  ?= /usr/share/include/llhttp
LLHTTP_SRCS := $(LLHTTP_DIR)/api.c $(LLHTTP_DIR)/http.c $(LLHTTP_DIR)/llhttp.c
LLHTTP_OBJS := build/llhttp/api.o build/llhttp/http.o build/llhttp/llhttp.o

CFLAGS        += -isystem $(LLHTTP_INC)
ENGINE_CFLAGS += -isystem $(LLHTTP_INC)
EXTRA_OBJS += $(LLHTTP_OBJS)

# Third-party code: no -Werror, no warnings of ours.
build/llhttp/%.o: $(LLHTTP_DIR)/%.c
	@mkdir -p $(dir $@)
	$(CC) $(OPT) -g -fPIC -w -I$(LLHTTP_INC) -c -o $@ $<

HTTP_UV_CFLAGS := $(shell pkg-config --cflags libuv 2>/dev/null)
HTTP_UV_LIBS   := $(shell pkg-config --libs libuv 2>/dev/null) -lpthread

# libFuzzer needs clang; without it the fuzz test reports a skip.
CLANG ?= clang
ifneq ($(shell command -v $(CLANG) 2>/dev/null),)
TEST_DEPS += build/fuzz-http
endif
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined
LLHTTP_FUZZ_OBJS := $(patsubst build/llhttp/%,build/llhttp-fuzz/%,$(LLHTTP_OBJS))
build/llhttp-fuzz/%.o: $(LLHTTP_DIR)/%.c
	@mkdir -p $(dir $@)
	$(CLANG) -g -O1 -w -fsanitize=fuzzer-no-link $(FUZZ_SAN) -I$(LLHTTP_INC) -c -o $@ $<
build/fuzz-http: tests/fuzz/fuzz_http.c $(HTTP_SRCS) engine/util.c $(HTTP_HDRS) engine/td.h $(LLHTTP_FUZZ_OBJS)
	@mkdir -p build
	$(CLANG) -g -O1 -std=gnu11 -Wall -Wextra -Werror -fsanitize=fuzzer $(FUZZ_SAN) \
	  -Iengine -isystem $(LLHTTP_INC) $(HTTP_UV_CFLAGS) \
	  -o $@ tests/fuzz/fuzz_http.c $(HTTP_SRCS) engine/util.c $(LLHTTP_FUZZ_OBJS) $(HTTP_UV_LIBS)

# The HTTP load generator and in-process hello/echo server (bench/http).
build/bench-http: bench/http/bench_http.c $(HTTP_SRCS) engine/util.c $(HTTP_HDRS) engine/td.h $(LLHTTP_OBJS)
	@mkdir -p build
	$(CC) $(OPT) -g -std=gnu11 -Wall -Wextra -Werror -Iengine -isystem $(LLHTTP_INC) \
	  $(HTTP_UV_CFLAGS) -o $@ bench/http/bench_http.c $(HTTP_SRCS) engine/util.c $(LLHTTP_OBJS) $(HTTP_UV_LIBS) -lm

# Tide GPU layer build fragment, included by the top Makefile.
#
# Adds the tensor core, CPU reference ops and CPU collectives to
# GPU_SRCS (linked into bin/tide and the C test binaries), OpenBLAS to LDLIBS,
# and extra targets to TEST_DEPS:
#   build/bench-allreduce      CPU ring allreduce benchmark (JSON lines)
#   build/fake_cuda.so         a stand-in CUDA plugin for GPU-less test runs
#   build/tide_cuda.so         CUDA plugin (kernels, cuBLAS, NCCL), only when
#                              nvcc is found; never linked, dlopen()ed at run
#                              time when a GPU is present.

GPU_CORE_SRCS := gpu/gpu_err.c gpu/tensor.c gpu/ops_cpu.c gpu/device.c gpu/reduce.c \
                 gpu/ring.c gpu/ring_local.c gpu/nccl_comm.c
GPU_HDRS      := $(wildcard gpu/*.h)
GPU_SRCS      += $(GPU_CORE_SRCS)
LDLIBS        += -lopenblas

# The module alone, for plain `luajit` (tests/gpu/dev_prelude.lua); not
# needed by bin/tide, so not built by default.
TENSOR_LUA_SRCS := lua/tensor_lua.c lua/tensor_new_lua.c lua/tensor_ops_lua.c
build/tide_tensor_dev.so: $(GPU_CORE_SRCS) $(TENSOR_LUA_SRCS) lua/tensor_lua_int.h $(GPU_HDRS)
	@mkdir -p build
	$(CC) $(CFLAGS) -fPIC -shared -o $@ $(GPU_CORE_SRCS) $(TENSOR_LUA_SRCS) -lopenblas -lm -lpthread -ldl

TEST_DEPS += build/bench-allreduce
BENCH_ALLREDUCE_SRCS := gpu/bench/bench_allreduce.c gpu/ring.c gpu/ring_local.c gpu/reduce.c gpu/gpu_err.c \
                        gpu/tensor.c gpu/device.c gpu/ops_cpu.c
build/bench-allreduce: $(BENCH_ALLREDUCE_SRCS) $(GPU_HDRS)
	@mkdir -p build
	$(CC) $(CFLAGS) -o $@ $(BENCH_ALLREDUCE_SRCS) -lopenblas -lm -lpthread -ldl

# The cross-node collective's exchange alone, two forked ranks (bench/coll_net_pair.c).
TEST_DEPS += build/bench-cnet
build/bench-cnet: bench/coll_net_pair.c lua/coll_net.c lua/coll_net.h gpu/reduce.c gpu/gpu_err.c \
                  gpu/tensor.c gpu/device.c gpu/ops_cpu.c build/libtide_engine.a $(GPU_HDRS)
	@mkdir -p build
	$(CC) $(CFLAGS) -o $@ bench/coll_net_pair.c lua/coll_net.c gpu/reduce.c gpu/gpu_err.c \
	  gpu/tensor.c gpu/device.c gpu/ops_cpu.c build/libtide_engine.a -lopenblas -lm -lpthread -ldl

# -- CUDA plugin (only when nvcc exists) ---------------------------------------
NVCC ?= $(shell command -v nvcc 2>/dev/null || { test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc; })
ifneq ($(strip $(NVCC)),)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
# Hopper and Ampere SASS plus Hopper PTX (JIT-compiled on newer GPUs).
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
             -gencode arch=compute_90,code=compute_90
NVCCFLAGS ?= -O2 -std=c++17 -Xcompiler -fPIC,-Wall -I$(CUDA_HOME)/include -Igpu
TEST_DEPS += build/tide_cuda.so
# The plugin finds CUDA libraries in $ORIGIN/cuda-libs (what scripts/gpu-check.sh
# carries to a GPU machine), then in the toolkit it was built against.
build/tide_cuda.so: gpu/cuda/plugin.cu $(GPU_HDRS)
	@mkdir -p build
	$(NVCC) $(NVCCFLAGS) $(CUDA_ARCH) -shared -o $@ gpu/cuda/plugin.cu \
	  -L$(CUDA_HOME)/lib64 -lcublas -lnccl \
	  -Xlinker -rpath='$$ORIGIN/cuda-libs' -Xlinker -rpath=$(CUDA_HOME)/lib64
endif

# A fake plugin (host memory, CPU kernels) that lets the CUDA code paths and
# tests/gpu/cuda_test.lua run on machines without a GPU.
TEST_DEPS += build/fake_cuda.so
build/fake_cuda.so: tests/gpu/fake_cuda.c gpu/ops_cpu.c gpu/gpu_err.c gpu/tensor.c gpu/device.c $(GPU_HDRS)
	@mkdir -p build
	$(CC) $(CFLAGS) -fPIC -shared -fvisibility=hidden -o $@ tests/gpu/fake_cuda.c gpu/ops_cpu.c \
	  gpu/gpu_err.c gpu/tensor.c gpu/device.c -lopenblas -lm -lpthread -ldl

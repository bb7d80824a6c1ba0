# Tide GPU layer build fragment, included by the top Makefile.
#
# Adds the tensor core, CPU reference ops, Lua binding and CPU collectives to
# GPU_SRCS (linked into bin/tide and the C test binaries), OpenBLAS to LDLIBS,
# and extra targets to TEST_DEPS:
#   build/tide_tensor_dev.so   the tensor module for plain `luajit` (dev use)
#   build/bench-allreduce      CPU ring allreduce benchmark (JSON lines)
#   build/bench-matmul         tensor matmul vs plain OpenBLAS sgemm
#   build/tide_cuda.so         CUDA plugin (kernels, cuBLAS, NCCL), only when
#                              nvcc is found; never linked, dlopen()ed at run
#                              time when a GPU is present.

GPU_CORE_SRCS := gpu/gpu_err.c gpu/tensor.c gpu/ops_cpu.c gpu/device.c \
                 gpu/tensor_lua.c gpu/ring.c gpu/ring_local.c
GPU_HDRS      := $(wildcard gpu/*.h)
GPU_SRCS      += $(GPU_CORE_SRCS)
LDLIBS        += -lopenblas
TEST_DEPS     += build/tide_tensor_dev.so

build/tide_tensor_dev.so: $(GPU_CORE_SRCS) $(GPU_HDRS)
	@mkdir -p build
	$(CC) $(CFLAGS) -fPIC -shared -o $@ $(GPU_CORE_SRCS) -lopenblas -lm -lpthread -ldl

TEST_DEPS += build/bench-allreduce
build/bench-allreduce: gpu/bench/bench_allreduce.c gpu/ring.c gpu/ring_local.c gpu/gpu_err.c $(GPU_HDRS)
	@mkdir -p build
	$(CC) $(CFLAGS) -o $@ gpu/bench/bench_allreduce.c gpu/ring.c gpu/ring_local.c gpu/gpu_err.c -lpthread

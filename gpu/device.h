/* Tide devices: the CPU, and CUDA devices reached through a plugin shared
 * object (build/tide_cuda.so, made by gpu/cuda/ when nvcc exists) that is
 * dlopen()ed only when a GPU is present.  The binary never links CUDA.
 * Uses ops.h for the op table and gpu_err.h for codes.
 *
 * The plugin exports one C symbol, td_cuda_plugin_get(), returning a
 * td_cuda_plugin_t with ABI version TD_CUDA_PLUGIN_ABI.  Every plugin
 * function returns 0 or a negative TD_GPU_E* code and leaves the CUDA,
 * cuBLAS or NCCL message in td_gpu_last_detail() through set_detail.
 */
#ifndef TD_DEVICE_H
#define TD_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "ops.h"

#define TD_CUDA_PLUGIN_ABI 3

/* Reduction kinds for collectives (CPU ring and NCCL). */
typedef enum td_redop { TD_SUM = 0, TD_AVG = 1, TD_MAX = 2, TD_MIN = 3 } td_redop_t;

/* memcpy directions for td_cuda_plugin_t.memcpy. */
enum { TD_H2D = 0, TD_D2H = 1, TD_D2D = 2 };

typedef struct td_cuda_plugin {
  int abi;                   /* TD_CUDA_PLUGIN_ABI */
  const td_ops_t *ops;       /* kernels; run on the current device */
  /* Sets the plugin's error-detail hook (td_gpu_set_detail of the host). */
  void (*set_detail_hook)(void (*fn)(const char *fmt, ...));
  int (*device_count)(int *n);                      /* 0 GPUs is not an error */
  int (*device_name)(int dev, char *buf, size_t n); /* "NVIDIA H100 ..." */
  int (*set_device)(int dev);                       /* current device, this thread */
  int (*malloc)(void **p, size_t n);                /* on the current device */
  int (*free)(void *p);
  int (*memcpy)(void *dst, const void *src, size_t n, int kind); /* TD_H2D.. */
  int (*memset)(void *p, int v, size_t n);
  int (*synchronize)(void);
  /* NCCL: ids are 128 opaque bytes; comm handles are opaque pointers owned
   * by the plugin until comm_destroy.  dtype is a td_dtype_t; op td_redop_t. */
  int (*nccl_get_unique_id)(void *id128);
  int (*nccl_comm_init)(void **comm, int nranks, const void *id128, int rank);
  int (*nccl_comm_destroy)(void *comm);
  int (*nccl_allreduce)(void *comm, const void *send, void *recv, size_t count,
                        int dtype, int op);
  int (*nccl_allgather)(void *comm, const void *send, void *recv,
                        size_t send_count, int dtype);
  int (*nccl_reduce_scatter)(void *comm, const void *send, void *recv,
                             size_t recv_count, int dtype, int op);
  int (*nccl_broadcast)(void *comm, void *buf, size_t count, int dtype,
                        int root);
  int (*nccl_send)(void *comm, const void *buf, size_t count, int dtype,
                   int peer);
  int (*nccl_recv)(void *comm, void *buf, size_t count, int dtype, int peer);
} td_cuda_plugin_t;

/* The symbol the plugin exports. */
typedef const td_cuda_plugin_t *(*td_cuda_plugin_get_fn)(void);

/* Loads the CUDA plugin once if a GPU is present: $TIDE_CUDA_PLUGIN, else
 * dirname(/proc/self/exe)/../build/tide_cuda.so.  Returns the plugin
 * (borrowed, lives until exit) or NULL with *err set to TD_GPU_ENODEV (no
 * GPU) or TD_GPU_EPLUGIN (detail says why). */
const td_cuda_plugin_t *td_cuda_plugin(int *err);

/* Number of usable CUDA devices (0 without a GPU or plugin); never fails. */
int td_cuda_device_count(void);

/* The op table for device dev (TD_CPU or a CUDA ordinal), with the device
 * made current; NULL and *err set if dev is not usable. */
const td_ops_t *td_device_ops(int dev, int *err);

/* Device memory helpers used by tensor.c (dev >= 0). */
int td_device_alloc(int dev, void **p, size_t n);
void td_device_free(int dev, void *p);
int td_device_memcpy(int dst_dev, void *dst, int src_dev, const void *src,
                     size_t n);

#endif

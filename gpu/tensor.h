/* Tide tensors: n-dimensional arrays on the CPU or a CUDA device, with
 * views (reshape, slice, transpose) sharing one reference-counted storage.
 * Uses gpu_err.h for codes and device.h to reach CUDA memory; the ops that
 * compute on tensors live behind the op table in ops.h.
 *
 * Ownership: every td_tensor_t is owned by exactly one holder, which frees
 * it with td_tensor_free(); views made from a tensor own a new reference to
 * the same storage, so the source may be freed first.  Tensors are not
 * thread-safe; storage reference counts are.
 */
#ifndef TD_TENSOR_H
#define TD_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "gpu_err.h"

/* -- Types ---------------------------------------------------------------- */

/* Element types.  Ops compute in f32 (indices in i32); the others are storage
 * types for conversion, checkpoints and CUDA matmul inputs. */
typedef enum td_dtype {
  TD_F32 = 0,
  TD_F16 = 1,
  TD_BF16 = 2,
  TD_I32 = 3,
  TD_I64 = 4,
  TD_U8 = 5,
  TD__NDTYPES
} td_dtype_t;

#define TD_CPU (-1)     /* device id of host memory; 0.. are CUDA ordinals */
#define TD_MAX_DIMS 8   /* most dimensions a tensor may have */

typedef struct td_tensor td_tensor_t;

/* Called when wrapped external memory is no longer referenced. */
typedef void (*td_release_cb)(void *ctx, void *data);

/* -- Dtypes and devices ----------------------------------------------------- */

size_t td_dtype_size(int dtype);                 /* bytes per element; 0 if bad */
const char *td_dtype_name(int dtype);            /* "f32", ...; "?" if bad */
int td_dtype_parse(const char *name);            /* dtype or TD_GPU_EDTYPE */
/* Parses "cpu", "cuda", "cuda:N" into a device id; negative code on error
 * (TD_CPU is -1, so the result is returned through *dev). */
int td_device_parse(const char *name, int *dev);
void td_device_format(int dev, char *buf, size_t n); /* "cpu" or "cuda:N" */

/* -- Creation and release ------------------------------------------------- */

/* Allocates an uninitialised contiguous tensor.  Caller owns *out. */
int td_tensor_empty(td_tensor_t **out, int dtype, int device, int ndim,
                    const int64_t *shape);
/* Allocates a contiguous tensor filled with zeros.  Caller owns *out. */
int td_tensor_zeros(td_tensor_t **out, int dtype, int device, int ndim,
                    const int64_t *shape);
/* Wraps nbytes of caller memory at data as a contiguous CPU tensor without
 * copying (zero-copy gets from the object store).  release(ctx, data) runs
 * when the last view goes away; it may be NULL.  Caller owns *out. */
int td_tensor_wrap(td_tensor_t **out, void *data, size_t nbytes, int dtype,
                   int ndim, const int64_t *shape, td_release_cb release,
                   void *ctx);
/* Frees the tensor (not necessarily its storage) and NULLs *t; idempotent. */
void td_tensor_free(td_tensor_t **t);

/* -- Metadata ------------------------------------------------------------- */

int td_tensor_dtype(const td_tensor_t *t);
int td_tensor_device(const td_tensor_t *t);
int td_tensor_ndim(const td_tensor_t *t);
const int64_t *td_tensor_shape(const td_tensor_t *t);  /* ndim entries */
const int64_t *td_tensor_strides(const td_tensor_t *t); /* in elements */
int64_t td_tensor_numel(const td_tensor_t *t);
size_t td_tensor_nbytes(const td_tensor_t *t);          /* numel * elsize */
int td_tensor_is_contiguous(const td_tensor_t *t);
/* Address of element 0 (host or device pointer); borrowed. */
void *td_tensor_data(const td_tensor_t *t);
/* Whether two tensors share one storage (views of each other). */
int td_tensor_same_storage(const td_tensor_t *a, const td_tensor_t *b);

/* -- Views (share storage; caller owns *out) ------------------------------- */

/* New shape with the same number of elements; t must be contiguous.  One
 * entry of shape may be -1 (inferred). */
int td_tensor_view(td_tensor_t **out, const td_tensor_t *t, int ndim,
                   const int64_t *shape);
/* Elements [start, stop) of dimension dim (0-based, stop exclusive). */
int td_tensor_slice(td_tensor_t **out, const td_tensor_t *t, int dim,
                    int64_t start, int64_t stop);
/* Swaps dimensions d0 and d1 (0-based). */
int td_tensor_transpose(td_tensor_t **out, const td_tensor_t *t, int d0, int d1);

/* -- Copies (caller owns *out) ---------------------------------------------- */

/* A contiguous copy of t on the same device (always copies). */
int td_tensor_clone(td_tensor_t **out, const td_tensor_t *t);
/* t itself as a new view when contiguous, else a contiguous copy. */
int td_tensor_contiguous(td_tensor_t **out, const td_tensor_t *t);
/* A contiguous copy on device dev, converted to dtype. */
int td_tensor_to(td_tensor_t **out, const td_tensor_t *t, int device, int dtype);
/* Copies src into dst (same shape, any strides/devices/dtypes). */
int td_tensor_copy(td_tensor_t *dst, const td_tensor_t *src);
/* Sets every element of a contiguous f32/i32 tensor to v. */
int td_tensor_fill(td_tensor_t *t, double v);

/* -- Serialization (object store) ------------------------------------------ */

/* Bytes td_tensor_serialize() writes for t: a header then the raw data. */
size_t td_tensor_serialized_size(const td_tensor_t *t);
/* Writes t (any device; read back to host) into buf of cap bytes. */
int td_tensor_serialize(const td_tensor_t *t, void *buf, size_t cap);
/* Parses a serialized tensor into a new CPU tensor (copies).  Caller owns. */
int td_tensor_deserialize(td_tensor_t **out, const void *buf, size_t len);
/* Writes the header td_tensor_serialize() puts before the data (at most
 * 8 + 8 * TD_MAX_DIMS bytes); returns its length. */
size_t td_tensor_header(const td_tensor_t *t, void *buf);
/* A CPU tensor from a header and its n data bytes.  Without release, the
 * bytes are copied.  With it, they are mapped in place (zero copy, when
 * aligned for the dtype) and the tensor is read-only; release(ctx, data)
 * runs when the last view goes away.  It never runs when this call fails
 * or copied (td_tensor_is_readonly tells which).  Caller owns *out. */
int td_tensor_from_parts(td_tensor_t **out, const void *hdr, size_t hlen,
                         const void *data, size_t n, td_release_cb release,
                         void *ctx);
/* Whether t maps memory it must not write (a tensor read from the store). */
int td_tensor_is_readonly(const td_tensor_t *t);

/* -- Host memory pool ------------------------------------------------------ */

/* Bytes of freed host blocks kept for reuse (pre-faulted pages: first touch
 * of fresh memory is slow on VMs).  Default 512 MiB or $TIDE_TENSOR_POOL_MB. */
void td_tensor_pool_limit(size_t bytes);
/* Returns every cached block to the system. */
void td_tensor_pool_trim(void);
/* Host bytes currently allocated to live storages. */
size_t td_tensor_host_bytes(void);

#endif

/* Tide tensor internals shared by the files of gpu/ (not a public API). */
#ifndef TD_TENSOR_INT_H
#define TD_TENSOR_INT_H

#include "tensor.h"

/* One allocation of elements, shared by every view of it. */
typedef struct td_storage {
  int refs;              /* views referring to it (atomic) */
  int device;            /* TD_CPU or CUDA ordinal */
  size_t nbytes;         /* bytes at data */
  void *data;            /* host or device memory */
  td_release_cb release; /* external memory: called instead of freeing */
  void *release_ctx;     /* argument for release */
  int readonly;          /* maps an object in the store: never written */
} td_storage_t;

struct td_tensor {
  td_storage_t *st;                 /* shared storage, one reference held */
  int64_t offset;                   /* element offset of element 0 */
  int dtype;                        /* td_dtype_t */
  int ndim;                         /* 0..TD_MAX_DIMS (0 = scalar) */
  int64_t shape[TD_MAX_DIMS];       /* extent per dimension */
  int64_t stride[TD_MAX_DIMS];      /* elements between neighbours */
};

/* Host allocation from the reuse pool; 64-byte aligned. */
void *td__host_alloc(size_t n);
void td__host_free(void *p, size_t n);

#endif

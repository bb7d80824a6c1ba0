/* Tide tensors: storage, views, copies, serialization, host memory pool
 * (see tensor.h). */
#include "tensor_int.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "device.h"
#include "ops.h"

/* -- Dtypes and devices ---------------------------------------------------- */

static const size_t td__dtype_sizes[TD__NDTYPES] = {4, 2, 2, 4, 8, 1};
static const char *const td__dtype_names[TD__NDTYPES] = {"f32", "f16", "bf16",
                                                         "i32", "i64", "u8"};

size_t td_dtype_size(int dtype) {
  return dtype >= 0 && dtype < TD__NDTYPES ? td__dtype_sizes[dtype] : 0;
}

const char *td_dtype_name(int dtype) {
  return dtype >= 0 && dtype < TD__NDTYPES ? td__dtype_names[dtype] : "?";
}

int td_dtype_parse(const char *name) {
  for (int i = 0; i < TD__NDTYPES; i++)
    if (strcmp(name, td__dtype_names[i]) == 0) return i;
  if (strcmp(name, "float32") == 0) return TD_F32;
  if (strcmp(name, "float16") == 0) return TD_F16;
  if (strcmp(name, "bfloat16") == 0) return TD_BF16;
  if (strcmp(name, "int32") == 0) return TD_I32;
  if (strcmp(name, "int64") == 0) return TD_I64;
  if (strcmp(name, "uint8") == 0) return TD_U8;
  return TD_GPU_EDTYPE;
}

int td_device_parse(const char *name, int *dev) {
  if (strcmp(name, "cpu") == 0) {
    *dev = TD_CPU;
    return 0;
  }
  if (strcmp(name, "cuda") == 0) {
    *dev = 0;
    return 0;
  }
  if (strncmp(name, "cuda:", 5) == 0 && name[5] >= '0' && name[5] <= '9') {
    char *end;
    long v = strtol(name + 5, &end, 10);
    if (*end == '\0' && v < 1024) {
      *dev = (int)v;
      return 0;
    }
  }
  return TD_GPU_EINVAL;
}

void td_device_format(int dev, char *buf, size_t n) {
  if (dev == TD_CPU)
    snprintf(buf, n, "cpu");
  else
    snprintf(buf, n, "cuda:%d", dev);
}

/* -- Host memory pool -------------------------------------------------------- */

/* Freed host blocks of a given size are kept and handed out again, because
 * a first touch of fresh pages costs ~11 us per 4 KiB page on these VMs.
 * Blocks of at least TD__MMAP_MIN bytes come from mmap(MAP_POPULATE), which
 * faults pages in bulk (about 5x faster than touching them one by one). */
#define TD__POOL_MIN (16u << 10)   /* smaller blocks: plain malloc/free */
#define TD__MMAP_MIN (1u << 20)    /* larger blocks: mmap + MAP_POPULATE */
#define TD__POOL_BUCKETS 256       /* distinct cached sizes */

typedef struct td__bucket {
  size_t size;  /* block size in bytes, 0 = unused slot */
  void *head;   /* free list threaded through the blocks' first word */
} td__bucket_t;

static struct {
  pthread_mutex_t mu;                    /* guards everything below */
  td__bucket_t b[TD__POOL_BUCKETS];      /* one free list per size */
  size_t cached;                         /* bytes in free lists */
  size_t limit;                          /* most bytes to keep cached */
  int limit_set;                         /* limit read from the env yet */
  size_t live;                           /* bytes handed out, not freed */
} td__pool = {PTHREAD_MUTEX_INITIALIZER, {{0, NULL}}, 0, 0, 0, 0};

static size_t td__round(size_t n) {
  if (n >= TD__MMAP_MIN) return (n + 4095) & ~(size_t)4095;
  return (n + 63) & ~(size_t)63;
}

static void *td__sys_alloc(size_t n) {
  if (n >= TD__MMAP_MIN) {
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
  }
  void *p = NULL;
  if (posix_memalign(&p, 64, n ? n : 64) != 0) return NULL;
  return p;
}

static void td__sys_free(void *p, size_t n) {
  if (n >= TD__MMAP_MIN)
    munmap(p, n);
  else
    free(p);
}

static void td__pool_init_limit(void) {
  if (td__pool.limit_set) return;
  const char *e = getenv("TIDE_TENSOR_POOL_MB");
  td__pool.limit = (e && *e ? (size_t)strtoull(e, NULL, 10) : 512) << 20;
  td__pool.limit_set = 1;
}

void *td__host_alloc(size_t n) {
  n = td__round(n);
  if (n >= TD__POOL_MIN) {
    pthread_mutex_lock(&td__pool.mu);
    for (int i = 0; i < TD__POOL_BUCKETS; i++) {
      if (td__pool.b[i].size == n && td__pool.b[i].head) {
        void *p = td__pool.b[i].head;
        td__pool.b[i].head = *(void **)p;
        td__pool.cached -= n;
        td__pool.live += n;
        pthread_mutex_unlock(&td__pool.mu);
        return p;
      }
    }
    pthread_mutex_unlock(&td__pool.mu);
  }
  void *p = td__sys_alloc(n);
  if (p) __atomic_add_fetch(&td__pool.live, n, __ATOMIC_RELAXED);
  return p;
}

void td__host_free(void *p, size_t n) {
  if (!p) return;
  n = td__round(n);
  if (n >= TD__POOL_MIN) {
    pthread_mutex_lock(&td__pool.mu);
    td__pool_init_limit();
    td__pool.live -= n;
    if (td__pool.cached + n <= td__pool.limit) {
      int slot = -1;
      for (int i = 0; i < TD__POOL_BUCKETS; i++) {
        if (td__pool.b[i].size == n) {
          slot = i;
          break;
        }
        if (slot < 0 && td__pool.b[i].head == NULL) slot = i;
      }
      if (slot >= 0) {
        td__pool.b[slot].size = n;
        *(void **)p = td__pool.b[slot].head;
        td__pool.b[slot].head = p;
        td__pool.cached += n;
        pthread_mutex_unlock(&td__pool.mu);
        return;
      }
    }
    pthread_mutex_unlock(&td__pool.mu);
  } else {
    __atomic_sub_fetch(&td__pool.live, n, __ATOMIC_RELAXED);
  }
  td__sys_free(p, n);
}

void td_tensor_pool_limit(size_t bytes) {
  pthread_mutex_lock(&td__pool.mu);
  td__pool.limit = bytes;
  td__pool.limit_set = 1;
  pthread_mutex_unlock(&td__pool.mu);
  if (td__pool.cached > bytes) td_tensor_pool_trim();
}

void td_tensor_pool_trim(void) {
  pthread_mutex_lock(&td__pool.mu);
  for (int i = 0; i < TD__POOL_BUCKETS; i++) {
    void *p = td__pool.b[i].head;
    while (p) {
      void *next = *(void **)p;
      td__sys_free(p, td__pool.b[i].size);
      p = next;
    }
    td__pool.b[i].head = NULL;
    td__pool.b[i].size = 0;
  }
  td__pool.cached = 0;
  pthread_mutex_unlock(&td__pool.mu);
}

size_t td_tensor_host_bytes(void) {
  return __atomic_load_n(&td__pool.live, __ATOMIC_RELAXED);
}

/* -- Storage --------------------------------------------------------------- */

static int td__storage_new(td_storage_t **out, int device, size_t nbytes) {
  td_storage_t *st = calloc(1, sizeof(*st));
  if (!st) return TD_GPU_ENOMEM;
  st->refs = 1;
  st->device = device;
  st->nbytes = nbytes;
  if (device == TD_CPU) {
    st->data = td__host_alloc(nbytes);
    if (!st->data) {
      free(st);
      return TD_GPU_ENOMEM;
    }
  } else {
    int rc = td_device_alloc(device, &st->data, nbytes ? nbytes : 4);
    if (rc) {
      free(st);
      return rc;
    }
  }
  *out = st;
  return 0;
}

static void td__storage_release(td_storage_t *st) {
  if (!st || __atomic_sub_fetch(&st->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
  if (st->release)
    st->release(st->release_ctx, st->data);
  else if (st->device == TD_CPU)
    td__host_free(st->data, st->nbytes);
  else if (st->data)
    td_device_free(st->device, st->data);
  free(st);
}

/* -- Creation ---------------------------------------------------------------- */

static int td__check_shape(int ndim, const int64_t *shape, int64_t *numel) {
  if (ndim < 0 || ndim > TD_MAX_DIMS) return TD_GPU_EINVAL;
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0 || (shape[i] > 0 && n > INT64_MAX / 16 / shape[i])) return TD_GPU_EINVAL;
    n *= shape[i];
  }
  *numel = n;
  return 0;
}

static void td__set_contiguous(td_tensor_t *t) {
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    t->stride[i] = s;
    s *= t->shape[i];
  }
}

int td_tensor_empty(td_tensor_t **out, int dtype, int device, int ndim,
                    const int64_t *shape) {
  int64_t n;
  int rc = td__check_shape(ndim, shape, &n);
  if (rc) return rc;
  if (td_dtype_size(dtype) == 0) return TD_GPU_EDTYPE;
  td_tensor_t *t = calloc(1, sizeof(*t));
  if (!t) return TD_GPU_ENOMEM;
  rc = td__storage_new(&t->st, device, (size_t)n * td_dtype_size(dtype));
  if (rc) {
    free(t);
    return rc;
  }
  t->dtype = dtype;
  t->ndim = ndim;
  if (ndim > 0) memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
  td__set_contiguous(t);
  *out = t;
  return 0;
}

int td_tensor_zeros(td_tensor_t **out, int dtype, int device, int ndim,
                    const int64_t *shape) {
  int rc = td_tensor_empty(out, dtype, device, ndim, shape);
  if (rc) return rc;
  td_tensor_t *t = *out;
  if (device == TD_CPU) {
    memset(t->st->data, 0, t->st->nbytes);
    return 0;
  }
  int err = 0;
  const td_cuda_plugin_t *p = td_cuda_plugin(&err);
  if (!p) rc = err;
  if (!rc) rc = p->set_device(device);
  if (!rc) rc = p->memset(t->st->data, 0, t->st->nbytes);
  if (rc) td_tensor_free(out);
  return rc;
}

/* Release hook for wrapped memory that its owner frees by other means. */
static void td__no_release(void *ctx, void *data) {
  (void)ctx;
  (void)data;
}

int td_tensor_wrap(td_tensor_t **out, void *data, size_t nbytes, int dtype,
                   int ndim, const int64_t *shape, td_release_cb release,
                   void *ctx) {
  int64_t n;
  int rc = td__check_shape(ndim, shape, &n);
  if (rc) return rc;
  if (td_dtype_size(dtype) == 0) return TD_GPU_EDTYPE;
  if ((size_t)n * td_dtype_size(dtype) > nbytes) return TD_GPU_ESHAPE;
  td_tensor_t *t = calloc(1, sizeof(*t));
  td_storage_t *st = calloc(1, sizeof(*st));
  if (!t || !st) {
    free(t);
    free(st);
    return TD_GPU_ENOMEM;
  }
  st->refs = 1;
  st->device = TD_CPU;
  st->nbytes = nbytes;
  st->data = data;
  st->release = release ? release : td__no_release;
  st->release_ctx = ctx;
  t->st = st;
  t->dtype = dtype;
  t->ndim = ndim;
  if (ndim > 0) memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
  td__set_contiguous(t);
  *out = t;
  return 0;
}

void td_tensor_free(td_tensor_t **t) {
  if (!t || !*t) return;
  td__storage_release((*t)->st);
  free(*t);
  *t = NULL;
}

/* -- Metadata ---------------------------------------------------------------- */

int td_tensor_dtype(const td_tensor_t *t) { return t->dtype; }
int td_tensor_device(const td_tensor_t *t) { return t->st->device; }
int td_tensor_ndim(const td_tensor_t *t) { return t->ndim; }
const int64_t *td_tensor_shape(const td_tensor_t *t) { return t->shape; }
const int64_t *td_tensor_strides(const td_tensor_t *t) { return t->stride; }

int64_t td_tensor_numel(const td_tensor_t *t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return n;
}

size_t td_tensor_nbytes(const td_tensor_t *t) {
  return (size_t)td_tensor_numel(t) * td_dtype_size(t->dtype);
}

int td_tensor_is_contiguous(const td_tensor_t *t) {
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] != 1 && t->stride[i] != s) return 0;
    s *= t->shape[i];
  }
  return 1;
}

void *td_tensor_data(const td_tensor_t *t) {
  return (char *)t->st->data + t->offset * (int64_t)td_dtype_size(t->dtype);
}

int td_tensor_same_storage(const td_tensor_t *a, const td_tensor_t *b) {
  return a->st == b->st;
}

/* -- Views ------------------------------------------------------------------- */

static td_tensor_t *td__alias(const td_tensor_t *t) {
  td_tensor_t *v = malloc(sizeof(*v));
  if (!v) return NULL;
  *v = *t;
  __atomic_add_fetch(&t->st->refs, 1, __ATOMIC_RELAXED);
  return v;
}

int td_tensor_view(td_tensor_t **out, const td_tensor_t *t, int ndim,
                   const int64_t *shape) {
  if (ndim < 0 || ndim > TD_MAX_DIMS) return TD_GPU_EINVAL;
  if (!td_tensor_is_contiguous(t)) return TD_GPU_EINVAL;
  int64_t known = 1, n = td_tensor_numel(t);
  int infer = -1;
  int64_t sh[TD_MAX_DIMS];
  for (int i = 0; i < ndim; i++) {
    sh[i] = shape[i];
    if (shape[i] == -1) {
      if (infer >= 0) return TD_GPU_EINVAL;
      infer = i;
    } else if (shape[i] < 0) {
      return TD_GPU_EINVAL;
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    if (known == 0 || n % known) return TD_GPU_ESHAPE;
    sh[infer] = n / known;
    known = n;
  }
  if (known != n) return TD_GPU_ESHAPE;
  td_tensor_t *v = td__alias(t);
  if (!v) return TD_GPU_ENOMEM;
  v->ndim = ndim;
  memcpy(v->shape, sh, sizeof(int64_t) * (size_t)ndim);
  td__set_contiguous(v);
  *out = v;
  return 0;
}

int td_tensor_slice(td_tensor_t **out, const td_tensor_t *t, int dim,
                    int64_t start, int64_t stop) {
  if (dim < 0 || dim >= t->ndim) return TD_GPU_EINVAL;
  if (start < 0 || stop < start || stop > t->shape[dim]) return TD_GPU_ERANGE;
  td_tensor_t *v = td__alias(t);
  if (!v) return TD_GPU_ENOMEM;
  v->offset += start * t->stride[dim];
  v->shape[dim] = stop - start;
  *out = v;
  return 0;
}

int td_tensor_transpose(td_tensor_t **out, const td_tensor_t *t, int d0,
                        int d1) {
  if (d0 < 0 || d0 >= t->ndim || d1 < 0 || d1 >= t->ndim) return TD_GPU_EINVAL;
  td_tensor_t *v = td__alias(t);
  if (!v) return TD_GPU_ENOMEM;
  int64_t s = v->shape[d0], st = v->stride[d0];
  v->shape[d0] = v->shape[d1];
  v->stride[d0] = v->stride[d1];
  v->shape[d1] = s;
  v->stride[d1] = st;
  *out = v;
  return 0;
}

/* -- Copies ------------------------------------------------------------------ */

/* A contiguous copy of t on its own device, same dtype. */
static int td__gather(td_tensor_t **out, const td_tensor_t *t) {
  int rc = td_tensor_empty(out, t->dtype, t->st->device, t->ndim, t->shape);
  if (rc) return rc;
  int err = 0;
  const td_ops_t *ops = td_device_ops(t->st->device, &err);
  if (!ops) {
    td_tensor_free(out);
    return err;
  }
  if (td_tensor_is_contiguous(t)) {
    if (t->st->device == TD_CPU)
      memcpy(td_tensor_data(*out), td_tensor_data(t), td_tensor_nbytes(t));
    else
      rc = td_device_memcpy(t->st->device, td_tensor_data(*out), t->st->device,
                            td_tensor_data(t), td_tensor_nbytes(t));
  } else {
    rc = ops->strided_copy(td_tensor_data(*out), td_tensor_data(t),
                           td_dtype_size(t->dtype), t->ndim, t->shape,
                           t->stride);
  }
  if (rc) td_tensor_free(out);
  return rc;
}

int td_tensor_clone(td_tensor_t **out, const td_tensor_t *t) {
  return td__gather(out, t);
}

int td_tensor_contiguous(td_tensor_t **out, const td_tensor_t *t) {
  if (td_tensor_is_contiguous(t)) {
    *out = td__alias(t);
    return *out ? 0 : TD_GPU_ENOMEM;
  }
  return td__gather(out, t);
}

/* Converts contiguous t in place of a new tensor of dtype on t's device. */
static int td__convert(td_tensor_t **out, const td_tensor_t *t, int dtype) {
  int rc = td_tensor_empty(out, dtype, t->st->device, t->ndim, t->shape);
  if (rc) return rc;
  int err = 0;
  const td_ops_t *ops = td_device_ops(t->st->device, &err);
  rc = ops ? ops->convert(td_tensor_data(*out), dtype, td_tensor_data(t),
                          t->dtype, td_tensor_numel(t))
           : err;
  if (rc) td_tensor_free(out);
  return rc;
}

int td_tensor_to(td_tensor_t **out, const td_tensor_t *t, int device,
                 int dtype) {
  if (td_dtype_size(dtype) == 0) return TD_GPU_EDTYPE;
  td_tensor_t *c = NULL, *d = NULL;
  int src = t->st->device;
  int rc = td_tensor_contiguous(&c, t);
  if (rc) return rc;
  if (src == device) {
    if (dtype == t->dtype) {
      /* Always a fresh copy, never an alias. */
      if (c->st == t->st) {
        td_tensor_free(&c);
        return td__gather(out, t);
      }
      *out = c;
      return 0;
    }
    rc = td__convert(out, c, dtype);
    td_tensor_free(&c);
    return rc;
  }
  /* Cross-device: convert on the CPU side, move the bytes once. */
  if (src == TD_CPU && dtype != t->dtype) {
    rc = td__convert(&d, c, dtype);
    td_tensor_free(&c);
    if (rc) return rc;
    c = d;
  }
  rc = td_tensor_empty(&d, c->dtype, device, c->ndim, c->shape);
  if (!rc)
    rc = td_device_memcpy(device, td_tensor_data(d), src, td_tensor_data(c),
                          td_tensor_nbytes(c));
  td_tensor_free(&c);
  if (rc) {
    td_tensor_free(&d);
    return rc;
  }
  if (d->dtype != dtype) {
    rc = td__convert(out, d, dtype);
    td_tensor_free(&d);
    return rc;
  }
  *out = d;
  return 0;
}

/* Scatters contiguous host src (elem bytes each) into the strided host dst. */
static void td__scatter_host(void *dst, const void *src, size_t elem, int ndim,
                             const int64_t *shape, const int64_t *stride) {
  int64_t idx[TD_MAX_DIMS] = {0};
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  const char *s = src;
  for (int64_t k = 0; k < n; k++) {
    int64_t off = 0;
    for (int i = 0; i < ndim; i++) off += idx[i] * stride[i];
    memcpy((char *)dst + off * (int64_t)elem, s + k * (int64_t)elem, elem);
    for (int i = ndim - 1; i >= 0; i--) {
      if (++idx[i] < shape[i]) break;
      idx[i] = 0;
    }
  }
}

int td_tensor_copy(td_tensor_t *dst, const td_tensor_t *src) {
  if (dst->ndim != src->ndim) return TD_GPU_ESHAPE;
  for (int i = 0; i < dst->ndim; i++)
    if (dst->shape[i] != src->shape[i]) return TD_GPU_ESHAPE;
  td_tensor_t *tmp = NULL;
  int rc = td_tensor_to(&tmp, src, dst->st->device, dst->dtype);
  if (rc) return rc;
  if (td_tensor_is_contiguous(dst)) {
    rc = td_device_memcpy(dst->st->device, td_tensor_data(dst),
                          dst->st->device, td_tensor_data(tmp),
                          td_tensor_nbytes(tmp));
  } else if (dst->st->device == TD_CPU) {
    td__scatter_host(td_tensor_data(dst), td_tensor_data(tmp),
                     td_dtype_size(dst->dtype), dst->ndim, dst->shape,
                     dst->stride);
  } else {
    rc = TD_GPU_EUNSUPPORTED;
  }
  td_tensor_free(&tmp);
  return rc;
}

int td_tensor_fill(td_tensor_t *t, double v) {
  if (!td_tensor_is_contiguous(t)) return TD_GPU_EINVAL;
  if (t->dtype != TD_F32 && t->dtype != TD_I32) return TD_GPU_EDTYPE;
  int err = 0;
  const td_ops_t *ops = td_device_ops(t->st->device, &err);
  if (!ops) return err;
  return ops->fill(td_tensor_data(t), t->dtype, td_tensor_numel(t), v);
}

/* -- Serialization ------------------------------------------------------------ */

/* Layout: "TDT1", u8 dtype, u8 ndim, u16 zero, then ndim little-endian
 * int64 extents, then the contiguous element bytes (8-byte aligned). */
#define TD__SER_MAGIC "TDT1"

size_t td_tensor_serialized_size(const td_tensor_t *t) {
  return 8 + 8 * (size_t)t->ndim + td_tensor_nbytes(t);
}

size_t td_tensor_header(const td_tensor_t *t, void *buf) {
  uint8_t *p = buf;
  memcpy(p, TD__SER_MAGIC, 4);
  p[4] = (uint8_t)t->dtype;
  p[5] = (uint8_t)t->ndim;
  p[6] = p[7] = 0;
  memcpy(p + 8, t->shape, 8 * (size_t)t->ndim);
  return 8 + 8 * (size_t)t->ndim;
}

int td_tensor_serialize(const td_tensor_t *t, void *buf, size_t cap) {
  size_t need = td_tensor_serialized_size(t);
  if (cap < need) return TD_GPU_EINVAL;
  uint8_t *data = (uint8_t *)buf + td_tensor_header(t, buf);
  if (t->st->device == TD_CPU && td_tensor_is_contiguous(t)) {
    memcpy(data, td_tensor_data(t), td_tensor_nbytes(t));
    return 0;
  }
  td_tensor_t *h = NULL;
  int rc = td_tensor_to(&h, t, TD_CPU, t->dtype);
  if (rc) return rc;
  memcpy(data, td_tensor_data(h), td_tensor_nbytes(h));
  td_tensor_free(&h);
  return 0;
}

/* Checks a header of hlen bytes against n data bytes. */
static int td__parse_header(const void *hdr, size_t hlen, size_t n, int *dtype,
                            int *ndim, int64_t *shape) {
  const uint8_t *p = hdr;
  if (hlen < 8 || memcmp(p, TD__SER_MAGIC, 4) != 0) return TD_GPU_EFORMAT;
  *dtype = p[4];
  *ndim = p[5];
  if (td_dtype_size(*dtype) == 0 || *ndim > TD_MAX_DIMS) return TD_GPU_EFORMAT;
  if (hlen < 8 + 8 * (size_t)*ndim) return TD_GPU_EFORMAT;
  memcpy(shape, p + 8, 8 * (size_t)*ndim);
  int64_t numel;
  if (td__check_shape(*ndim, shape, &numel)) return TD_GPU_EFORMAT;
  if (n != (size_t)numel * td_dtype_size(*dtype)) return TD_GPU_EFORMAT;
  return 0;
}

int td_tensor_deserialize(td_tensor_t **out, const void *buf, size_t len) {
  size_t hlen = len >= 8 ? 8 + 8 * (size_t)((const uint8_t *)buf)[5] : len;
  if (hlen > len) return TD_GPU_EFORMAT;
  return td_tensor_from_parts(out, buf, hlen, (const uint8_t *)buf + hlen, len - hlen, NULL, NULL);
}

int td_tensor_from_parts(td_tensor_t **out, const void *hdr, size_t hlen,
                         const void *data, size_t n, td_release_cb release,
                         void *ctx) {
  int dtype, ndim;
  int64_t shape[TD_MAX_DIMS];
  int rc = td__parse_header(hdr, hlen, n, &dtype, &ndim, shape);
  if (rc) return rc;
  if (!release || (uintptr_t)data % td_dtype_size(dtype)) {
    rc = td_tensor_empty(out, dtype, TD_CPU, ndim, shape);
    if (!rc) memcpy(td_tensor_data(*out), data, n);
    return rc;
  }
  rc = td_tensor_wrap(out, (void *)data, n, dtype, ndim, shape, release, ctx);
  if (!rc) (*out)->st->readonly = 1;
  return rc;
}

int td_tensor_is_readonly(const td_tensor_t *t) { return t->st->readonly; }

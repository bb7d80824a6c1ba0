/* Tests of the tensor core (gpu/tensor.c, gpu/device.c): views share
 * storage, copies and conversions, serialization, wrapped memory, the host
 * pool, and the CUDA path failing cleanly without a GPU. */
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "device.h"
#include "gpu_err.h"
#include "td.h"
#include "tensor.h"
#include "ser.h"
#include "tensor_lua.h"
#include "test.h"

static td_tensor_t *iota(int ndim, const int64_t *shape) {
  td_tensor_t *t = NULL;
  ASSERT_EQ(td_tensor_empty(&t, TD_F32, TD_CPU, ndim, shape), 0);
  float *p = td_tensor_data(t);
  for (int64_t i = 0; i < td_tensor_numel(t); i++) p[i] = (float)i;
  return t;
}

TEST_IMPL(tensor_views) {
  int64_t shape[3] = {2, 3, 4};
  td_tensor_t *t = iota(3, shape), *v = NULL, *s = NULL, *tr = NULL, *c = NULL;
  ASSERT(td_tensor_is_contiguous(t));
  int64_t vs[2] = {6, -1};
  ASSERT_EQ(td_tensor_view(&v, t, 2, vs), 0);
  ASSERT_EQ(td_tensor_shape(v)[1], 4);
  ASSERT(td_tensor_same_storage(t, v));
  int64_t bad[2] = {5, -1};
  ASSERT_EQ(td_tensor_view(&c, t, 2, bad), TD_GPU_ESHAPE);
  /* slice dim 1 rows [1,3): elements start at 4 */
  ASSERT_EQ(td_tensor_slice(&s, t, 1, 1, 3), 0);
  ASSERT_EQ(((float *)td_tensor_data(s))[0], 4.0f);
  ASSERT(!td_tensor_is_contiguous(s));
  ASSERT_EQ(td_tensor_slice(&c, t, 1, 2, 4), TD_GPU_ERANGE);
  ASSERT_EQ(td_tensor_contiguous(&c, s), 0);
  float *cp = td_tensor_data(c);
  ASSERT_EQ(cp[0], 4.0f);
  ASSERT_EQ(cp[8], 16.0f); /* batch 1, row 1 */
  ASSERT_EQ(cp[15], 23.0f);
  td_tensor_free(&c);
  /* transpose of the last two dims, made contiguous */
  ASSERT_EQ(td_tensor_transpose(&tr, t, 1, 2), 0);
  ASSERT_EQ(td_tensor_contiguous(&c, tr), 0);
  cp = td_tensor_data(c);
  ASSERT_EQ(td_tensor_shape(c)[1], 4);
  ASSERT_EQ(cp[1], 4.0f); /* [0][0][1] = t[0][1][0] */
  ASSERT_EQ(cp[12 + 3 * 3 + 2], 12.0f + 2 * 4 + 3);
  /* views outlive their source */
  td_tensor_free(&t);
  ASSERT(t == NULL);
  td_tensor_free(&t); /* idempotent */
  ASSERT_EQ(((float *)td_tensor_data(v))[23], 23.0f);
  td_tensor_free(&v), td_tensor_free(&s), td_tensor_free(&tr), td_tensor_free(&c);
  return 0;
}

TEST_IMPL(tensor_copy_convert) {
  int64_t shape[2] = {2, 3};
  td_tensor_t *t = iota(2, shape), *h = NULL, *b = NULL, *back = NULL, *tr = NULL;
  float *p = td_tensor_data(t);
  p[0] = 1.0f / 3.0f;
  p[1] = 65504.0f; /* largest f16 */
  p[2] = -2.5e-6f; /* f16 subnormal range */
  ASSERT_EQ(td_tensor_to(&h, t, TD_CPU, TD_F16), 0);
  ASSERT_EQ(td_tensor_nbytes(h), 12u);
  ASSERT_EQ(((uint16_t *)td_tensor_data(h))[0], 0x3555); /* 1/3 rounded */
  ASSERT_EQ(((uint16_t *)td_tensor_data(h))[1], 0x7bff);
  ASSERT_EQ(td_tensor_to(&back, h, TD_CPU, TD_F32), 0);
  float *q = td_tensor_data(back);
  ASSERT(q[0] > 0.3332f && q[0] < 0.3335f);
  ASSERT_EQ(q[1], 65504.0f);
  ASSERT(q[2] < -2.3e-6f && q[2] > -2.7e-6f);
  ASSERT_EQ(q[5], 5.0f);
  td_tensor_free(&back);
  ASSERT_EQ(td_tensor_to(&b, t, TD_CPU, TD_BF16), 0);
  ASSERT_EQ(((uint16_t *)td_tensor_data(b))[3], 0x4040); /* 3.0 */
  ASSERT_EQ(td_tensor_to(&back, b, TD_CPU, TD_I32), 0);
  ASSERT_EQ(((int32_t *)td_tensor_data(back))[4], 4);
  td_tensor_free(&back);
  /* copy into a strided destination */
  ASSERT_EQ(td_tensor_transpose(&tr, t, 0, 1), 0);
  td_tensor_t *z = NULL;
  int64_t zs[2] = {3, 2};
  ASSERT_EQ(td_tensor_zeros(&z, TD_F32, TD_CPU, 2, zs), 0);
  ASSERT_EQ(td_tensor_copy(z, tr), 0);
  ASSERT_EQ(((float *)td_tensor_data(z))[1], 3.0f);
  ASSERT_EQ(td_tensor_copy(z, t), TD_GPU_ESHAPE);
  ASSERT_EQ(td_tensor_fill(z, 7), 0);
  ASSERT_EQ(((float *)td_tensor_data(z))[5], 7.0f);
  td_tensor_free(&t), td_tensor_free(&h), td_tensor_free(&b), td_tensor_free(&tr), td_tensor_free(&z);
  return 0;
}

static void td__count_release(void *ctx, void *data) {
  (void)data;
  (*(int *)ctx)++;
}

TEST_IMPL(tensor_serialize) {
  int64_t shape[3] = {2, 1, 5};
  td_tensor_t *t = iota(3, shape), *s = NULL, *u = NULL, *w = NULL;
  ASSERT_EQ(td_tensor_slice(&s, t, 2, 1, 4), 0); /* non-contiguous (2,1,3) */
  size_t n = td_tensor_serialized_size(s);
  ASSERT_EQ(n, 8 + 3 * 8 + 6 * 4u);
  char *buf = malloc(n);
  ASSERT_EQ(td_tensor_serialize(s, buf, n - 1), TD_GPU_EINVAL);
  ASSERT_EQ(td_tensor_serialize(s, buf, n), 0);
  ASSERT_EQ(td_tensor_deserialize(&u, buf, n), 0);
  ASSERT_EQ(td_tensor_ndim(u), 3);
  ASSERT_EQ(td_tensor_shape(u)[2], 3);
  ASSERT_EQ(((float *)td_tensor_data(u))[3], 6.0f);
  /* Header and data apart: mapped in place with a release, read-only;
   * copied without one. */
  int released = 0;
  ASSERT_EQ(td_tensor_from_parts(&w, buf, 32, buf + 32, n - 32, td__count_release, &released), 0);
  ASSERT_EQ(((float *)td_tensor_data(w))[5], 8.0f);
  ASSERT((char *)td_tensor_data(w) == buf + 32); /* zero-copy */
  ASSERT(td_tensor_is_readonly(w));
  td_tensor_t *wv = NULL;
  ASSERT_EQ(td_tensor_slice(&wv, w, 0, 0, 1), 0);
  ASSERT(td_tensor_is_readonly(wv)); /* views share it */
  td_tensor_free(&w);
  ASSERT_EQ(released, 0);
  td_tensor_free(&wv);
  ASSERT_EQ(released, 1);
  ASSERT_EQ(td_tensor_from_parts(&w, buf, 32, buf + 32, n - 32, NULL, NULL), 0);
  ASSERT((char *)td_tensor_data(w) != buf + 32 && !td_tensor_is_readonly(w));
  td_tensor_free(&w);
  ASSERT_EQ(td_tensor_from_parts(&w, buf, 32, buf + 32, n - 36, td__count_release, &released),
            TD_GPU_EFORMAT);
  ASSERT_EQ(released, 1);
  /* Malformed input is refused, never read past its end. */
  ASSERT_EQ(td_tensor_deserialize(&w, buf, n - 4), TD_GPU_EFORMAT);
  ASSERT_EQ(td_tensor_deserialize(&w, buf, 7), TD_GPU_EFORMAT);
  buf[4] = 99; /* bad dtype */
  ASSERT_EQ(td_tensor_deserialize(&w, buf, n), TD_GPU_EFORMAT);
  buf[4] = 0;
  buf[5] = 9; /* too many dims */
  ASSERT_EQ(td_tensor_deserialize(&w, buf, n), TD_GPU_EFORMAT);
  free(buf);
  td_tensor_free(&t), td_tensor_free(&s), td_tensor_free(&u);
  return 0;
}

static int released;
static void on_release(void *ctx, void *data) {
  released += (ctx == (void *)&released) && data != NULL;
}

TEST_IMPL(tensor_wrap_release) {
  float data[6] = {1, 2, 3, 4, 5, 6};
  int64_t shape[2] = {2, 3};
  td_tensor_t *t = NULL, *v = NULL;
  ASSERT_EQ(td_tensor_wrap(&t, data, sizeof(data), TD_F32, 2, shape, on_release, &released), 0);
  ASSERT_EQ(td_tensor_slice(&v, t, 0, 1, 2), 0);
  td_tensor_free(&t);
  ASSERT_EQ(released, 0); /* the view still refers to it */
  ASSERT_EQ(((float *)td_tensor_data(v))[0], 4.0f);
  td_tensor_free(&v);
  ASSERT_EQ(released, 1);
  int64_t big[2] = {3, 3};
  ASSERT_EQ(td_tensor_wrap(&t, data, sizeof(data), TD_F32, 2, big, NULL, NULL), TD_GPU_ESHAPE);
  return 0;
}

TEST_IMPL(tensor_pool_reuse) {
  /* A freed block of the same size comes back (pre-faulted) from the pool. */
  int64_t shape[1] = {1 << 18}; /* 1 MiB: the mmap path */
  td_tensor_t *a = NULL, *b = NULL;
  size_t before = td_tensor_host_bytes();
  ASSERT_EQ(td_tensor_zeros(&a, TD_F32, TD_CPU, 1, shape), 0);
  ASSERT_EQ(td_tensor_host_bytes(), before + (1u << 20));
  void *pa = td_tensor_data(a);
  td_tensor_free(&a);
  ASSERT_EQ(td_tensor_host_bytes(), before);
  ASSERT_EQ(td_tensor_empty(&b, TD_F32, TD_CPU, 1, shape), 0);
  ASSERT(td_tensor_data(b) == pa);
  td_tensor_free(&b);
  td_tensor_pool_trim();
  td_tensor_pool_limit(0); /* nothing is cached any more */
  ASSERT_EQ(td_tensor_empty(&a, TD_F32, TD_CPU, 1, shape), 0);
  td_tensor_free(&a);
  return 0;
}

/* Every TD_GPU_E* code is negative, below TD_GPU__EFIRST and below td.h's
 * TD_E* range (so the two never meet), distinct and named. */
TEST_IMPL(tensor_err_codes) {
  ASSERT((int)TD_GPU__EFIRST < (int)TD__ELAST);
  static const test_err_t table[] = {
#define TD_GPU__ROW(name, msg) {TD_GPU_E##name, msg},
      TD_GPU_ERRDEF(TD_GPU__ROW)
#undef TD_GPU__ROW
  };
  assert_err_table(table, sizeof(table) / sizeof(table[0]), TD_GPU__ECOUNT, TD_GPU__EFIRST, TD_GPU__ELAST,
                   td_gpu_strerror);
  ASSERT_EQ(TD_GPU_ENOMEM, -2001); /* the numbers the CUDA plugin returns */
  ASSERT(strcmp(td_gpu_strerror(0), "success") == 0);
  ASSERT(strcmp(td_gpu_strerror(-TD_GPU_ENOMEM), "unknown error") == 0);
  ASSERT(strcmp(td_gpu_strerror(TD_GPU__ELAST - 1), "unknown error") == 0);
  ASSERT(strcmp(td_gpu_strerror(TD_ENOMEM), "unknown error") == 0);
  return 0;
}

TEST_IMPL(tensor_devices_without_gpu) {
  int dev = 5;
  ASSERT_EQ(td_device_parse("cpu", &dev), 0);
  ASSERT_EQ(dev, TD_CPU);
  ASSERT_EQ(td_device_parse("cuda:3", &dev), 0);
  ASSERT_EQ(dev, 3);
  ASSERT_EQ(td_device_parse("cuda:x", &dev), TD_GPU_EINVAL);
  ASSERT_EQ(td_device_parse("tpu", &dev), TD_GPU_EINVAL);
  ASSERT_EQ(td_dtype_parse("bf16"), TD_BF16);
  ASSERT_EQ(td_dtype_parse("f8"), TD_GPU_EDTYPE);
  ASSERT(strcmp(td_gpu_strerror(TD_GPU_ENODEV), "no GPU: CUDA device not available") == 0);
  ASSERT(strcmp(td_gpu_strerror(-1), "unknown error") == 0);
  if (td_cuda_device_count() > 0) return 0; /* a GPU machine: see the Lua GPU tests */
  int64_t shape[1] = {4};
  td_tensor_t *t = NULL, *g = NULL;
  ASSERT_EQ(td_tensor_zeros(&t, TD_F32, TD_CPU, 1, shape), 0);
  int rc = td_tensor_to(&g, t, 0, TD_F32);
  ASSERT(rc == TD_GPU_ENODEV || rc == TD_GPU_EPLUGIN);
  ASSERT(g == NULL);
  ASSERT_EQ(td_tensor_empty(&g, TD_F32, 0, 1, shape), rc);
  td_tensor_free(&t);
  return 0;
}

TEST_IMPL(tensor_lua_push) {
  /* C code (the object store) hands a tensor to Lua and gets it back. */
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  int64_t shape[2] = {2, 3};
  td_tensor_t *t = NULL;
  ASSERT_EQ(td_tensor_zeros(&t, TD_F32, TD_CPU, 2, shape), 0);
  ((float *)td_tensor_data(t))[5] = 4.5f;
  td_tensor_lua_push(L, t); /* the module is not opened yet */
  ASSERT(td_tensor_lua_to(L, -1) == t);
  lua_setglobal(L, "x");
  ASSERT_EQ(luaL_dostring(L, "assert(x:get(2, 3) == 4.5); assert(x:shape()[2] == 3);"
                             "y = x:view({6})"), 0);
  lua_pushnumber(L, 1);
  ASSERT(td_tensor_lua_to(L, -1) == NULL);
  lua_pop(L, 1);
  lua_close(L); /* __gc frees x and y */
  return 0;
}

/* Holds counted by the store's stand-in. */
static int holds;
static void test_hold(void *ctx) { (void)ctx; holds++; }
static void test_release(void *ctx, void *data) { (void)ctx; (void)data; holds--; }

TEST_IMPL(tensor_ser_raw) {
  /* A tensor in a value is encoded with its bytes 64-byte aligned from the
   * start of the encoding, whatever precedes it, and decoded from aligned
   * memory by mapping them (held until the last view goes) or, without a
   * holder or from a misaligned copy, by copying them. */
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_newmetatable(L, TD_REF_MT);
  lua_pop(L, 1);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, luaopen_tide_tensor);
  lua_setfield(L, -2, "tide.tensor");
  lua_pop(L, 2);
  static const td_holder_t holder = {test_hold, test_release};
  for (int pad = 0; pad < 70; pad += 23) {
    lua_pushfstring(L, "local T = require('tide.tensor')\n"
                       "return {s = string.rep('p', %d), big = T.arange(20000, {dtype = 'f32'}),"
                       " small = T.ones({3}), view = T.ones({4, 4}):transpose(1, 2)}", pad);
    ASSERT_EQ(luaL_dostring(L, lua_tostring(L, -1)), 0);
    td_ser_t s;
    td_ser_init(&s);
    ASSERT_EQ(td_ser_value(&s, L, -1, "value"), 0);
    ASSERT_EQ(s.nsegs, 1); /* the big tensor's bytes are not copied into the buffer */
    uint8_t *bytes = aligned_alloc(64, (s.size + 64) & ~(size_t)63);
    td_ser_copy(&s, bytes);
    lua_pop(L, 2);
    td_deser_t d = {0};
    d.holder = &holder;
    ASSERT_EQ(td_deser_value(&d, L, bytes, s.size), 0);
    td_tensor_t *big = NULL;
    lua_getfield(L, -1, "big");
    big = td_tensor_lua_to(L, -1);
    ASSERT(big && td_tensor_is_readonly(big));
    ASSERT(((uintptr_t)td_tensor_data(big) - (uintptr_t)bytes) % 64 == 0);
    ASSERT((uint8_t *)td_tensor_data(big) > bytes && (uint8_t *)td_tensor_data(big) < bytes + s.size);
    ASSERT_EQ(((float *)td_tensor_data(big))[19999], 19999.0f);
    ASSERT_EQ(holds, 2); /* big and small map; the transposed view was copied */
    lua_pop(L, 2);
    lua_gc(L, LUA_GCCOLLECT, 0);
    ASSERT_EQ(holds, 0);
    /* No holder, or misaligned bytes: copies, writable. */
    d.holder = NULL;
    ASSERT_EQ(td_deser_value(&d, L, bytes, s.size), 0);
    lua_getfield(L, -1, "big");
    ASSERT(!td_tensor_is_readonly(td_tensor_lua_to(L, -1)));
    lua_pop(L, 2);
    uint8_t *odd = malloc(s.size + 1);
    memcpy(odd + 1, bytes, s.size);
    d.holder = &holder;
    ASSERT_EQ(td_deser_value(&d, L, odd + 1, s.size), 0);
    lua_getfield(L, -1, "big");
    ASSERT(!td_tensor_is_readonly(td_tensor_lua_to(L, -1)));
    ASSERT_EQ(holds, 0);
    lua_pop(L, 2);
    /* Truncated: a clean error. */
    for (size_t cut = 0; cut < s.size; cut += 331) {
      int top = lua_gettop(L);
      td_deser_value(&d, L, bytes, cut);
      lua_settop(L, top);
    }
    lua_gc(L, LUA_GCCOLLECT, 0);
    ASSERT_EQ(holds, 0);
    free(odd);
    free(bytes);
    td_ser_free(&s);
  }
  lua_close(L);
  return 0;
}

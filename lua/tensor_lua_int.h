/* Private to the `tide.tensor` binding: what lua/tensor_lua.c (the userdata,
 * argument helpers, methods, module open), lua/tensor_new_lua.c (making
 * tensors, the object-store hooks) and lua/tensor_ops_lua.c (ops, operators,
 * NCCL communicators) share.  Other code uses tensor_lua.h.
 *
 * Names: td__tlua_* are the shared helpers (defined in tensor_lua.c); each
 * file keeps its Lua C functions static, as td__l_* (module functions),
 * td__m_* (tensor methods), td__c_* (communicator methods) and td__op_*
 * (metamethods), and hands them to luaopen_tide_tensor in the tables below.
 */
#ifndef TD_TENSOR_LUA_INT_H
#define TD_TENSOR_LUA_INT_H

#include <lauxlib.h>
#include <lua.h>
#include <stddef.h>
#include <stdint.h>

#include "ops.h"
#include "tensor.h"

/* Raises "tide.tensor.<fn>: <message>[: <detail>]" for a failed call. */
__attribute__((noreturn)) void td__tlua_raise(lua_State *L, const char *fn, int rc);

/* The detail is cleared first: one left by an earlier call (a probe of
 * CUDA that found no device) must not name this call's failure. */
#define TD__TRY(L, fn, expr)               \
  do {                                     \
    td_gpu_clear_detail();                 \
    int rc__ = (expr);                     \
    if (rc__) td__tlua_raise(L, fn, rc__); \
  } while (0)

/* -- Boxes ------------------------------------------------------------------- */

/* The live tensor at idx (raises if it is not one, or was freed). */
td_tensor_t *td__tlua_check(lua_State *L, int idx);
/* Whether the value at idx is a tide.tensor userdata. */
int td__tlua_is_tensor(lua_State *L, int idx);
/* Pushes a new userdata owning t (t may not be NULL); returns t. */
td_tensor_t *td__tlua_push(lua_State *L, td_tensor_t *t);

/* -- Arguments (fn names the call in errors) ------------------------------------ */

/* opts[k] pushed, when opts is a table and opts[k] is not nil (returns 1). */
int td__tlua_opt_field(lua_State *L, int opts, const char *k);
double td__tlua_opt_num(lua_State *L, int opts, const char *k, double def);
int td__tlua_opt_bool(lua_State *L, int opts, const char *k, int def);
int td__tlua_opt_dtype(lua_State *L, int opts, int def);
int td__tlua_parse_device(lua_State *L, const char *s);
int td__tlua_opt_device(lua_State *L, int opts, int def);
/* Reads a shape table {d1, d2, ...} at idx into shape; returns ndim. */
int td__tlua_shape_arg(lua_State *L, int idx, int64_t *shape);
/* "{d1, d2, ...}" for messages. */
void td__tlua_shape_str(const td_tensor_t *t, char *buf, size_t n);
/* The op table of t's device (loads the CUDA plugin for GPU tensors). */
const td_ops_t *td__tlua_ops(lua_State *L, const char *fn, const td_tensor_t *t);
void td__tlua_same_device(lua_State *L, const char *fn, const td_tensor_t *a, const td_tensor_t *b);
void td__tlua_want_dtype(lua_State *L, const char *fn, const td_tensor_t *t, int dtype, const char *what);
/* The tensor at idx, or a contiguous copy of it pushed on the stack. */
td_tensor_t *td__tlua_contig(lua_State *L, const char *fn, int idx);
/* Checked contiguous f32 / i32 input at idx on the device of ref (if given). */
const float *td__tlua_in_f32(lua_State *L, const char *fn, int idx, const td_tensor_t *ref, const char *what);
const int32_t *td__tlua_in_i32(lua_State *L, const char *fn, int idx, const td_tensor_t *ref,
                               const char *what);
/* A tensor the call writes (raises for a read-only one that maps the store). */
td_tensor_t *td__tlua_mut(lua_State *L, const char *fn, int idx);
/* An output: opts[key] when given (checked; pushed again) else a new tensor
 * (zeroed when zero) pushed.  *given tells which. */
td_tensor_t *td__tlua_out(lua_State *L, const char *fn, int opts, const char *key, int dtype, int device,
                          int ndim, const int64_t *shape, int zero, int *given);
/* v as an int (raises when negative or above INT_MAX). */
int td__tlua_int_arg(lua_State *L, const char *fn, int64_t v, const char *what);
/* Host f32 copy of t (pushed; t itself when it is one), for reading elements. */
const float *td__tlua_host_f32(lua_State *L, const char *fn, td_tensor_t *t);

/* -- What each file registers (luaopen_tide_tensor in tensor_lua.c) ---------- */

extern const luaL_Reg td__tlua_new_funcs[];   /* T.zeros, ..., T.__tide_deser_raw */
extern const luaL_Reg td__tlua_new_meta[];    /* __tide_ser, __tide_raw */
extern const luaL_Reg td__tlua_ops_funcs[];   /* T.matmul, ..., T.nccl_comm */
extern const luaL_Reg td__tlua_ops_methods[]; /* t:sum(), t:mean() */
extern const luaL_Reg td__tlua_ops_meta[];    /* __add, __sub, __mul, __div, __unm */
/* Registers the "tide.nccl_comm" metatable (tensor_ops_lua.c). */
void td__tlua_open_comm(lua_State *L);

#endif

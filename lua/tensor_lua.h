/* Tide tensor Lua binding: the `tide.tensor` module, and helpers for C code
 * (the engine's object store) that moves tensors in and out of Lua states
 * without the string copy of __tide_ser / __tide_deser.  Uses tensor.h and
 * the Lua C API.
 *
 * The object store itself goes through the metatable hooks (__tide_raw
 * and T.__tide_deser_raw, see lua/ser.h), which write a tensor's bytes once
 * and map them in place on reads.
 */
#ifndef TD_TENSOR_LUA_H
#define TD_TENSOR_LUA_H

#include <lua.h>

#include "tensor.h"

/* Opens the module: pushes its table (registers the metatables once). */
int luaopen_tide_tensor(lua_State *L);

/* Pushes t as a tide.tensor userdata; the userdata takes ownership of t (its
 * __gc frees it).  Registers the metatables first if needed.  Raises (a Lua
 * error) only on memory exhaustion, and then after freeing t. */
void td_tensor_lua_push(lua_State *L, td_tensor_t *t);

/* The tensor at stack index idx (borrowed; owned by the userdata), or NULL
 * when the value is not a live tide.tensor.  Never raises. */
td_tensor_t *td_tensor_lua_to(lua_State *L, int idx);

#endif

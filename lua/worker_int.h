/* Private to the worker executor: what worker.c (the loop, waiting, tasks
 * and actors), worker_states.c (the Lua states it runs them in) and
 * worker_io.c (their writes to stdout and stderr) use of each other.
 * Other files use core.h.
 */
#ifndef TD_WORKER_INT_H
#define TD_WORKER_INT_H

#include <lua.h>

#include "core.h"

/* -- worker.c ---------------------------------------------------------------------- */

/* TIDE_HOME, whose stdlib new states find on package.path. */
extern char td__home[4096];

/* -- worker_states.c --------------------------------------------------------------- */

/* Function and class definitions by id, as they arrived (td__load_fn). */
extern td_map_t td__blobs;
/* A new Lua state: the task worker's (actor 0) or an actor's lightweight one. */
lua_State *td__newstate(int actor);
/* Pushes the function or class `id` (blob: its definition, if sent with
 * it). Returns 0, or -1 with a message pushed. */
int td__load_fn(lua_State *L, uint64_t id, const uint8_t *blob, uint32_t len);
/* Decodes args+deps from rd onto L. Returns nargs, or -1 with an error
 * value pushed (error table when a dependency failed: *deperr set). */
int td__push_args(lua_State *L, td_rd_t *rd, int *deperr);

/* -- worker_io.c ------------------------------------------------------------------- */

/* Makes L's writes to stdout and stderr from Lua (io.write, file:write)
 * the running call's output, sent to the node as PRINT frames (RAW). Call
 * once the io library is open in L; a no-op if it is not. */
void td__io_attribute(lua_State *L);

#endif

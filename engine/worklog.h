/* Worker output kept per process (tide logs). With a log directory set (a
 * daemon: SESSION/logs) every worker's stdout and stderr, and the prints
 * and Lua writes to stdout and stderr of its tasks (sent as PRINT frames),
 * go to logs/worker-<id>.out; beside it, logs/worker-<id>.idx
 * records where each print landed and whose it was (task, actor), so that
 * one task's or actor's output can be sliced out of a worker's that ran
 * many, even of calls that ran interleaved. td_obs_rotate moves a file
 * past max bytes to <file>.1 (one older part kept) and empties it, its
 * index with it. Uses util (td_buf_t).
 */
#ifndef TD_WORKLOG_H
#define TD_WORKLOG_H

#include <stddef.h>
#include <stdint.h>

#include "td.h"

int td_obs_set_logdir(const char *session);
const char *td_obs_logdir(void);
int td__obs_worker_log(uint64_t wk_id); /* an fd the worker's output goes to, or -1 */
/* A print of worker wk_id: appended to its log and, when it was a task's
 * or an actor's (task or actor not 0), indexed under them. Returns 0, or
 * -1 when no log keeps it (none is kept, or it cannot be written). */
int td__obs_print(uint64_t wk_id, uint64_t task, uint64_t actor, const uint8_t *s, size_t l);
void td_obs_rotate(size_t max);

/* Which prints a slice takes: those of one task, or of one actor. */
typedef enum { TD_SLICE_TASK, TD_SLICE_ACTOR } td_slice_by_t;

/* Appends to out the prints of worker wk_id's log that were `by` id, from
 * index record *rec on (0: the first), stopping once out has max bytes;
 * sets *rec to the record to go on from. A *rec past the index's end (it
 * was rotated) starts again from 0. Returns 0, or TD_ENOTFOUND when the
 * worker kept no index (it printed nothing indexed). */
int td_obs_log_slice(uint64_t wk_id, td_slice_by_t by, uint64_t id, uint64_t *rec, size_t max, td_buf_t *out);
/* The same from the part rotation kept (worker-<id>.idx.1 and .out.1), from
 * its first record, up to max bytes. Returns 0, or TD_ENOTFOUND when there
 * is none. */
int td_obs_log_slice_rotated(uint64_t wk_id, td_slice_by_t by, uint64_t id, size_t max, td_buf_t *out);
/* The workers whose index (or the rotated one) holds a print `by` id (a finished task's
 * worker, which the node no longer knows): up to max ids into wks, in the
 * log directory's order; returns how many. */
int td_obs_log_find(td_slice_by_t by, uint64_t id, uint64_t *wks, int max);

#endif

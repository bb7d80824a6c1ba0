/* Introspection: what a head knows, as answers for `tide list`, the
 * dashboard's JSON endpoints and the Prometheus /metrics text. Everything
 * is read from the node's own tables in one pass, filtered and cut to a
 * page on this side, so one request stays cheap with 100,000 actors.
 * Also keeps a bounded history of failed tasks (their errors and
 * tracebacks), which the node's task code reports here. Uses node_int.h.
 */
#ifndef TD_INTROSPECT_H
#define TD_INTROSPECT_H

#include "node.h"
#include "worklog.h"

#define TD_LIST_FILTERS 8   /* --filter key=value pairs per request */
#define TD_FAILED_KEEP 1000 /* failed tasks remembered (the oldest go first) */

typedef struct td_list_req {
  const char *kind;                        /* nodes, actors, tasks, objects, placement-groups */
  const char *key[TD_LIST_FILTERS];        /* filters: a row is kept when every key's */
  const char *val[TD_LIST_FILTERS];        /* field equals its value (as text) */
  int nfilter;
  long limit;                              /* rows at most (<= 0: 100) */
  long offset;                             /* matching rows skipped first */
} td_list_req_t;

/* Appends {"kind","total","matched","offset","limit","truncated","rows":[...]}
 * as JSON to out. Returns 0, or TD_EINVAL with err set (an unknown kind, a
 * filter on a field that kind has not). */
int td_introspect_list(td_node_t *n, const td_list_req_t *q, td_buf_t *out, char *err, size_t errn);

/* Appends the engine's metrics in Prometheus text format (0.0.4) to out. */
void td_introspect_metrics(td_node_t *n, td_buf_t *out);

/* Task code reports every task that ends in failure: its error blob (an
 * encoded {kind, message, traceback} table) or kind and message. */
struct td_task;
void td__obs_failed(td_node_t *n, struct td_task *t, const uint8_t *blob, size_t len, const char *kind,
                    const char *msg);
/* ... and every task that ends (a counter for /metrics). */
extern uint64_t td__obs_finished;

/* Worker output (tide logs): worklog.h. */
/* Appends s to out as a JSON string (quoted, escaped). */
void td_json_str(td_buf_t *out, const char *s, size_t len);

#endif

/* Tide node <-> worker protocol: message types and the task spec that
 * both the driver and workers submit. Every decoder checks bounds (td_rd_t)
 * and rejects malformed input with TD_EPROTO; nothing trusts a length.
 */
#ifndef TD_PROTO_H
#define TD_PROTO_H

#include "td.h"

/* -- Message types -------------------------------------------------------- */

/* The comments are a column, continued under it: */
/* clang-format off */
enum {
  /* node -> worker */
  TD_M_TASK = 1,       /* run a task */
  TD_M_ACTOR_NEW,      /* create an actor in this process */
  TD_M_ACTOR_CALL,     /* call an actor method */
  TD_M_ACTOR_KILL,     /* destroy an actor */
  TD_M_REPLY,          /* reply to a worker request: u32 req_id, payload */
  TD_M_CANCEL,         /* interrupt a running task: u64 task_id (to a node: u8 TD_CANCEL_* flags) */
  TD_M_HELLO,          /* to a client: u64 its id, u64 inline_max (store fd sent before) */
  TD_M_NODE_TASK,      /* head -> node: u64 task id, u32 attempt, spec, fn, dep values */
  TD_M_WELCOME,        /* head -> node: u32 the node's index */
  /* worker -> node */
  TD_M_READY = 20,     /* u32 pid */
  TD_M_DONE,           /* task or call finished */
  TD_M_ITEM,           /* one streamed item */
  TD_M_SUBMIT,         /* a nested task, actor or call (td_spec) */
  TD_M_GET,            /* u32 req, f64 timeout, u32 n, u64 ids[n]; the reply: u8 timed out
                          (1: nothing follows), else n values */
  TD_M_WAIT,           /* u32 req, f64 timeout, u32 num, u32 n, u64 ids[n] */
  TD_M_PUT,            /* u64 id, value, refs */
  TD_M_REFS,           /* u32 n, (u64 id, i32 delta)[n] */
  TD_M_PRINT,          /* str text, then (optional, in order) u64 task, u64 actor (0: none),
                          u8 TD_PRINT_* flags */
  TD_M_ALLOC,          /* u32 req, u64 size: shared-memory extent */
  TD_M_BLOCKED,        /* u32 n, u64 unstarted task ids[n] handed back */
  TD_M_UNBLOCKED,
  TD_M_ACTOR_EXIT,     /* u64 actor id, u8 crashed, str reason */
  TD_M_RPC,            /* u32 req, str op, str args (serialized list) */
  TD_M_STREAM_NEXT,    /* u32 req, u64 stream id, u32 index, f64 timeout; the reply:
                          u8 td_sn_t, u64 item */
  TD_M_UNPIN,          /* u32 n, u64 ids[n] */
  TD_M_ACTOR_READY,    /* u64 actor id */
  TD_M_REMOTE,         /* from the TCP bridge: this client cannot map the store; str its address */
  TD_M_PIN,            /* u32 n, u64 ids[n]: keep them in place (zero-copy reads) */
  TD_M_STREAM_ROOM,    /* u32 req, u64 task id: answered once its stream is within
                          the window its consumer set (td_node_stream_window) */
  /* between nodes (a node's link to its head, both ways) */
  TD_M_BEAT = 40,      /* heartbeat; node -> head: u32 workers, actors, tasks running,
                          queued, u64 objects, store used, store capacity, spilled,
                          bytes sent to nodes, bytes fetched from nodes, bytes kept inline */
  TD_M_JOIN,           /* node -> head: u32 index wanted (0: any) */
  TD_M_NODE_INFO,      /* node -> head: str name, u32 n, (str resource, f64 total)[n],
                          u32 k, (u64 actor, u32 incarnation)[k]: detached actors it runs,
                          u32 the port it listens on for other nodes (0: none) */
  TD_M_FN,             /* either way: u64 id, str definition (before work that needs it) */
  TD_M_PKG_GET,        /* node -> head: str hash of a working-directory package */
  TD_M_PKG,            /* head -> node: str hash, u8 ok, str package (or why not) */
  TD_M_CHUNK_GET,      /* between nodes: u64 object id, u64 offset, u32 length[, u8 1: answer on
                          the link's data-plane stream (TD_M_DP)] */
  TD_M_CHUNK,          /* the answer: u64 id, u64 offset, str bytes (empty: it is gone) */
  TD_M_LINEAGE,        /* node -> head: u64 object id, str spec of the task that makes it */
  TD_M_PEER,           /* node -> node, first on a link between them: u32 the sender's index */
  TD_M_HAVE,           /* node -> head: u64 object id, u8 ok: a fetch the head directed ended */
  TD_M_KILL,           /* node -> head: u64 actor id, u8 no_restart, str why: an actor the head keeps */
  TD_M_DP,             /* either way on a link between nodes: u32 port, str token[16], u8 mode: the
                          sender's data-plane listener; a stream presenting the token carries the
                          chunks asked for on this link with the CHUNK_GET flag set (dplane.c) */
  TD_M_NOTE,           /* node -> head: str topic, str bytes (empty: withdrawn): the latest of a
                          host's figures (a serve ingress's), kept per node (td_node_note_head) */
  TD_M_JOB_END,        /* either way between nodes: u64 job: a driver left; its work everywhere
                          goes with it (the head passes it on to every other node) */
  TD_M_CANCEL_REF,     /* either way between nodes: u64 object id, u8 TD_CANCEL_* flags: cancel the
                          task that makes it, which the other end keeps (a foreign ref) */
  TD_M_ROOM,           /* either way between nodes: f64 CPUs, f64 GPUs free: a node's own (to its
                          head), or the rest of the cluster's (to a node), sent when it changed */
  TD_M_CANCEL_TREE,    /* either way between nodes: u64 parent, u8 force: cancel the tasks that
                          the task making parent submitted, and theirs (passed on by the head) */
};
/* clang-format on */

/* How a PRINT's text was written. 0: a print, a whole line with its
 * origin's prefix. RAW: bytes Lua wrote to stdout itself (io.write), as
 * they were, maybe part of a line; with STDERR, to stderr. */
enum { TD_PRINT_RAW = 1, TD_PRINT_STDERR = 2 };

/* The status of a STREAM_NEXT reply, and what core.stream_next returns
 * for it (td__ret_item). */
typedef enum {
  TD_SN_ITEM = 0,    /* the item: a ref the receiver now holds */
  TD_SN_ENDED = 1,   /* the stream ended: nil */
  TD_SN_TIMEOUT = 2, /* none came within the timeout: false */
} td_sn_t;

/* Object, worker and node ids carry the index of the node that made them
 * in their top bits, so any node can tell where an object came from:
 * [node:12][worker:20][sequence:32]. Node 0 is the head. */
#define TD_NODE_SHIFT 52
#define TD_NODE_MAX 4095
static inline uint32_t td_id_node(uint64_t id) { return (uint32_t)(id >> TD_NODE_SHIFT); }

/* How a value travels: inline bytes, a shared-memory extent, or an error. */
enum { TD_V_INLINE, TD_V_SHM, TD_V_ERROR, TD_V_LOST,
       TD_V_PULL, /* between nodes: large, ask the sender for it (once per node); in a reply,
                     followed by u64 size: fetch it in chunks (TD_M_CHUNK_GET) */
       TD_V_PEER  /* head -> node, in a reply: u64 size, u32 node index, str endpoint: fetch
                     the chunks from that node, which has it or is fetching it */ };

/* -- Task spec ------------------------------------------------------------ */

enum { TD_K_TASK, TD_K_ACTOR_NEW, TD_K_ACTOR_CALL };
/* Scheduling strategies: default (local first, then a node that fits),
 * spread over nodes, or node affinity, hard or soft. Lua reads them by
 * name (core.STRATEGY, from td_strategy_codes). */
enum { TD_ST_DEFAULT, TD_ST_SPREAD, TD_ST_NODE, TD_ST_NODE_SOFT, TD_ST_COUNT };

/* A code and its name. The codes that cross into Lua (strategies here,
 * placement-group strategies in node.h, get statuses in lua/core.h) each
 * have one such table, ended by {NULL, 0}: lua/core.c exports it as a
 * table of names (core.STRATEGY.SPREAD), and text output prints from it. */
typedef struct td_code {
  const char *name; /* as Lua and text see it: "SPREAD" */
  int value;        /* the enum's value: TD_ST_SPREAD */
} td_code_t;

/* TD_ST_* by name. */
extern const td_code_t td_strategy_codes[];
/* The name of `value` in a code table; NULL when it has none. */
const char *td_code_name(const td_code_t *t, int value);

#define TD_NRES_MAX 32   /* resource kinds per node: CPU, GPU, memory, custom */
#define TD_RES_CPU 0
#define TD_RES_GPU 1
#define TD_RES_MEM 2

/* What a submitter asks for. Built from Lua options by the bindings, sent
 * as TD_M_SUBMIT by workers, handed to td_node_submit. */
typedef struct td_spec {
  uint8_t kind;           /* TD_K_* */
  uint64_t fn_id;         /* function, or class for ACTOR_NEW */
  uint64_t actor_id;      /* ACTOR_NEW / ACTOR_CALL */
  char method[64];        /* ACTOR_CALL */
  int32_t nret;           /* returns; -1 = streaming */
  uint64_t *rets;         /* nret ids (1 for streaming), chosen by the submitter */
  const uint8_t *args;    /* encoded argument list (not owned) */
  uint32_t args_len;
  uint64_t *deps;         /* top-level argument refs */
  uint32_t ndeps;
  uint64_t *refs;         /* nested refs held while in flight */
  uint32_t nrefs;
  int32_t max_retries;    /* tasks; actors: max_task_retries */
  int32_t max_restarts;   /* actors */
  int32_t max_concurrency;
  uint8_t detached;
  uint8_t own_process;    /* actors: a process of its own, shared with no other actor */
  uint8_t retry_exceptions; /* tasks: retry when the function raises */
  uint8_t pipeline;         /* tasks: may queue at a busy worker, however long it runs */
  uint64_t pg_id;         /* 0 = none */
  int32_t bundle;         /* 0-based; -1 = any */
  uint8_t strategy;       /* TD_ST_* */
  uint32_t node;          /* TD_ST_NODE*: the node's index */
  uint64_t job;           /* the driver whose work this is (its id, unique in the cluster;
                             0: none known): set by the node a submission enters at */
  uint64_t parent;        /* the first return of the task whose worker submitted it (0: a
                             driver's): a recursive cancel of that task reaches this one */
  char name[128];         /* task name or actor name */
  char ns[64];            /* actor namespace */
  uint32_t env_len;
  char env[1024];         /* runtime_env env_vars as "K=V\0K=V\0"; env_len used */
  /* Read at submission only (a task keeps resolved demands): nothing from
   * here on is copied into the node's task records. */
  uint32_t nres;          /* resource demands */
  char res_name[TD_NRES_MAX][32];
  double res_amt[TD_NRES_MAX];
} td_spec_t;

void td_spec_encode(const td_spec_t *s, td_buf_t *b);
/* Decodes into *s; pointers refer into the message or into `scratch`,
 * which the caller frees. Returns 0 or TD_EPROTO. */
int td_spec_decode(td_spec_t *s, td_rd_t *r, uint64_t **scratch);

#endif

/* Tide node: the per-machine executor. It owns the worker processes, the
 * local scheduler (resources, worker leases, placement groups), the object
 * table and shared-memory store (with spilling to disk), and the actor
 * directory. In the embedded cluster it runs inside the driver process and
 * is pumped whenever the driver waits; workers talk to it over Unix
 * sockets. Uses chan, store, proto.
 */
#ifndef TD_NODE_H
#define TD_NODE_H

#include "chan.h"
#include "proto.h"
#include "store.h"

typedef struct td_node td_node_t;
typedef struct td_wk td_wk_t;

/* What is at the other end of a node's socket; a worker process says its
 * kind in HELLO (lua/worker.c).  WK_TASK runs tasks; WK_HOST hosts actors;
 * WK_GPUHOST hosts actors on a GPU; WK_CLIENT is a driver attached to a
 * running node.  WK_NODE: on a head, the link to a node that joined it;
 * WK_HEAD: on a node, its link to the head; WK_PEER: between two nodes,
 * for chunks of objects only.  Links are neither workers nor clients. */
enum { WK_TASK, WK_HOST, WK_GPUHOST, WK_CLIENT, WK_NODE, WK_HEAD, WK_PEER };

/* Object states, as the bindings see them. */
enum { TD_OBJ_PENDING, TD_OBJ_READY, TD_OBJ_ERROR, TD_OBJ_MISSING };

typedef struct td_node_opts {
  double num_cpus;           /* <0: detect */
  double num_gpus;           /* fake GPUs are fine: ids 0..n-1 */
  double memory;             /* bytes; <0: detect */
  char res_names[TD_NRES_MAX][32]; /* custom resources */
  double res_amts[TD_NRES_MAX];
  int nres;
  size_t store_capacity;     /* bytes of shared memory; 0: default */
  size_t inline_max;         /* values up to this size stay inline */
  const char *exe;           /* the tide binary, for spawning workers */
  int prestart;              /* task workers to start at once */
  int no_workers;            /* never spawn workers (fuzzing, tests) */
  uint32_t index;            /* this node's index in its cluster (0: the head) */
  double node_timeout;       /* seconds of silence before a link is dead; 0: 5 */
  const char *name;          /* shown by tide status; NULL: the host name */
} td_node_opts_t;

/* RPC handler for control requests from workers, installed by the Lua
 * bindings. It answers with td_node_reply when req != 0. */
typedef void (*td_rpc_cb)(void *ud, td_wk_t *wk, uint32_t req, const char *op,
                          const uint8_t *args, size_t len);

/* Creates a node; caller owns it. Returns NULL on failure (errno set). */
td_node_t *td_node_new(const td_node_opts_t *opts);
/* Kills every worker and frees everything; idempotent, NULLs *n. */
void td_node_destroy(td_node_t **n);
void td_node_set_rpc(td_node_t *n, td_rpc_cb cb, void *ud);

/* Node-to-node links. A node that listens for other nodes on `port` (its
 * head learns the port, and the address it sees the node at) fetches large
 * objects from nodes that have them, as the head directs; `open` connects
 * to another node's endpoint ("tcp://HOST:PORT") and gives a local fd for
 * it plus a handle that `close` ends (after the fd is closed). */
typedef void *(*td_peer_open_cb)(void *ud, const char *endpoint, int *fd);
typedef void (*td_peer_close_cb)(void *ud, void *handle);
void td_node_set_peering(td_node_t *n, int port, td_peer_open_cb open, td_peer_close_cb close, void *ud);

/* One loop iteration: flush, poll up to `timeout` s, handle, schedule. */
void td_node_pump(td_node_t *n, double timeout);
void td_node_flush(td_node_t *n);
/* Acts on the objects that calls made outside a message changed (became
 * ready or failed: their waiters wake, results nobody holds go), as each
 * message and each pump does. A host calls it after its own calls (the
 * driver, when a tide call returns) so that they take effect at once. */
void td_node_settle(td_node_t *n);
/* Extensions (the HTTP ingress): one more fd to poll, with a callback when
 * it is readable, and a callback after every pump. */
typedef void (*td_node_cb)(void *ud);
void td_node_watch_fd(td_node_t *n, int fd, td_node_cb on_readable, td_node_cb on_tick, void *ud);
/* The same for an extension beside the host's (a serve ingress in a node
 * daemon, whose host watches its listener): returns the watch's slot (> 0)
 * for td_node_watch_remove, or -EBUSY when every slot is taken. */
int td_node_watch_add(td_node_t *n, int fd, td_node_cb on_readable, td_node_cb on_tick, void *ud);
void td_node_watch_remove(td_node_t *n, int slot);
/* Whether process `id` (a worker or an attached client) is still attached. */
int td_node_proc_alive(td_node_t *n, uint64_t id);
/* Adopts a connected client (a driver or REPL attached to this node over
 * a Unix socket): sends it the store fd and its id. Returns 0 or an error. */
int td_node_add_client(td_node_t *n, int fd);
/* The fds a pump would poll (a snapshot for a thread waiting on them). */
int td_node_fds(td_node_t *n, int *fds, int max);
/* Handles one message as if a client had sent it; for fuzzing and tests.
 * Returns 0 or TD_EPROTO (the fake client is then dropped). */
int td_node_feed(td_node_t *n, uint8_t type, const uint8_t *p, uint32_t len);
/* The same from a link: from_head 1, this node's head (made on first use);
 * 0, a client, which a JOIN turns into a node's link (on a head). */
int td_node_feed_as(td_node_t *n, int from_head, uint8_t type, const uint8_t *p, uint32_t len);
/* Replies to a worker request (payload is copied). */
void td_node_reply(td_node_t *n, td_wk_t *wk, uint32_t req, const void *p, size_t len);

/* -- Objects (the driver is owner 0) -------------------------------------- */

uint64_t td_node_new_id(td_node_t *n);
/* Creates a ready object of `size` bytes with one reference held by the
 * caller and returns where to write its bytes (valid until the next pump).
 * `refs` are nested refs the value holds. Returns 0, TD_ETOOBIG. */
int td_node_store(td_node_t *n, uint64_t id, size_t size, const uint64_t *refs,
                  uint32_t nrefs, uint8_t **dst);
int td_node_state(td_node_t *n, uint64_t id);
/* Bytes of a ready or failed object (failed: *is_err, bytes are an encoded
 * error table). Restores spilled objects. Valid until the next pump. */
int td_node_bytes(td_node_t *n, uint64_t id, const uint8_t **p, size_t *len, int *is_err);
void td_node_incref(td_node_t *n, uint64_t id);
void td_node_incref_for(td_node_t *n, td_wk_t *wk, uint64_t id); /* held for wk (a reply to it; NULL: none) */
void td_node_decref(td_node_t *n, uint64_t id);
/* Whether a ready object's bytes lie in the shared-memory store, and pins
 * that keep them there (not spilled) while something maps them. */
int td_node_in_store(td_node_t *n, uint64_t id);
int td_node_pin(td_node_t *n, uint64_t id, int delta);  /* 1 if it changed a pin */
/* Streams: what td_node_stream_item finds at index idx (0-based). */
enum {
  TD_STREAM_ENDED = -1, /* the stream ended before idx */
  TD_STREAM_NOT_YET = 0,
  TD_STREAM_ITEM = 1, /* *item is the idx-th item */
};
int td_node_stream_item(td_node_t *n, uint64_t stream, uint32_t idx, uint64_t *item);
/* Back-pressure for a stream whose consumer is on this node: its producer,
 * asking for room (TD_M_STREAM_ROOM), waits while `window` items or more
 * are not released yet (0: no limit, the default). */
void td_node_stream_window(td_node_t *n, uint64_t stream, uint32_t window);
/* The consumer is done with item idx (and every one before it): the
 * stream lets it go, and its producer may run ahead again. */
void td_node_stream_release(td_node_t *n, uint64_t stream, uint32_t idx);

/* -- Tasks and actors ------------------------------------------------------ */

/* Registers a function or actor class descriptor under id. */
void td_node_register_fn(td_node_t *n, uint64_t id, const uint8_t *blob, size_t len);
/* The descriptor registered under id (*len its bytes), or NULL when this
 * node has none. */
const uint8_t *td_node_fn(td_node_t *n, uint64_t id, size_t *len);
/* Submits a task, actor creation or actor call. The return objects are
 * created with one reference each, held by the submitter. Returns 0 or
 * TD_EINVAL with *msg set (unknown resource shapes are accepted: they wait). */
int td_node_submit(td_node_t *n, const td_spec_t *spec, const char **msg);
/* Cancels the task that makes obj_id (flags: TD_CANCEL_*), wherever it
 * runs. 0, or TD_ENOTFOUND when nothing makes it any more. */
enum { TD_CANCEL_FORCE = 1, TD_CANCEL_RECURSIVE = 2 };
int td_node_cancel(td_node_t *n, uint64_t obj_id, int flags);
int td_node_kill_actor(td_node_t *n, uint64_t actor_id, int no_restart);
/* Finds a live named actor. Returns 0 or TD_ENOTFOUND. */
int td_node_get_actor(td_node_t *n, const char *name, const char *ns, uint64_t *actor_id,
                      uint64_t *class_id);
/* Actor state: 0 pending, 1 alive, 2 restarting, 3 dead; -1 unknown. */
int td_node_actor_state(td_node_t *n, uint64_t actor_id, const char **reason);

/* -- Placement groups ------------------------------------------------------ */

/* Placement-group strategies; Lua reads them by name (core.PG_STRATEGY,
 * from td_pg_strategy_codes), and so does tide list. */
enum { TD_PG_PACK, TD_PG_SPREAD, TD_PG_STRICT_PACK, TD_PG_STRICT_SPREAD, TD_PG_COUNT };
extern const td_code_t td_pg_strategy_codes[];
/* bundles: nb rows of TD_NRES_MAX amounts indexed by resource index;
 * strategy: a TD_PG_* (anything else is misuse). A
 * detached group outlives the client that made it and, on a head with a
 * store, the head (persisted; reserved again on restart). *ready_id holds
 * one reference for the caller. */
int td_node_pg_create(td_node_t *n, int nb, const double (*bundles)[TD_NRES_MAX],
                      int strategy, const char *name, int detached, uint64_t *pg_id,
                      uint64_t *ready_id);
int td_node_pg_remove(td_node_t *n, uint64_t pg_id);
/* A live group by name: its id, a new reference to its ready object, its
 * strategy and bundles (valid until the group changes). Returns 0 or
 * TD_ENOTFOUND. */
int td_node_pg_find(td_node_t *n, const char *name, uint64_t *pg_id, uint64_t *ready_id,
                    int *strategy, int *nb, const double (**bundles)[TD_NRES_MAX]);

/* -- Resources and introspection ------------------------------------------ */

/* Index of a resource name, adding it (with zero capacity) if new; -1 if
 * the table is full. */
int td_node_res_index(td_node_t *n, const char *name);
int td_node_res_count(td_node_t *n);
const char *td_node_res_name(td_node_t *n, int i);
double td_node_res_total(td_node_t *n, int i);
double td_node_res_avail(td_node_t *n, int i);

/* -- Cluster ------------------------------------------------------------------ */

/* A node joining a head: sends JOIN (want: the index it had, or 0) on a
 * connection to the head and waits for its index. Returns 0, TD_ETIMEDOUT,
 * TD_EIO or TD_EPROTO. Done before td_node_new, whose ids carry the index. */
int td_link_handshake(int fd, uint32_t want, uint32_t *index, double timeout);
/* The same without waiting, for a node that rejoins while it keeps running
 * its own work: td_link_join_start sends JOIN on fd; td_link_join_poll
 * reads what has come (it never blocks): 0 with *index once the head
 * answered, TD_ETIMEDOUT while nothing has, or TD_EIO / TD_EPROTO;
 * td_link_join_end forgets the join (fd stays open). */
typedef struct td_link_join {
  td_chan_t c;
} td_link_join_t;
int td_link_join_start(td_link_join_t *j, int fd, uint32_t want);
int td_link_join_poll(td_link_join_t *j, uint32_t *index);
void td_link_join_end(td_link_join_t *j);
/* Adopts the connection as this node's link to its head (after the
 * handshake) and reports its resources. The head then sends it work. */
int td_node_link_head(td_node_t *n, int fd);
/* Passes a worker's RPC to the head (cluster-wide state: named actors,
 * the KV); the head's reply goes back to the worker. TD_ENOTFOUND when
 * this node has no head. */
int td_node_relay(td_node_t *n, td_wk_t *wk, uint32_t req, const char *op, const uint8_t *args, size_t len);
/* 1 while the link to the head is up; 0 once it is lost (rejoin then). */
int td_node_linked(td_node_t *n);
uint32_t td_node_index(td_node_t *n);

/* A head with a persistent store (persist.h): re-creates the detached
 * actors it had and reserves the node indices it gave. */
void td_node_restore(td_node_t *n);

typedef struct td_node_stats {
  int workers, actors, tasks_running, tasks_queued;
  size_t objects, store_used, store_capacity, spilled_bytes;
  size_t inline_bytes;       /* values kept inline (up to inline_max) and error blobs, outside the store */
  uint64_t bytes_sent;       /* object bytes this node sent other nodes in chunks */
  uint64_t bytes_from_peers; /* object bytes it fetched from nodes other than its head */
} td_node_stats_t;
typedef struct td_node_info {
  uint32_t index;
  const char *name;
  const char *address;         /* its IP: where its link to the head comes from; this machine's for the local node */
  int alive;
  const double *total, *avail; /* by resource index (td_node_res_name) */
  int tasks, actors;           /* as the head sees them: work it sent there */
  td_node_stats_t st;          /* the node's own figures (its last heartbeat) */
  int has_st;
  double heard_ago;            /* seconds since the head last heard from it (0: this node) */
} td_node_info_t;
/* This node, then every node joined to it. Returns how many. */
int td_node_cluster(td_node_t *n, td_node_info_t *out, int max);

void td_node_stats(td_node_t *n, td_node_stats_t *st);
uint64_t td_wk_id(const td_wk_t *wk);

/* -- Timeline (timeline.c) --------------------------------------------------- */

/* One task or actor call that ended on this node (or that it sent to another
 * node, as the head sees it). Times are td_now() seconds; add the wall0 of
 * td_node_timeline for unix time. */
typedef struct td_tl_event {
  double submit, start, end; /* submitted; began on its worker (or was sent to a node); ended */
  uint64_t task;             /* this node's task id */
  uint64_t ref;              /* its first return's object id (0: none) */
  uint64_t owner;            /* the client whose work it is (0: the node's driver) */
  uint64_t actor;            /* calls and creations: the actor */
  uint64_t wk;               /* the worker that ran it (0: another node's) */
  uint32_t node;             /* index of the node that ran it */
  int32_t pid;               /* the worker's process (0: another node's) */
  uint32_t args;             /* bytes of its encoded arguments */
  uint8_t kind;              /* TD_K_* */
  uint8_t ok;                /* 1: it returned; 0: it raised or failed */
  uint8_t ran;               /* 0: it failed before any worker ran it */
  char name[45];             /* task name, or actor.method */
} td_tl_event_t;
typedef void (*td_tl_cb)(void *ud, const td_tl_event_t *e);
/* Calls cb on every kept record, oldest first; *dropped is how many were
 * overwritten before. Returns 0, or TD_ENOTFOUND when recording is off
 * (TIDE_TIMELINE=0). */
int td_node_timeline(td_node_t *n, td_tl_cb cb, void *ud, uint64_t *dropped, double *wall0);
/* The process of a client that attached (a task's owner) and its parent.
 * Returns 0 or TD_ENOTFOUND (not among the last 256 clients). */
int td_node_client_pid(td_node_t *n, uint64_t id, int32_t *pid, int32_t *ppid);

/* -- Why is it stuck (why.c) ------------------------------------------------- */

/* Flags of td_node_why: TD_WHY_STACK asks a running task's worker for its
 * Lua stack (on its stderr); TD_WHY_WARNED says a waiter warned, so the
 * node does not name that task again. */
enum { TD_WHY_STACK = 1, TD_WHY_WARNED = 2 };
/* Writes into out (len bytes) why object or task id is not done: the task
 * that makes it and where that task is. Returns 0, or TD_ENOTFOUND (out
 * says so). */
int td_node_why(td_node_t *n, uint64_t id, int flags, char *out, size_t len);

/* -- Notes from nodes to their head (cluster.c) -------------------------------- */

/* Node: sends len bytes under topic (at most 15 characters) to the head,
 * which keeps the latest per node and topic until the node leaves; len 0
 * withdraws it. For a host's own figures (a serve ingress's stats), sent
 * now and then, not per task. Returns 0, or TD_ENOTFOUND when this node
 * has no head (it is the head, or alone, or its head is gone). */
int td_node_note_head(td_node_t *n, const char *topic, const void *p, size_t len);
typedef void (*td_note_cb)(void *ud, uint32_t node, const char *name, const uint8_t *p, size_t len);
/* Head: calls cb with the latest note under topic of each node joined now. */
void td_node_notes(td_node_t *n, const char *topic, td_note_cb cb, void *ud);

/* -- Transfers (transfer.c) -------------------------------------------------- */

/* How far this node's fetch of object id from another node has come:
 * *total bytes, of which *got have landed (counted per chunk as it lands,
 * so asking costs a lookup). Returns 0, or TD_ENOTFOUND when no chunked
 * fetch of it is under way here (it is this node's own, small, ready, or
 * its size is not known yet). */
int td_node_xfer(td_node_t *n, uint64_t id, uint64_t *total, uint64_t *got);

/* -- Live handles (introspect.c) --------------------------------------------- */

/* What a node still holds that td_node_stats does not count, so that a
 * test can end by checking that nothing is left (libuv's "no live
 * handles"): every count is 0 on a node that has let everything go. */
typedef struct td_node_handles {
  int records;   /* workers, clients and links in its table */
  int requests;  /* GET, WAIT and stream requests not answered yet */
  int tasks;     /* task records in any state: waiting for arguments, queued, sent, fetching */
  int groups;    /* placement groups, reserved or waiting */
  int lineage;   /* task specs kept to make a lost result again (a node's, and on a head its nodes') */
  int forwarded; /* work the head sent this node whose results have not all gone back */
} td_node_handles_t;
void td_node_handles(td_node_t *n, td_node_handles_t *h);

#endif

/* Private to the node: the records of engine/node.c and of the files split
 * from it (pg.c: placement groups), and the functions they share.  Other
 * layers use node.h.
 */
#ifndef TD_NODE_INT_H
#define TD_NODE_INT_H
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "node.h"
#include "chan.h"
#include "persist.h"
#include "pkg.h"
#include "proto.h"
#include "value.h"
#include "spill.h"

#define TD_PIPELINE 32          /* tasks queued at one leased worker */
#define TD_CHUNK (8u << 20)     /* values above this cross nodes in chunks */
#define TD_CHUNKS_OUT 4         /* chunks asked for at once, per object */
#define TD__NOWHERE UINT32_MAX  /* a placement group bundle whose node died */
#define TD_TASK_TAIL 256        /* pooled task records hold ids and args up to this */
/* Free records kept for reuse, of each kind. None under ASan, so that a
 * record freed twice, or used after its free, is caught where it happens
 * rather than handed out again to a second owner. */
#if defined(__SANITIZE_ADDRESS__)
#define TD_POOL_MAX 0
#else
#define TD_POOL_MAX 4096
#endif
#define TD_ACTORS_PER_HOST 4096 /* lightweight actors per shared process */
/* A large chunk is read from the link straight into its extent, not
 * through the channel's buffer (which would cost a copy, and fresh pages
 * when it grows): the channel stops at its header (td_chan_partial). */
#define TD__CHUNK_HEAD 20 /* u64 id, u64 offset, u32 length */

/* -- Records --------------------------------------------------------------- */

enum { OBJ_PENDING, OBJ_READY, OBJ_ERROR };
enum { LOC_NONE, LOC_INLINE, LOC_SHM, LOC_SPILLED };
/* T_FETCHING: done on a node, its large result still coming in chunks;
 * kept so that it can run again if that node dies first (lineage). */
enum { T_WAITDEPS, T_QUEUED, T_SENT, T_DONE, T_FETCHING };
enum { A_PENDING, A_ALIVE, A_RESTARTING, A_DEAD };

typedef struct td_task td_task_t;
typedef struct td_actor td_actor_t;
typedef struct td_tl td_tl_t;

/* On a node: a worker's request passed on to the head, until it answers. */
typedef struct td_relay {
  uint64_t wk_id;
  uint32_t req;
} td_relay_t;

/* On a node: a NODE_TASK held until its package arrives from the head. */
typedef struct td_parked {
  char key[1024];        /* a package hash, or the head's path of a working dir */
  uint8_t *msg;
  uint32_t len;
  struct td_parked *next;
} td_parked_t;

/* On a node whose head is gone: work for the head, waiting for it to come
 * back (a TD_M_SUBMIT as its submitter sent it). */
typedef struct td_waitsub {
  uint64_t owner, owner_task; /* whose work (td_node_submit's submitter) */
  uint64_t job, parent;       /* its spec's (the held message does not say) */
  uint64_t *held;             /* the arguments held here meanwhile */
  uint32_t nheld;
  uint8_t *msg;
  uint32_t len;
  struct td_waitsub *next;
} td_waitsub_t;
#define TD_HEAD_WAIT 60 /* s a node holds such work for a head that is gone */

/* On a node: a working directory the head named by its path, shipped as
 * a package; looked up again after a minute (the head may have changed it). */
typedef struct td_wdmap {
  char path[1024];
  char hash[TD_PKG_HASH_LEN + 1];
  double at;
  struct td_wdmap *next;
} td_wdmap_t;

/* On a node: work its head sent it, until the results go back. */
typedef struct td_fwd {
  uint64_t task;         /* the head's task id */
  uint8_t kind;          /* TD_K_* */
  int32_t nret;
  uint64_t *rets;
  uint64_t actor;
  uint32_t items_sent;   /* streams: items sent to the head so far */
} td_fwd_t;

typedef struct td_obj {
  uint64_t id;
  uint8_t state;         /* OBJ_* */
  uint8_t loc;           /* LOC_* */
  uint8_t is_stream;     /* a streaming generator's handle object */
  uint8_t stream_done;
  uint8_t *data;         /* inline bytes or error blob, owned */
  size_t len;            /* value size */
  size_t off;            /* shm or spill offset */
  int64_t refs;          /* handles, in-flight holds, containment */
  int32_t pins;          /* readers that must not see it move */
  uint64_t *contained;   /* refs this value holds, owned */
  uint32_t ncontained;
  td_task_t *producer;   /* running producer, for cancel */
  td_task_t **waiters;   /* tasks waiting for it as a dependency */
  uint32_t nwaiters, capwaiters;
  uint64_t *items;       /* stream items, held (0: released by the consumer) */
  uint32_t nitems, capitems;
  uint32_t window;       /* stream: unreleased items its producer may run ahead (0: any) */
  uint32_t released;     /* stream: items released by the consumer */
  uint64_t last_use;     /* LRU clock for spilling */
  td_fwd_t *fwd;         /* a return of work the head sent this node */
  uint8_t foreign;       /* a record of another node's object: holds one ref there */
  uint8_t pulling;       /* its value was asked for */
  uint8_t chunked;       /* being fetched in chunks into its extent (off, len) */
  uint8_t away;          /* head: a task's large result, made and kept on node up - 1 (len
                            bytes), fetched here only when something here needs it */
  uint8_t told;          /* node: a fetch the head directed, to report (TD_M_HAVE) */
  uint32_t up;           /* node index + 1 to fetch it from (0: by its id) */
  uint64_t asked, got;   /* chunks: bytes asked for and received */
  uint64_t src;          /* chunks: the id of the link they come from */
  uint8_t dp;            /* chunks: asked for on link src's data-plane stream (dplane.c) */
  struct td_copies *copies; /* head: the nodes that have or fetch it (large objects) */
} td_obj_t;

/* Head: a node that has, or fetches, a large object (see Peers). */
typedef struct td_copy {
  uint32_t node;         /* the node that has it, or fetches it */
  uint32_t from;         /* where it fetches from (0: the head) */
  uint32_t load;         /* fetches from it under way */
  uint8_t done;          /* it has the whole value */
} td_copy_t;

typedef struct td_copies {
  uint32_t load;         /* fetches from the head itself under way */
  uint32_t n, cap;
  td_copy_t *c;
} td_copies_t;

/* A chunk another node asked for before it landed here. */
typedef struct td_cwait {
  uint64_t wk, id, off;
  uint32_t len;
  uint8_t via;           /* answered on the link's data-plane stream */
} td_cwait_t;
#define TD_CWAIT_MAX 4096

/* A node that went silent on this one, and until when it is not asked. */
typedef struct td_shun {
  uint32_t index;
  double until;
} td_shun_t;
#define TD_SHUN_MAX 16
#define TD_SHUN_S 300.0

/* An object this node fetches from another node: when a chunk last came. */
typedef struct td_ppull {
  uint64_t id, wk;
  double at;
} td_ppull_t;

struct td_task {
  uint64_t id;
  td_spec_t spec;        /* arrays and args owned by the task */
  uint8_t state;         /* T_* */
  uint8_t cancelled;
  uint8_t force_cancel;
  uint32_t deps_pending;
  int32_t retries_left;
  uint32_t attempt;
  int res_idx[TD_NRES_MAX];  /* resolved demand: index, amount */
  double res_amt[TD_NRES_MAX];
  int nres;
  td_wk_t *wk;           /* where it was sent */
  td_actor_t *actor;     /* for actor calls and creations */
  double sent_at;        /* when it was sent to its worker */
  double submit_at;      /* when it was submitted (timeline only: 0 when it is off) */
  double hang_seen;      /* why.c: when a scan saw it waiting (0: not yet) */
  uint64_t hang_done;    /* why.c: n->tasks.ndone then; work that ended since re-arms the wait */
  uint8_t hang_warned;   /* why.c: named once already */
  uint8_t slow;          /* not known to be short when sent */
  uint8_t node_held;     /* sent to a node link holding: 1 its resources, 2 a bundle's */
  uint8_t pooled;        /* a TD_TASK_TAIL record, reused from n->tasks.pool */
  uint8_t restored;      /* a detached actor's creation, restored by a restarted head */
  uint8_t has_away;      /* a task with arguments kept on other nodes (td_obj_t away) */
  uint8_t unplaced;      /* queued although no node has what it asks for: nodes may rejoin (settle_until) */
  uint64_t owner;        /* the client (or head link) whose work it is: prints go there */
  uint64_t owner_task;   /* on a node: the head's id of this task */
  int32_t held_bundle;   /* node_held 2: the bundle of its placement group */
  uint32_t spread_to;    /* SPREAD: 1 + the index of the busy node whose turn it took, to wait there */
  uint32_t origin;       /* head: 1 + the index of the node that sent it here (0: none) */
  td_task_t *prev, *next;/* links in the queue it is on */
  void *on;              /* the queue it is on, NULL if none */
};

typedef struct td_tq {
  td_task_t *head, *tail;
  int len;
} td_tq_t;

struct td_wk {
  uint64_t id;
  pid_t pid;
  int kind;              /* WK_* */
  int dead;
  td_chan_t ch;
  td_tq_t inflight;      /* tasks and calls sent, in order */
  int leased;            /* holds lease resources for its task shape */
  double lease[TD_NRES_MAX];
  uint64_t lease_pg;
  int lease_bundle;
  int blocked;
  int nactors;
  int gpus[16], ngpus;
  td_map_t fns_sent;     /* function ids this worker has */
  td_map_t held, pinned; /* a worker's or client's refs and pins by object id, given back when it dies */
  int exit_status;
  td_map_t allocs;       /* shm extents lent by TD_M_ALLOC: off+1 -> len */
  int nslow;             /* inflight tasks not known to be short */
  int remote;            /* a client over TCP: no shared memory */
  uint8_t submitted;     /* a client that submitted work: its leaving ends a job (td__job_end) */
  double last_done;      /* when its last task finished */
  /* Node links (WK_NODE, WK_HEAD): */
  uint32_t node_index;
  int joined;            /* WK_NODE: its resources are known */
  uint32_t fns_upto;     /* function definitions sent so far (n->tasks.fn_order) */
  char name[64];
  double ntotal[TD_NRES_MAX], navail[TD_NRES_MAX]; /* by this node's resource index */
  td_node_stats_t nstats; /* a joined node's own figures, from its last heartbeat */
  int has_nstats;
  double nfree[2];       /* WK_NODE: the CPUs and GPUs free there, all work counted, as it last
                          * said (TD_M_ROOM; -1: not yet); navail counts only the head's own */
  double room_sent[2];   /* links: the last TD_M_ROOM sent on it */
  struct td_note *notes; /* WK_NODE: the latest note per topic it sent (TD_M_NOTE) */
  uint32_t nnotes;
  double last_seen;      /* last message from the other side */
  uint64_t sink_id;      /* a TD_M_CHUNK read straight into the store: its object */
  uint64_t sink_off;     /* its offset in the value */
  uint32_t sink_len;     /* its length */
  uint32_t sink_left;    /* bytes of it still to read (0: none) */
  char peer_host[64];    /* WK_NODE: the address its link came from */
  uint32_t peer_port;    /* WK_NODE: where it listens for other nodes (0: nowhere) */
  void *bridge;          /* WK_PEER opened here: the connection's handle (peer_close) */
};

/* Running time of a function, to decide whether queueing behind it is
 * safe: short tasks pipeline, long or unknown ones do not. */
typedef struct td_fnstat {
  double avg;            /* seconds, moving average */
  uint32_t n;
} td_fnstat_t;
#define TD_SHORT_TASK 0.002

struct td_actor {
  uint64_t id;
  td_task_t *create;     /* the creation task, kept for restarts */
  int state;             /* A_* */
  td_wk_t *host;
  uint64_t owner;        /* client that created it (0: the node's driver) */
  int restarts_left;
  int res_held;
  uint32_t pg_share;     /* 1 + the placement group bundle whose share it holds (0: none) */
  td_tq_t queue;         /* calls not sent yet, in order */
  char *reason;          /* why it died */
  int gpus[16], ngpus;
  td_wk_t *res_node;     /* the node link whose resources it holds */
  uint32_t fwd_attempt;  /* on a node: the head's incarnation (0: not the head's) */
  uint8_t of_head;       /* on a node: the head keeps it (it restarts it, calls may wait there);
                          * 2: killed through the head, so calls go there */
  uint8_t crashed;       /* it died by a crash, not by a kill or its own exit */
  uint8_t was_up;        /* restored by a restarted head: an earlier head had started it */
};

typedef struct td_req {
  td_wk_t *wk;
  uint32_t req;
  int op;                /* TD_M_GET / WAIT / STREAM_NEXT */
  uint64_t *ids;
  uint32_t n, num;
  double deadline;       /* 0 = none */
  struct td_req *next;
} td_req_t;

typedef struct td_pg {
  uint64_t id;
  int strategy;
  int nb;
  double (*total)[TD_NRES_MAX];
  double (*avail)[TD_NRES_MAX];
  int created, removed;
  uint64_t ready_id;
  char name[64];
  uint32_t *where;       /* per bundle, once created: the index of its node */
  uint64_t owner;        /* the client that made it (0: the node's driver) */
  uint8_t detached;      /* outlives its owner (and the head: persisted) */
  uint8_t holds_ready;   /* restored: the group itself holds its ready object */
  uint32_t *hint;        /* restored: per bundle, 1 + the node it should go to (0: any) */
  struct td_adoptee *adopt; /* restored: its detached actors still running on nodes */
  struct td_pg *next;
} td_pg_t;

/* A restored group's detached actor that a rejoining node still runs: it
 * is adopted there if its bundle is placed on that node. */
typedef struct td_adoptee {
  uint64_t actor;
  uint32_t attempt, node;
  int bundle;
  struct td_adoptee *next;
} td_adoptee_t;

/* A worker's TD_M_ALLOC that found the store full of values in use: it
 * waits for room (pins let go as tasks end) until its deadline. */
typedef struct td_allocw {
  uint64_t wk_id;
  uint32_t req;
  uint64_t size;
  double deadline;
  struct td_allocw *next;
} td_allocw_t;
#define TD_ALLOC_WAIT 10.0 /* s an ALLOC waits for room before it fails */

typedef struct td_fnblob {
  size_t len;
  uint8_t data[];
} td_fnblob_t;

/* The node's records, one sub-struct per module: a field belongs to the
 * module named on its struct, which alone writes it (others may read). */

/* Objects (obj.c; spill.c and store.c under it). */
typedef struct td_node_objs {
  td_map_t map;          /* object id -> td_obj_t */
  td_store_t *store;     /* shared memory for values above inline_max (store.h) */
  size_t inline_max;     /* values up to this many bytes travel inside messages */
  size_t inline_bytes;   /* bytes of the values and error blobs kept in this process's memory
                          * (o->data), outside the store: the sum of their o->len */
  td_spill_t *spill;     /* where objects the store has no room for go (spill.h) */
  uint64_t next_seq;     /* the last id made here (td_node_new_id): node index << TD_NODE_SHIFT, up */
  uint64_t clock;        /* ticks on each use, for the spill's least-recently-used order */
  int dirty;             /* objects changed since waiting requests were checked (the pump) */
  uint64_t *changed;     /* objects that became ready or failed, their waiters not woken yet:
                          * node.c's objects phase (td__objs_phase) acts on them */
  uint32_t nchanged, capchanged;
  td_allocw_t *allocw; /* ALLOCs waiting for room, oldest first (td__allocs_retry) */
  void **pool; /* free td_obj_t records kept for reuse */
  int npool;
} td_node_objs_t;

/* Resources and the run queue (sched.c). */
typedef struct td_node_sched {
  int nres;                      /* resources known, by index */
  char resname[TD_NRES_MAX][32]; /* their names: "CPU", "GPU", ... */
  double total[TD_NRES_MAX];     /* this node's amount of each */
  double avail[TD_NRES_MAX];     /* what is not held by running work */
  double gpu_free[64];           /* free fraction of each GPU id */
  int ngpus;                     /* GPU ids in gpu_free */
  td_tq_t queue;                 /* runnable tasks and actor creations, in order */
  td_map_t fnstats;              /* function id -> td_fnstat_t: short tasks pipeline */
  uint32_t spread;               /* round robin for SPREAD */
} td_node_sched_t;

/* Tasks and functions (task.c; why.c's scan). */
typedef struct td_node_tasks {
  td_map_t map;       /* task id -> td_task_t, until it ends */
  uint64_t next;      /* the last task id given here */
  td_map_t fns;       /* function id -> td_fnblob_t, its definition */
  uint64_t *fn_order; /* function ids in the order registered (sent to nodes in it) */
  uint32_t nfn_order, capfn_order;
  uint64_t submitter, submitter_task; /* whose tasks are being submitted now (prints go there) */
  uint32_t submitter_node;            /* head: 1 + the index of the node they come from (0: none) */
  uint32_t attempt_base;              /* node: the head's attempt of the actor being made, less 1 */
  void **pool;                        /* free td_task_t records of TD_TASK_TAIL, kept for reuse */
  int npool;
  uint64_t ndone;      /* tasks and calls ended here: progress, for why.c */
  double hang_warn_s;  /* TIDE_HANG_WARN_S: a queued task this long without progress is named (0: off) */
  double hang_scan_at; /* why.c: when to look for such tasks next */
} td_node_tasks_t;

/* Actors (actor.c). */
typedef struct td_node_actors {
  td_map_t map;       /* actor id -> td_actor_t, until it is dead and unreferenced */
  td_map_t names;     /* td__actor_name_key(ns, name) -> the named td_actor_t made last
                       * with that key (td_node_get_actor checks it is alive and that
                       * the names match) */
  int restoring;      /* a restarted head re-creates persisted actors: they wait for nodes */
  double adopt_until; /* until then restored actors wait to be adopted (td__adopt) */
} td_node_actors_t;

/* Placement groups (pg.c). */
typedef struct td_node_pgs {
  td_pg_t *list; /* every group not removed, newest first */
} td_node_pgs_t;

/* Lineage: how to make an object again (lineage.c). */
typedef struct td_node_lineage {
  td_map_t specs; /* node: object id -> td_fnblob_t, the spec of the task that makes it */
  td_map_t kept;  /* head: the same, sent by nodes; holds the spec's argument refs */
  uint64_t *out;  /* node: ids whose lineage goes to the head after this message */
  uint32_t nout, capout;
  int from_head; /* node: submitting work the head sent (its lineage is the head's) */
} td_node_lineage_t;

/* Worker processes, clients and links: everything on a channel (workers.c). */
typedef struct td_node_procs {
  td_wk_t **list; /* every channel's worker record, in no order */
  int n, cap;
  uint64_t next_id;      /* the last worker id given */
  td_req_t *reqs;        /* GET / WAIT / STREAM_NEXT requests waiting for objects */
  char exe[PATH_MAX];    /* the executable workers are started from */
  int no_workers;        /* opts.no_workers: start none (tests, clients only) */
  td_rpc_cb rpc;         /* runs a worker's control call (the Lua layer's) */
  void *rpc_ud;          /* rpc's argument */
  td_wk_t *rpc_wk;       /* whose request the RPC handler is running */
  /* A call's raw output (PRINT frames flagged RAW) held while the frames
   * that follow add to it, and acted on once (td__raw_flush): one log
   * write, index record and forward for a burst of writes. */
  td_buf_t raw;       /* its bytes (len 0: none held) */
  uint64_t raw_wk;    /* the channel they came on */
  uint64_t raw_task;  /* whose: the task ... */
  uint64_t raw_actor; /* ... and the actor (0: none) */
  uint8_t raw_flags;  /* TD_PRINT_* (RAW, and STDERR or not) */
} td_node_procs_t;

/* Moving large objects between nodes (transfer.c; dplane.c). */
typedef struct td_node_xfer {
  int peer_port;               /* where this node listens for other nodes (0: nowhere) */
  td_peer_open_cb peer_open;   /* opens a link to another node (the host's) */
  td_peer_close_cb peer_close; /* closes one */
  void *peer_ud;               /* their argument */
  td_map_t pulls;              /* request id -> object id, values asked of a link */
  uint32_t next_pull;          /* the last such request id */
  td_cwait_t *cwait;           /* chunks other nodes asked for that have not landed here yet */
  uint32_t ncwait, capcwait;
  td_ppull_t *ppull; /* objects being fetched from other nodes: their progress */
  uint32_t nppull, capppull;
  uint64_t bytes_sent;         /* chunk bytes sent to other nodes */
  uint64_t bytes_from_peers;   /* chunk bytes received from nodes other than the head */
  td_shun_t shun[TD_SHUN_MAX]; /* nodes not asked for chunks until then (they went silent) */
  uint32_t nshun;
  struct td_dp *dp; /* the data plane: direct streams for chunks (dplane.c; NULL: off) */
} td_node_xfer_t;

/* The head and its nodes (cluster.c). */
typedef struct td_node_links {
  uint32_t index;        /* this node's index; 0 = the head */
  char name[64];         /* this node's name, as the cluster lists it */
  td_wk_t *head;         /* a node's link to its head (NULL: this is the head, or alone) */
  double node_timeout;   /* silence after which a link is dead */
  double beat_at;        /* when heartbeats were last sent */
  int nlinks;            /* a head's joined nodes */
  uint32_t next_index;   /* head: the last node index given */
  double *gone_at;       /* head: by node index, when its node left (0: not while this head ran) */
  double settle_until;   /* head: nodes may still rejoin (it restarted, or one left) until then */
  double settle_max[TD_NRES_MAX]; /* the most of each resource a node that may rejoin had */
  int nunplaced;         /* tasks queued with unplaced set, judged again when settled */
  td_map_t fwd;          /* node: head task id -> td_fwd_t, work the head sent */
  uint64_t *fwd_ready;   /* node: returns of head work that changed, to send */
  uint32_t nfwd_ready, capfwd_ready;
  td_map_t fwd_actors;   /* node: actor id -> its driver's client id, for the non-detached
                          * actors forwarded to the head: they end when that driver leaves */
  td_map_t relays;       /* node: request id -> td_relay_t, requests passed to the head */
  td_parked_t *parked;   /* node: head work waiting for its working-directory package */
  td_wdmap_t *wdmap;     /* node: head paths of working dirs -> packages, fetched */
  td_waitsub_t *waitsubs; /* node: work for a head that is gone (td__hold_for_head) */
  double rejoin_until;    /* node: until when such work waits for it */
  double room[2];         /* node: the CPUs and GPUs free on the rest of the cluster, as the
                           * head last said (TD_M_ROOM): work that would queue here goes
                           * there instead (td__for_head) */
  double room_used[2];    /* node: what of it this node sent the head since (td__spills) */
  double room_at;         /* when TD_M_ROOM changes were last sent */
  int room_owed;          /* a turn since found it too soon to send them */
} td_node_links_t;

/* One extra fd the loop polls for its host or an extension (the daemon's
 * listener, the dashboard, a serve ingress), with its callbacks. */
#define TD_NODE_WATCHES 4
typedef struct td_node_watch {
  int fd;          /* polled with the channels (-1: none) */
  td_node_cb read; /* called when fd is readable */
  td_node_cb tick; /* called each turn of the loop */
  void *ud;        /* their argument */
} td_node_watch_t;

struct td_node {
  td_node_objs_t objs;
  td_node_sched_t sched;
  td_node_tasks_t tasks;
  td_node_actors_t actors;
  td_node_pgs_t pgs;
  td_node_lineage_t lineage;
  td_node_procs_t procs;
  td_node_xfer_t xfer;
  td_node_links_t links;
  /* The loop (node.c): */
  td_buf_t tmp;        /* scratch for building one message or blob at a time */
  struct pollfd *pfds; /* the poll set, rebuilt each turn: one per channel, then the watched fds */
  int cappfds;
  double tick_at;      /* when links and timers were last checked */
  td_node_watch_t
      watch[TD_NODE_WATCHES]; /* [0] the host's (td_node_watch_fd); the rest td_node_watch_add's */
  td_tl_t *tl;         /* the timeline's ring (timeline.c); NULL: not recording */
};

/* -- Queues ---------------------------------------------------------------- */

static inline void tq_push(td_tq_t *q, td_task_t *t) {
  if (t->on) { fprintf(stderr, "tide: BUG: task %llu queued twice\n", (unsigned long long)t->id); abort(); }
  t->on = q;
  t->next = NULL;
  t->prev = q->tail;
  if (q->tail) q->tail->next = t; else q->head = t;
  q->tail = t;
  q->len++;
}

static inline void tq_push_front(td_tq_t *q, td_task_t *t) {
  if (t->on) { fprintf(stderr, "tide: BUG: task %llu queued twice\n", (unsigned long long)t->id); abort(); }
  t->on = q;
  t->prev = NULL;
  t->next = q->head;
  if (q->head) q->head->prev = t; else q->tail = t;
  q->head = t;
  q->len++;
}

static inline void tq_del(td_tq_t *q, td_task_t *t) {
  if (t->on != q) { fprintf(stderr, "tide: BUG: task %llu not on that queue\n", (unsigned long long)t->id); abort(); }
  t->on = NULL;
  if (t->prev) t->prev->next = t->next; else q->head = t->next;
  if (t->next) t->next->prev = t->prev; else q->tail = t->prev;
  t->prev = t->next = NULL;
  q->len--;
}
/* -- Resources: a task's demand against a pool (hot paths) ----------------- */

/* Whether pool (by resource index) has what t asks for. */
static inline int td__fits(const double *pool, const td_task_t *t) {
  for (int i = 0; i < t->nres; i++)
    if (pool[t->res_idx[i]] + 1e-9 < t->res_amt[i]) return 0;
  return 1;
}

/* Takes t's demand from pool (sign 1), or gives it back (sign -1). */
static inline void td__take(double *pool, const td_task_t *t, double sign) {
  for (int i = 0; i < t->nres; i++) pool[t->res_idx[i]] -= sign * t->res_amt[i];
}

/* -- Placement groups: lookups on hot paths (pg.c has the rest) ------------- */

static inline td_pg_t *td__pg(td_node_t *n, uint64_t id) {
  for (td_pg_t *pg = n->pgs.list; pg; pg = pg->next)
    if (pg->id == id) return pg;
  return NULL;
}

/* The pool a task draws from: the node's, or a placement group bundle's. */
static inline double *td__pool(td_node_t *n, td_task_t *t, int *bundle) {
  *bundle = -1;
  if (!t->spec.pg_id) return n->sched.avail;
  td_pg_t *pg = td__pg(n, t->spec.pg_id);
  if (!pg || !pg->created || pg->removed) return NULL;
  if (t->spec.bundle >= 0) {
    if (t->spec.bundle >= pg->nb) return NULL;
    *bundle = t->spec.bundle;
    return pg->avail[t->spec.bundle];
  }
  for (int b = 0; b < pg->nb; b++) {
    int fits = 1;
    for (int i = 0; i < t->nres; i++)
      if (pg->avail[b][t->res_idx[i]] + 1e-9 < t->res_amt[i]) fits = 0;
    if (fits) { *bundle = b; return pg->avail[b]; }
  }
  *bundle = 0;
  return pg->avail[0];
}

/* The object record of id here, or NULL. */
static inline td_obj_t *td__obj(td_node_t *n, uint64_t id) { return td_map_get(&n->objs.map, id); }

/* -- Functions the node's files share, by the file that defines them ---------- */

/* A message's handler (node.c's table td__msgs[] calls it once the sender
 * may send it): reads the body from rd and acts; TD_EPROTO when the body is
 * malformed, and the sender is dropped. Each module below has its own. */
typedef int td_msg_fn(td_node_t *n, td_wk_t *wk, td_rd_t *rd);

/* node.c: the loop and the message table. */
void td__errblob(td_buf_t *b, const char *kind, const char *msg);
void td__inflight_add(td_node_t *n, td_wk_t *wk, td_task_t *t);
void td__inflight_del(td_node_t *n, td_wk_t *wk, td_task_t *t);
void td__link_chan(td_wk_t *wk);
const char *td__msg_name(uint8_t type);
void td__obj_done(td_node_t *n, td_obj_t *o);
void td__objs_phase(td_node_t *n);
void td__obj_freeing(td_node_t *n, td_obj_t *o);
void td__obj_freed(td_node_t *n, td_task_t *producer);
void td__put_lstr(td_buf_t *b, const char *s);

/* obj.c: the object table. */
void td__add_waiter(td_obj_t *o, td_task_t *t);
int td__alloc(td_node_t *n, size_t size, size_t *off, td_obj_t *keep);
void td__obj_fail(td_node_t *n, td_obj_t *o, const uint8_t *blob, size_t len);
void td__obj_free(td_node_t *n, td_obj_t *o);
td_obj_t *td__obj_new(td_node_t *n, uint64_t id);
int td__obj_resident(td_node_t *n, td_obj_t *o);
void td__obj_set(td_node_t *n, td_obj_t *o, int state, int shm, const uint8_t *data, size_t len,
    size_t off, const uint64_t *refs, uint32_t nrefs);
void td__unref(td_node_t *n, td_obj_t *o, int64_t k);
void td__wait_on(td_obj_t *o, td_task_t *t);
int td__read_value(td_rd_t *rd, int *shm, const uint8_t **p, size_t *len, size_t *off);
int td__take_extent(td_wk_t *wk, size_t off, size_t len);
td_msg_fn td__on_put, td__on_refs, td__on_pin, td__on_unpin, td__on_alloc;
void td__allocs_retry(td_node_t *n, double now);
void td__allocs_free(td_node_t *n);

/* sched.c: resources, placement, leasing workers. */
void td__gpus_give(td_node_t *n, double amount, const int *ids, int k);
void td__sched(td_node_t *n);
double td__task_gpus(const td_task_t *t);

/* task.c: submission and tasks in flight. */
void td__task_infeasible(td_node_t *n, td_task_t *t, char *why, size_t len);
void td__count(td_wk_t *wk, td_map_t *m, uint64_t id, intptr_t d);
int td__env_get(const char *env, uint32_t len, const char *key, char *out, size_t n);
void td__give_back(td_node_t *n, td_wk_t *wk);
void td__lease_done(td_node_t *n, td_wk_t *wk);
void td__obj_wake(td_node_t *n, td_obj_t *o);
int td__put_value(td_node_t *n, td_buf_t *b, uint64_t id, int pin, int remote);
void td__send_fn(td_node_t *n, td_wk_t *wk, uint64_t fn_id);
void td__send_task(td_node_t *n, td_wk_t *wk, td_task_t *t);
void td__task_fail(td_node_t *n, td_task_t *t, const char *kind, const char *msg);
void td__tasks_lost(td_node_t *n, td_wk_t *wk, const char *reason);
uint64_t td__job_of(td_node_t *n, const td_wk_t *wk);
void td__tasks_job_end(td_node_t *n, uint64_t job);
void td__task_finish(td_node_t *n, td_task_t *t);
void td__unpin_deps(td_node_t *n, td_task_t *t);
void td__unplaced_check(td_node_t *n, double now);
void td__wake_waiters(td_node_t *n, td_obj_t *o, int away);
int td__task_fetching(td_node_t *n, td_task_t *t);
td_msg_fn td__on_fn, td__on_submit, td__on_done, td__on_item;

/* actor.c: the actor directory. */
void td__actor_calls_lost(td_node_t *n, td_actor_t *a, td_wk_t *wk, int may_retry, const char *why);
void td__actor_die(td_node_t *n, td_actor_t *a, const char *why);
uint64_t td__actor_name_key(const char *ns, const char *name);
void td__actor_kill_at(td_wk_t *wk, uint64_t aid);
void td__actor_pump(td_node_t *n, td_actor_t *a);
void td__actor_restart_or_die(td_node_t *n, td_actor_t *a, const char *why);
void td__actors_owner_left(td_node_t *n, uint64_t owner);
void td__actors_job_end(td_node_t *n, uint64_t job);
void td__actors_host_lost(td_node_t *n, td_wk_t *wk, const char *reason);
int td__kill_actor(td_node_t *n, uint64_t actor_id, int no_restart, const char *why);
void td__persist_actor(td_node_t *n, const td_spec_t *s);
td_wk_t *td__pick_host(td_node_t *n, td_actor_t *a);
void td__restore_actor(void *ud, const char *key, const void *val, size_t len);
void td__restore_actor_up(void *ud, const char *key, const void *val, size_t len);
void td__persist_actor_up(td_actor_t *a);
int td__restored_gone(td_node_t *n, td_task_t *t);
td_msg_fn td__on_actor_ready, td__on_actor_exit, td__on_kill, td__on_actor_kill;

/* pg.c: placement groups and adoption. */
void td__adopt(td_node_t *n, td_wk_t *wk, uint64_t aid, uint32_t attempt);
void td__adopt_at(td_node_t *n, td_wk_t *wk, td_task_t *t, uint32_t attempt);
void td__pg_adopt(td_node_t *n, td_pg_t *pg);
void td__pgs_node_lost(td_node_t *n, uint32_t index);
void td__pgs_owner_left(td_node_t *n, uint64_t owner);
void td__restore_pg(void *ud, const char *key, const void *val, size_t len);
int td__try_pg(td_node_t *n, td_pg_t *pg);

/* lineage.c: results made again when lost. */
void td__lineage_drop(td_node_t *n, uint64_t id);
void td__lineage_keep(td_node_t *n, const td_spec_t *s);
void td__lineage_send(td_node_t *n);
void td__link_lost_objects(td_node_t *n, td_wk_t *wk);
void td__obj_unfetch(td_node_t *n, td_obj_t *o);
int td__on_lineage(td_node_t *n, td_wk_t *wk, td_rd_t *rd);

/* transfer.c: large objects between nodes. */
void td__peer_dead(td_node_t *n, td_wk_t *wk);
td_wk_t *td__away_home(td_node_t *n, td_task_t *t);
int td__away_source(td_node_t *n, td_obj_t *o, td_wk_t *wk);
uint32_t td__away_wait(td_node_t *n, td_task_t *t, int here);
void td__chunk_begin(td_node_t *n, td_obj_t *o, uint64_t total, td_wk_t *up);
void td__chunk_fail(td_node_t *n, td_obj_t *o, const char *kind, const char *why);
void td__chunk_landed(td_node_t *n, td_wk_t *wk, td_obj_t *o, uint32_t l);
void td__chunk_more(td_node_t *n, td_obj_t *o, td_wk_t *up);
td_obj_t *td__chunk_obj(td_node_t *n, td_wk_t *wk, uint64_t id, uint64_t off, uint32_t l);
const uint8_t *td__chunk_src(td_node_t *n, uint64_t id, uint64_t off, uint32_t len);
td_copy_t *td__copy(td_copies_t *cp, uint32_t node);
void td__copy_drop(td_copies_t *cp, uint32_t node);
void td__cwait_serve(td_node_t *n, uint64_t id);
void td__have(td_node_t *n, td_obj_t *o, int ok);
void td__have_id(td_node_t *n, uint64_t id, int ok);
int td__link_pushed(td_node_t *n, td_rd_t *rd, uint64_t **made, uint32_t *nmade);
void td__obj_away(td_node_t *n, td_obj_t *o, td_wk_t *wk, uint64_t total);
int td__on_chunk(td_node_t *n, td_wk_t *wk, td_rd_t *rd);
int td__on_chunk_get(td_node_t *n, td_wk_t *wk, td_rd_t *rd);
int td__on_have(td_node_t *n, td_wk_t *wk, td_rd_t *rd);
td_msg_fn td__on_peer, td__on_remote;
td_wk_t *td__peer(td_node_t *n, uint32_t index, const char *ep);
void td__peer_fallback(td_node_t *n, td_obj_t *o, const char *why);
void td__ppull_check(td_node_t *n, td_wk_t *peer, double now);
void td__ppull_note(td_node_t *n, td_obj_t *o, td_wk_t *peer);
void td__put_pull(td_node_t *n, td_buf_t *b, td_obj_t *o, td_wk_t *wk);
int td__sink_read(td_node_t *n, td_wk_t *wk);
int td__sink_take(td_node_t *n, td_wk_t *wk);

/* ... and where another node's object is, and getting it. */
td_wk_t *td__upstream(td_node_t *n, uint64_t id);
td_wk_t *td__upstream_of(td_node_t *n, td_obj_t *o);
td_obj_t *td__foreign(td_node_t *n, uint64_t id, int held);
void td__unhold(td_node_t *n, td_obj_t *o);
void td__send_refs1(td_wk_t *up, uint64_t id, int32_t delta);
void td__pull(td_node_t *n, td_obj_t *o);
void td__obj_fill(td_node_t *n, td_obj_t *o, int state, const uint8_t *p, size_t len, const uint64_t *refs,
                  uint32_t nrefs);

/* dplane.c: chunks over direct, encrypted TCP streams between nodes. */
void td__dp_advertise(td_node_t *n, td_wk_t *wk);
int td__dp_fd(td_node_t *n);
void td__dp_free(td_node_t *n);
void td__dp_io(td_node_t *n);
int td__dp_ready(td_node_t *n, td_wk_t *wk);
void td__dp_send(td_node_t *n, td_wk_t *wk, uint64_t id, uint64_t off, uint32_t len);
void td__dp_tick(td_node_t *n, double now);
int td__on_dp(td_node_t *n, td_wk_t *wk, td_rd_t *rd);

/* workers.c: worker processes and their requests. */
uint64_t td__new_wk_id(td_node_t *n);
int td__req_add(td_node_t *n, td_wk_t *wk, int op, td_rd_t *rd);
void td__reqs_check(td_node_t *n, double now);
void td__restore_meta(void *ud, const char *key, const void *val, size_t len);
td_wk_t *td__spawn(td_node_t *n, int kind, const int *gpus, int ngpus);
td_wk_t *td__wk_add(td_node_t *n, uint64_t id, int kind, int fd);
void td__wk_dead(td_node_t *n, td_wk_t *wk, const char *why); /* node.c: tells each module */
void td__wk_reason(td_wk_t *wk, const char *why, char *reason, size_t cap);
void td__wk_free(td_node_t *n, td_wk_t *wk);
/* A node link whose join was answered too late (the node joined again,
 * under the same index): it had nothing. */
static inline int td__wk_ghost(const td_wk_t *wk) { return wk->kind == WK_NODE && !wk->joined; }
td_msg_fn td__on_get, td__on_wait, td__on_stream_next, td__on_stream_room, td__on_print, td__on_rpc,
    td__on_blocked, td__on_unblocked;
/* Acts on the raw output held (procs.raw): before any other message, a
 * worker's death, and at the end of the I/O phase. */
void td__raw_flush(td_node_t *n);

/* timeline.c: the ring of tasks and calls that ended. */
void td__tl_init(td_node_t *n);
void td__tl_free(td_node_t *n);
void td__tl_client(td_node_t *n, uint64_t id, int32_t pid);
void td__tl_record(td_node_t *n, const td_task_t *t, const td_wk_t *wk, double begun, double ended, int ok,
                   int ran);
void td__tl_failed(td_node_t *n, const td_task_t *t);

/* why.c: why an object or task is not done; warnings about stuck tasks. */
void td__why_init(td_node_t *n);
double td__why_next(td_node_t *n, double now);
void td__why_tick(td_node_t *n, double now);

/* cluster.c: links between a head and its nodes. */
void td__link_dead(td_node_t *n, td_wk_t *wk);
void td__job_end(td_node_t *n, uint64_t job, td_wk_t *from);
void td__room_tick(td_node_t *n);
void td__node_full(td_wk_t *wk, const td_spec_t *s);
int td__spills(td_node_t *n, const td_spec_t *s);
void td__tell_cluster(td_node_t *n, td_wk_t *from, uint8_t type, uint64_t id, int flags);
double td__cluster_max(td_node_t *n, int r);
void td__settle(td_node_t *n, const double *had);
void td__cluster_tick(td_node_t *n, double now);
void td__export(td_node_t *n, const uint64_t *ids, uint32_t k);
int td__forward(td_node_t *n, const td_spec_t *s);
void td__fwd_flush(td_node_t *n);
void td__fwd_note(td_node_t *n, uint64_t id);
void td__head_lost(td_node_t *n);
void td__import(td_node_t *n, td_wk_t *from, const uint64_t *ids, uint32_t k);
td_wk_t *td__link(td_node_t *n, uint32_t index);
td_obj_t *td__obj_from_bytes(td_node_t *n, uint64_t id, int state, const uint8_t *p, size_t len);
int td__on_join(td_node_t *n, td_wk_t *wk, td_rd_t *rd);
int td__on_link_reply(td_node_t *n, td_wk_t *wk, td_rd_t *rd);
int td__on_node_info(td_node_t *n, td_wk_t *wk, td_rd_t *rd);
int td__on_node_task(td_node_t *n, td_wk_t *wk, td_rd_t *rd);
td_msg_fn td__on_beat, td__on_welcome, td__on_cancel, td__on_note, td__on_job_end, td__on_cancel_ref,
    td__on_cancel_tree, td__on_room;
void td__notes_free(td_wk_t *wk);
int td__hold_for_head(td_node_t *n, td_wk_t *wk, const td_spec_t *s, const uint8_t *msg, uint32_t len);
void td__waitsubs_check(td_node_t *n, double now);
void td__send_fns(td_node_t *n, td_wk_t *wk);
void td__send_node_task(td_node_t *n, td_wk_t *wk, td_task_t *t);
/* Fails the head's task htid here: a failed DONE with the error blob. */
void td__link_fail(td_node_t *n, uint64_t task, const uint8_t *blob, size_t len);

/* workdir.c: working directories (packages) of the work a head sends. */
/* Points the spec at the copy here of its working directory, or writes
 * the package key to fetch into key (empty when none is needed). */
void td__node_task_wd(td_node_t *n, td_spec_t *s, char *key, size_t keylen);
/* Parks the work message until its package arrives; asks the head once. */
void td__node_task_park(td_node_t *n, td_wk_t *wk, const char *key, const uint8_t *msg, uint32_t msglen);
int td__on_pkg(td_node_t *n, td_wk_t *wk, td_rd_t *rd);
int td__on_pkg_get(td_node_t *n, td_wk_t *wk, td_rd_t *rd);
void td__parked_drop(td_node_t *n);

#endif

/* Tide TCP bridge: ZeroMQ with CURVE between a node and remote clients
 * (drivers, REPLs, `tide status`). The node keeps speaking its framed
 * protocol over local sockets: on the node's side a thread turns each
 * authenticated ZeroMQ peer into a client connection on the node's Unix
 * socket; on the client's side a thread turns a socketpair into a ZeroMQ
 * DEALER. Peers without the cluster key are refused by a ZAP handler and
 * counted. Uses libzmq (CURVE via libsodium).
 */
#ifndef TD_BRIDGE_H
#define TD_BRIDGE_H

#include <stdint.h>

/* The cluster key: a CURVE server keypair and the one client keypair every
 * member holds, Z85-encoded (40 characters each). */
typedef struct td_cluster_key {
  char server_public[41], server_secret[41];
  char client_public[41], client_secret[41];
} td_cluster_key_t;

/* Creates a fresh key and writes it to path with mode 0600. These return
 * 0 or a negative code (td_strerror): -errno for the file, TD_EINVAL for a
 * key file without the three keys, TD_EZMQ for ZeroMQ's own failures. */
int td_key_create(const char *path, td_cluster_key_t *k);
int td_key_save(const char *path, const td_cluster_key_t *k);
int td_key_load(const char *path, td_cluster_key_t *k);

/* Node side: listens on endpoint ("tcp://0.0.0.0:6380") and forwards every
 * authenticated peer to the node's Unix socket. Returns 0 or a negative
 * code: TD_EADDRINUSE when the port is taken, -errno or TD_EZMQ. */
int td_bridge_server_start(const char *endpoint, const char *unix_sock, const td_cluster_key_t *k);
void td_bridge_server_stop(void);
int td_bridge_server_port(void);  /* the port listened on (0: none), also for "tcp://H:*" */
uint64_t td_bridge_refused(void); /* peers refused so far */

/* Client side: connects to endpoint ("tcp://host:port"); *fd receives the
 * local end to use as the connection. Returns NULL on failure. Closing:
 * close *fd first, then td_bridge_close (flush: wait up to 2 s for what is
 * queued to be delivered; else drop it). A process may hold many. */
typedef struct td_bridge_client td_bridge_client_t;
td_bridge_client_t *td_bridge_open(const char *endpoint, const td_cluster_key_t *k, int *fd);
void td_bridge_close(td_bridge_client_t *c, int flush);

/* The one connection of a node to its head or a driver to its node:
 * connects to endpoint ("tcp://host:port"); *fd receives the
 * local end to use as the node connection. Returns 0 or TD_EIO (a connection
 * that fails later reads as the end of *fd's stream). */
int td_bridge_client_start(const char *endpoint, const td_cluster_key_t *k, int *fd);
/* Flushes what is queued for the node and stops (at exit). */
void td_bridge_client_stop(void);
/* Stops at once, dropping what is queued: for a link that is dead anyway
 * (a head that did not answer a JOIN), so that nothing waits on it. */
void td_bridge_client_drop(void);

#endif

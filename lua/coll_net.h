/* Tide collectives across nodes: a ring transport (gpu/ring.h) over TCP
 * streams between the ranks of a group, AES-128-OCB records (or GCM's GMAC
 * only, --data-plane plain) keyed per stream from a secret the group's rank 0
 * makes and hands out through the head's KV (coll_net.c, and
 * docs/architecture.md, "Collectives across nodes"). */
#ifndef TD_COLL_NET_H
#define TD_COLL_NET_H

#include <stdint.h>

#include "ring.h"

typedef struct td_cnet td_cnet_t;

/* Listens on host (an ephemeral port) for the group's other ranks; *port
 * gets the port. Returns 0 or -1 (errno). Caller frees with td_cnet_free. */
int td_cnet_listen(td_cnet_t **out, const char *host, int *port);
/* Joins rank to the world: connects to every lower rank (hosts[i],
 * ports[i]) and takes a connection from every higher one, each proving it
 * holds secret (HMAC over both ends' nonces); plain: GMAC only. names[i]
 * (the rank's node) is used in error messages. Blocks up to timeout
 * seconds. Returns 0, or -1 with td_cnet_error() saying why. */
int td_cnet_join(td_cnet_t *c, int rank, int world, const char *const *hosts, const int *ports,
                 const char *const *names, const uint8_t secret[32], int plain, double timeout);
/* The transport among all ranks (ring rank = group rank). */
void td_cnet_transport(td_cnet_t *c, td_ring_transport_t *tr);
/* The transport among a subset: ring rank i is group rank map[i] (map is
 * copied; n at most the world; at most 4 per cnet, freed with it).
 * Returns 0 or -1. */
int td_cnet_sub_transport(td_cnet_t *c, const int *map, int n, td_ring_transport_t *tr);
/* Allreduce of count elements of dtype in place between this rank and
 * group rank peer alone, in one exchange: each sends its whole buffer
 * once and reduces the other's into it as it arrives (one round trip,
 * where a ring of two takes two steps and a wait between). Both get
 * op(lower rank's, higher rank's), the same values. op: TD_RING_SUM, MAX
 * or MIN (for AVG the caller sums and divides). Returns 0, or a negative
 * code (with td_cnet_error() saying why for a transport failure). */
int td_cnet_allreduce_pair(td_cnet_t *c, int peer, void *buf, size_t count, int dtype, int op);
/* Seconds an operation waits for a peer that sends nothing (0: forever). */
void td_cnet_set_timeout(td_cnet_t *c, double s);
/* Why the last call failed (names the peer rank and node), "" if none. */
const char *td_cnet_error(const td_cnet_t *c);
/* What seals a joined group's records: "aes-128-ocb (libgcrypt)", the same
 * by OpenSSL where libgcrypt did not load, or "gmac (openssl)" (plain). */
const char *td_cnet_cipher(const td_cnet_t *c);
/* Whether the failure was a peer gone (closed, reset, silent too long). */
int td_cnet_peer_gone(const td_cnet_t *c);
void td_cnet_free(td_cnet_t **c);
/* 32 random bytes (a group secret). */
int td_cnet_random(uint8_t out[32]);

#endif

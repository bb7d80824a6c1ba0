/* Tide data plane: bulk bytes between nodes over direct TCP streams,
 * beside the ZeroMQ control links (see dplane.c and docs/architecture.md,
 * "Data plane"). */
#ifndef TD_DPLANE_H
#define TD_DPLANE_H

#include "td.h"

/* --data-plane: AES-128-GCM (the default), authenticated only (GMAC tags,
 * bytes in the clear: trusted fabrics), or none (chunks over ZeroMQ). */
enum { TD_DP_OFF, TD_DP_ON, TD_DP_PLAIN };

struct td_node;
/* Parses a --data-plane value ("on", "plain", "off"); -1 for anything else. */
int td_dp_mode_parse(const char *s);
/* Starts this node's data-plane listener on bind_host (an ephemeral port)
 * with a secret derived from the cluster key (key_text: its secret and
 * public keys, as they are in the key file). head_host: where this node's
 * head is (NULL on a head). Returns 0, or -1 (errno) when it cannot listen:
 * the node then runs without one, over ZeroMQ. */
int td_node_set_dplane(struct td_node *n, int mode, const char *bind_host, const char *head_host,
                       const char *key_text);
/* The listener's port (0: none). */
int td_node_dplane_port(struct td_node *n);

#endif

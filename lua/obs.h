/* Observability in the node daemon: the tide.obs_c module for its private
 * RPC state, and the dashboard's HTTP server (/metrics, /api/..., pages).
 * Uses http, introspect, core. See lua/obs.c.
 */
#ifndef TD_OBS_H
#define TD_OBS_H

#include "node.h"

/* Loads stdlib/tide/obs.lua into the daemon's private state (its RPC ops:
 * list, metrics, logs) once the node and that state exist. Returns 0 or
 * TD_EINVAL. */
int td_obs_enable(const char *home);

/* The dashboard token of a cluster key's secret (hex, 64 digits + NUL). */
void td_obs_token(const char *secret, char out[65]);

/* Serves the dashboard on host:port (port 0: any; *bound gets it). The
 * daemon's listening socket listen_fd keeps being watched (on_accept)
 * beside it. secret: the cluster key's, for the token other addresses
 * must show (NULL: loopback only). Returns 0, TD_EADDRINUSE, TD_EINVAL,
 * TD_ENOMEM or -errno (td_http_server_listen's codes). */
int td_obs_dashboard_start(const char *host, int port, const char *secret, int listen_fd, td_node_cb on_accept,
                           int *bound);
void td_obs_dashboard_stop(void);

#endif

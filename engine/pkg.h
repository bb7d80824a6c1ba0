/* Tide working-directory packages: a job's directory shipped to every node
 * as one blob, named by a hash of its content and unpacked once per machine
 * into a cache ($TIDE_PKG_CACHE, default /tmp/tide-pkgs-<uid>, then <hash>),
 * where the tasks that carry it run.
 * Format: "TDPKG1", u32 files, then per file u32 path length, path (relative,
 * no ".." or empty parts), u64 size, bytes. Uses libc only.
 */
#ifndef TD_PKG_H
#define TD_PKG_H

#include <stddef.h>

#define TD_PKG_MAX ((size_t)512 << 20) /* bytes in one package */

/* The hash of a blob as 16 hex digits (FNV-1a, 64 bits) into out[17]. */
void td_pkg_hash(const void *p, size_t n, char out[17]);
/* Where the package lives on this machine; out has room for PATH_MAX. */
void td_pkg_dir(const char *hash, char *out, size_t n);
/* 1 when the package is unpacked here. */
int td_pkg_have(const char *hash);
/* Checks the blob against hash, keeps it (hash.pkg, to serve other nodes)
 * and unpacks it. Returns 0, or -1 with err set. Safe to repeat. */
int td_pkg_install(const char *hash, const void *blob, size_t len, char *err, size_t errlen);
/* The blob of an installed package (malloc'd), or NULL. */
void *td_pkg_read(const char *hash, size_t *len);
/* Packs every regular file under dir (not .git) into a new blob
 * (malloc'd; *len its size), or NULL with err set. */
void *td_pkg_pack(const char *dir, size_t *len, char *err, size_t errlen);

#endif

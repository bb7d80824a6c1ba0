/* Tide working-directory packages: a job's directory shipped to every node
 * as one blob, named by its BLAKE2b-256 hash and unpacked once per machine
 * into a cache ($TIDE_PKG_CACHE, default /tmp/tide-pkgs-<euid>, then <hash>),
 * where the tasks that carry it run. The cache is used only while it is a
 * private directory of this user's (td_private_dir), and a package only
 * while its blob and its unpacked files are true to its name.
 * Format: "TDPKG1", u32 files, then per file u32 path length, path (relative,
 * no ".." or empty parts), u64 size, bytes. Uses libc and libsodium.
 */
#ifndef TD_PKG_H
#define TD_PKG_H

#include <stddef.h>

#define TD_PKG_MAX ((size_t)512 << 20) /* bytes in one package */
#define TD_PKG_HASH_LEN 64             /* hex digits in a package's name */

/* Opens path as a private directory: a directory (not a link) owned by
 * this user (the effective uid) that no other user can write; its mode is
 * made 0700 if it was not. With create, a missing one is made (0700).
 * Returns its fd (O_DIRECTORY, close-on-exec; the caller closes it), or -1
 * with err naming the path and the problem. */
int td_private_dir(const char *path, int create, char *err, size_t errlen);
/* The hash of a blob (BLAKE2b, 256 bits) as TD_PKG_HASH_LEN hex digits. */
void td_pkg_hash(const void *p, size_t n, char out[TD_PKG_HASH_LEN + 1]);
/* Where the package lives on this machine; out has room for PATH_MAX. */
void td_pkg_dir(const char *hash, char *out, size_t n);
/* 1 when the package is unpacked here, whole and true to its name. Its
 * files are read again when anything in it changed since this process last
 * checked them; a changed tree is unpacked again from its blob, a package
 * whose blob is wrong is removed (0: fetched again). */
int td_pkg_have(const char *hash);
/* Checks the blob against hash, keeps it (hash.pkg, to serve other nodes)
 * and unpacks it. Returns 0, or -1 with err set. Safe to repeat. */
int td_pkg_install(const char *hash, const void *blob, size_t len, char *err, size_t errlen);
/* The blob of an installed package (malloc'd), or NULL (also when it
 * does not match its name). */
void *td_pkg_read(const char *hash, size_t *len);
/* Packs every regular file under dir (not .git) into a new blob
 * (malloc'd; *len its size), or NULL with err set. */
void *td_pkg_pack(const char *dir, size_t *len, char *err, size_t errlen);

#endif

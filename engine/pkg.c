/* Tide working-directory packages (see pkg.h). */
#include "pkg.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

/* -- Private directories ------------------------------------------------------
 * Session directories and the package cache have predictable names under
 * /tmp: another local user can create one first, full of links. Only a
 * directory of this user's, that no one else can write, is trusted. */

int td_private_dir(const char *path, int create, char *err, size_t errlen) {
  struct stat st;
  if (lstat(path, &st) != 0) {
    if (errno != ENOENT || !create) {
      snprintf(err, errlen, "cannot use %s: %s", path, strerror(errno));
      return -1;
    }
    if (mkdir(path, 0700) != 0 && errno != EEXIST) {
      snprintf(err, errlen, "cannot create %s: %s", path, strerror(errno));
      return -1;
    }
  }
  /* O_NOFOLLOW: a link put in its place between the two calls is refused. */
  int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ELOOP || (lstat(path, &st) == 0 && S_ISLNK(st.st_mode)))
      snprintf(err, errlen, "refusing %s: it is a symbolic link (another user may have made it; remove it)", path);
    else if (errno == ENOTDIR)
      snprintf(err, errlen, "refusing %s: it is not a directory", path);
    else
      snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
    return -1;
  }
  if (fstat(fd, &st) != 0) {
    snprintf(err, errlen, "cannot use %s: %s", path, strerror(errno));
    close(fd);
    return -1;
  }
  if (st.st_uid != geteuid()) {
    snprintf(err, errlen, "refusing %s: it is owned by uid %d, not by this user (uid %d); another user "
             "may have created it: remove it, or choose another directory", path, (int)st.st_uid, (int)geteuid());
    close(fd);
    return -1;
  }
  if (st.st_mode & (S_IWGRP | S_IWOTH)) {
    /* Others could have put anything in it already: repairing the mode
     * would not make its contents ours. */
    snprintf(err, errlen, "refusing %s: other users can write to it (mode %04o); remove it, or check "
             "its contents and chmod 700 it", path, (unsigned)(st.st_mode & 07777));
    close(fd);
    return -1;
  }
  if ((st.st_mode & 07777) != 0700 && fchmod(fd, 0700) != 0) {
    snprintf(err, errlen, "cannot make %s private (chmod 700): %s", path, strerror(errno));
    close(fd);
    return -1;
  }
  return fd;
}

/* -- Package names ------------------------------------------------------------ */

void td_pkg_hash(const void *p, size_t n, char out[TD_PKG_HASH_LEN + 1]) {
  unsigned char h[TD_PKG_HASH_LEN / 2];
  crypto_generichash(h, sizeof(h), p, n, NULL, 0);
  for (size_t i = 0; i < sizeof(h); i++) snprintf(out + 2 * i, 3, "%02x", h[i]);
}

static int td__hash_ok(const char *hash) {
  if (strlen(hash) != TD_PKG_HASH_LEN) return 0;
  for (int i = 0; i < TD_PKG_HASH_LEN; i++)
    if (!strchr("0123456789abcdef", hash[i])) return 0;
  return 1;
}

static void td__cache(char *out, size_t n) {
  const char *c = getenv("TIDE_PKG_CACHE");
  if (c && *c) snprintf(out, n, "%s", c);
  else snprintf(out, n, "/tmp/tide-pkgs-%d", (int)geteuid());
}

/* The cache, checked (td_private_dir) and made when missing; -1 with err
 * (logged once per process while it stays the same: it is asked per task). */
static int td__cache_open(char *err, size_t errlen) {
  static char said[PATH_MAX + 256];
  static pthread_mutex_t said_mu = PTHREAD_MUTEX_INITIALIZER;
  char c[PATH_MAX];
  td__cache(c, sizeof(c));
  int fd = td_private_dir(c, 1, err, errlen);
  if (fd < 0) {
    pthread_mutex_lock(&said_mu);
    if (strcmp(said, err)) {
      fprintf(stderr, "tide: package cache: %s\n", err);
      snprintf(said, sizeof(said), "%s", err);
    }
    pthread_mutex_unlock(&said_mu);
  }
  return fd;
}

void td_pkg_dir(const char *hash, char *out, size_t n) {
  char c[PATH_MAX];
  td__cache(c, sizeof(c));
  snprintf(out, n, "%.3000s/%.64s", c, hash);
}

/* A path inside the package: relative, no "." or ".." or empty parts. */
static int td__path_ok(const char *p, size_t n) {
  if (n == 0 || n >= 1024 || p[0] == '/' || memchr(p, 0, n)) return 0;
  size_t start = 0;
  for (size_t i = 0; i <= n; i++) {
    if (i < n && p[i] != '/') continue;
    size_t l = i - start;
    if (l == 0 || (l == 1 && p[start] == '.') || (l == 2 && p[start] == '.' && p[start + 1] == '.')) return 0;
    start = i + 1;
  }
  return 1;
}

/* -- Reading and removing, never through a link -------------------------------- */

/* The whole of regular file name under dir fd at (malloc'd, one spare byte),
 * at most max bytes; NULL when missing, a link, not ours or too large. */
static void *td__slurp(int at, const char *name, size_t max, size_t *len) {
  /* O_NONBLOCK: a fifo in its place is refused, not waited on. */
  int fd = openat(at, name, O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return NULL;
  struct stat st;
  unsigned char *b = NULL;
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid() && (size_t)st.st_size <= max &&
      (b = malloc((size_t)st.st_size + 1))) {
    size_t got = 0;
    ssize_t r;
    while (got < (size_t)st.st_size && (r = read(fd, b + got, (size_t)st.st_size - got)) > 0) got += (size_t)r;
    if (got != (size_t)st.st_size) { free(b); b = NULL; }
    else *len = got;
  }
  close(fd);
  return b;
}

/* rm -rf of name under dir fd at, links removed, never followed. */
static void td__rmtree(int at, const char *name, int depth) {
  if (unlinkat(at, name, 0) == 0 || errno == ENOENT) return;
  int fd = openat(at, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd >= 0 && depth < 80) {
    DIR *d = fdopendir(fd);
    if (d) {
      struct dirent *e;
      while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) td__rmtree(dirfd(d), e->d_name, depth + 1);
      closedir(d);
    } else {
      close(fd);
    }
  } else if (fd >= 0) {
    close(fd);
  }
  unlinkat(at, name, AT_REMOVEDIR);
}

/* Opens rel (a checked package path) under root without following any
 * link on the way; O_CREAT makes the directories it needs. */
static int td__open_in(int root, const char *rel, int flags) {
  char part[1024];
  int dfd = root;
  const char *s = rel;
  for (;;) {
    const char *slash = strchr(s, '/');
    if (!slash) break;
    snprintf(part, sizeof(part), "%.*s", (int)(slash - s), s);
    if ((flags & O_CREAT) && mkdirat(dfd, part, 0700) != 0 && errno != EEXIST) goto fail;
    int nfd = openat(dfd, part, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd != root) close(dfd);
    dfd = nfd;
    if (dfd < 0) return -1;
    s = slash + 1;
  }
  int fd = openat(dfd, s, flags | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (dfd != root) close(dfd);
  return fd;
fail:
  if (dfd != root) close(dfd);
  return -1;
}

/* -- Verification -------------------------------------------------------------
 * A package is used from the cache only while its blob (hash.pkg) hashes to
 * its name and its unpacked tree holds exactly the blob's files, with the
 * blob's bytes. Reading it all for every task would cost too much, so a
 * process remembers a fingerprint of what it verified: every entry's inode,
 * size, mtime and ctime. Any change (ctime cannot be set back) means a full
 * check again. */

typedef struct td__verified {
  char hash[TD_PKG_HASH_LEN + 1];      /* the package */
  unsigned char print[32];             /* td__fingerprint when verified */
} td__verified_t;

#define TD__NVERIFIED 32
static td__verified_t td__verified[TD__NVERIFIED];
static unsigned td__verified_next;
/* A driver's thread and its node's may both ask. */
static pthread_mutex_t td__verified_mu = PTHREAD_MUTEX_INITIALIZER;

static void td__print_stat(crypto_generichash_state *g, const char *name, const struct stat *st) {
  crypto_generichash_update(g, (const unsigned char *)name, strlen(name) + 1);
  int64_t v[8] = {(int64_t)st->st_dev, (int64_t)st->st_ino, (int64_t)st->st_mode, (int64_t)st->st_size,
                  (int64_t)st->st_mtim.tv_sec, (int64_t)st->st_mtim.tv_nsec, (int64_t)st->st_ctim.tv_sec,
                  (int64_t)st->st_ctim.tv_nsec};
  crypto_generichash_update(g, (const unsigned char *)v, sizeof(v));
}

/* Adds every entry under dir fd (which it closes) to g; counts regular
 * files. -1 for anything but our files and directories (a link, a fifo,
 * another owner, writable by others). */
static int td__print_tree(crypto_generichash_state *g, int fd, int depth, uint32_t *files) {
  DIR *d = fdopendir(fd);
  if (!d) { close(fd); return -1; }
  int rc = 0;
  struct dirent *e;
  while (rc == 0 && (e = readdir(d))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    struct stat st;
    if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || st.st_uid != geteuid() ||
        (st.st_mode & (S_IWGRP | S_IWOTH))) {
      rc = -1;
      break;
    }
    td__print_stat(g, e->d_name, &st);
    if (S_ISREG(st.st_mode)) {
      (*files)++;
    } else if (S_ISDIR(st.st_mode) && depth < 64) {
      int sub = openat(dirfd(d), e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      rc = sub < 0 ? -1 : td__print_tree(g, sub, depth + 1, files);
      crypto_generichash_update(g, (const unsigned char *)"/", 1);
    } else {
      rc = -1;
    }
  }
  closedir(d);
  return rc;
}

/* The fingerprint of a package in the cache; -1 when it is not whole
 * (missing, or holding something it must not). */
static int td__fingerprint(int cfd, const char *hash, unsigned char out[32], uint32_t *files) {
  char name[TD_PKG_HASH_LEN + 8];
  struct stat st;
  snprintf(name, sizeof(name), "%s.pkg", hash);
  if (fstatat(cfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid())
    return -1;
  crypto_generichash_state g;
  crypto_generichash_init(&g, NULL, 0, 32);
  td__print_stat(&g, name, &st);
  int fd = openat(cfd, hash, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0 || fstat(fd, &st) != 0 || st.st_uid != geteuid() || (st.st_mode & (S_IWGRP | S_IWOTH))) {
    if (fd >= 0) close(fd);
    return -1;
  }
  td__print_stat(&g, hash, &st);
  *files = 0;
  if (td__print_tree(&g, fd, 0, files)) return -1;
  crypto_generichash_final(&g, out, 32);
  return 0;
}

/* Walks a package blob: calls fn for each file; -1 when malformed or when
 * fn says so. */
typedef int (*td__file_cb)(void *ud, const char *path, size_t pl, const unsigned char *data, uint64_t size);

static int td__each_file(const void *blob, size_t len, td__file_cb fn, void *ud, uint32_t *count) {
  const unsigned char *p = blob, *end = p + len;
  if (len < 10 || memcmp(p, "TDPKG1", 6)) return -1;
  uint32_t nf;
  memcpy(&nf, p + 6, 4);
  p += 10;
  for (uint32_t i = 0; i < nf; i++) {
    uint32_t pl;
    uint64_t sz;
    if (end - p < 4) return -1;
    memcpy(&pl, p, 4);
    p += 4;
    if ((size_t)(end - p) < (size_t)pl + 8 || !td__path_ok((const char *)p, pl)) return -1;
    const char *path = (const char *)p;
    p += pl;
    memcpy(&sz, p, 8);
    p += 8;
    if ((uint64_t)(end - p) < sz) return -1;
    if (fn(ud, path, pl, p, sz)) return -1;
    p += sz;
  }
  if (count) *count = nf;
  return p == end ? 0 : -1;
}

/* td__file_cb: the file in the tree (ud: its fd) has exactly these bytes. */
static int td__same_file(void *ud, const char *path, size_t pl, const unsigned char *data, uint64_t size) {
  char rel[1024];
  snprintf(rel, sizeof(rel), "%.*s", (int)pl, path);
  int fd = td__open_in(*(int *)ud, rel, O_RDONLY | O_NONBLOCK);
  if (fd < 0) return -1;
  struct stat st;
  int rc = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size == size ? 0 : -1;
  unsigned char buf[65536];
  for (uint64_t at = 0; rc == 0 && at < size;) {
    size_t want = size - at < sizeof(buf) ? (size_t)(size - at) : sizeof(buf);
    ssize_t r = read(fd, buf, want);
    if (r <= 0 || memcmp(buf, data + at, (size_t)r)) rc = -1;
    else at += (uint64_t)r;
  }
  close(fd);
  return rc;
}

/* Full check of a package in the cache: 0 when whole and true to its name
 * (its fingerprint then remembered); 1 when the blob is right but the tree
 * is not (it can be unpacked again); -1 when the blob is missing or wrong. */
static int td__verify(int cfd, const char *hash) {
  size_t len;
  char name[TD_PKG_HASH_LEN + 8], h[TD_PKG_HASH_LEN + 1];
  snprintf(name, sizeof(name), "%s.pkg", hash);
  unsigned char print[32], after[32];
  uint32_t files = 0, want = 0, files2 = 0;
  if (td__fingerprint(cfd, hash, print, &files) != 0) files = UINT32_MAX;
  void *blob = td__slurp(cfd, name, TD_PKG_MAX, &len);
  if (!blob) return -1;
  td_pkg_hash(blob, len, h);
  if (strcmp(h, hash)) {
    free(blob);
    fprintf(stderr, "tide: package cache: %s does not match its hash; removed\n", name);
    unlinkat(cfd, name, 0);
    return -1;
  }
  int tfd = openat(cfd, hash, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  int rc = tfd >= 0 && files != UINT32_MAX && td__each_file(blob, len, td__same_file, &tfd, &want) == 0 &&
           want == files ? 0 : 1;
  if (tfd >= 0) close(tfd);
  free(blob);
  /* What was read must be what was fingerprinted. */
  if (rc == 0 && (td__fingerprint(cfd, hash, after, &files2) != 0 || memcmp(print, after, 32))) rc = 1;
  if (rc == 0) {
    pthread_mutex_lock(&td__verified_mu);
    td__verified_t *v = &td__verified[td__verified_next++ % TD__NVERIFIED];
    for (int i = 0; i < TD__NVERIFIED; i++)
      if (!strcmp(td__verified[i].hash, hash)) v = &td__verified[i];
    snprintf(v->hash, sizeof(v->hash), "%s", hash);
    memcpy(v->print, print, 32);
    pthread_mutex_unlock(&td__verified_mu);
  }
  return rc;
}

/* 0 when the package is whole here (cheaply, when nothing changed since it
 * was verified), else what td__verify says. */
static int td__check(int cfd, const char *hash) {
  unsigned char print[32];
  uint32_t files;
  if (td__fingerprint(cfd, hash, print, &files) != 0) {
    struct stat st;
    /* Nothing there at all: no need to read anything. */
    if (fstatat(cfd, hash, &st, AT_SYMLINK_NOFOLLOW) != 0) {
      char name[TD_PKG_HASH_LEN + 8];
      snprintf(name, sizeof(name), "%s.pkg", hash);
      if (fstatat(cfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) return -1;
    }
  } else {
    int known = 0;
    pthread_mutex_lock(&td__verified_mu);
    for (int i = 0; i < TD__NVERIFIED && !known; i++)
      known = !strcmp(td__verified[i].hash, hash) && !memcmp(td__verified[i].print, print, 32);
    pthread_mutex_unlock(&td__verified_mu);
    if (known) return 0;
  }
  return td__verify(cfd, hash);
}

/* -- Installing ------------------------------------------------------------------ */

/* td__file_cb: writes the file into the new tree (ud: its fd). */
static int td__put_file(void *ud, const char *path, size_t pl, const unsigned char *data, uint64_t size) {
  char rel[1024];
  snprintf(rel, sizeof(rel), "%.*s", (int)pl, path);
  /* O_EXCL: a package naming a file twice is malformed. */
  int fd = td__open_in(*(int *)ud, rel, O_WRONLY | O_CREAT | O_EXCL);
  if (fd < 0) return -1;
  while (size) {
    ssize_t w = write(fd, data, size);
    if (w <= 0) { close(fd); return -1; }
    data += w;
    size -= (uint64_t)w;
  }
  return close(fd);
}

/* Writes name under dir fd at whole, through a new file renamed over it. */
static int td__write_at(int at, const char *name, const void *p, size_t n) {
  char tmp[256];
  snprintf(tmp, sizeof(tmp), "%.200s.tmp%d", name, (int)getpid());
  unlinkat(at, tmp, 0);
  int fd = openat(at, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return -1;
  const char *b = p;
  while (n) {
    ssize_t w = write(fd, b, n);
    if (w <= 0) { close(fd); unlinkat(at, tmp, 0); return -1; }
    b += w;
    n -= (size_t)w;
  }
  if (close(fd) != 0 || renameat(at, tmp, at, name) != 0) { unlinkat(at, tmp, 0); return -1; }
  return 0;
}

/* Unpacks a blob already checked against hash into the cache. */
static int td__unpack(int cfd, const char *hash, const void *blob, size_t len, char *err, size_t errlen) {
  char tmp[TD_PKG_HASH_LEN + 32], name[TD_PKG_HASH_LEN + 8];
  snprintf(tmp, sizeof(tmp), "%s.tmp%d", hash, (int)getpid());
  td__rmtree(cfd, tmp, 0);
  if (mkdirat(cfd, tmp, 0700) != 0) {
    snprintf(err, errlen, "cannot create %s in the package cache: %s", tmp, strerror(errno));
    return -1;
  }
  int tfd = openat(cfd, tmp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  int bad = tfd < 0 || td__each_file(blob, len, td__put_file, &tfd, NULL) != 0;
  int saved = errno;
  if (tfd >= 0) close(tfd);
  if (bad) {
    td__rmtree(cfd, tmp, 0);
    if (saved == ENOSPC || saved == EDQUOT || saved == EACCES)
      snprintf(err, errlen, "cannot unpack package %s: %s", hash, strerror(saved));
    else
      snprintf(err, errlen, "package %s is malformed", hash);
    return -1;
  }
  snprintf(name, sizeof(name), "%s.pkg", hash);
  if (td__write_at(cfd, name, blob, len) != 0) {  /* to serve nodes that ask for it */
    td__rmtree(cfd, tmp, 0);
    snprintf(err, errlen, "cannot write %s in the package cache: %s", name, strerror(errno));
    return -1;
  }
  /* Whole or not at all: another process may have won the race. */
  if (renameat(cfd, tmp, cfd, hash) != 0) {
    td__rmtree(cfd, tmp, 0);
    if (td__check(cfd, hash) != 0) {
      snprintf(err, errlen, "cannot install package %s: %s", hash, strerror(errno));
      return -1;
    }
  }
  return 0;
}

int td_pkg_have(const char *hash) {
  if (!td__hash_ok(hash)) return 0;
  char err[PATH_MAX + 200];
  int cfd = td__cache_open(err, sizeof(err));
  if (cfd < 0) return 0;
  int rc = td__check(cfd, hash);
  if (rc == 1) {
    /* The tree was changed after it was unpacked: unpack it again from the
     * blob, which is still true to its name. */
    size_t len;
    char name[TD_PKG_HASH_LEN + 8];
    snprintf(name, sizeof(name), "%s.pkg", hash);
    void *blob = td__slurp(cfd, name, TD_PKG_MAX, &len);
    char h[TD_PKG_HASH_LEN + 1] = "";
    if (blob) td_pkg_hash(blob, len, h);
    fprintf(stderr, "tide: package cache: package %s was changed after it was unpacked; unpacking it again\n", hash);
    td__rmtree(cfd, hash, 0);
    rc = blob && !strcmp(h, hash) && td__unpack(cfd, hash, blob, len, err, sizeof(err)) == 0 ? td__verify(cfd, hash) : -1;
    free(blob);
  }
  if (rc != 0) {
    td__rmtree(cfd, hash, 0);  /* fetched again, whole, when needed */
  }
  close(cfd);
  return rc == 0;
}

int td_pkg_install(const char *hash, const void *blob, size_t len, char *err, size_t errlen) {
  char h[TD_PKG_HASH_LEN + 1];
  if (!td__hash_ok(hash)) { snprintf(err, errlen, "bad package name %.80s", hash); return -1; }
  td_pkg_hash(blob, len, h);
  if (strcmp(h, hash)) { snprintf(err, errlen, "package %s does not match its hash (%s)", hash, h); return -1; }
  if (td_pkg_have(hash)) return 0;
  int cfd = td__cache_open(err, errlen);
  if (cfd < 0) return -1;
  td__rmtree(cfd, hash, 0);
  int rc = td__unpack(cfd, hash, blob, len, err, errlen);
  if (rc == 0 && td__verify(cfd, hash) != 0) {
    snprintf(err, errlen, "package %s changed while it was unpacked", hash);
    rc = -1;
  }
  close(cfd);
  return rc;
}

void *td_pkg_read(const char *hash, size_t *len) {
  if (!td__hash_ok(hash)) return NULL;
  char err[PATH_MAX + 200], name[TD_PKG_HASH_LEN + 8], h[TD_PKG_HASH_LEN + 1];
  int cfd = td__cache_open(err, sizeof(err));
  if (cfd < 0) return NULL;
  snprintf(name, sizeof(name), "%s.pkg", hash);
  void *b = td__slurp(cfd, name, TD_PKG_MAX, len);
  close(cfd);
  if (b) {
    td_pkg_hash(b, *len, h);
    if (strcmp(h, hash)) { free(b); b = NULL; }  /* never served as if it were the package */
  }
  return b;
}

typedef struct td__pack {
  unsigned char *p;
  size_t len, cap;
  uint32_t files;
  int bad;
  char *err;
  size_t errlen;
} td__pack_t;

/* Room for n more bytes; 0, or 1 (bad, err set). */
static int td__room(td__pack_t *k, size_t n) {
  if (k->bad) return 1;
  if (k->len + n > TD_PKG_MAX) {
    snprintf(k->err, k->errlen, "the working directory is over %d MiB", (int)(TD_PKG_MAX >> 20));
    return k->bad = 1;
  }
  if (k->len + n <= k->cap) return 0;
  size_t cap = k->cap ? k->cap : 65536;
  while (cap < k->len + n) cap *= 2;
  unsigned char *np = realloc(k->p, cap);
  if (!np) {
    snprintf(k->err, k->errlen, "out of memory");
    return k->bad = 1;
  }
  k->p = np;
  k->cap = cap;
  return 0;
}

static void td__put(td__pack_t *k, const void *d, size_t n) {
  if (td__room(k, n)) return;
  memcpy(k->p + k->len, d, n);
  k->len += n;
}

/* Adds the files under root/rel (rel "" for root itself). */
static void td__pack_dir(td__pack_t *k, const char *root, const char *rel, int depth) {
  char path[PATH_MAX];
  snprintf(path, sizeof(path), "%s%s%s", root, rel[0] ? "/" : "", rel);
  DIR *d = opendir(path);
  if (!d || depth > 64) {
    if (d) closedir(d);
    snprintf(k->err, k->errlen, "cannot read %s", path);
    k->bad = 1;
    return;
  }
  struct dirent *e;
  while (!k->bad && (e = readdir(d))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") || (!rel[0] && !strcmp(e->d_name, ".git"))) continue;
    char sub[1024], full[PATH_MAX + 1100];
    int sl = snprintf(sub, sizeof(sub), "%s%s%s", rel, rel[0] ? "/" : "", e->d_name);
    if (sl <= 0 || (size_t)sl >= sizeof(sub)) continue;
    snprintf(full, sizeof(full), "%s/%s", root, sub);
    struct stat st;
    if (stat(full, &st) != 0) continue;
    if (S_ISDIR(st.st_mode)) { td__pack_dir(k, root, sub, depth + 1); continue; }
    if (!S_ISREG(st.st_mode)) continue;
    FILE *f = fopen(full, "rb");
    if (!f) continue;
    uint32_t pl = (uint32_t)sl;
    uint64_t sz = (uint64_t)st.st_size;
    td__put(k, &pl, 4);
    td__put(k, sub, pl);
    td__put(k, &sz, 8);
    if (!td__room(k, (size_t)sz)) {  /* read straight into the blob */
      if (fread(k->p + k->len, 1, (size_t)sz, f) == (size_t)sz) {
        k->len += (size_t)sz;
      } else {
        snprintf(k->err, k->errlen, "cannot read %s", full);
        k->bad = 1;
      }
    }
    fclose(f);
    k->files++;
  }
  closedir(d);
}

void *td_pkg_pack(const char *dir, size_t *len, char *err, size_t errlen) {
  td__pack_t k = {0};
  k.err = err;
  k.errlen = errlen;
  uint32_t zero = 0;
  td__put(&k, "TDPKG1", 6);
  td__put(&k, &zero, 4);
  td__pack_dir(&k, dir, "", 0);
  if (k.bad) { free(k.p); return NULL; }
  memcpy(k.p + 6, &k.files, 4);
  *len = k.len;
  return k.p;
}

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
#include <sys/stat.h>
#include <unistd.h>

void td_pkg_hash(const void *p, size_t n, char out[17]) {
  const unsigned char *b = p;
  uint64_t h = 1469598103934665603ULL;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ULL;
  snprintf(out, 17, "%016llx", (unsigned long long)h);
}

static int td__hash_ok(const char *hash) {
  if (strlen(hash) != 16) return 0;
  for (int i = 0; i < 16; i++)
    if (!strchr("0123456789abcdef", hash[i])) return 0;
  return 1;
}

static void td__cache(char *out, size_t n) {
  const char *c = getenv("TIDE_PKG_CACHE");
  if (c && *c) snprintf(out, n, "%s", c);
  else snprintf(out, n, "/tmp/tide-pkgs-%d", (int)getuid());
}

void td_pkg_dir(const char *hash, char *out, size_t n) {
  char c[PATH_MAX];
  td__cache(c, sizeof(c));
  snprintf(out, n, "%.3000s/%.16s", c, hash);
}

int td_pkg_have(const char *hash) {
  if (!td__hash_ok(hash)) return 0;
  char d[PATH_MAX];
  td_pkg_dir(hash, d, sizeof(d));
  struct stat st;
  return stat(d, &st) == 0 && S_ISDIR(st.st_mode);
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

static int td__mkdirs(char *path) {  /* mkdir -p of path's parent directories */
  for (char *s = path + 1; *s; s++) {
    if (*s != '/') continue;
    *s = 0;
    int rc = mkdir(path, 0700);
    *s = '/';
    if (rc != 0 && errno != EEXIST) return -1;
  }
  return 0;
}

static int td__write_file(const char *path, const void *p, size_t n) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return -1;
  const char *b = p;
  while (n) {
    ssize_t w = write(fd, b, n);
    if (w <= 0) { close(fd); return -1; }
    b += w;
    n -= (size_t)w;
  }
  return close(fd);
}

int td_pkg_install(const char *hash, const void *blob, size_t len, char *err, size_t errlen) {
  char h[17], cache[PATH_MAX], dir[PATH_MAX], tmp[PATH_MAX + 32], path[PATH_MAX + 1100];
  if (!td__hash_ok(hash)) { snprintf(err, errlen, "bad package name %.40s", hash); return -1; }
  td_pkg_hash(blob, len, h);
  if (strcmp(h, hash)) { snprintf(err, errlen, "package %s does not match its hash (%s)", hash, h); return -1; }
  if (td_pkg_have(hash)) return 0;
  const unsigned char *p = blob, *end = p + len;
  if (len < 10 || memcmp(p, "TDPKG1", 6)) { snprintf(err, errlen, "not a package"); return -1; }
  uint32_t nf;
  memcpy(&nf, p + 6, 4);
  p += 10;
  td__cache(cache, sizeof(cache));
  mkdir(cache, 0700);
  td_pkg_dir(hash, dir, sizeof(dir));
  snprintf(tmp, sizeof(tmp), "%s.tmp%d", dir, (int)getpid());
  if (mkdir(tmp, 0700) != 0 && errno != EEXIST) { snprintf(err, errlen, "cannot create %s", tmp); return -1; }
  for (uint32_t i = 0; i < nf; i++) {
    uint32_t pl;
    uint64_t sz;
    if (end - p < 4) goto bad;
    memcpy(&pl, p, 4);
    p += 4;
    if ((size_t)(end - p) < (size_t)pl + 8 || !td__path_ok((const char *)p, pl)) goto bad;
    snprintf(path, sizeof(path), "%s/%.*s", tmp, (int)pl, (const char *)p);
    p += pl;
    memcpy(&sz, p, 8);
    p += 8;
    if ((uint64_t)(end - p) < sz) goto bad;
    if (td__mkdirs(path) || td__write_file(path, p, (size_t)sz)) {
      snprintf(err, errlen, "cannot write %s: %s", path, strerror(errno));
      return -1;
    }
    p += sz;
  }
  if (p != end) goto bad;
  snprintf(path, sizeof(path), "%s.pkg", dir);
  td__write_file(path, blob, len);  /* to serve nodes that ask for it */
  /* Whole or not at all: another process may have won the race. */
  if (rename(tmp, dir) != 0 && !td_pkg_have(hash)) {
    snprintf(err, errlen, "cannot install %s: %s", dir, strerror(errno));
    return -1;
  }
  return 0;
bad:
  snprintf(err, errlen, "package %s is malformed", hash);
  return -1;
}

void *td_pkg_read(const char *hash, size_t *len) {
  if (!td__hash_ok(hash)) return NULL;
  char dir[PATH_MAX], path[PATH_MAX + 8];
  td_pkg_dir(hash, dir, sizeof(dir));
  snprintf(path, sizeof(path), "%s.pkg", dir);
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  void *b = n >= 0 && (size_t)n <= TD_PKG_MAX ? malloc((size_t)n + 1) : NULL;
  if (b && fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); b = NULL; }
  fclose(f);
  if (b) *len = (size_t)n;
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

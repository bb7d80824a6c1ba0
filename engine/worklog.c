/* Worker output per process, its index of prints, rotation and slices.
 * See worklog.h.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "worklog.h"

/* One indexed print: where it is in the .out file and whose it was. */
typedef struct td_logrec {
  uint64_t off;   /* its first byte in worker-<id>.out */
  uint64_t task;  /* the task or call that printed it (0: none) */
  uint64_t actor; /* the actor it ran in (0: none) */
  uint32_t len;   /* its bytes */
  uint32_t zero;  /* padding, 0 */
} td_logrec_t;

static char td__logdir[PATH_MAX]; /* SESSION/logs, "" when not kept */
/* Open worker logs and their indexes, for prints (fd 0: not open). */
static struct {
  uint64_t id;
  int fd, idx;
} td__logfds[32];
static unsigned td__logfd_next;

int td_obs_set_logdir(const char *session) {
  char d[PATH_MAX];
  if (snprintf(d, sizeof(d), "%s/logs", session) >= (int)sizeof(d)) return TD_EINVAL;
  if (mkdir(d, 0700) != 0 && errno != EEXIST) return TD_EIO;
  snprintf(td__logdir, sizeof(td__logdir), "%s", d);
  return 0;
}

const char *td_obs_logdir(void) { return td__logdir[0] ? td__logdir : NULL; }

/* SESSION/logs/worker-<16 hex digits>.<ext> */
static void td__log_path(char *p, size_t n, uint64_t wk_id, const char *ext) {
  snprintf(p, n, "%s/worker-%016llx.%s", td__logdir, (unsigned long long)wk_id, ext);
}

static int td__log_open(uint64_t wk_id, const char *ext) {
  char p[PATH_MAX + 40];
  td__log_path(p, sizeof(p), wk_id, ext);
  /* O_APPEND: after a rotation truncates the file, writes go to its new end. */
  return open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
}

int td__obs_worker_log(uint64_t wk_id) {
  if (!td__logdir[0]) return -1;
  return td__log_open(wk_id, "out");
}

/* The cache slot of worker wk_id's open log, opened if need be; -1: none. */
static int td__log_slot(uint64_t wk_id) {
  for (unsigned i = 0; i < 32; i++)
    if (td__logfds[i].id == wk_id && td__logfds[i].fd > 0) return (int)i;
  unsigned k = td__logfd_next++ % 32;
  if (td__logfds[k].fd > 0) close(td__logfds[k].fd);
  if (td__logfds[k].idx > 0) close(td__logfds[k].idx);
  td__logfds[k].fd = td__logfds[k].idx = 0;
  int fd = td__obs_worker_log(wk_id);
  if (fd < 0) return -1;
  td__logfds[k].id = wk_id;
  td__logfds[k].fd = fd;
  return (int)k;
}

int td__obs_print(uint64_t wk_id, uint64_t task, uint64_t actor, const uint8_t *s, size_t l) {
  if (!td__logdir[0] || !wk_id) return -1;
  int k = td__log_slot(wk_id);
  if (k < 0) return -1;
  ssize_t w = write(td__logfds[k].fd, s, l);
  if (w < 0) return -1;
  if (!w || (!task && !actor)) return 0;
  /* With O_APPEND the offset is the file's end after this write: the
   * worker's own output (its stdout) may have landed just before. */
  off_t end = lseek(td__logfds[k].fd, 0, SEEK_CUR);
  if (end < w) return 0;
  if (td__logfds[k].idx <= 0) td__logfds[k].idx = td__log_open(wk_id, "idx");
  if (td__logfds[k].idx < 0) {
    td__logfds[k].idx = 0;
    return 0;
  }
  td_logrec_t r = {(uint64_t)(end - w), task, actor, (uint32_t)w, 0};
  w = write(td__logfds[k].idx, &r, sizeof(r));
  (void)w;
  return 0;
}

/* Copies p to p.1, then empties p (its writers keep their descriptors). */
static void td__rotate_one(const char *p) {
  char old[PATH_MAX + 310];
  snprintf(old, sizeof(old), "%s.1", p);
  int in = open(p, O_RDWR | O_CLOEXEC | O_NOFOLLOW),
      out = open(old, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (in >= 0 && out >= 0) {
    char buf[65536];
    ssize_t r;
    while ((r = read(in, buf, sizeof(buf))) > 0)
      if (write(out, buf, (size_t)r) != r) break;
    if (ftruncate(in, 0) != 0) td_log("cannot truncate %s", p);
  }
  if (in >= 0) close(in);
  if (out >= 0) close(out);
}

void td_obs_rotate(size_t max) {
  if (!td__logdir[0]) return;
  DIR *d = opendir(td__logdir);
  if (!d) return;
  struct dirent *e;
  while ((e = readdir(d))) {
    size_t nl = strlen(e->d_name);
    if (strncmp(e->d_name, "worker-", 7) || nl < 5 || strcmp(e->d_name + nl - 4, ".out")) continue;
    char p[PATH_MAX + 300];
    snprintf(p, sizeof(p), "%s/%s", td__logdir, e->d_name);
    struct stat st;
    if (stat(p, &st) != 0 || (size_t)st.st_size <= max) continue;
    /* One older part is kept; the index goes with its file, as its
     * offsets are that file's. */
    td__rotate_one(p);
    memcpy(p + strlen(p) - 3, "idx", 3);
    if (stat(p, &st) == 0) td__rotate_one(p);
  }
  closedir(d);
}

/* -- Slices ----------------------------------------------------------------- */

static int td__rec_matches(const td_logrec_t *r, td_slice_by_t by, uint64_t id) {
  return by == TD_SLICE_TASK ? r->task == id : r->actor == id;
}

/* A slice of one part of worker wk_id's log: the current one (idx, out) or
 * the one rotation kept (idx.1, out.1). */
static int td__slice_part(uint64_t wk_id, const char *idx, const char *outf, td_slice_by_t by, uint64_t id,
                          uint64_t *rec, size_t max, td_buf_t *out) {
  if (!td__logdir[0]) return TD_ENOTFOUND;
  char p[PATH_MAX + 40];
  td__log_path(p, sizeof(p), wk_id, idx);
  int ix = open(p, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (ix < 0) return TD_ENOTFOUND;
  td__log_path(p, sizeof(p), wk_id, outf);
  int fd = open(p, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  struct stat st;
  if (fd < 0 || fstat(ix, &st) != 0) {
    close(ix);
    if (fd >= 0) close(fd);
    return TD_ENOTFOUND;
  }
  uint64_t n = (uint64_t)st.st_size / sizeof(td_logrec_t), i = *rec > n ? 0 : *rec;
  td_logrec_t rs[256];
  while (i < n && out->len < max) {
    ssize_t got = pread(ix, rs, sizeof(rs), (off_t)(i * sizeof(td_logrec_t)));
    if (got < (ssize_t)sizeof(td_logrec_t)) break;
    int k = 0, nk = (int)((size_t)got / sizeof(td_logrec_t));
    for (; k < nk && out->len < max; k++) {
      if (!td__rec_matches(&rs[k], by, id) || rs[k].len > (1u << 24)) continue;
      size_t at = out->len;
      td_buf_reserve(out, rs[k].len);
      /* A record past the file's end (rotated between the two) is left out. */
      ssize_t r = pread(fd, out->p + at, rs[k].len, (off_t)rs[k].off);
      if (r > 0) out->len = at + (size_t)r;
    }
    i += (uint64_t)k;
  }
  *rec = i;
  close(ix);
  close(fd);
  return 0;
}

int td_obs_log_slice(uint64_t wk_id, td_slice_by_t by, uint64_t id, uint64_t *rec, size_t max,
                     td_buf_t *out) {
  return td__slice_part(wk_id, "idx", "out", by, id, rec, max, out);
}

int td_obs_log_slice_rotated(uint64_t wk_id, td_slice_by_t by, uint64_t id, size_t max, td_buf_t *out) {
  uint64_t rec = 0;
  return td__slice_part(wk_id, "idx.1", "out.1", by, id, &rec, max, out);
}

/* Whether the index at path holds a record `by` id. */
static int td__idx_has(const char *path, td_slice_by_t by, uint64_t id) {
  int ix = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (ix < 0) return 0;
  td_logrec_t rs[256];
  ssize_t got;
  int found = 0;
  off_t at = 0;
  while (!found && (got = pread(ix, rs, sizeof(rs), at)) >= (ssize_t)sizeof(td_logrec_t)) {
    int nk = (int)((size_t)got / sizeof(td_logrec_t));
    for (int k = 0; k < nk && !found; k++) found = td__rec_matches(&rs[k], by, id);
    at += (off_t)((size_t)nk * sizeof(td_logrec_t));
  }
  close(ix);
  return found;
}

int td_obs_log_find(td_slice_by_t by, uint64_t id, uint64_t *wks, int max) {
  if (!td__logdir[0]) return 0;
  DIR *d = opendir(td__logdir);
  if (!d) return 0;
  struct dirent *e;
  int n = 0;
  while (n < max && (e = readdir(d))) {
    unsigned long long w;
    char tail[8];
    /* The current index and the one rotation kept; each worker once. */
    if (sscanf(e->d_name, "worker-%16llx.%7s", &w, tail) != 2 ||
        (strcmp(tail, "idx") && strcmp(tail, "idx.1")))
      continue;
    int seen = 0;
    for (int k = 0; k < n && !seen; k++) seen = wks[k] == (uint64_t)w;
    char p[PATH_MAX + 300];
    snprintf(p, sizeof(p), "%s/%s", td__logdir, e->d_name);
    if (!seen && td__idx_has(p, by, id)) wks[n++] = (uint64_t)w;
  }
  closedir(d);
  return n;
}

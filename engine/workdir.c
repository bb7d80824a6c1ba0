/* Working directories between a head and its nodes (node_int.h): work the
 * head sends runs in its job's package or its runtime_env working_dir.
 * Node: work whose package is not here yet is parked (td__node_task_park)
 * and the head asked for the package once; when it arrives (td__on_pkg)
 * the parked work goes on, or fails naming why. Head: packs a working
 * directory by its path when a node asks (td__on_pkg_get), a snapshot as
 * Ray uploads it. */
#include <limits.h>

#include "node_int.h"
#include "pkg.h"

/* The package a head path was shipped as, while fresh (a minute). */
static const char *td__wd_hash(td_node_t *n, const char *path) {
  double now = td_now();
  for (td_wdmap_t *m = n->links.wdmap; m; m = m->next)
    if (!strcmp(m->path, path)) return now - m->at < 60 ? m->hash : NULL;
  return NULL;
}

static void td__wd_note(td_node_t *n, const char *path, const char *hash) {
  td_wdmap_t *m = n->links.wdmap;
  while (m && strcmp(m->path, path)) m = m->next;
  if (!m) {
    m = td_xcalloc(1, sizeof(*m));
    snprintf(m->path, sizeof(m->path), "%s", path);
    m->next = n->links.wdmap;
    n->links.wdmap = m;
  }
  snprintf(m->hash, sizeof(m->hash), "%s", hash);
  m->at = td_now();
}

/* Sets KEY=val in a spec's env, replacing what was there. */
static void td__env_set(td_spec_t *s, const char *key, const char *val) {
  char out[sizeof(s->env)];
  uint32_t ol = 0;
  size_t kl = strlen(key);
  for (uint32_t i = 0; i < s->env_len;) {
    const char *kv = s->env + i;
    size_t l = strnlen(kv, s->env_len - i);
    if (!(l > kl && kv[kl] == '=' && !memcmp(kv, key, kl))) {
      memcpy(out + ol, kv, l + 1 <= s->env_len - i ? l + 1 : l);
      ol += (uint32_t)(l + 1 <= s->env_len - i ? l + 1 : l);
    }
    i += (uint32_t)l + 1;
  }
  int w = snprintf(out + ol, sizeof(out) - ol, "%s=%s", key, val);
  if (w > 0 && ol + (uint32_t)w + 1 <= sizeof(out)) ol += (uint32_t)w + 1;
  memcpy(s->env, out, ol);
  s->env_len = ol;
}

/* A working directory must be here before the work runs: a job's package
 * (TIDE_PKG), or a task's runtime_env working_dir, a path on the head
 * shipped as a package (a snapshot, as Ray uploads it). Points the spec at
 * the copy here, or writes the key to fetch into key. */
void td__node_task_wd(td_node_t *n, td_spec_t *s, char *key, size_t keylen) {
  char hash[TD_PKG_HASH_LEN + 2], wdp[1024];
  if (td__env_get(s->env, s->env_len, "TIDE_PKG", hash, sizeof(hash))) {
    if (strlen(hash) == TD_PKG_HASH_LEN && !td_pkg_have(hash)) {
      snprintf(key, keylen, "%s", hash);
    } else if (strlen(hash) == TD_PKG_HASH_LEN) { /* here, not where the head has it */
      char dir[PATH_MAX];
      td_pkg_dir(hash, dir, sizeof(dir));
      td__env_set(s, "TIDE_WORKING_DIR", dir);
    }
  } else if (td__env_get(s->env, s->env_len, "TIDE_WORKING_DIR", wdp, sizeof(wdp)) && wdp[0] == '/') {
    const char *h = td__wd_hash(n, wdp);
    if (h && td_pkg_have(h)) {
      char dir[PATH_MAX];
      td_pkg_dir(h, dir, sizeof(dir));
      td__env_set(s, "TIDE_WORKING_DIR", dir);
    } else {
      snprintf(key, keylen, "%s", wdp);
    }
  }
}

/* The message waits for its package (td__on_pkg takes it up again); the
 * head is asked once per package. */
void td__node_task_park(td_node_t *n, td_wk_t *wk, const char *key, const uint8_t *msg, uint32_t msglen) {
  int asked = 0;
  for (td_parked_t *q = n->links.parked; q; q = q->next) asked |= !strcmp(q->key, key);
  td_parked_t *pk = td_xcalloc(1, sizeof(*pk));
  snprintf(pk->key, sizeof(pk->key), "%s", key);
  pk->msg = td_xmalloc(msglen);
  memcpy(pk->msg, msg, msglen);
  pk->len = msglen;
  pk->next = n->links.parked;
  n->links.parked = pk;
  if (!asked) {
    td_chan_begin(&wk->ch, TD_M_PKG_GET);
    td_buf_str(&wk->ch.out, key, strlen(key));
    td_chan_end(&wk->ch);
  }
}

/* Node: the head is gone. Its work here is dropped: a head that comes
 * back does not know it. */
void td__parked_drop(td_node_t *n) {
  while (n->links.parked) {
    td_parked_t *q = n->links.parked;
    n->links.parked = q->next;
    free(q->msg);
    free(q);
  }
}

/* Head: a node asks for a working-directory package. */
int td__on_pkg_get(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  (void)n;
  uint32_t kl;
  const uint8_t *k = td_rd_str(rd, &kl);
  if (rd->bad || kl == 0 || kl >= 1024) return TD_EPROTO;
  char key[1024], err[300] = "the head does not have it";
  memcpy(key, k, kl);
  key[kl] = 0;
  size_t len = 0;
  void *blob;
  if (key[0] == '/') { /* a working directory by its path here: pack it now */
    blob = td_pkg_pack(key, &len, err, sizeof(err));
    if (blob) {
      char h[TD_PKG_HASH_LEN + 1];
      td_pkg_hash(blob, len, h);
      td_pkg_install(h, blob, len, err, sizeof(err));
    }
  } else {
    blob = td_pkg_read(key, &len);
  }
  td_chan_begin(&wk->ch, TD_M_PKG);
  td_buf_str(&wk->ch.out, key, kl);
  td_buf_u8(&wk->ch.out, blob != NULL);
  if (blob) td_buf_str(&wk->ch.out, blob, len);
  else td_buf_str(&wk->ch.out, err, strlen(err));
  td_chan_end(&wk->ch);
  free(blob);
  return 0;
}

/* Node: the package arrived (or cannot): the work parked for it goes on
 * (or fails, naming why). */
int td__on_pkg(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint32_t kl, bl;
  const uint8_t *k = td_rd_str(rd, &kl);
  uint8_t ok = td_rd_u8(rd);
  const uint8_t *blob = td_rd_str(rd, &bl);
  if (rd->bad || wk != n->links.head || kl == 0 || kl >= 1024) return TD_EPROTO;
  char hash[1024], err[300] = ""; /* the key: a hash, or a working dir's path */
  memcpy(hash, k, kl);
  hash[kl] = 0;
  if (!ok) {
    snprintf(err, sizeof(err), "%.*s", (int)(bl < 200 ? bl : 200), (const char *)blob);
  } else if (hash[0] == '/') {
    char h[TD_PKG_HASH_LEN + 1];
    td_pkg_hash(blob, bl, h);
    if (td_pkg_install(h, blob, bl, err, sizeof(err)) == 0) td__wd_note(n, hash, h);
  } else {
    td_pkg_install(hash, blob, bl, err, sizeof(err));
  }
  td_parked_t **pp = &n->links.parked, *q, *mine = NULL;
  while ((q = *pp)) { /* take this package's work, oldest first */
    if (strcmp(q->key, hash)) {
      pp = &q->next;
      continue;
    }
    *pp = q->next;
    q->next = mine;
    mine = q;
  }
  int rc = 0;
  while (mine) {
    q = mine;
    mine = q->next;
    if (!err[0] && n->links.head) {
      td_rd_t r2;
      td_rd_init(&r2, q->msg, q->len);
      rc |= td__on_node_task(n, wk, &r2);
    } else if (n->links.head && q->len >= 8) {
      uint64_t htid;
      memcpy(&htid, q->msg, 8);
      char why[600];
      snprintf(why, sizeof(why), "working directory %.200s unavailable on this node: %.300s", hash, err);
      td__errblob(&n->tmp, "TaskError", why);
      td__link_fail(n, htid, n->tmp.p, n->tmp.len);
    }
    free(q->msg);
    free(q);
  }
  return rc;
}

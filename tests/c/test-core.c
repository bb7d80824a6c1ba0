/* Unit tests of the engine's building blocks: buffers, id maps, the
 * shared-memory store, channels and the spec codec (including malformed
 * input, which must be rejected, never crash).  Links with the engine
 * library alone: no Lua, no tensors. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bridge.h"
#include "chan.h"
#include "proto.h"
#include "spill.h"
#include "store.h"
#include "test.h"
#include "worklog.h"

TEST_IMPL(buf_grow) {
  td_buf_t b;
  td_buf_init(&b);
  for (int i = 0; i < 10000; i++) td_buf_u32(&b, (uint32_t)i);
  ASSERT_EQ(b.len, 40000);
  uint32_t v;
  memcpy(&v, b.p + 4 * 9999, 4);
  ASSERT_EQ(v, 9999);
  td_rd_t r;
  td_rd_init(&r, b.p, 6);
  ASSERT_EQ(td_rd_u32(&r), 0);
  ASSERT_EQ(r.bad, 0);
  td_rd_u32(&r);
  ASSERT_EQ(r.bad, 1);
  td_buf_free(&b);
  return 0;
}

/* Every TD_E* code is negative, below TD__EFIRST, distinct, keeps its
 * number and has its own message; a negative errno (what a libuv code is
 * on Unix) gets libc's sentence; nothing else passes for a code. */
TEST_IMPL(err_codes) {
  static const test_err_t table[] = {
#define TD__ROW(name, msg) {TD_E##name, msg},
      TD_ERRDEF(TD__ROW)
#undef TD__ROW
  };
  assert_err_table(table, sizeof(table) / sizeof(table[0]), TD__ECOUNT, TD__EFIRST, TD__ELAST, td_strerror);
  /* Numbers are stable (new codes go at the end of the table). */
  ASSERT_EQ(TD_ENOMEM, -1001);
  ASSERT_EQ(TD_EPROTO, -1003);
  ASSERT(strcmp(td_strerror(0), "success") == 0);
  ASSERT(strcmp(td_strerror(-ENOENT), strerror(ENOENT)) == 0);
  ASSERT(strcmp(td_strerror(-EADDRINUSE), "Address already in use") == 0);
  ASSERT(strcmp(td_strerror(-EACCES), "Permission denied") == 0);
  /* Positive numbers, and negatives outside both ranges, are not codes. */
  ASSERT(strcmp(td_strerror(1), "unknown error") == 0);
  ASSERT(strcmp(td_strerror(-TD_ENOMEM), "unknown error") == 0);
  ASSERT(strcmp(td_strerror(TD__ELAST - 1), "unknown error") == 0);
  ASSERT(strcmp(td_strerror(TD__EFIRST), "unknown error") == 0);
  return 0;
}

/* The bridge says what failed with a code td_strerror names, not -1 and
 * errno: a missing key file, a file without the keys, a port taken. */
TEST_IMPL(bridge_err_codes) {
  td_cluster_key_t k, back;
  ASSERT_EQ(td_key_load("/nonexistent-tide-dir/cluster.key", &k), -ENOENT);
  char path[] = "/tmp/tide-test-key-XXXXXX";
  int fd = mkstemp(path);
  ASSERT(fd >= 0);
  ASSERT_EQ(write(fd, "# no keys here\nserver_public=short\n", 35), 35);
  close(fd);
  ASSERT_EQ(td_key_load(path, &k), TD_EINVAL);
  ASSERT_EQ(td_key_create(path, &k), 0);
  ASSERT_EQ(td_key_load(path, &back), 0);
  ASSERT(memcmp(&k, &back, sizeof(k)) == 0);
  unlink(path);
  ASSERT_EQ(td_key_save("/nonexistent-tide-dir/cluster.key", &k), -ENOENT);

  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t sl = sizeof(sa);
  ASSERT(bind(s, (struct sockaddr *)&sa, sizeof(sa)) == 0 && listen(s, 1) == 0);
  ASSERT(getsockname(s, (struct sockaddr *)&sa, &sl) == 0);
  char ep[64];
  snprintf(ep, sizeof(ep), "tcp://127.0.0.1:%d", ntohs(sa.sin_port));
  int rc = td_bridge_server_start(ep, "/tmp/tide-test-bridge.sock", &k);
  ASSERT_EQ(rc, TD_EADDRINUSE);
  ASSERT(strcmp(td_strerror(rc), "address already in use") == 0);
  ASSERT_EQ(td_bridge_server_start("bogus://x", "/tmp/tide-test-bridge.sock", &k), -EPROTONOSUPPORT);
  close(s);
  return 0;
}

TEST_IMPL(map_basic) {
  td_map_t m;
  td_map_init(&m);
  for (uint64_t i = 1; i <= 5000; i++) td_map_set(&m, i * 7919, (void *)(uintptr_t)i);
  ASSERT_EQ(m.len, 5000);
  for (uint64_t i = 1; i <= 5000; i += 2) ASSERT_EQ((uintptr_t)td_map_del(&m, i * 7919), i);
  ASSERT_EQ(m.len, 2500);
  for (uint64_t i = 2; i <= 5000; i += 2) ASSERT_EQ((uintptr_t)td_map_get(&m, i * 7919), i);
  ASSERT(td_map_get(&m, 7919) == NULL);
  size_t it = 0, n = 0;
  while (td_map_next(&m, &it, NULL, NULL)) n++;
  ASSERT_EQ(n, 2500);
  /* Deleted slots are reused without growing forever. */
  for (int round = 0; round < 100; round++) {
    td_map_set(&m, 1, (void *)1);
    td_map_del(&m, 1);
  }
  ASSERT(m.cap <= 16384);
  td_map_free(&m);
  return 0;
}

/* Ids 0 and UINT64_MAX (the table's own marks; a malformed message may
 * name them) are kept like any other, and counted right. */
TEST_IMPL(map_mark_ids) {
  td_map_t m;
  td_map_init(&m);
  ASSERT(td_map_get(&m, 0) == NULL);
  ASSERT(td_map_get(&m, UINT64_MAX) == NULL);
  ASSERT(td_map_del(&m, UINT64_MAX) == NULL);
  ASSERT_EQ(m.len, 0);
  td_map_set(&m, 0, (void *)1);
  td_map_set(&m, UINT64_MAX, (void *)2);
  for (uint64_t i = 1; i <= 100; i++) td_map_set(&m, i, (void *)(uintptr_t)(i + 10));
  td_map_del(&m, 50);  /* a deleted slot: UINT64_MAX must not find it */
  ASSERT_EQ(m.len, 101);
  ASSERT_EQ((uintptr_t)td_map_get(&m, 0), 1);
  ASSERT_EQ((uintptr_t)td_map_get(&m, UINT64_MAX), 2);
  size_t it = 0, n = 0;
  uint64_t k;
  int seen0 = 0, seenmax = 0;
  while (td_map_next(&m, &it, &k, NULL)) { n++; seen0 |= k == 0; seenmax |= k == UINT64_MAX; }
  ASSERT_EQ(n, 101);
  ASSERT(seen0 && seenmax);
  ASSERT_EQ((uintptr_t)td_map_del(&m, UINT64_MAX), 2);
  ASSERT(td_map_del(&m, UINT64_MAX) == NULL);
  ASSERT_EQ((uintptr_t)td_map_del(&m, 0), 1);
  ASSERT_EQ(m.len, 99);
  td_map_free(&m);
  return 0;
}

/* The spill file reuses what was freed, shrinks when its tail is free, and
 * says "no space" (keeping what it holds readable) when the disk is full:
 * here a file-size limit stands for the full disk (EFBIG, as ENOSPC). */
TEST_IMPL(spill_reuse_and_full) {
  enum { MB = 1 << 20 };
  char *buf = malloc(3 * MB), *back = malloc(MB);
  for (int i = 0; i < 3 * MB; i++) buf[i] = (char)(i * 7 + i / MB);
  td_spill_t *sp = td_spill_new("/tmp");
  size_t a, b, c, d;
  ASSERT_EQ(td_spill_write(sp, buf, MB, &a), 0);
  ASSERT_EQ(td_spill_write(sp, buf + MB, MB, &b), 0);
  ASSERT_EQ(td_spill_write(sp, buf + 2 * MB, MB, &c), 0);
  ASSERT(td_spill_used(sp) == 3 * MB && td_spill_end(sp) == 3 * MB);
  td_spill_free(sp, b, MB);
  ASSERT(td_spill_used(sp) == 2 * MB && td_spill_end(sp) == 3 * MB);
  ASSERT_EQ(td_spill_write(sp, buf, MB / 2, &d), 0);
  ASSERT_EQ(d, b);  /* the hole is reused before the file grows */
  ASSERT_EQ(td_spill_end(sp), 3 * MB);
  ASSERT_EQ(td_spill_read(sp, c, back, MB), 0);
  ASSERT(memcmp(back, buf + 2 * MB, MB) == 0);
  td_spill_free(sp, c, MB);  /* a free tail: the file is cut back */
  ASSERT_EQ(td_spill_end(sp), b + MB / 2);
  /* The disk "fills": a write past the limit fails as no space, and
   * leaves what was written readable and the file as it was. */
  struct rlimit old, lim;
  getrlimit(RLIMIT_FSIZE, &old);
  lim = old;
  lim.rlim_cur = 2 * MB;
  void (*was)(int) = signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
  ASSERT_EQ(td_spill_write(sp, buf, 2 * MB, &d), TD_ENOSPACE);
  ASSERT_EQ(td_spill_end(sp), b + MB / 2);
  ASSERT_EQ(td_spill_write(sp, buf, MB / 2, &d), 0);  /* fits under the limit */
  setrlimit(RLIMIT_FSIZE, &old);
  signal(SIGXFSZ, was);
  ASSERT_EQ(td_spill_read(sp, a, back, MB), 0);
  ASSERT(memcmp(back, buf, MB) == 0);
  td_spill_free(sp, a, MB);
  td_spill_free(sp, b, MB / 2);
  td_spill_free(sp, d, MB / 2);
  ASSERT(td_spill_used(sp) == 0 && td_spill_end(sp) == 0);
  td_spill_destroy(&sp);
  ASSERT(sp == NULL);
  free(buf);
  free(back);
  return 0;
}

TEST_IMPL(store_alloc_free) {
  td_store_t *s = td_store_new(1 << 20);
  ASSERT(s);
  size_t a, b, c, d;
  ASSERT_EQ(td_store_alloc(s, 300000, &a), 0);
  ASSERT_EQ(td_store_alloc(s, 300000, &b), 0);
  ASSERT_EQ(td_store_alloc(s, 300000, &c), 0);
  ASSERT_EQ(td_store_alloc(s, 300000, &d), TD_ESTOREFULL);
  td_store_free(s, b, 300000);
  ASSERT_EQ(td_store_alloc(s, 300000, &d), 0);
  ASSERT_EQ(d, b); /* the freed extent is reused */
  td_store_free(s, a, 300000);
  td_store_free(s, d, 300000);
  td_store_free(s, c, 300000);
  ASSERT_EQ(td_store_used(s), 0);
  /* Coalesced: one allocation of the whole capacity fits again. */
  ASSERT_EQ(td_store_alloc(s, td_store_capacity(s), &a), 0);
  /* Another process sees the same bytes through the fd. */
  memset(td_store_base(s), 0x5a, 4096);
  size_t cap;
  uint8_t *m = td_store_map(td_store_fd(s), &cap);
  ASSERT(m && cap == td_store_capacity(s) && m[4095] == 0x5a);
  td_store_destroy(&s);
  ASSERT(s == NULL);
  td_store_destroy(&s);
  return 0;
}

TEST_IMPL(chan_frames) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  td_chan_t a, b;
  td_chan_init(&a, sv[0]);
  td_chan_init(&b, sv[1]);
  for (int i = 0; i < 1000; i++) {
    td_chan_begin(&a, (uint8_t)(i & 0x7f));
    td_buf_u32(&a.out, (uint32_t)i);
    td_chan_end(&a);
  }
  ASSERT_EQ(td_chan_flush_all(&a), 0);
  int got = 0;
  while (got < 1000) {
    ASSERT_EQ(td_chan_read(&b), 0);
    uint8_t t;
    const uint8_t *p;
    uint32_t n;
    while (td_chan_next(&b, &t, &p, &n) == 1) {
      uint32_t v;
      ASSERT_EQ(n, 4);
      memcpy(&v, p, 4);
      ASSERT_EQ(v, (uint32_t)got);
      ASSERT_EQ(t, got & 0x7f);
      got++;
    }
  }
  /* A bad length is a protocol error, not a crash. */
  uint32_t bad = 0;
  ASSERT_EQ(write(sv[0], &bad, 4), 4);
  ASSERT_EQ(write(sv[0], "x", 1), 1);
  usleep(1000);
  td_chan_read(&b);
  uint8_t t;
  const uint8_t *p;
  uint32_t n;
  ASSERT_EQ(td_chan_next(&b, &t, &p, &n), TD_EPROTO);
  ASSERT(td_chan_next(&b, &t, &p, &n) < 0); /* what its callers test */
  td_chan_close(&a);
  ASSERT_EQ(td_chan_read(&b), TD_ECLOSED);
  td_chan_close(&b);
  return 0;
}

/* A large frame sent from elsewhere (td_chan_frame_ext) and taken in
 * pieces by a split channel: its bulk never passes through `in`, and the
 * frames around it arrive whole and in order. */
TEST_IMPL(chan_split_frames) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  td_chan_t a, b;
  td_chan_init(&a, sv[0]);
  td_chan_init(&b, sv[1]);
  b.split = 9;
  b.split_head = 8;
  size_t big = (size_t)3 << 20;
  uint8_t *src = malloc(big), *dst = malloc(big);
  for (size_t i = 0; i < big; i++) src[i] = (uint8_t)(i * 7 + (i >> 12));
  uint64_t tag = 0xabcd;
  td_chan_begin(&a, 1);
  td_buf_u32(&a.out, 7);
  td_chan_end(&a);
  td_chan_frame_ext(&a, 9, &tag, 8, src, big);
  td_chan_begin(&a, 2);
  td_buf_u32(&a.out, 8);
  td_chan_end(&a);
  int seen1 = 0, seen2 = 0, taken = 0;
  size_t at = 0, left = 0;
  while (!seen2) {
    ASSERT_EQ(td_chan_flush(&a), 0);
    if (left) {
      ssize_t r = read(sv[1], dst + at, left);
      if (r > 0) { at += (size_t)r; left -= (size_t)r; }
      continue;
    }
    ASSERT_EQ(td_chan_read(&b), 0);
    uint8_t t;
    const uint8_t *p;
    uint32_t n, v;
    while (td_chan_next(&b, &t, &p, &n) == 1) {
      ASSERT(t == 1 || t == 2);
      ASSERT_EQ(n, 4);
      memcpy(&v, p, 4);
      if (t == 1) { ASSERT(!seen1 && !taken && v == 7); seen1 = 1; }
      if (t == 2) { ASSERT(taken && !left && v == 8); seen2 = 1; }
    }
    uint32_t have, len;
    if (td_chan_partial(&b, &p, &have, &len)) {
      ASSERT(seen1 && !taken);
      ASSERT_EQ(len, 8 + big);
      ASSERT(have >= 8 && have < len);
      ASSERT_EQ(memcmp(p, &tag, 8), 0);
      memcpy(dst, p + 8, have - 8);
      at = have - 8;
      left = big - at;
      td_chan_take(&b);
      taken = 1;
    }
  }
  ASSERT_EQ(memcmp(src, dst, big), 0);
  ASSERT(b.in.cap < big / 4);
  td_chan_close(&a);
  td_chan_close(&b);
  free(src);
  free(dst);
  return 0;
}

TEST_IMPL(spec_roundtrip_and_garbage) {
  td_spec_t s;
  memset(&s, 0, sizeof(s));
  uint64_t rets[2] = {11, 12}, deps[1] = {5}, refs[2] = {6, 7};
  s.kind = TD_K_TASK;
  s.fn_id = 99;
  s.nret = 2;
  s.rets = rets;
  s.args = (const uint8_t *)"abc";
  s.args_len = 3;
  s.deps = deps;
  s.ndeps = 1;
  s.refs = refs;
  s.nrefs = 2;
  s.nres = 1;
  strcpy(s.res_name[0], "CPU");
  s.res_amt[0] = 2;
  s.max_retries = 3;
  strcpy(s.name, "f");
  td_buf_t b;
  td_buf_init(&b);
  td_spec_encode(&s, &b);
  td_spec_t d;
  uint64_t *scratch;
  td_rd_t r;
  td_rd_init(&r, b.p, b.len);
  ASSERT_EQ(td_spec_decode(&d, &r, &scratch), 0);
  ASSERT(d.fn_id == 99 && d.nret == 2 && d.rets[1] == 12 && d.ndeps == 1 && d.deps[0] == 5);
  ASSERT(d.nrefs == 2 && d.refs[1] == 7 && d.args_len == 3 && !memcmp(d.args, "abc", 3));
  ASSERT(!strcmp(d.res_name[0], "CPU") && d.res_amt[0] == 2 && !strcmp(d.name, "f"));
  free(scratch);
  /* Every truncation and random corruption is rejected or decoded, never a crash. */
  for (size_t cut = 0; cut < b.len; cut++) {
    td_rd_init(&r, b.p, cut);
    int rc = td_spec_decode(&d, &r, &scratch);
    ASSERT(rc != 0 || r.bad || cut == b.len);
    free(scratch);
  }
  srand(1);
  for (int i = 0; i < 20000; i++) {
    uint8_t junk[256];
    size_t n = (size_t)(rand() % 256);
    for (size_t k = 0; k < n; k++) junk[k] = (uint8_t)rand();
    td_rd_init(&r, junk, n);
    td_spec_decode(&d, &r, &scratch);
    free(scratch);
  }
  td_buf_free(&b);
  return 0;
}

/* Worker logs: two tasks' prints interleaved in one worker's log, with
 * the worker's own output between them; each slice is one task's lines
 * only, an actor's slice both of its calls', and a rotation starts the
 * index again. */
static void worklog_print(uint64_t wk, uint64_t task, uint64_t actor, const char *s) {
  td__obs_print(wk, task, actor, (const uint8_t *)s, strlen(s));
}

static void worklog_expect(uint64_t wk, td_slice_by_t by, uint64_t id, const char *want) {
  td_buf_t b;
  td_buf_init(&b);
  uint64_t rec = 0;
  ASSERT_EQ(td_obs_log_slice(wk, by, id, &rec, 1 << 20, &b), 0);
  ASSERT_EQ(b.len, strlen(want));
  ASSERT(b.len == 0 || memcmp(b.p, want, b.len) == 0);
  td_buf_free(&b);
}

TEST_IMPL(worklog_slices) {
  char dir[] = "/tmp/tide-worklog-XXXXXX";
  ASSERT(mkdtemp(dir) != NULL);
  ASSERT_EQ(td_obs_set_logdir(dir), 0);
  const uint64_t wk = 0x100002, A = 0x11, B = 0x12, ACT = 0x77;
  int raw = td__obs_worker_log(wk); /* the worker's own stdout */
  ASSERT(raw >= 0);
  worklog_print(wk, A, ACT, "alpha 1\n");
  worklog_print(wk, B, ACT, "beta 1\n");
  ASSERT_EQ(write(raw, "raw bytes\n", 10), 10);
  worklog_print(wk, A, ACT, "alpha 2\n");
  worklog_print(wk, 0x13, 0, "gamma 1\n");
  worklog_print(wk, B, ACT, "beta 2\n");
  worklog_expect(wk, TD_SLICE_TASK, A, "alpha 1\nalpha 2\n");
  worklog_expect(wk, TD_SLICE_TASK, B, "beta 1\nbeta 2\n");
  worklog_expect(wk, TD_SLICE_ACTOR, ACT, "alpha 1\nbeta 1\nalpha 2\nbeta 2\n");
  worklog_expect(wk, TD_SLICE_TASK, 0x99, "");
  /* A slice is read on from where the last read stopped. */
  td_buf_t b;
  td_buf_init(&b);
  uint64_t rec = 0;
  ASSERT_EQ(td_obs_log_slice(wk, TD_SLICE_TASK, B, &rec, 1, &b), 0); /* stops once it has a byte */
  ASSERT(b.len == 7 && rec == 2);
  ASSERT_EQ(td_obs_log_slice(wk, TD_SLICE_TASK, B, &rec, 1 << 20, &b), 0);
  ASSERT(b.len == 14 && !memcmp(b.p, "beta 1\nbeta 2\n", 14) && rec == 5);
  uint64_t wks[4];
  ASSERT(td_obs_log_find(TD_SLICE_TASK, B, wks, 4) == 1 && wks[0] == wk);
  ASSERT_EQ(td_obs_log_find(TD_SLICE_TASK, 0x99, wks, 4), 0);
  /* Rotation empties the log and its index: a reader past the end starts again. */
  td_obs_rotate(8);
  worklog_print(wk, B, ACT, "beta 3\n");
  b.len = 0;
  ASSERT_EQ(td_obs_log_slice(wk, TD_SLICE_TASK, B, &rec, 1 << 20, &b), 0);
  ASSERT(b.len == 7 && !memcmp(b.p, "beta 3\n", 7) && rec == 1);
  /* The part rotation kept is sliced on its own; a task whose prints are
   * only there (A) is still found, once. */
  b.len = 0;
  ASSERT_EQ(td_obs_log_slice_rotated(wk, TD_SLICE_TASK, B, 1 << 20, &b), 0);
  ASSERT(b.len == 14 && !memcmp(b.p, "beta 1\nbeta 2\n", 14));
  ASSERT(td_obs_log_find(TD_SLICE_TASK, A, wks, 4) == 1 && wks[0] == wk);
  ASSERT(td_obs_log_find(TD_SLICE_TASK, B, wks, 4) == 1 && wks[0] == wk);
  ASSERT_EQ(td_obs_log_slice_rotated(0x100003, TD_SLICE_TASK, B, 1 << 20, &b), TD_ENOTFOUND);
  ASSERT_EQ(td_obs_log_slice(0x100003, TD_SLICE_TASK, B, &rec, 1 << 20, &b), TD_ENOTFOUND);
  td_buf_free(&b);
  close(raw);
  char cmd[64];
  snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
  ASSERT_EQ(system(cmd), 0);
  return 0;
}

/* The node's message table (engine/node.c td__msgs[]): each message is
 * taken only from the kinds of sender that may send it, and anything else
 * (a wrong sender, a type no one sends) drops the sender as malformed,
 * giving back what it held. Driven through td_node_feed (a client) and
 * td_node_feed_as (the head's link), with no worker processes. */
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "node.h"
#include "proto.h"
#include "test.h"

static td_node_t *msgs_node(void) {
  td_node_opts_t o;
  memset(&o, 0, sizeof(o));
  o.num_cpus = 1;
  o.memory = 1 << 30;
  o.store_capacity = 4 << 20;
  o.no_workers = 1;
  return td_node_new(&o);
}

/* PUT id = "hi" inline, holding nothing. */
static int put(td_node_t *n, int from_head, uint64_t id) {
  td_buf_t b;
  td_buf_init(&b);
  td_buf_u64(&b, id);
  td_buf_u8(&b, TD_V_INLINE);
  td_buf_str(&b, "hi", 2);
  td_buf_u32(&b, 0);
  int rc = td_node_feed_as(n, from_head, TD_M_PUT, b.p, (uint32_t)b.len);
  td_buf_free(&b);
  return rc;
}

/* FN id with a definition: only the head's link (or a node's) sends these. */
static int fn(td_node_t *n, int from_head, uint64_t id) {
  td_buf_t b;
  td_buf_init(&b);
  td_buf_u64(&b, id);
  td_buf_str(&b, "return 1", 8);
  int rc = td_node_feed_as(n, from_head, TD_M_FN, b.p, (uint32_t)b.len);
  td_buf_free(&b);
  return rc;
}

TEST_IMPL(msgs_senders_checked) {
  td_node_t *n = msgs_node();
  ASSERT(n);
  uint8_t cancel[9] = {0};
  /* A client may not send what only the head sends, nor a function. */
  ASSERT_EQ(td_node_feed(n, TD_M_CANCEL, cancel, sizeof(cancel)), TD_EPROTO);
  ASSERT_EQ(td_node_feed(n, TD_M_WELCOME, cancel, 4), TD_EPROTO);
  ASSERT_EQ(fn(n, 0, 7), TD_EPROTO);
  /* The head's link may. */
  ASSERT_EQ(td_node_feed_as(n, 1, TD_M_CANCEL, cancel, sizeof(cancel)), 0);
  ASSERT_EQ(fn(n, 1, 7), 0);
  /* Types no one sends, and a client's READY. */
  ASSERT_EQ(td_node_feed(n, 0, NULL, 0), TD_EPROTO);
  ASSERT_EQ(td_node_feed(n, 255, NULL, 0), TD_EPROTO);
  ASSERT_EQ(td_node_feed(n, TD_M_TASK, NULL, 0), TD_EPROTO);
  ASSERT_EQ(td_node_feed(n, TD_M_READY, NULL, 0), 0);
  td_node_destroy(&n);
  return 0;
}

TEST_IMPL(msgs_wrong_sender_dropped) {
  td_node_t *n = msgs_node();
  ASSERT(n);
  uint64_t a = td_node_new_id(n), b = td_node_new_id(n);
  ASSERT_EQ(put(n, 0, a), 0);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_READY); /* held by the client */
  /* A message it may not send: dropped, and its value with it. */
  ASSERT_EQ(fn(n, 0, 9), TD_EPROTO);
  td_node_pump(n, 0);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_MISSING);
  /* Another node's link (PEER) carries chunks and nothing else. */
  uint8_t idx[4] = {3, 0, 0, 0};
  ASSERT_EQ(td_node_feed(n, TD_M_PEER, idx, sizeof(idx)), 0);
  ASSERT_EQ(put(n, 0, b), TD_EPROTO);
  ASSERT_EQ(td_node_state(n, b), TD_OBJ_MISSING);
  /* A new client, and a second PEER is not for it either once it is one. */
  ASSERT_EQ(td_node_feed(n, TD_M_PEER, idx, sizeof(idx)), 0);
  ASSERT_EQ(td_node_feed(n, TD_M_PEER, idx, sizeof(idx)), TD_EPROTO);
  td_node_stats_t st;
  td_node_stats(n, &st);
  ASSERT_EQ(st.objects, 0);
  ASSERT_EQ(st.store_used, 0);
  td_node_destroy(&n);
  return 0;
}

/* A client whose frame has an impossible length is dropped (its socket is
 * closed), not kept reading forever: td_chan_next's TD_EPROTO is negative,
 * which is what the node tests for. */
TEST_IMPL(msgs_bad_frame_drops_client) {
  td_node_t *n = msgs_node();
  ASSERT(n);
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  ASSERT_EQ(td_node_add_client(n, sv[1]), 0);
  uint8_t frame[5] = {0, 0, 0, 0, 'x'}; /* length 0: no type byte */
  ASSERT_EQ(write(sv[0], frame, sizeof(frame)), (ssize_t)sizeof(frame));
  int eof = 0;
  for (int i = 0; i < 200 && !eof; i++) {
    td_node_pump(n, 0.01);
    struct pollfd pfd = {sv[0], POLLIN, 0};
    char buf[4096];
    while (!eof && poll(&pfd, 1, 0) > 0) eof = read(sv[0], buf, sizeof(buf)) <= 0;
  }
  ASSERT(eof);
  td_node_handles_t h;
  td_node_handles(n, &h);
  ASSERT_EQ(h.records, 0);
  close(sv[0]);
  td_node_destroy(&n);
  return 0;
}

/* NOTE from a node's link: the head keeps the latest per topic. */
static int note(td_node_t *n, const char *topic, const char *data) {
  td_buf_t b;
  td_buf_init(&b);
  td_buf_str(&b, topic, strlen(topic));
  td_buf_str(&b, data, strlen(data));
  int rc = td_node_feed(n, TD_M_NOTE, b.p, (uint32_t)b.len);
  td_buf_free(&b);
  return rc;
}

typedef struct {
  int count;
  uint32_t node;
  char data[32];
} notes_seen_t;

static void note_seen(void *ud, uint32_t node, const char *name, const uint8_t *p, size_t len) {
  (void)name;
  notes_seen_t *s = ud;
  s->count++;
  s->node = node;
  snprintf(s->data, sizeof(s->data), "%.*s", (int)len, (const char *)p);
}

static notes_seen_t notes_of(td_node_t *n, const char *topic) {
  notes_seen_t s;
  memset(&s, 0, sizeof(s));
  td_node_notes(n, topic, note_seen, &s);
  return s;
}

TEST_IMPL(msgs_node_notes) {
  td_node_t *n = msgs_node();
  ASSERT(n);
  /* This node has no head to send to. */
  ASSERT_EQ(td_node_note_head(n, "serve", "x", 1), TD_ENOTFOUND);
  /* A client may not send a note; one that joined (a node's link) may. */
  ASSERT_EQ(note(n, "serve", "a"), TD_EPROTO);
  uint8_t want[4] = {0};
  ASSERT_EQ(td_node_feed(n, TD_M_JOIN, want, sizeof(want)), 0);
  ASSERT_EQ(note(n, "serve", "a"), 0);
  notes_seen_t s = notes_of(n, "serve");
  ASSERT_EQ(s.count, 1);
  ASSERT(s.node >= 1);
  ASSERT_EQ(strcmp(s.data, "a"), 0);
  /* The latest replaces it; other topics are kept apart. */
  ASSERT_EQ(note(n, "serve", "bb"), 0);
  ASSERT_EQ(note(n, "other", "x"), 0);
  s = notes_of(n, "serve");
  ASSERT_EQ(s.count, 1);
  ASSERT_EQ(strcmp(s.data, "bb"), 0);
  ASSERT_EQ(notes_of(n, "other").count, 1);
  /* Empty: withdrawn. */
  ASSERT_EQ(note(n, "serve", ""), 0);
  ASSERT_EQ(notes_of(n, "serve").count, 0);
  ASSERT_EQ(notes_of(n, "other").count, 1);
  /* A topic too long is malformed: the link is dropped, its notes with it. */
  ASSERT_EQ(note(n, "a-topic-too-long", "x"), TD_EPROTO);
  td_node_pump(n, 0);
  ASSERT_EQ(notes_of(n, "other").count, 0);
  td_node_destroy(&n);
  return 0;
}

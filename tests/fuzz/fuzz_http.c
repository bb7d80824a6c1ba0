/* libFuzzer target for the HTTP ingress request path: bytes go through an
 * in-memory connection (same parser, queue, limits and writer as TCP), an
 * application that answers in many ways (at once, streamed, late and out of
 * order, aborted, with bad arguments), and the server's output is checked to
 * be a well-formed sequence of HTTP responses.
 *
 * Input: byte 0 picks the feed chunk size, byte 1 the application's
 * behaviour, the rest is what the client sends.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem */
#endif
#include <llhttp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"

#define MAX_PENDING 128

static uv_loop_t loop;
static td_http_server_t *srv;
static unsigned behaviour; /* from byte 1, advanced per request */
static td_http_req_id pending[MAX_PENDING];
static int pending_stream[MAX_PENDING];
static int npending;
static char *out;          /* everything the server wrote */
static size_t out_len, out_cap;
static int saw_head;       /* HEAD responses cannot be framed without the request */

static void sink(void *ud, const char *data, size_t len) {
  (void)ud;
  if (out_len + len > out_cap) {
    size_t cap = out_cap ? out_cap : 4096;
    while (cap < out_len + len) cap *= 2;
    out = realloc(out, cap);
    if (!out) abort();
    out_cap = cap;
  }
  memcpy(out + out_len, data, len);
  out_len += len;
}

static void must(int ok) {
  if (!ok) abort();
}

static void on_request(td_http_server_t *s, const td_http_request_t *req, void *data) {
  (void)data;
  unsigned b = behaviour++;
  static const td_http_header_t h[] = {TD_HTTP_HDR("Content-Type", "text/plain"),
                                       TD_HTTP_HDR("X-Seq", "1")};
  static const td_http_header_t bad[] = {TD_HTTP_HDR("X-Bad", "a\r\nInjected: 1")};
  if (strcmp(req->method, "HEAD") == 0) saw_head = 1;
  /* The view must be self-consistent. */
  must(strlen(req->path) == req->path_len);
  must(strlen(req->query) == req->query_len);
  must(req->body[req->body_len] == '\0');
  for (size_t i = 0; i < req->nheaders; i++) {
    must(strlen(req->headers[i].name) == req->headers[i].name_len);
    must(req->headers[i].name_len > 0);
    for (size_t k = 0; k < req->headers[i].name_len; k++)
      must(!(req->headers[i].name[k] >= 'A' && req->headers[i].name[k] <= 'Z'));
  }
  switch (b % 8) {
    case 0:
      must(td_http_respond(s, req->id, 200, h, 2, req->path, req->path_len) == 0);
      must(td_http_respond(s, req->id, 200, NULL, 0, "x", 1) == TD_ENOTFOUND);
      break;
    case 1:
      must(td_http_stream_start(s, req->id, 200, h, 1) == 0);
      must(td_http_stream_write(s, req->id, "ab", 2) == 0);
      must(td_http_stream_write(s, req->id, req->body, req->body_len) == 0);
      must(td_http_stream_end(s, req->id) == 0);
      break;
    case 2:
    case 4:
      if (npending < MAX_PENDING) {
        if (b % 8 == 4) {
          must(td_http_stream_start(s, req->id, 200, NULL, 0) == 0);
          must(td_http_stream_write(s, req->id, "chunk", 5) == 0);
        }
        pending_stream[npending] = b % 8 == 4;
        pending[npending++] = req->id;
      } else {
        must(td_http_abort(s, req->id) == 0);
      }
      break;
    case 3:
      if (b & 8) {
        must(td_http_stream_start(s, req->id, 200, NULL, 0) == 0);
        must(td_http_stream_write(s, req->id, "x", 1) == 0);
      }
      must(td_http_abort(s, req->id) == 0);
      break;
    case 5:
      must(td_http_respond(s, req->id, 204, NULL, 0, "ignored", 7) == 0);
      break;
    case 6:
      must(td_http_respond(s, req->id, 99, NULL, 0, NULL, 0) == TD_EINVAL);
      must(td_http_stream_write(s, req->id, "x", 1) == TD_EINVAL);
      must(td_http_respond(s, req->id, 404, NULL, 0, req->body, req->body_len) == 0);
      break;
    default:
      must(td_http_respond(s, req->id, 200, bad, 1, NULL, 0) == TD_EINVAL);
      must(td_http_respond(s, req->id, 500, NULL, 0, "e", 1) == 0);
      break;
  }
}

static void on_abort(td_http_server_t *s, td_http_req_id id, td_http_abort_reason_t why,
                     void *data) {
  (void)data;
  (void)why;
  must(td_http_respond(s, id, 200, NULL, 0, NULL, 0) == TD_ENOTFOUND);
  for (int i = 0; i < npending; i++)
    if (pending[i] == id) pending[i] = 0;
}

/* Answers the deferred requests, newest first (out of request order). */
static void answer_pending(void) {
  while (npending > 0) {
    npending--;
    td_http_req_id id = pending[npending];
    if (!id) continue;
    if (pending_stream[npending])
      (void)td_http_stream_end(srv, id);
    else
      (void)td_http_respond(srv, id, 201, NULL, 0, "late", 4);
  }
}

/* Responses must parse; a close-delimited or truncated last one is fine. */
static int resp_headers_complete(llhttp_t *p) {
  (void)p;
  return 0;
}

static void check_output(void) {
  if (saw_head || out_len == 0) return;
  llhttp_settings_t st;
  llhttp_settings_init(&st);
  st.on_headers_complete = resp_headers_complete;
  llhttp_t p;
  llhttp_init(&p, HTTP_RESPONSE, &st);
  llhttp_errno_t e = llhttp_execute(&p, out, out_len);
  if (e != HPE_OK) abort();
  must(memcmp(out, "HTTP/1.1 ", 9) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!srv) {
    uv_loop_init(&loop);
    td_http_opts_t o = {.on_request = on_request,
                        .on_abort = on_abort,
                        .max_header_bytes = 2048,
                        .max_headers = 20,
                        .max_body_bytes = 4096,
                        .max_pipeline = 4};
    srv = td_http_server_new(&loop, &o);
    if (!srv) abort();
  }
  if (size < 2) return 0;
  size_t chunk = data[0] < 200 ? (size_t)data[0] % 64 + 1 : size;
  behaviour = data[1];
  data += 2;
  size -= 2;
  out_len = 0;
  saw_head = memmem(data, size, "HEAD", 4) != NULL; /* incl. HEAD /-/healthz */
  npending = 0;
  td__http_conn_t *c = td__http_virt_open(srv, sink, NULL);
  if (!c) abort();
  for (size_t off = 0; off < size; off += chunk) {
    size_t n = size - off < chunk ? size - off : chunk;
    td__http_virt_feed(c, (const char *)data + off, n);
    td__http_virt_flush(srv);
    if ((off / chunk) % 3 == 2) {
      answer_pending();
      td__http_virt_flush(srv);
    }
  }
  for (int i = 0; i < 64 && npending; i++) { /* answers may resume paused parsing */
    answer_pending();
    td__http_virt_flush(srv);
  }
  check_output();
  td__http_virt_feed(c, NULL, 0); /* EOF */
  td__http_virt_flush(srv);
  td__http_virt_close(c);
  return 0;
}

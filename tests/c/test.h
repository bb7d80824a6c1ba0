/* Assertion helpers for C unit tests. */
#ifndef TD_TEST_H
#define TD_TEST_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define TEST_IMPL(name) int run_test_##name(void)
#define ASSERT(expr)                                                        \
  do {                                                                      \
    if (!(expr)) {                                                          \
      fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__, __LINE__, \
              #expr);                                                       \
      abort();                                                              \
    }                                                                       \
  } while (0)
#define ASSERT_EQ(a, b) ASSERT((a) == (b))

/* One row of an error table (td.h's TD_ERRDEF, gpu_err.h's TD_GPU_ERRDEF). */
typedef struct test_err {
  int code;        /* the code */
  const char *msg; /* its message in the table */
} test_err_t;

/* The n rows are the table's count codes; every code is negative and in
 * [last, first), no two codes or messages are the same, and name() gives
 * each code its message. */
static inline void assert_err_table(const test_err_t *t, size_t n, int count, int first, int last,
                                    const char *(*name)(int)) {
  ASSERT_EQ(n, (size_t)count);
  for (size_t i = 0; i < n; i++) {
    ASSERT(t[i].code < 0);
    ASSERT(t[i].code < first && t[i].code >= last);
    for (size_t j = 0; j < i; j++) ASSERT(t[i].code != t[j].code && strcmp(t[i].msg, t[j].msg) != 0);
    ASSERT(strcmp(name(t[i].code), t[i].msg) == 0);
  }
}
#endif

/* Assertion helpers for C unit tests. */
#ifndef TD_TEST_H
#define TD_TEST_H
#include <stdio.h>
#include <stdlib.h>
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
#endif

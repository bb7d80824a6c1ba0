/* Every C unit test, one TEST_DECLARE per line; areas owned by other
 * parts of the tree add theirs through the included lists. */
TEST_DECLARE(buf_grow)
#if __has_include("test-list-gpu.h")
#include "test-list-gpu.h"
#endif
#if __has_include("test-list-http.h")
#include "test-list-http.h"
#endif

/* Every C unit test, one TEST_DECLARE per line; areas owned by other
 * parts of the tree add theirs through the included lists.  The engine's
 * own tests come first; build/ctest-engine (TD_TEST_ENGINE_ONLY) runs
 * them linked with the engine library alone. */
TEST_DECLARE(buf_grow)
TEST_DECLARE(map_basic)
TEST_DECLARE(map_mark_ids)
TEST_DECLARE(store_alloc_free)
TEST_DECLARE(spill_reuse_and_full)
TEST_DECLARE(chan_frames)
TEST_DECLARE(chan_split_frames)
TEST_DECLARE(spec_roundtrip_and_garbage)
TEST_DECLARE(node_objects_refs)
TEST_DECLARE(node_sched_infeasible_and_queue)
TEST_DECLARE(node_pg_reserve_release)
TEST_DECLARE(msgs_senders_checked)
TEST_DECLARE(msgs_wrong_sender_dropped)
#if __has_include("test-list-http.h")
#include "test-list-http.h"
#endif
#ifndef TD_TEST_ENGINE_ONLY
#include "test-list-lua.h"
#if __has_include("test-list-gpu.h")
#include "test-list-gpu.h"
#endif
#endif

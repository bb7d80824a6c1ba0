/* Every C unit test, one TEST_DECLARE per line; areas owned by other
 * parts of the tree add theirs through the included lists.  The engine's
 * own tests come first; build/ctest-engine (TD_TEST_ENGINE_ONLY) runs
 * them linked with the engine library alone. */
TEST_DECLARE(buf_grow)
TEST_DECLARE(err_codes)
TEST_DECLARE(bridge_err_codes)
TEST_DECLARE(map_basic)
TEST_DECLARE(map_mark_ids)
TEST_DECLARE(store_alloc_free)
TEST_DECLARE(spill_reuse_and_full)
TEST_DECLARE(chan_frames)
TEST_DECLARE(chan_split_frames)
TEST_DECLARE(spec_roundtrip_and_garbage)
TEST_DECLARE(worklog_slices)
TEST_DECLARE(obj_api_nested_refs)
TEST_DECLARE(obj_put_and_ref_deltas)
TEST_DECLARE(obj_forged_deltas)
TEST_DECLARE(obj_link_gives_back_only_its_refs)
TEST_DECLARE(obj_nested_refs_by_put)
TEST_DECLARE(obj_pins)
TEST_DECLARE(obj_alloc_waits_for_room)
TEST_DECLARE(obj_client_death_gives_back)
TEST_DECLARE(obj_get_requests)
TEST_DECLARE(sched_infeasible_and_queue)
TEST_DECLARE(sched_fit_and_wait)
TEST_DECLARE(sched_spill_to_node)
TEST_DECLARE(sched_infeasible_in_cluster)
TEST_DECLARE(sched_node_affinity)
TEST_DECLARE(sched_spread)
TEST_DECLARE(sched_node_dies_with_work)
TEST_DECLARE(pg_reserve_release)
TEST_DECLARE(pg_strategies_one_node)
TEST_DECLARE(pg_strategies_cluster)
TEST_DECLARE(pg_waits_for_a_node)
TEST_DECLARE(pg_bundle_share)
TEST_DECLARE(pg_remove_fails_its_work)
TEST_DECLARE(pg_node_dies)
TEST_DECLARE(pg_goes_with_its_client)
TEST_DECLARE(pg_codes_by_name)
TEST_DECLARE(lineage_rerun_when_kept_result_lost)
TEST_DECLARE(lineage_spec_kept_and_resubmitted)
TEST_DECLARE(lineage_dropped_with_last_ref)
TEST_DECLARE(lineage_malformed)
TEST_DECLARE(lineage_node_keeps_and_sends)
TEST_DECLARE(lineage_freed_with_result)
TEST_DECLARE(lineage_head_work_not_kept)
TEST_DECLARE(msgs_senders_checked)
TEST_DECLARE(msgs_wrong_sender_dropped)
TEST_DECLARE(msgs_bad_frame_drops_client)
#if __has_include("test-list-http.h")
#include "test-list-http.h"
#endif
#ifndef TD_TEST_ENGINE_ONLY
#include "test-list-lua.h"
#if __has_include("test-list-gpu.h")
#include "test-list-gpu.h"
#endif
#endif

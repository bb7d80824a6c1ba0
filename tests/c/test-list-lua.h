/* Lua binding tests (tests/c/test-lua.c). */
TEST_DECLARE(ser_roundtrip)
TEST_DECLARE(rpc_table)
/* Collective streams between nodes (tests/c/test-coll-net.c). */
TEST_DECLARE(coll_net_allreduce)
TEST_DECLARE(coll_net_wrong_secret_refused)
TEST_DECLARE(coll_net_tamper_detected)
TEST_DECLARE(coll_net_peer_death)
TEST_DECLARE(coll_net_silent_peer_times_out)
TEST_DECLARE(coll_net_pair_allreduce)
TEST_DECLARE(coll_net_pair_tamper_detected)
TEST_DECLARE(coll_net_pair_peer_death)
TEST_DECLARE(coll_net_pair_late_peer)
TEST_DECLARE(coll_net_send_to_late_receiver)

/* Lua binding tests (tests/c/test-lua.c). */
TEST_DECLARE(ser_roundtrip)

# TAP helpers for the shell tests: . tests/sh/lib.sh (from the repo root).
#   ok NAME / no NAME [DETAIL] / check NAME 'SHELL CONDITION' [DETAIL]
#   skip NAME WHY; at the end: plan (prints 1..N)
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
no() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "$2" | head -40 | sed 's/^/# /'; }
check() { if eval "$2"; then ok "$1"; else no "$1" "$3"; fi; }
skip() { n=$((n + 1)); echo "ok $n - $1 # SKIP $2"; }
plan() { echo "1..$n"; }
# head_session NAME BASE: for a test that starts its own head: T (the
# tide binary, TIDE_BIN to test another build), TIDE_SESSION_DIR and a
# work directory W, both removed at exit, where the head is stopped and
# KILL (a pid the test may set) killed; PORT from BASE, DPORT above it.
head_session() {
  T=${TIDE_BIN:-$(pwd)/bin/tide}
  export TIDE_SESSION_DIR=$(mktemp -d /tmp/tide-$1-XXXXXX)
  W=$(mktemp -d /tmp/tide-$1-work-XXXXXX)
  KILL=
  trap '[ -n "$KILL" ] && kill -9 $KILL 2>/dev/null; $T stop >/dev/null 2>&1; rm -rf "$W" "$TIDE_SESSION_DIR"' EXIT
  PORT=$(($2 + $$ % 1000))
  DPORT=$((PORT + 1000))
}

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
# poll TRIES 'SHELL CONDITION': every 0.1 s until it holds, TRIES times at most.
poll() { _i=0; while [ $_i -lt $1 ] && ! eval "$2"; do sleep 0.1; _i=$((_i + 1)); done; }
# join_node DIR [start options]: a node daemon in session DIR joined to the
# head of head_session (stopped at exit too); returns once the head lists it.
join_node() {
  _d=$1; shift
  _want=$(($($T status 2>/dev/null | grep -c '^node-') + 1))
  TIDE_SESSION_DIR=$_d $T start --address 127.0.0.1:$PORT --key $TIDE_SESSION_DIR/cluster.key "$@" >/dev/null 2>&1
  trap '[ -n "$KILL" ] && kill -9 $KILL 2>/dev/null; TIDE_SESSION_DIR='"$_d"' $T stop >/dev/null 2>&1;
    $T stop >/dev/null 2>&1; rm -rf "$W" "$TIDE_SESSION_DIR"' EXIT
  poll 100 '[ "$($T status 2>/dev/null | grep -c "^node-")" = $_want ]'
}
# serve_listening LOG: waits (30 s at most) until `tide serve run` writing
# LOG says it listens.
serve_listening() { _log=$1; poll 300 'grep -q "listening on" "$_log"'; }

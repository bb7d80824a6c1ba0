# TAP helpers for the shell tests: . tests/sh/lib.sh (from the repo root).
#   ok NAME / no NAME [DETAIL] / check NAME 'SHELL CONDITION' [DETAIL]
#   skip NAME WHY; at the end: plan (prints 1..N)
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
no() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "$2" | head -40 | sed 's/^/# /'; }
check() { if eval "$2"; then ok "$1"; else no "$1" "$3"; fi; }
skip() { n=$((n + 1)); echo "ok $n - $1 # SKIP $2"; }
plan() { echo "1..$n"; }

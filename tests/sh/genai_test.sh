#!/bin/sh
# `make demo` works: examples/genai.lua in its short mode (quick) trains the
# tiny GPT on 2 workers, batch-generates, serves over HTTP, fine-tunes
# through the service's job endpoint and shows the served output change,
# then exits 0 leaving no process behind.
cd "$(dirname "$0")/../.."
TIDE=${TIDE:-bin/tide}
OUT=$(mktemp)
MARK=genai-test-$$
n=0
ok() { n=$((n + 1)); if [ "$1" = 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; sed 's/^/# /' "$OUT" | tail -30; fi; }

TIDE_GENAI_TEST_MARK=$MARK TIDE_SESSION_DIR=$(mktemp -d) timeout -k 5 120 $TIDE run examples/genai.lua quick >"$OUT" 2>&1
ok $? "the quick demo exits 0"

r=0; for s in 1 2 3 4 5; do grep -q "^== $s\. " "$OUT" || r=1; done
ok $r "it prints each of the 5 steps"

grep '^   loss .* -> .* in ' "$OUT" | awk '{ exit !($4 < $2) }'
ok $? "training on 2 workers brings the loss down"

grep -q '^   8 prompts -> 8 completions' "$OUT"
ok $? "batch generation completes every prompt"

[ "$(grep -c 'streamed: [0-9]* chunks' "$OUT")" = 2 ]
ok $? "the served model answers its own HTTP requests with streamed chunks"

grep -q 'succeeded, step 12/12' "$OUT" && grep -q '^   succeeded: loss .* on 2 workers' "$OUT"
ok $? "the fine-tune job succeeds on 2 workers, its progress shown"

b=$(grep '^     before: ' "$OUT" | sed 's/^     before: //'); a=$(grep '^     after:  ' "$OUT" | sed 's/^     after:  //')
[ -n "$a" ] && [ "$a" != "$b" ]
ok $? "the served output changed after the fine-tune"

sleep 1
left=$(grep -l "TIDE_GENAI_TEST_MARK=$MARK" /proc/[0-9]*/environ 2>/dev/null | wc -l)
[ "$left" = 0 ]
ok $? "no process is left behind ($left)"

rm -f "$OUT"
echo "1..$n"

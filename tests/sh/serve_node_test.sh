#!/bin/sh
# A serve application attached to a node that is not the head: its ingress
# runs in that node, which sends its stats to the head once a second, so the
# head's /api/serve, /serve page and /metrics show its deployments, labelled
# with the node. Real requests with curl; the head's counts must be exactly
# those sent; when the serve driver is killed, the head forgets them. TAP.
cd "$(dirname "$0")/../.."
. tests/sh/lib.sh
head_session servenode 24000
SP=$((PORT + 2000))
D=http://127.0.0.1:$DPORT
N1=$W/n1

if ! command -v curl >/dev/null 2>&1; then
  skip "serve on another node on the head's dashboard" "curl not installed"
  plan
  exit 0
fi

$T start --head --num-cpus 1 --port $PORT --dashboard-port $DPORT >/dev/null 2>&1
join_node $N1 --num-cpus 2
check "a head and a second node" '[ "$($T status 2>/dev/null | grep -c "^node-")" = 2 ]' "$($T status 2>&1)"

cat > "$W/app.lua" <<'LUA'
local serve = require("tide.serve")
serve.run({
  serve.deployment{name = "echo", route = "/echo", num_replicas = 2,
    call = function(self, req) return {got = req.body} end},
})
LUA
# Attached to node-1 (its session), not to the head.
TIDE_SESSION_DIR=$N1 $T serve run --address local --port $SP "$W/app.lua" > "$W/serve.log" 2>&1 &
KILL=$!
serve_listening "$W/serve.log"
check "tide serve run attached to node-1 runs its ingress there" \
  'grep -q "listening on http://127.0.0.1:$SP (in the node this driver is attached to)" "$W/serve.log"' \
  "$(cat $W/serve.log)"
poll 100 'curl -s $D/api/serve | grep -q "\"replicas\":2"'
out=$(curl -s $D/api/serve)
check "the head's /api/serve lists node-1's deployment with its replicas" \
  'echo "$out" | grep -q "\"name\":\"echo\"" && echo "$out" | grep -q "\"node\":\"node-1\"" &&
   echo "$out" | grep -q "\"replicas\":2"' "$out"

bad=0
for i in 1 2 3 4 5; do
  c=$(curl -s -o /dev/null -w '%{http_code}' -d "hello $i" http://127.0.0.1:$SP/echo)
  [ "$c" = 200 ] || bad="$bad $c"
done
check "node-1's ingress answers 5 requests" '[ "$bad" = 0 ]' "$bad $(cat $W/serve.log)"

# The node sends once a second: wait for the counts to arrive.
poll 40 'curl -s $D/metrics | grep -q "tide_serve_requests_total{node=\"node-1\",.*code=\"200\"} 5"'
m=$(curl -s $D/metrics)
check "the head's /metrics counts node-1's requests, labelled with the node" \
  'echo "$m" | grep -qx "tide_serve_requests_total{node=\"node-1\",deployment=\"echo\",route=\"/echo\",code=\"200\"} 5" &&
   echo "$m" | grep -qx "tide_serve_request_duration_seconds_count{node=\"node-1\",deployment=\"echo\",route=\"/echo\"} 5" &&
   echo "$m" | grep -qx "tide_serve_replicas{node=\"node-1\",deployment=\"echo\",route=\"/echo\"} 2"' \
  "$(echo "$m" | grep tide_serve)"
check "each serve family's HELP and TYPE appear once" \
  '[ "$(echo "$m" | grep -c "^# TYPE tide_serve_requests_total ")" = 1 ] &&
   [ "$(echo "$m" | grep -c "^# TYPE tide_serve_request_duration_seconds ")" = 1 ]' "$(echo "$m" | grep "^# .*tide_serve")"
if command -v promtool >/dev/null 2>&1; then
  pout=$(echo "$m" | promtool check metrics 2>&1)
  check "promtool accepts it" '[ $? -eq 0 ]' "$pout"
else
  skip "promtool accepts it" "promtool not installed"
fi
out=$(curl -s $D/api/serve)
check "the head's /api/serve has node-1's counts by status" \
  'echo "$out" | grep -q "\"codes\":{\"200\":5}" && echo "$out" | grep -q "\"requests\":5"' "$out"
if command -v node >/dev/null 2>&1; then
  html=$(timeout 30 node tests/sh/dashboard_dom.js "$D" /serve 2000 2>&1)
  check "the head's /serve page shows node-1's deployment, its requests and its node" \
    'echo "$html" | grep -q "<tr data-id=\"node-1/echo\"><td class=\"name\">echo</td><td class=\"route\">/echo</td><td class=\"replicas\">2</td>" &&
     echo "$html" | grep -q "<td class=\"answered\">5</td>" && echo "$html" | grep -q "<td class=\"node\">node-1</td>"' "$html"
else
  skip "the head's /serve page shows node-1's deployment, its requests and its node" "node not installed"
fi

# The serve driver dies: node-1 stops its ingress and the head forgets it.
kill -9 $KILL
wait $KILL 2>/dev/null
KILL=
poll 50 '[ "$(curl -s $D/api/serve)" = "{\"deployments\":[]}" ]'
out=$(curl -s $D/api/serve)
check "a killed serve driver's deployments leave the head's /api/serve" '[ "$out" = "{\"deployments\":[]}" ]' "$out"
m=$(curl -s $D/metrics)
check "... and the head's /metrics" \
  '! echo "$m" | grep -q "^tide_serve_" && echo "$m" | grep -q "^tide_nodes 2"' "$(echo "$m" | grep tide_serve)"
plan

#!/bin/sh
# A serve application attached to a head (`tide serve run --address`): its
# ingress runs in the head, so the head's /metrics and dashboard (/api/serve,
# the /serve page) show its deployments. Real requests with curl, then the
# counts there must be exactly those sent; when the serve driver is killed,
# the head stops its ingress and frees the port. TAP output.
cd "$(dirname "$0")/../.."
. tests/sh/lib.sh
head_session servehead 23000
SP=$((PORT + 2000))
D=http://127.0.0.1:$DPORT

if ! command -v curl >/dev/null 2>&1; then
  skip "serve on the head's dashboard" "curl not installed"
  plan
  exit 0
fi

out=$($T start --head --num-cpus 2 --port $PORT --dashboard-port $DPORT 2>&1)
check "a head starts with its dashboard" '[ "$(cat $TIDE_SESSION_DIR/dashboard.port 2>/dev/null)" = $DPORT ]' "$out"
out=$(curl -s $D/api/serve)
check "/api/serve: no deployments before a serve app attaches" '[ "$out" = "{\"deployments\":[]}" ]' "$out"

cat > "$W/app.lua" <<'LUA'
local serve = require("tide.serve")
serve.run({
  serve.deployment{name = "echo", route = "/echo", num_replicas = 2,
    call = function(self, req) return {got = req.body} end},
  serve.deployment{name = "made", route = "/made",
    call = function(self, req) return serve.response{status = 201, body = "made"} end},
})
LUA
$T serve run --address local --port $SP "$W/app.lua" > "$W/serve.log" 2>&1 &
KILL=$!
serve_listening "$W/serve.log"
check "tide serve run --address: the ingress runs in the node it attached to" \
  'grep -q "listening on http://127.0.0.1:$SP (in the node this driver is attached to)" "$W/serve.log"' \
  "$(cat $W/serve.log)"
# The replicas start after the listening line: wait for both of echo's.
for i in $(seq 1 100); do
  curl -s $D/api/serve | grep -q '"name":"echo"[^}]*"replicas":2' && break
  sleep 0.1
done

# Real requests through the ingress: 7 to echo, 3 to made, 2 to no route.
bad=0
for i in 1 2 3 4 5 6 7; do
  c=$(curl -s -o /dev/null -w '%{http_code}' -d "hello $i" http://127.0.0.1:$SP/echo)
  [ "$c" = 200 ] || bad="$bad echo:$c"
done
for i in 1 2 3; do
  c=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$SP/made/x)
  [ "$c" = 201 ] || bad="$bad made:$c"
done
for i in 1 2; do curl -s -o /dev/null http://127.0.0.1:$SP/nothing-here; done
check "the ingress answers 7 echo (200) and 3 made (201) requests" '[ "$bad" = 0 ]' "$bad $(cat $W/serve.log)"
check "its access log is the head's stderr (node.log)" \
  '[ "$(grep -c "\"POST /echo HTTP/1.1\" 200 " "$TIDE_SESSION_DIR/node.log")" = 7 ]' "$(tail -5 $TIDE_SESSION_DIR/node.log)"

m=$(curl -s $D/metrics)
check "the head's /metrics counts the requests by deployment, route and code, exactly" \
  'echo "$m" | grep -qx "tide_serve_requests_total{deployment=\"echo\",route=\"/echo\",code=\"200\"} 7" &&
   echo "$m" | grep -qx "tide_serve_requests_total{deployment=\"made\",route=\"/made\",code=\"201\"} 3" &&
   [ "$(echo "$m" | grep -c "^tide_serve_requests_total{")" = 2 ]' "$(echo "$m" | grep tide_serve)"
check "the head's /metrics has a latency histogram per deployment and route" \
  'echo "$m" | grep -qx "tide_serve_request_duration_seconds_count{deployment=\"echo\",route=\"/echo\"} 7" &&
   echo "$m" | grep -qx "tide_serve_request_duration_seconds_bucket{deployment=\"made\",route=\"/made\",le=\"+Inf\"} 3" &&
   echo "$m" | grep -q "^# TYPE tide_serve_request_duration_seconds histogram"' "$(echo "$m" | grep duration)"
check "the head's /metrics has replicas and queue per deployment" \
  'echo "$m" | grep -qx "tide_serve_replicas{deployment=\"echo\",route=\"/echo\"} 2" &&
   echo "$m" | grep -qx "tide_serve_replicas{deployment=\"made\",route=\"/made\"} 1" &&
   echo "$m" | grep -qx "tide_serve_queued_requests{deployment=\"echo\",route=\"/echo\"} 0" &&
   echo "$m" | grep -qx "tide_serve_ongoing_requests{deployment=\"echo\",route=\"/echo\"} 0"' "$(echo "$m" | grep tide_serve)"
check "the engine's metrics are still there beside them" 'echo "$m" | grep -q "^tide_nodes 1"' "$(echo "$m" | head -5)"
if command -v promtool >/dev/null 2>&1; then
  pout=$(echo "$m" | promtool check metrics 2>&1)
  check "promtool accepts the head's /metrics with serve in it" '[ $? -eq 0 ]' "$pout"
else
  skip "promtool accepts the head's /metrics with serve in it" "promtool not installed"
fi

# req/s counts whole seconds: wait for the second of the requests to end.
sleep 1.1
j=$(curl -s $D/api/serve)
echo "$j" > "$W/serve.json"
check "/api/serve: each deployment with replicas, counts by status, p50/p99 and req/s" \
  'node -e "
    const j = JSON.parse(require(\"fs\").readFileSync(process.argv[1], \"utf8\"));
    const e = j.deployments.find((d) => d.name === \"echo\"), m = j.deployments.find((d) => d.name === \"made\");
    const ok = j.deployments.length === 2 && e.route === \"/echo\" && e.replicas === 2 && e.codes[\"200\"] === 7 &&
      m.codes[\"201\"] === 3 && e.requests === 7 && e.errors === 0 && e.queued === 0 &&
      e.p50_ms > 0 && e.p99_ms >= e.p50_ms && e.rate > 0 && e.rate <= 1.0;
    process.exit(ok ? 0 : 1);" "$W/serve.json" 2>/dev/null ||
   { ! command -v node >/dev/null && grep -q "\"codes\":{\"200\":7}" "$W/serve.json"; }' "$j"

out=$(curl -s -o /dev/null -w '%{http_code}' $D/serve)
check "the dashboard serves the /serve page" '[ "$out" = 200 ]' "$out"
if command -v node >/dev/null 2>&1; then
  html=$(timeout 30 node tests/sh/dashboard_dom.js "$D" /serve 2000 2>&1)
  check "the /serve page shows each deployment's replicas and requests" \
    'echo "$html" | grep -q "<tr data-id=\"echo\"><td class=\"name\">echo</td><td class=\"route\">/echo</td><td class=\"replicas\">2</td>" &&
     echo "$html" | grep -q "<td class=\"answered\">7</td>" && echo "$html" | grep -q "<td class=\"codes\">201: 3</td>" &&
     echo "$html" | grep -q "id=\"rate-chart\""' "$html"
else
  skip "the /serve page shows each deployment's replicas and requests" "node not installed"
fi

out=$($T serve status --port $SP 2>&1)
check "tide serve status asks the ingress in the head" 'echo "$out" | grep -q "\"echo\""' "$out"

# The driver dies without a word: the head stops the ingress it ran for it.
kill -9 $KILL
wait $KILL 2>/dev/null
KILL=
for i in $(seq 1 50); do [ "$(curl -s $D/api/serve)" = '{"deployments":[]}' ] && break; sleep 0.1; done
out=$(curl -s $D/api/serve)
check "a killed serve driver's ingress is stopped by the head" '[ "$out" = "{\"deployments\":[]}" ]' "$out"
c=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$SP/echo)
check "... and its port no longer answers" '[ "$c" = 000 ]' "$c"
check "... and the head says why" 'grep -q "the client that started the ingress .* is gone" "$TIDE_SESSION_DIR/node.log"' \
  "$(tail -5 $TIDE_SESSION_DIR/node.log)"

# The same port again, from a new driver.
$T serve run --address local --port $SP "$W/app.lua" > "$W/serve2.log" 2>&1 &
KILL=$!
serve_listening "$W/serve2.log"
check "a new serve run attaches and listens on the same port" 'grep -q "listening on http://127.0.0.1:$SP" "$W/serve2.log"' \
  "$(cat $W/serve2.log)"
kill $KILL
wait $KILL 2>/dev/null
KILL=
plan

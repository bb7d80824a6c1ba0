#!/bin/sh
# Seeing the cluster: tide list (every kind, filters, limits, JSON, bad
# input), tide logs (worker, actor, task, job; --follow; rotation by size),
# the head's /metrics (checked by promtool when installed) and the
# dashboard's JSON API, and who may ask (loopback, or the token from the
# cluster key; a keyless request from another address is refused).
cd "$(dirname "$0")/../.."
T=${TIDE_BIN:-$(pwd)/bin/tide}  # TIDE_BIN: another build (build/asan/tide)
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
no() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "# $(echo "$2" | head -20 | tr '\n' '|')"; }
check() { if eval "$2"; then ok "$1"; else no "$1" "$3"; fi; }
skip() { n=$((n + 1)); echo "ok $n - $1 # SKIP $2"; }
export TIDE_SESSION_DIR=$(mktemp -d /tmp/tide-obs-test-XXXXXX)
W=$(mktemp -d /tmp/tide-obs-work-XXXXXX)
trap '$T stop >/dev/null 2>&1; rm -rf "$W" "$TIDE_SESSION_DIR"' EXIT
# The machine's own non-loopback address: a request from it is not from loopback.
ADDR=$(hostname -I 2>/dev/null | awk '{print $1}')
PORT=$((21000 + $$ % 1000))
DPORT=$((22000 + $$ % 1000))

out=$(TIDE_LOG_MAX_BYTES=20000 $T start --head --num-cpus 2 --port $PORT --dashboard-port $DPORT --dashboard-host 0.0.0.0 2>&1)
check "a head starts with its dashboard on the port asked for" \
  'echo "$out" | grep -q "node started" && [ "$(cat $TIDE_SESSION_DIR/dashboard.port)" = $DPORT ] &&
   [ "$(stat -c %a $TIDE_SESSION_DIR/dashboard.token)" = 600 ]' "$out $(cat $TIDE_SESSION_DIR/node.log)"
D=http://127.0.0.1:$DPORT

# A driver that leaves things to see, then waits until told to end.
cat > "$W/drv.lua" <<'LUA'
local tide = require("tide")
local A = tide.actor({ping = function(self) print("PING from actor"); return 1 end})
local as = {}
for i = 1, 5 do as[i] = A:options({name = "obs" .. i}):remote() end
for i = 1, 5 do tide.get(as[i]:ping()) end
local bad = tide.remote(function() print("before the boom"); error("boom in a task") end)
pcall(tide.get, bad:remote())
local hog = tide.remote({num_cpus = 2}, function() tide.sleep(60) end)
local h = hog:remote()
tide.sleep(0.5)
local one = tide.remote({num_cpus = 1}, function() return 2 end)
local r = one:remote()
local dep = tide.remote(function(x) return x end)
local r2 = dep:remote(r)
local keep = tide.put(string.rep("x", 200000))
local f = io.open(arg[1] .. "/ready", "w"); f:write("ready"); f:close()
while not io.open(arg[1] .. "/done") do tide.sleep(0.1) end
tide.cancel(h, {force = true})
LUA
$T run --address local "$W/drv.lua" "$W" > "$W/drv.out" 2>&1 &
DRV=$!
for i in $(seq 1 200); do [ -f "$W/ready" ] && break; sleep 0.1; done
check "the driver set things up" '[ -f "$W/ready" ]' "$(cat $W/drv.out)"

out=$($T list actors 2>&1)
check "list actors: a table of the five, ALIVE, with names" \
  '[ "$(echo "$out" | grep -c " ALIVE .*obs[1-5]")" = 5 ] && echo "$out" | head -1 | grep -q "^ACTOR_ID"' "$out"
out=$($T list actors --filter name=obs3 --json 2>&1)
check "list --filter name=obs3 --json: one row, JSON, matched 1 of 5" \
  'echo "$out" | grep -q "\"name\":\"obs3\"" && echo "$out" | grep -q "\"matched\":1," &&
   echo "$out" | grep -q "\"total\":5,"' "$out"
out=$($T list actors --filter state=ALIVE --filter name=obs9 2>&1)
check "two filters must both match (none here, said)" 'echo "$out" | grep -q "no actors match the filters"' "$out"
out=$($T list actors --limit 2 2>"$W/err"); err=$(cat "$W/err")
check "--limit 2 shows 2 rows and says 2 of 5 were shown" \
  '[ "$(echo "$out" | grep -c ALIVE)" = 2 ] && echo "$err" | grep -q "2 of 5 matching actors shown"' "$out $err"
out=$($T list actors --limit 2 --offset 4 2>&1)
check "--offset 4 pages to the last one" '[ "$(echo "$out" | grep -c ALIVE)" = 1 ]' "$out"
out=$($T list tasks 2>&1)
check "list tasks: the running one, with node and pid" \
  'echo "$out" | grep "RUNNING" | grep -q "node-0 *[0-9]"' "$out"
check "list tasks: a queued one says it waits for resources" \
  'echo "$out" | grep "QUEUED" | grep -q "resources: waiting for CPU = 1"' "$out"
check "list tasks: one waiting on its argument says so" \
  'echo "$out" | grep "WAITING_DEPS" | grep -q "dependencies: 1 argument not ready"' "$out"
out=$($T list tasks --filter state=FAILED --json 2>&1)
check "list tasks: the failed one keeps its error and remote traceback" \
  'echo "$out" | grep -q "boom in a task" && echo "$out" | grep -q "\"traceback\":\"stack traceback:" &&
   echo "$out" | grep -q "\"error_kind\":\"TaskError\""' "$out"
ftask=$(echo "$out" | sed -n 's/.*"task_id":"\([0-9a-f]*\)".*/\1/p' | head -1)
out=$($T list objects --filter where=shm 2>&1)
check "list objects: the 200 KB one, in shared memory" 'echo "$out" | grep -q "READY *2000[0-9][0-9] *shm"' "$out"
out=$($T list nodes --json 2>&1)
check "list nodes: the head, alive, with its resources" \
  'echo "$out" | grep -q "\"node_id\":\"node-0\"" && echo "$out" | grep -q "\"resources\":{\"CPU\":2"' "$out"
out=$($T list placement-groups 2>&1)
check "list placement-groups: none, said" 'echo "$out" | grep -q "no placement-groups"' "$out"
out=$($T list jobs 2>&1)
check "list jobs: none, said" 'echo "$out" | grep -q "no jobs"' "$out"

# Bad input: a clear error, never a traceback.
out=$($T list bogus 2>&1); st=$?
check "an unknown kind is a usage error naming the kinds" \
  '[ $st = 2 ] && echo "$out" | grep -q "unknown kind bogus (nodes, actors"' "$out"
out=$($T list tasks --filter nope=1 2>&1); st=$?
check "a filter on an unknown field names the fields" \
  '[ $st = 1 ] && echo "$out" | grep -q "unknown filter key .nope. for tasks; known keys: task_id"' "$out"
out=$($T list tasks --filter state 2>&1); st=$?
check "--filter without = is a usage error" '[ $st = 2 ] && echo "$out" | grep -q "needs key=value"' "$out"
out=$($T list tasks --limit 0 2>&1); st=$?
check "--limit 0 is a usage error" '[ $st = 2 ] && echo "$out" | grep -q "positive number"' "$out"
out=$($T logs task zz 2>&1); st=$?
check "logs with a malformed id says what an id is" '[ $st = 1 ] && echo "$out" | grep -q "16 hex digits"' "$out"

# Logs: a task's worker, an actor's, a worker's, a job's.
out=$($T logs task "$ftask" 2>&1)
check "logs task ID: the output of the worker the failed task ran in" \
  '[ -n "$ftask" ] && echo "$out" | grep -q "before the boom"' "$ftask: $out"
aid=$($T list actors --filter name=obs2 --json | sed -n 's/.*"actor_id":"\([0-9a-f]*\)".*/\1/p')
wid=$($T list actors --filter name=obs2 --json | sed -n 's/.*"worker_id":"\([0-9a-f]*\)".*/\1/p')
out=$($T logs actor "$aid" 2>&1)
check "logs actor ID: its worker's output" 'echo "$out" | grep -q "PING from actor"' "$aid: $out"
out=$($T logs worker "$wid" --tail 1 2>&1)
check "logs worker ID --tail 1: the last line only" \
  '[ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q "PING from actor"' "$wid: $out"
check "worker output is kept per process in the session's logs/" \
  '[ -f "$TIDE_SESSION_DIR/logs/worker-$wid.out" ] && [ "$(stat -c %a "$TIDE_SESSION_DIR/logs/worker-$wid.out")" = 600 ]'

# /metrics and the JSON API, from loopback.
m=$(curl -s $D/metrics)
check "/metrics: actors, tasks by state, store bytes, jobs" \
  'echo "$m" | grep -q "^tide_actors{state=\"alive\"} 5$" && echo "$m" | grep -q "^tide_tasks{state=\"queued\"} 1$" &&
   echo "$m" | grep -q "^tide_object_store_used_bytes{node=\"node-0\"" && echo "$m" | grep -q "^tide_jobs{status=\"running\"} 0$" &&
   echo "$m" | grep -q "^tide_tasks_failed_total [1-9]"' "$m"
if command -v promtool >/dev/null 2>&1; then
  pout=$(echo "$m" | promtool check metrics 2>&1); pst=$?
  check "promtool check metrics accepts /metrics" '[ $pst = 0 ]' "$pout"
else
  skip "promtool check metrics accepts /metrics" "promtool not installed (Debian prometheus)"
fi
out=$(curl -s "$D/api/list/actors?filter=name%3Dobs4&limit=5")
check "/api/list/actors filters on the head like tide list" \
  'echo "$out" | grep -q "\"name\":\"obs4\"" && echo "$out" | grep -q "\"matched\":1,"' "$out"
out=$(curl -s -w "%{http_code}" "$D/api/list/bogus")
check "/api/list of an unknown kind: 400 with the reason" 'echo "$out" | grep -q "unknown kind.*400$"' "$out"
out=$(curl -s -w "%{http_code}" -X POST "$D/metrics")
check "only GET: 405" 'echo "$out" | grep -q "405$"' "$out"

# From another address: refused without the token, answered with it.
TOK=$(cat "$TIDE_SESSION_DIR/dashboard.token")
if [ -n "$ADDR" ] && [ "${ADDR#127.}" = "$ADDR" ]; then
  out=$(curl -s -w "%{http_code}" "http://$ADDR:$DPORT/metrics")
  check "a keyless request from another address is refused (403)" \
    'echo "$out" | grep -q "403$" && ! echo "$out" | grep -q tide_actors' "$out"
  out=$(curl -s -w "%{http_code}" -H "Authorization: Bearer 0000$(echo $TOK | cut -c5-)" "http://$ADDR:$DPORT/metrics")
  check "a wrong token is refused (403)" 'echo "$out" | grep -q "403$"' "$out"
  out=$(curl -s -w "%{http_code}" -H "Authorization: Bearer $TOK" "http://$ADDR:$DPORT/metrics")
  check "the token from the cluster key is let in" 'echo "$out" | grep -q "^tide_actors" && echo "$out" | grep -q "200$"' "$out"
  out=$(curl -s -w "%{http_code}" "http://$ADDR:$DPORT/api/list/nodes?token=$TOK")
  check "the token in the query (a browser's first page) is let in" 'echo "$out" | grep -q "node-0.*200$"' "$out"
else
  skip "requests from another address" "no non-loopback address on this machine"
fi

# tide.metrics: user code's own, exported by the same /metrics.
cat > "$W/um.lua" <<'LUA'
local tide = require("tide")
local work = tide.remote(function(i)
  local m = tide.metrics
  m.counter("app_items_total", {help = "Items done."}):inc(2, {stage = "parse"})
  m.gauge("app_depth"):set(7)
  m.histogram("app_latency_seconds", {buckets = {0.1, 1}}):observe(i == 1 and 0.05 or 0.5, {route = "/q"})
  return true
end)
tide.get({work:remote(1), work:remote(2), work:remote(3)})
tide.metrics.counter("app_items_total"):inc(1, {stage = "driver"})
print("BAD", pcall(tide.metrics.counter, "bad name"))
print("NEG", pcall(function() tide.metrics.counter("app_c"):inc(-1) end))
print("LE", pcall(tide.metrics.histogram, "app_h", {labels = {le = "1"}}))
LUA
out=$($T run --address local "$W/um.lua" 2>&1)
m=$(curl -s $D/metrics)
check "tide.metrics from tasks and an attached driver: counters add up, gauges set, histograms bucket" \
  'echo "$m" | grep -q "^app_items_total{stage=\"parse\"} 6$" && echo "$m" | grep -q "^app_items_total{stage=\"driver\"} 1$" &&
   echo "$m" | grep -q "^app_depth 7$" && echo "$m" | grep -q "^app_latency_seconds_bucket{route=\"/q\",le=\"0.1\"} 1$" &&
   echo "$m" | grep -q "^app_latency_seconds_bucket{route=\"/q\",le=\"+Inf\"} 3$" &&
   echo "$m" | grep -q "^app_latency_seconds_count{route=\"/q\"} 3$" && echo "$m" | grep -q "^# TYPE app_latency_seconds histogram"' "$out $m"
check "tide.metrics refuses a bad name, a counter going down, a histogram label le" \
  'echo "$out" | grep -q "BAD	false	.*not a valid metric name" && echo "$out" | grep -q "NEG	false	.*only goes up" &&
   echo "$out" | grep -q "LE	false	.*label named le"' "$out"
if command -v promtool >/dev/null 2>&1; then
  pout=$(echo "$m" | promtool check metrics 2>&1); pst=$?
  check "promtool accepts /metrics with user metrics" '[ $pst = 0 ]' "$pout"
else
  skip "promtool accepts /metrics with user metrics" "promtool not installed"
fi
cat > "$W/emb.lua" <<'LUA'
local tide = require("tide")
tide.metrics.gauge("app_local", {help = "kept here"}):set(3, {k = "v"})
io.write(tide.metrics.text())
LUA
out=$(env -u TIDE_ADDRESS $T run "$W/emb.lua" 2>&1)
check "an embedded driver keeps its metrics and renders them (tide.metrics.text)" \
  'echo "$out" | grep -q "^app_local{k=\"v\"} 3$"' "$out"

# A real Prometheus server scrapes the head and answers a query about it.
if command -v prometheus >/dev/null 2>&1; then
  PPORT=$((24000 + $$ % 1000))
  cat > "$W/prom.yml" <<YML
global: {scrape_interval: 1s}
scrape_configs:
  - job_name: tide
    static_configs: [{targets: ["127.0.0.1:$DPORT"]}]
YML
  prometheus --config.file="$W/prom.yml" --storage.tsdb.path="$W/tsdb" --web.listen-address=127.0.0.1:$PPORT \
    >"$W/prom.log" 2>&1 &
  PROM=$!
  q=""
  for i in $(seq 1 60); do
    q=$(curl -s "http://127.0.0.1:$PPORT/api/v1/query?query=tide_actors%7Bstate%3D%22alive%22%7D" 2>/dev/null)
    echo "$q" | grep -q '"value":\[[0-9.]*,"5"\]' && break
    sleep 0.5
  done
  up=$(curl -s "http://127.0.0.1:$PPORT/api/v1/query?query=up%7Bjob%3D%22tide%22%7D")
  kill $PROM 2>/dev/null; wait $PROM 2>/dev/null
  check "Prometheus scrapes the head: up is 1 and tide_actors{state=alive} is 5" \
    'echo "$q" | grep -q "\"value\":\[[0-9.]*,\"5\"\]" && echo "$up" | grep -q "\"value\":\[[0-9.]*,\"1\"\]"' \
    "$q $up $(tail -5 $W/prom.log)"
else
  skip "Prometheus scrapes the head" "prometheus not installed (Debian prometheus)"
fi

touch "$W/done"
wait $DRV

# Rotation by size: TIDE_LOG_MAX_BYTES=20000 on this head.
# The task prints a line, writes past the limit, waits for the rotation,
# and prints another: its slice has both, from the rotated part and the
# current one.
cat > "$W/loud.lua" <<'LUA'
local tide = require("tide")
local loud = tide.remote(function(logs)
  print("MARK before the rotation")
  for i = 1, 600 do io.write(string.format("line %04d %s\n", i, string.rep("y", 60))) end
  io.flush()
  local wid = tide.get_runtime_context().worker_id
  local file = string.format("%s/worker-%016x.out.1", logs, tonumber(wid:match("%d+$")))
  for _ = 1, 100 do
    local f = io.open(file)
    if f then f:close() break end
    tide.sleep(0.1)
  end
  print("MARK after the rotation")
  return wid .. " TASK " .. tide.get_runtime_context().task_id
end)
print("WID", tide.get(loud:remote(arg[1])))
LUA
$T run --address local "$W/loud.lua" "$TIDE_SESSION_DIR/logs" >"$W/loud.out" 2>&1
for i in $(seq 1 40); do ls "$TIDE_SESSION_DIR"/logs/*.out.1 >/dev/null 2>&1 && break; sleep 0.2; done
big=$(grep -l "line 0600" "$TIDE_SESSION_DIR"/logs/*.out* 2>/dev/null | head -1)
check "a worker log past TIDE_LOG_MAX_BYTES is rotated to .1 and emptied" \
  'ls "$TIDE_SESSION_DIR"/logs/*.out.1 >/dev/null 2>&1 && [ -n "$big" ] &&
   [ $(stat -c %s "${big%.1}") -lt 20000 ]' "$(ls -la $TIDE_SESSION_DIR/logs) $(cat $W/loud.out)"
ltask=$(sed -n 's/.* TASK \([0-9a-f]*\)$/\1/p' "$W/loud.out")
out=$($T logs task "$ltask" 2>&1)
check "tide logs task: a slice has the prints in the rotated part and in the current one" \
  '[ "$(echo "$out" | grep -c "MARK")" = 2 ] && echo "$out" | head -1 | grep -q "MARK before" &&
   echo "$out" | tail -1 | grep -q "MARK after"' "$ltask: $out $(cat $W/loud.out)"

# A job's logs, followed to its end.
cat > "$W/job.lua" <<'LUA'
for i = 1, 3 do print("job line " .. i); require("tide").sleep(0.3) end
LUA
jid=$($T submit "$W/job.lua" | sed -n 's/^submitted //p')
out=$(timeout 20 $T logs job "$jid" --follow 2>&1)
check "logs job ID --follow prints the job's output until it ends" \
  'echo "$out" | grep -q "job line 3"' "$jid: $out"
out=$($T list jobs --filter status=SUCCEEDED 2>&1)
check "list jobs --filter status=SUCCEEDED shows it" 'echo "$out" | grep -q "$jid"' "$out"
m=$(curl -s $D/metrics)
check "/metrics counts it" 'echo "$m" | grep -q "^tide_jobs{status=\"succeeded\"} 1$"' "$m"

$T stop >/dev/null 2>&1
out=$($T start --head --port 0 --dashboard-port off 2>&1)
check "--dashboard-port off: no dashboard" \
  'echo "$out" | grep -q "node started" && [ ! -f "$TIDE_SESSION_DIR/dashboard.port" ]' "$out"
$T stop >/dev/null 2>&1
out=$($T start --head --dashboard-port 99999 2>&1); st=$?
check "--dashboard-port 99999 is a usage error" '[ $st = 2 ] && echo "$out" | grep -q "dashboard-port needs"' "$out"
echo "1..$n"

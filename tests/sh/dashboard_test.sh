#!/bin/sh
# The dashboard in a real browser: headless Chromium loads each page from a
# live head, its DOM must show the numbers `tide list --json` gives, and a
# screenshot of each page is kept in build/dashboard-PAGE.png. Without
# Chromium (Debian chromium) those checks are a SKIP; the training and data
# pages are then loaded in Node with a minimal DOM (tests/sh/dashboard_dom.js)
# when node is installed. First, without a browser: a driver attached to the
# head runs train.fit and a tide.data pipeline, whose series reach the
# head's history (/api/series, at most one publish a second) and /metrics.
cd "$(dirname "$0")/../.."
T=${TIDE_BIN:-$(pwd)/bin/tide}  # TIDE_BIN: another build (build/asan/tide)
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
no() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "# $(echo "$2" | head -c 600 | tr '\n' '|')"; }
check() { if eval "$2"; then ok "$1"; else no "$1" "$3"; fi; }
skip() { n=$((n + 1)); echo "ok $n - $1 # SKIP $2"; }
PAGES="overview nodes actors tasks objects placement-groups jobs"
CHROME=$(command -v chromium || command -v chromium-browser || command -v google-chrome)
export TIDE_SESSION_DIR=$(mktemp -d /tmp/tide-dash-test-XXXXXX)
W=$(mktemp -d /tmp/tide-dash-work-XXXXXX)
trap '$T stop >/dev/null 2>&1; rm -rf "$W" "$TIDE_SESSION_DIR"' EXIT
DPORT=$((23000 + $$ % 1000))
$T start --head --num-cpus 2 --port 0 --dashboard-port $DPORT >"$W/start" 2>&1
D=http://127.0.0.1:$DPORT
mkdir -p build

# The page's DOM after its scripts ran, and a screenshot of it (Chromium);
# without Chromium, for the training and data pages, the DOM app.js makes in
# Node (tests/sh/dashboard_dom.js).
dom() {
  url="$D/$1"; [ "$1" = overview ] && url="$D/"
  timeout 60 "$CHROME" --headless=new --no-sandbox --disable-gpu --virtual-time-budget=4000 \
    --dump-dom "$url" 2>/dev/null
  timeout 60 "$CHROME" --headless=new --no-sandbox --disable-gpu --virtual-time-budget=4000 \
    --window-size=1280,720 --screenshot="build/dashboard-$1.png" "$url" >/dev/null 2>&1
}
DOMTOOL=
if [ -n "$CHROME" ]; then DOMTOOL=Chromium; elif command -v node >/dev/null 2>&1; then DOMTOOL=Node; fi
page_dom() {
  if [ "$DOMTOOL" = Chromium ]; then dom "$1"; else timeout 30 node tests/sh/dashboard_dom.js "$D" "/$1" 2000 2>&1; fi
}

# Before any run: no series, and the pages say so.
out=$(curl -s "$D/api/series?prefix=tide_train_")
check "/api/series before any run: no series" 'echo "$out" | grep -q "\"series\":\[\]"' "$out"
if [ -n "$DOMTOOL" ]; then
  html=$(page_dom training)
  check "the training page in $DOMTOOL before any run: the empty text" \
    'echo "$html" | grep -q "id=\"empty\"[^>]*>No training run has reported to this head yet: runs report when train.fit runs in a driver attached with --address"' "$html"
  html=$(page_dom data)
  check "the data page in $DOMTOOL before any run: the empty text" \
    'echo "$html" | grep -q "id=\"empty\"[^>]*>No data pipeline has reported to this head yet"' "$html"
else
  skip "the training and data pages' empty text" "neither chromium nor node installed"
fi

# A training run (1000 reports over about 2 s) and a two-stage pipeline,
# from a driver attached to the head; it reads /api/series back itself.
cat > "$W/train.lua" <<'LUA'
local tide = require("tide")
local train, data = require("tide.train"), require("tide.data")
local httpc = require("tide.http")
local port = tonumber(arg[1])
local r = train.fit({name = "dash-run", num_workers = 1, progress = false, config = {steps = 1000},
  loop = function(ctx, cfg)
    for step = 1, cfg.steps do
      ctx:report({step = step, loss = 10 / step, tokens = step * 64})
      if step % 10 == 0 then require("tide").sleep(0.02) end
    end
  end})
print(string.format("TRAIN step=%d reports=%d wall=%.2f", r.metrics.step, #r.history, r.wall_s))
local ds = data.range(20000, {num_blocks = 8}):map(function(row) return {id = row.id, sq = row.id * row.id} end)
  :repartition(4)
print("DATA rows=" .. ds:count({name = "dash-pipe", progress = false}))
local function series(prefix)
  local res = httpc.request(port, "GET", "/api/series?prefix=" .. prefix)
  assert(res.status == 200 and res.json, res.body)
  return res.json.series
end
local function find(list, name, labels)
  for _, s in ipairs(list) do
    local ok = s.name == name
    for k, v in pairs(labels) do if s.labels[k] ~= v then ok = false end end
    if ok then return s end
  end
end
local function last(s) return s and s.points[#s.points] and s.points[#s.points][2] end
local tr = series("tide_train_")
local step = find(tr, "tide_train_step", {run = "dash-run"})
print(string.format("STEP points=%d last=%s wall=%d", step and #step.points or -1, tostring(last(step)),
  math.floor(r.wall_s)))
print("LOSS last=" .. tostring(last(find(tr, "tide_train_metric", {run = "dash-run", key = "loss"}))))
local tps = last(find(tr, "tide_train_tokens_per_second", {run = "dash-run"}))
print("TPS positive=" .. tostring(type(tps) == "number" and tps > 0))
print("RUNNING last=" .. tostring(last(find(tr, "tide_train_running", {run = "dash-run"}))))
local only = true
for _, s in ipairs(tr) do if s.name:sub(1, 11) ~= "tide_train_" then only = false end end
print("ONLY_TRAIN " .. tostring(only))
local dd = series("tide_data_")
for _, st in ipairs({"1 range->map", "2 repartition(4)"}) do
  local l = {pipeline = "dash-pipe", stage = st}
  local rate = last(find(dd, "tide_data_rows_per_second", l))
  print(string.format("STAGE %s rows=%s inflight=%s rate_positive=%s", st:gsub(" ", "_"),
    tostring(last(find(dd, "tide_data_rows_out", l))), tostring(last(find(dd, "tide_data_in_flight", l))),
    tostring(type(rate) == "number" and rate > 0)))
end
print("PIPE running=" .. tostring(last(find(dd, "tide_data_running", {pipeline = "dash-pipe"}))))
-- The history's bounds, on a store of its own: 3 series of 5 points.
local M = require("tide.metrics")
local S = M._store()
local clock = 0
local H = M._history(S, {max_series = 3, max_points = 5, clock = function() clock = clock + 1; return clock end})
for i = 1, 12 do H.op("gauge", "tide_train_step", "", {run = "a"}, "set", i) end
local a = H.series("tide_train_")[1]
print(string.format("RING points=%d first=%s t=%s last=%s", #a.points, a.points[1][2], a.points[1][1], a.points[5][2]))
H.op({{"gauge", "tide_train_step", "", {run = "b"}, "set", 1}, {"gauge", "tide_train_step", "", {run = "c"}, "set", 1}})
H.op("gauge", "tide_data_rows_out", "", {pipeline = "p", stage = "1 x"}, "set", 5)
H.op("gauge", "app_other", "", {}, "set", 1)
local names = {}
for _, s in ipairs(H.series("")) do names[#names + 1] = s.name .. "/" .. (s.labels.run or s.labels.pipeline) end
print("BOUND " .. table.concat(names, ",") .. " a_in_text=" .. tostring(S.text():find('run="a"') ~= nil)
  .. " other_in_text=" .. tostring(S.text():find("app_other 1") ~= nil))
LUA
$T run --address local "$W/train.lua" $DPORT >"$W/train.out" 2>&1
tout=$(cat "$W/train.out")
check "an attached driver ran train.fit (1000 reports) and a two-stage tide.data pipeline" \
  'echo "$tout" | grep -q "^TRAIN step=1000 reports=1000" && echo "$tout" | grep -q "^DATA rows=20000$"' "$tout"
pts=$(echo "$tout" | sed -n 's/^STEP points=\(-*[0-9]*\) .*/\1/p'); wall=$(echo "$tout" | sed -n 's/^STEP .* wall=\([0-9]*\)$/\1/p')
check "/api/series: tide_train_step{run=dash-run} ends at 1000, one point a second at most ($pts points in $wall s)" \
  'echo "$tout" | grep -q "^STEP points=[0-9]* last=1000 " && [ "$pts" -ge 2 ] && [ "$pts" -le $((wall + 2)) ]' "$tout"
check "/api/series: the loss, tokens/s and the run's end (running 0); only tide_train_* for that prefix" \
  'echo "$tout" | grep -q "^LOSS last=0.01$" && echo "$tout" | grep -q "^TPS positive=true$" &&
   echo "$tout" | grep -q "^RUNNING last=0$" && echo "$tout" | grep -q "^ONLY_TRAIN true$"' "$tout"
check "/api/series: each stage's rows out (20000), rows/s, nothing in flight at the end" \
  'echo "$tout" | grep -q "^STAGE 1_range->map rows=20000 inflight=0 rate_positive=true$" &&
   echo "$tout" | grep -q "^STAGE 2_repartition(4) rows=20000 inflight=0 rate_positive=true$" &&
   echo "$tout" | grep -q "^PIPE running=0$"' "$tout"
check "the history keeps the last 5 points of a series and 3 series, dropping the oldest (from /metrics too)" \
  'echo "$tout" | grep -q "^RING points=5 first=8 t=8 last=12$" &&
   echo "$tout" | grep -q "^BOUND tide_data_rows_out/p,tide_train_step/b,tide_train_step/c a_in_text=false other_in_text=true$"' "$tout"
m=$(curl -s $D/metrics)
check "/metrics: the run's and the pipeline's gauges" \
  'echo "$m" | grep -q "^tide_train_step{run=\"dash-run\"} 1000$" &&
   echo "$m" | grep -q "^tide_train_metric{key=\"loss\",run=\"dash-run\"} 0.01$" &&
   echo "$m" | grep -q "^tide_train_tokens_per_second{run=\"dash-run\"} [0-9]" &&
   echo "$m" | grep -q "^# TYPE tide_train_step gauge$" &&
   echo "$m" | grep -q "^tide_data_rows_out{pipeline=\"dash-pipe\",stage=\"2 repartition(4)\"} 20000$" &&
   echo "$m" | grep -q "^tide_data_rows_per_second{pipeline=\"dash-pipe\",stage=\"1 range->map\"} [0-9]"' "$m"
if command -v promtool >/dev/null 2>&1; then
  pout=$(echo "$m" | promtool check metrics 2>&1); pst=$?
  check "promtool accepts /metrics with the training and data gauges" '[ $pst = 0 ]' "$pout"
fi
if [ -n "$DOMTOOL" ]; then
  html=$(page_dom training)
  check "the training page in $DOMTOOL: the run, its last step 1000, its loss, a loss chart" \
    'echo "$html" | grep -q "<tr data-id=\"dash-run\"><td class=\"run\">dash-run</td>" &&
     echo "$html" | grep -q "<td class=\"step\">1000</td>" && echo "$html" | grep -q "data-key=\"loss\">0.0100<" &&
     echo "$html" | grep -q "id=\"loss-chart\"" && echo "$html" | grep -q "<polyline"' "$html"
  html=$(page_dom data)
  check "the data page in $DOMTOOL: the pipeline, each stage's 20000 rows out, a rows/s chart" \
    'echo "$html" | grep -q ">dash-pipe<" && echo "$html" | grep -q "<td class=\"stage\">1 range-&gt;map</td><td class=\"rows\">20000</td>" &&
     echo "$html" | grep -q "<td class=\"stage\">2 repartition(4)</td><td class=\"rows\">20000</td>" &&
     echo "$html" | grep -q "id=\"rate-chart-0\""' "$html"
else
  skip "the training and data pages" "neither chromium nor node installed"
fi
if [ -z "$CHROME" ]; then
  for p in $PAGES; do skip "the $p page in Chromium" "chromium not installed"; done
  echo "1..$n"
  exit 0
fi

cat > "$W/drv.lua" <<'LUA'
local tide = require("tide")
local A = tide.actor({ping = function(self) return 1 end})
local as = {}
for i = 1, 6 do as[i] = A:options({name = "dash" .. i, lifetime = "detached"}):remote() end
for i = 1, 6 do tide.get(as[i]:ping()) end
local bad = tide.remote(function() error("dashboard boom") end)
pcall(tide.get, bad:remote())
local pg = tide.placement_group({{CPU = 1}})
tide.get(pg:ready())
local keep = {tide.put(string.rep("x", 100000)), tide.put("small")}
local f = io.open(arg[1] .. "/ready", "w"); f:write("ready"); f:close()
while not io.open(arg[1] .. "/done") do tide.sleep(0.1) end
LUA
$T run --address local "$W/drv.lua" "$W" >"$W/drv.out" 2>&1 &
DRV=$!
for i in $(seq 1 200); do [ -f "$W/ready" ] && break; sleep 0.1; done
printf 'print("job ran")\n' > "$W/job.lua"
$T submit "$W/job.lua" >/dev/null
sleep 1

# The number `tide list --json` says matched (with optional filters).
matched() { $T list "$@" --json 2>/dev/null | sed -n 's/.*"matched":\([0-9]*\).*/\1/p'; }
num() { echo "$1" | sed -n "s/.*id=\"$2\">\([0-9]*\)<.*/\1/p" | head -1; }

for p in $PAGES; do
  html=$(dom $p)
  case $p in
    overview)
      want_a=$(matched actors --filter state=ALIVE); want_f=$(matched tasks --filter state=FAILED)
      got_a=$(num "$html" count-actors); got_f=$(num "$html" count-failed)
      check "the overview page in Chromium: $got_a actors alive and $got_f failed tasks, as tide list says" \
        '[ -n "$got_a" ] && [ "$got_a" = "$want_a" ] && [ "$got_a" = 6 ] && [ "$got_f" = "$want_f" ] &&
         echo "$html" | grep -q "<polyline"' "$want_a/$want_f $html" ;;
    *)
      want=$(matched $p); got=$(num "$html" matched); rows=$(echo "$html" | grep -o '<tr data-id=' | wc -l)
      extra=true
      [ $p = tasks ] && extra='echo "$html" | grep -q "dashboard boom"'
      [ $p = actors ] && extra='echo "$html" | grep -q ">dash3<"'
      [ $p = jobs ] && extra='echo "$html" | grep -q "SUCCEEDED"'
      check "the $p page in Chromium: $got rows matching, $rows shown, as tide list says" \
        '[ -n "$got" ] && [ "$got" = "$want" ] && [ "$rows" = "$want" ] && [ "$want" -ge 1 ] && eval "$extra"' \
        "want $want got $got rows $rows: $html" ;;
  esac
done
touch "$W/done"
wait $DRV
echo "# screenshots: build/dashboard-*.png"
echo "1..$n"

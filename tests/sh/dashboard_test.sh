#!/bin/sh
# The dashboard in a real browser. Without a browser first: a driver
# attached to the head runs train.fit and tide.data pipelines, whose series
# reach the head's history (/api/series, at most one publish a second; a
# pipeline shorter than a second still two points) and /metrics. Then, with
# a live cluster busy (actors, running, queued and failed tasks, objects, a
# placement group, a job), headless Chromium (Debian chromium) loads every
# page the dashboard's menu lists, driven by Node over Chromium's DevTools
# pipe (tests/sh/dashboard_browser.js: one browser for all pages), and each
# page's DOM must show the numbers `tide list --json` gives; a failed task's
# traceback and a job's output are opened by clicking, as a user would. The
# pages' DOMs and screenshots are kept in the artifacts directory the test
# prints (TIDE_TEST_ARTIFACTS to choose it). Without Chromium (or Node)
# those checks are a SKIP; the training and data pages are then loaded in
# Node with a minimal DOM (tests/sh/dashboard_dom.js) when node is installed.
cd "$(dirname "$0")/../.."
. tests/sh/lib.sh
T=${TIDE_BIN:-$(pwd)/bin/tide}  # TIDE_BIN: another build (build/asan/tide)
# TIDE_TEST_CHROMIUM: another browser, or empty for none (the checks without one).
CHROME=${TIDE_TEST_CHROMIUM-$(command -v chromium || command -v chromium-browser || command -v google-chrome)}
NODE=$(command -v node)
W=$(mktemp -d /tmp/tide-dash-test-XXXXXX)
ART=${TIDE_TEST_ARTIFACTS:-$W/artifacts}
export TIDE_SESSION_DIR=$W/session
mkdir -p "$TIDE_SESSION_DIR" "$ART"
# Every browser's process group (its pid file) is ended whatever happens;
# all of $W but the artifacts goes.
endchrome() { for f in "$ART"/*/chrome.pid; do [ -f "$f" ] && kill -9 -"$(cat "$f")" 2>/dev/null; done; }
trap 'endchrome; $T stop >/dev/null 2>&1; [ -d "$ART/pages" ] && cp "$TIDE_SESSION_DIR/node.log" "$ART/"; find "$W" -mindepth 1 -maxdepth 1 ! -name artifacts -exec rm -rf {} +; rmdir "$ART" "$W" 2>/dev/null' EXIT
DPORT=$((23000 + $$ % 1000))
$T start --head --num-cpus 2 --port 0 --dashboard-port $DPORT >"$W/start" 2>&1
D=http://127.0.0.1:$DPORT

# The pages, as the menu lists them: "overview" for /.
PAGES=$(sed -n 's|.*<a href="/\([a-z-]*\)">.*|\1|p' stdlib/tide/dashboard/index.html | sed 's/^$/overview/')
path_of() { if [ "$1" = overview ]; then echo /; else echo "/$1"; fi; }

# browse RUN: loads the pages listed in $W/RUN.spec (NAME<tab>PATH[<tab>CLICK
# <tab>UNTIL]) in one Chromium; DOMs and screenshots into $ART/RUN/.
browse() {
  timeout -k 5 90 "$NODE" tests/sh/dashboard_browser.js "$CHROME" "$D" "$W/$1.spec" "$ART/$1" \
    --width 1280 --height 900 >"$ART/$1.log" 2>&1
}
BROWSER=
if [ -n "$CHROME" ] && [ -n "$NODE" ]; then BROWSER=Chromium; fi
# page_dom RUN PAGE: the page's DOM after its scripts ran (Chromium's, or
# without it app.js's in Node for the training and data pages).
page_dom() {
  if [ -n "$BROWSER" ]; then cat "$ART/$1/$2.html" 2>/dev/null
  else timeout 30 "$NODE" tests/sh/dashboard_dom.js "$D" "/$2" 2000 2>&1; fi
}
DOMTOOL=$BROWSER
[ -z "$DOMTOOL" ] && [ -n "$NODE" ] && DOMTOOL=Node

# The training and data pages' checks, on $html drawn by $1.
training_checks() {
  check "the training page in $1: the run, its last step 1000, its loss, a loss chart" \
    'echo "$html" | grep -q "<tr data-id=\"dash-run\"><td class=\"run\">dash-run</td>" &&
     echo "$html" | grep -q "<td class=\"step\">1000</td>" && echo "$html" | grep -q "data-key=\"loss\">0.0100<" &&
     echo "$html" | grep -q "id=\"loss-chart\"" && echo "$html" | grep -q "<polyline"' "$html"
}
data_checks() {
  check "the data page in $1: the pipelines, each stage's 20000 rows out, a rows/s chart" \
    'echo "$html" | grep -q ">dash-pipe<" && echo "$html" | grep -q ">dash-short<" &&
     echo "$html" | grep -q "<td class=\"stage\">1 range-&gt;map</td><td class=\"rows\">20000</td>" &&
     echo "$html" | grep -q "<td class=\"stage\">2 repartition(4)</td><td class=\"rows\">20000</td>" &&
     echo "$html" | grep -q "id=\"rate-chart-0\""' "$html"
}

# Before any run: no series, and the pages say so.
out=$(curl -s "$D/api/series?prefix=tide_train_")
check "/api/series before any run: no series" 'echo "$out" | grep -q "\"series\":\[\]"' "$out"
if [ -n "$DOMTOOL" ]; then
  printf 'training\t/training\ndata\t/data\n' >"$W/empty.spec"
  [ -n "$BROWSER" ] && browse empty
  html=$(page_dom empty training)
  check "the training page in $DOMTOOL before any run: the empty text" \
    'echo "$html" | grep -q "id=\"empty\"[^>]*>No training run has reported to this head yet: runs report when train.fit runs in a driver attached with --address"' "$html"
  html=$(page_dom empty data)
  check "the data page in $DOMTOOL before any run: the empty text" \
    'echo "$html" | grep -q "id=\"empty\"[^>]*>No data pipeline has reported to this head yet"' "$html"
else
  skip "the training and data pages' empty text" "neither chromium nor node installed"
fi

# A training run (1000 reports over about 2 s), a two-stage pipeline and a
# short one, from a driver attached to the head; it reads /api/series back
# itself.
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
-- A pipeline shorter than a second: published when it starts and at its
-- end, so its chart still has a line.
print("SHORT rows=" .. data.range(100):map(function(row) return row end):count({name = "dash-short", progress = false}))
dd = series("tide_data_")
for _, n in ipairs({"tide_data_rows_out", "tide_data_rows_per_second", "tide_data_running"}) do
  local s = find(dd, n, n == "tide_data_running" and {pipeline = "dash-short"} or
    {pipeline = "dash-short", stage = "1 range->map"})
  local p = s and s.points or {}
  print(string.format("SHORT %s points=%d first=%s last=%s", n, #p, tostring(p[1] and p[1][2]),
    tostring(p[#p] and p[#p][2])))
end
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
check "/api/series: a pipeline shorter than a second has two points or more (its start and its end)" \
  'echo "$tout" | grep -q "^SHORT rows=100$" &&
   echo "$tout" | grep -q "^SHORT tide_data_rows_out points=[2-9] first=0 last=100$" &&
   echo "$tout" | grep -Eq "^SHORT tide_data_rows_per_second points=[2-9] first=0 last=[1-9]" &&
   echo "$tout" | grep -q "^SHORT tide_data_running points=[2-9] first=1 last=0$"' "$tout"
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

if [ -z "$BROWSER" ]; then
  if [ -n "$NODE" ]; then
    html=$(page_dom x training); training_checks Node
    html=$(page_dom x data); data_checks Node
  else
    skip "the training and data pages" "neither chromium nor node installed"
  fi
  why="chromium not installed"; [ -n "$CHROME" ] && why="node not installed (it drives Chromium)"
  for p in $PAGES; do skip "the $p page in Chromium" "$why"; done
  plan
  exit 0
fi

# Work to see: six detached actors, a failed task, a placement group (one
# CPU), a large and a small object, a task holding the other CPU until the
# test is done, two queued behind it and one waiting for its result; and a
# job that ran.
cat > "$W/drv.lua" <<'LUA'
local tide = require("tide")
local dir = arg[1]
local A = tide.actor({ping = function(self) return 1 end})
local as = {}
for i = 1, 6 do as[i] = A:options({name = "dash" .. i, lifetime = "detached"}):remote() end
for i = 1, 6 do tide.get(as[i]:ping()) end
local bad = tide.remote(function() error("dashboard boom") end)
pcall(tide.get, bad:remote())
local pg = tide.placement_group({{CPU = 1}})
tide.get(pg:ready())
local keep = {tide.put(string.rep("x", 100000)), tide.put("small")}
local hold = tide.remote(function(d)
  while not io.open(d .. "/done") do tide.sleep(0.1) end
  return 1
end)
local held = {hold:remote(dir), hold:remote(dir), hold:remote(dir)}
local echo = tide.remote(function(x) return x end)
local dep = echo:remote(held[1])
-- Refs dropped so far are given back now, so the objects stay as they are
-- while the pages are compared with tide list.
collectgarbage(); collectgarbage()
local f = io.open(dir .. "/ready", "w"); f:write("ready"); f:close()
while not io.open(dir .. "/done") do tide.sleep(0.1) end
tide.get(dep)
print("DRIVER kept " .. #keep .. " objects and " .. #held .. " tasks")
LUA
$T run --address local "$W/drv.lua" "$W" >"$W/drv.out" 2>&1 &
DRV=$!
printf 'print("job ran")\n' > "$W/job.lua"
$T submit "$W/job.lua" >"$W/submit.out" 2>&1

# The JSON `tide list` gives; the number it says matched; a field of its first row.
lj() { $T list "$@" --json 2>/dev/null; }
matched() { lj "$@" | sed -n 's/.*"matched":\([0-9]*\).*/\1/p'; }
field() { sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\).*/\1/p" | head -1; }
# Waits until the workload is in place: the actors, one task running, a
# failed one kept, the job ended.
for i in $(seq 1 150); do
  [ -f "$W/ready" ] && [ "$(matched tasks --filter state=RUNNING)" = 1 ] &&
    [ "$(matched jobs --filter status=SUCCEEDED)" = 1 ] && break
  sleep 0.2
done
# A DOM's table rows, one a line; a number the page shows by element id.
rows() { echo "$1" | tr '\n' ' ' | sed 's/<tr /\n<tr /g; s/<\/tr>/<\/tr>\n/g' | grep '^<tr data-id='; }
num() { echo "$1" | sed -n "s/.*id=\"$2\">\([0-9]*\)<.*/\1/p" | head -1; }
# Bytes as the page writes them (app.js human()).
human() { awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u, " "); i = 1
  while (b >= 1024 && i < 5) { b /= 1024; i++ }
  if (i == 1) printf "%d B", b; else printf (b < 10 ? "%.2f %s" : "%.1f %s"), b, u[i] }'; }

# Every page in one browser; the failed task's row and the job's row are
# clicked for the traceback and the output.
FAILED_ID=$(lj tasks --filter state=FAILED --limit 1 | field task_id)
JOB_ID=$(lj jobs --limit 1 | field id)
for p in $PAGES; do
  case $p in
    tasks) printf 'tasks\t/tasks\ttr[data-id="%s"]\ttr.detail pre\n' "$FAILED_ID" ;;
    jobs) printf 'jobs\t/jobs\ttr[data-id="%s"]\t#log:not(:empty)\n' "$JOB_ID" ;;
    *) printf '%s\t%s\n' "$p" "$(path_of $p)" ;;
  esac
done >"$W/pages.spec"
t0=$(date +%s)
browse pages; brc=$?
secs=$(($(date +%s) - t0))
check "Chromium loaded every page ($(echo $PAGES | wc -w)) in $secs s, clicks included" '[ $brc = 0 ]' "$(cat "$ART/pages.log")"
G="$ART/pages"
for p in $PAGES; do
  html=$(cat "$G/$p.html" 2>/dev/null)
  case $p in
    overview)
      want="$(matched nodes) $(matched actors --filter state=ALIVE) $(matched tasks --filter state=RUNNING)"
      want="$want $(($(matched tasks --filter state=QUEUED) + $(matched tasks --filter state=WAITING_DEPS)))"
      want="$want $(matched tasks --filter state=FAILED) $(matched placement-groups --filter state=CREATED)"
      want="$want $(matched jobs --filter status=RUNNING) $(matched objects)"
      got=$(for c in nodes actors running queued failed pgs jobs objects; do printf '%s ' "$(num "$html" count-$c)"; done)
      used=$(human "$(lj nodes --limit 1 | field store_used)")
      check "the overview in Chromium: nodes, actors alive, tasks running, waiting, failed, placement groups, jobs running, objects ($got) as tide list says; the store bar; the chart's legend" \
        '[ "$got" = "$want " ] && [ "${want% *}" = "1 6 1 3 1 1 0" ] &&
         echo "$html" | grep -q ">$used / " && echo "$html" | grep -q "<polyline" &&
         echo "$html" | grep -q ">running 1</text>" && echo "$html" | grep -q ">waiting 3</text>"' "want $want, store $used: $html" ;;
    nodes)
      r=$(rows "$html" | grep '^<tr data-id="node-0"'); n0=$(lj nodes --limit 1)
      used=$(human "$(echo "$n0" | field store_used)"); cap=$(human "$(echo "$n0" | field store_capacity)")
      na=$(echo "$n0" | field actors); nr=$(echo "$n0" | field tasks_running)
      check "the nodes page in Chromium: node-0 alive with $na actors, $nr task running, store $used of $cap, as tide list says" \
        '[ "$(num "$html" matched)" = "$(matched nodes)" ] && [ "$na" = 6 ] &&
         echo "$r" | grep -q ">ALIVE</td><td class=\"\">[0-9]*</td><td class=\"\">$na</td><td class=\"\">$nr</td>" &&
         echo "$r" | grep -q ">$used<" && echo "$r" | grep -q ">$cap<"' "$r" ;;
    actors)
      r=$(rows "$html" | grep ">dash3<"); pid=$(lj actors --filter name=dash3 | field pid)
      check "the actors page in Chromium: $(num "$html" matched) actors, all shown, as tide list says; dash3 alive in pid $pid" \
        '[ "$(num "$html" matched)" = "$(matched actors)" ] && [ "$(rows "$html" | wc -l)" = "$(matched actors)" ] &&
         echo "$r" | grep -q "class=\"state-ALIVE\">ALIVE<" && echo "$r" | grep -q "<td class=\"\">$pid</td>"' "$html" ;;
    tasks)
      all=$(rows "$html")
      nrun=$(echo "$all" | grep -c '>RUNNING<'); nq=$(echo "$all" | grep -c '>QUEUED<')
      nd=$(echo "$all" | grep -c '>WAITING_DEPS<'); nf=$(echo "$all" | grep -c '>FAILED<')
      check "the tasks page in Chromium: $nrun running, $nq queued, $nd waiting for arguments, $nf failed, as tide list says; why they wait" \
        '[ "$(num "$html" matched)" = "$(matched tasks)" ] && [ "$nrun" = "$(matched tasks --filter state=RUNNING)" ] &&
         [ "$nq" = "$(matched tasks --filter state=QUEUED)" ] && [ "$nq" = 2 ] &&
         [ "$nd" = "$(matched tasks --filter state=WAITING_DEPS)" ] && [ "$nd" = 1 ] &&
         [ "$nf" = "$(matched tasks --filter state=FAILED)" ] &&
         echo "$all" | grep ">QUEUED<" | grep -q "resources: waiting for CPU" &&
         echo "$all" | grep ">WAITING_DEPS<" | grep -q "dependencies: 1 argument not ready"' "$html"
      d=$(echo "$html" | tr '\n' '~' | sed -n 's/.*<tr class="detail">\(.*\)<\/pre>.*/\1/p' | tr '~' '\n')
      check "the tasks page in Chromium: clicking the failed task shows its error and remote traceback" \
        'echo "$d" | grep -q "error: .*dashboard boom" && echo "$d" | grep -q "remote traceback:" &&
         echo "$d" | grep -q "in function .error." && echo "$d" | grep -q "drv.lua:"' "$d" ;;
    objects)
      r=$(rows "$html" | grep ">97.7 KiB<"); oid=$(echo "$r" | sed -n 's/^<tr data-id="\([0-9a-f]*\)".*/\1/p')
      o=$(lj objects --filter object_id="$oid"); where=$(echo "$o" | field where); size=$(echo "$o" | field size)
      check "the objects page in Chromium: $(num "$html" matched) objects as tide list says; the large one ($oid: $size bytes) in $where" \
        '[ "$(num "$html" matched)" = "$(matched objects)" ] && [ -n "$oid" ] && [ "$(human "$size")" = "97.7 KiB" ] &&
         [ -n "$where" ] && echo "$r" | grep -q ">$where<" && echo "$r" | grep -q "class=\"state-READY\""' "$o $r" ;;
    placement-groups)
      r=$(rows "$html" | grep 'state-CREATED'); st=$(lj placement-groups --filter state=CREATED | field strategy)
      check "the placement groups page in Chromium: $(num "$html" matched) as tide list says, one created ($st)" \
        '[ "$(num "$html" matched)" = "$(matched placement-groups)" ] && [ "$(echo "$r" | grep -c .)" = 1 ] &&
         echo "$r" | grep -q ">$st<"' "$html" ;;
    jobs)
      r=$(rows "$html" | grep "data-id=\"$JOB_ID\"")
      check "the jobs page in Chromium: job $JOB_ID SUCCEEDED as tide list says; clicking it shows its output" \
        '[ -n "$JOB_ID" ] && [ "$(num "$html" matched)" = "$(matched jobs)" ] &&
         echo "$r" | grep -q ">$(lj jobs --limit 1 | field status)<" && echo "$r" | grep -q ">SUCCEEDED<" &&
         echo "$html" | grep -q "<pre id=\"log\">[^<]*job ran"' "$html" ;;
    training) training_checks Chromium ;;
    data) data_checks Chromium ;;
    *)
      check "the $p page in Chromium: drawn (or its empty text), no error shown" \
        '{ echo "$html" | grep -q "id=\"status\"[^>]*>updated " || echo "$html" | grep -q "id=\"empty\""; } &&
         ! echo "$html" | grep -q "id=\"error\"[^>]*>[^<]"' "$html" ;;
  esac
  errs=$(cat "$G/$p.errors" 2>/dev/null)
  check "the $p page in Chromium: no script error; a screenshot" \
    '[ -f "$G/$p.errors" ] && [ -z "$errs" ] && [ "$(head -c 4 "$G/dashboard-$p.png" | tail -c 3)" = PNG ] &&
     [ "$(wc -c <"$G/dashboard-$p.png")" -gt 10000 ]' "$errs"
done
# What is left of the browser's process group (zombies not yet reaped by
# init are dead already).
g=$(cat "$G/chrome.pid" 2>/dev/null)
left=$(ps -eo pgid=,stat=,pid=,args= | awk -v g="$g" '$1 == g && $2 !~ /^Z/')
check "no Chromium process is left (process group $g)" '[ -n "$g" ] && [ -z "$left" ]' "$left"
touch "$W/done"
wait $DRV
# Under TIDE_BIN=build/asan/tide: what the head and its workers did for
# the browser, clean.
san=$(grep -A8 -E "Sanitizer|runtime error" "$TIDE_SESSION_DIR/node.log" "$TIDE_SESSION_DIR"/logs/* 2>/dev/null)
check "the head's and the workers' logs have no sanitizer report" '[ -z "$san" ]' "$san"
echo "# screenshots, page DOMs and the head's node.log: $ART"
plan

#!/bin/sh
# Screenshots of every dashboard page for docs/observability.md: starts a
# head of its own, gives it work a user would have (a training run with a
# loss curve, a data pipeline of two stages, actors alive and dead, tasks
# running, queued, waiting for an argument and failed, one with a
# traceback and one infeasible, objects, placement groups created and
# pending, jobs that ended and one that runs, a serve application answering
# a stream of curl requests), then loads each page the dashboard's menu lists in headless
# Chromium (tests/sh/dashboard_browser.js, 1280x900) and writes
# OUT_DIR/dashboard-PAGE.png, made smaller by pngquant or optipng when
# installed.
#
#   sh scripts/dashboard-shots.sh [OUT_DIR]     (default docs/img)
#
# Needs chromium, node and curl (Debian chromium, nodejs, curl); takes about
# a minute.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${1:-docs/img}
T=$(pwd)/bin/tide
CHROME=$(command -v chromium || command -v chromium-browser || command -v google-chrome)
NODE=$(command -v node)
if [ -z "$CHROME" ] || [ -z "$NODE" ] || ! command -v curl >/dev/null 2>&1; then
  echo "dashboard-shots: needs chromium, node and curl (apt-get install chromium nodejs curl)" >&2
  exit 2
fi
[ -x "$T" ] || { echo "dashboard-shots: no $T: run make first" >&2; exit 2; }
W=$(mktemp -d /tmp/tide-shots-XXXXXX)
export TIDE_SESSION_DIR=$W/session
mkdir -p "$TIDE_SESSION_DIR" "$OUT"
DRV= SRV= LOAD=
cleanup() {
  [ -f "$W/shots/chrome.pid" ] && kill -9 -"$(cat "$W/shots/chrome.pid")" 2>/dev/null
  touch "$W/done"
  [ -n "$LOAD" ] && wait "$LOAD"
  [ -n "$SRV" ] && kill "$SRV" 2>/dev/null && wait "$SRV"
  [ -n "$DRV" ] && wait "$DRV"
  $T stop >/dev/null 2>&1
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
$T start --head --num-cpus 4 --port 0 --dashboard-port 0 >"$W/start.log" 2>&1 ||
  { cat "$W/start.log" >&2; exit 1; }
D=http://127.0.0.1:$(cat "$TIDE_SESSION_DIR/dashboard.port")

# A training run (about 15 s, one point a second on the head) and a
# pipeline (a few seconds), one after the other.
cat >"$W/history.lua" <<'LUA'
local tide = require("tide")
local train, data = require("tide.train"), require("tide.data")
train.fit({name = "gpt-tiny-sft", num_workers = 2, progress = false, config = {steps = 300},
  loop = function(ctx, cfg)
    local loss = 4.2
    for step = 1, cfg.steps do
      loss = loss * 0.99 + 0.02 * math.sin(step / 7) + 0.01
      ctx:report({step = step, loss = loss, lr = 3e-4 * math.min(1, step / 50), tokens = step * 8192})
      tide.sleep(0.05)
    end
  end})
data.range(40000, {num_blocks = 40})
  :map(function(row) return {id = row.id, text = string.rep("t", row.id % 50)} end)
  :map_batches(function(batch) tide.sleep(0.15); return batch end, {batch_size = 500, name = "tokenize"})
  :map_batches(function(batch) tide.sleep(0.1); return batch end, {batch_size = 1000, name = "embed", fuse = false})
  :count({name = "embed-corpus", progress = false})
LUA
$T run --address local "$W/history.lua" >"$W/history.log" 2>&1 || { cat "$W/history.log" >&2; exit 1; }

# What is alive now: kept until the screenshots are taken.
cat >"$W/live.lua" <<'LUA'
local tide = require("tide")
local dir = arg[1]
local function wait_done() while not io.open(dir .. "/done") do tide.sleep(0.2) end end
local Tokenizer = tide.actor({encode = function(self, s) return #s end})
local Ranker = tide.actor({score = function(self, x) return x end})
local toks, rankers = {}, {}
for i = 1, 4 do toks[i] = Tokenizer:options({name = "tokenizer-" .. i}):remote() end
for i = 1, 2 do rankers[i] = Ranker:options({name = "ranker-" .. i, namespace = "search"}):remote() end
for _, a in ipairs(toks) do tide.get(a:encode("x")) end
for _, a in ipairs(rankers) do tide.get(a:score(1)) end
local gone = Ranker:options({name = "ranker-old"}):remote()
tide.get(gone:score(1))
tide.kill(gone)
local parse = tide.remote({name = "parse_shard"}, function(path)
  local n = tonumber(path:match("%d+"))
  if n % 2 == 1 then error("shard " .. path .. ": bad record at line " .. n * 37) end
  return n
end)
for i = 1, 3 do pcall(tide.get, parse:remote("shard-" .. i .. ".jsonl")) end
local pg = tide.placement_group({{CPU = 1}, {CPU = 1}}, {strategy = "PACK", name = "trainer-bundles"})
tide.get(pg:ready())
tide.placement_group({{CPU = 8}}, {name = "too-big"})
local objs = {}
for i = 1, 6 do objs[i] = tide.put(string.rep("w", 50000 * i)) end
objs[#objs + 1] = tide.put({config = "small"})
local crawl = tide.remote({name = "crawl"}, function(d)
  while not io.open(d .. "/done") do tide.sleep(0.2) end
  return 1
end)
local running = {crawl:remote(dir), crawl:remote(dir)}
local queued = {crawl:remote(dir), crawl:remote(dir)}
local summarize = tide.remote({name = "summarize"}, function(x) return x end)
local waiting = summarize:remote(running[1])
local gpu = tide.remote({name = "finetune", num_gpus = 1}, function() return 1 end):remote()
local f = io.open(dir .. "/ready", "w"); f:write("ready"); f:close()
wait_done()
print(#queued, waiting, gpu)
LUA
$T run --address local "$W/live.lua" "$W" >"$W/live.log" 2>&1 &
DRV=$!
printf 'print("loading shards")\nfor i = 1, 3 do print("shard " .. i .. " done") end\n' >"$W/ingest.lua"
printf 'print("checking the index")\nerror("index is stale: rebuild it")\n' >"$W/check.lua"
printf 'local tide = require("tide")\nfor i = 1, 600 do print("indexed batch " .. i); tide.sleep(1) end\n' >"$W/index.lua"
for j in ingest check index; do $T submit "$W/$j.lua" >>"$W/jobs.log" 2>&1; done
for i in $(seq 1 150); do [ -f "$W/ready" ] && break; sleep 0.2; done
[ -f "$W/ready" ] || { echo "dashboard-shots: the workload did not start:" >&2; cat "$W/live.log" >&2; exit 1; }

# A serve application attached to the head, and curl asking it until the
# shots are taken: a chat route (2 replicas, 20-70 ms a request) and an
# embed route whose 10th, 20th and 30th requests fail (more would fill the
# tasks page's failures, which show the workload's own first).
cat >"$W/app.lua" <<'LUA'
local tide, serve = require("tide"), require("tide.serve")
serve.run({
  serve.deployment{name = "chat", route = "/v1/chat", num_replicas = 2,
    call = function(self, req) tide.sleep(0.02 + math.random() * 0.05); return {reply = "ok"} end},
  serve.deployment{name = "embed", route = "/v1/embed",
    call = function(self, req)
      if req.body == "bad" then error("cannot embed an empty document") end
      return {dim = 384}
    end},
})
LUA
$T serve run --address local --port 0 --access-log off "$W/app.lua" >"$W/serve.log" 2>&1 &
SRV=$!
for i in $(seq 1 150); do grep -q "listening on" "$W/serve.log" && break; sleep 0.2; done
SURL=$(sed -n 's|.*listening on \(http://[0-9.:]*\).*|\1|p' "$W/serve.log" | head -1)
[ -n "$SURL" ] || { echo "dashboard-shots: the serve app did not start:" >&2; cat "$W/serve.log" >&2; exit 1; }
(
  i=0
  while [ ! -f "$W/done" ]; do
    i=$((i + 1))
    curl -s -o /dev/null -d "hello $i" "$SURL/v1/chat"
    body=doc; [ $((i % 10)) = 0 ] && [ $i -le 30 ] && body=bad
    curl -s -o /dev/null -d "$body" "$SURL/v1/embed"
    sleep 0.05
  done
) &
LOAD=$!
sleep 2

# Each page, the failed task opened, a job's output shown; 8 s on each so
# the overview's chart has a few points.
FAILED=$($T list tasks --filter state=FAILED --filter name=parse_shard --limit 1 --json | sed -n 's/.*"task_id":"\([0-9a-f]*\)".*/\1/p')
JOB=$($T list jobs --filter status=RUNNING --limit 1 --json | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
sed -n 's|.*<a href="/\([a-z-]*\)">.*|\1|p' stdlib/tide/dashboard/index.html | sed 's/^$/overview/' | while read -r p; do
  case $p in
    overview) printf 'overview\t/\n' ;;
    tasks) printf 'tasks\t/tasks\ttr[data-id="%s"]\ttr.detail pre\n' "$FAILED" ;;
    jobs) printf 'jobs\t/jobs\ttr[data-id="%s"]\t#log:not(:empty)\n' "$JOB" ;;
    *) printf '%s\t/%s\n' "$p" "$p" ;;
  esac
done >"$W/pages.spec"
"$NODE" tests/sh/dashboard_browser.js "$CHROME" "$D" "$W/pages.spec" "$W/shots" \
  --width 1280 --height 900 --settle 8000 --parallel 3 || exit 1
for f in "$W"/shots/dashboard-*.png; do
  if command -v pngquant >/dev/null 2>&1; then pngquant --force --skip-if-larger --quality 65-90 --output "$f" "$f"
  elif command -v optipng >/dev/null 2>&1; then optipng -quiet -o2 "$f"; fi
  cp "$f" "$OUT/"
  echo "$OUT/$(basename "$f") $(wc -c <"$f") bytes"
done

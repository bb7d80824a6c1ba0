#!/bin/sh
# tide timeline: a known script's tasks and actor calls come out as Chrome
# trace events (valid JSON, the right names and counts, each run after its
# submission, an actor's calls in order, flows that pair up), --job keeps
# one job's work, and the ring is bounded (dropped counted) or off.
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
no() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "# $2"; }
check() { if eval "$2"; then ok "$1"; else no "$1" "$3"; fi; }
export TIDE_SESSION_DIR=$(mktemp -d /tmp/tide-timeline-test-XXXXXX)
rmdir "$TIDE_SESSION_DIR"
W=$(mktemp -d /tmp/tide-timeline-work-XXXXXX)
trap 'TIDE_SESSION_DIR="$W/n1" $T stop >/dev/null 2>&1; $T stop >/dev/null 2>&1; rm -rf "$W" "$TIDE_SESSION_DIR"' EXIT
PORT=$((23000 + $$ % 1000))

cat > "$W/known.lua" <<'LUA'
local tide = require("tide")
local sq = tide.remote(function(x) return x * x end):options({name = "square"})
local inner = tide.remote(function(x) tide.sleep(0.05); return x + 1 end):options({name = "inner"})
local outer = tide.remote(function(x) return tide.get(inner:remote(x)) * 2 end):options({name = "outer"})
local refs = {}
for i = 1, 6 do refs[i] = sq:remote(i) end
assert(table.concat(tide.get(refs), ",") == "1,4,9,16,25,36")
assert(tide.get(outer:remote(1)) == 4)
local C = tide.actor({init = function(s) s.n = 0 end, add = function(s, k) s.n = s.n + k; return s.n end})
local c = C:options({name = "ctr"}):remote()
local calls = {}
for i = 1, 3 do calls[i] = c:add(string.rep("x", i * 1000) and i) end
assert(tide.get(calls[3]) == 6)
-- A long name of 2-byte characters is cut at a character (the trace stays UTF-8).
tide.get(tide.remote(function() return 1 end):options({name = "x" .. string.rep("é", 40)}):remote())
local big = tide.remote(function(s) return #s end):options({name = "bigarg"})
assert(tide.get(big:remote(string.rep("y", 20000))) == 20000)
print("KNOWN OK")
LUA

out=$($T start --head --num-cpus 2 --port $PORT 2>&1)
check "a head starts" '[ $? -eq 0 ]' "$out"
out=$($T run --address local "$W/known.lua" 2>&1)
check "the known script runs" 'echo "$out" | grep -q "KNOWN OK"' "$out"
$T timeline > "$W/trace.json" 2> "$W/err"; st=$?
check "tide timeline exits 0" '[ $st -eq 0 ]' "$(cat "$W/err")"

cat > "$W/check.py" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ev = d["traceEvents"]
X = [e for e in ev if e["ph"] == "X"]
def names(n): return [e for e in X if e["name"] == n]
fails = []
def want(cond, msg):
    if not cond: fails.append(msg)
want(len(names("square")) == 6, "6 square runs, got %d" % len(names("square")))
want(len(names("outer")) == 1 and len(names("inner")) == 1, "one outer and one inner")
want(len(names("ctr.add")) == 3, "3 ctr.add calls, got %d" % len(names("ctr.add")))
want(len(names("ctr.new")) == 1, "the actor's creation, ctr.new")
want(len(names("x" + "\u00e9" * 21)) == 1, "the long name, cut after its 21st é (43 bytes), not inside the 22nd")
want(names("ctr.new")[0]["ts"] + names("ctr.new")[0]["dur"] <= min(e["ts"] for e in names("ctr.add")) + 1,
     "the actor is created before its calls run")
want(len(names("bigarg")) == 1 and names("bigarg")[0]["args"]["args_bytes"] >= 20000, "bigarg's args_bytes")
for e in X:
    for k in ("ts", "dur", "pid", "tid", "args"):
        want(k in e, "X event has %s" % k)
    want(e["dur"] >= 0 and e["args"]["queued_ms"] >= 0, "%s starts after its submission" % e["name"])
    want(e["tid"] > 0 and e["args"].get("worker_id"), "%s names its worker" % e["name"])
    want(e["args"]["ok"] is True, "%s ok" % e["name"])
# inner ran inside outer's run (outer waited for it), on another worker
o, i = names("outer")[0], names("inner")[0]
want(o["ts"] <= i["ts"] and i["ts"] + i["dur"] <= o["ts"] + o["dur"] + 1000, "inner nests in outer")
want(o["tid"] != i["tid"], "inner runs on another worker than outer")
want(i["dur"] >= 40000, "inner took its 50 ms sleep (%d us)" % i["dur"])
# an actor's calls: one worker, in call order, not overlapping
adds = sorted(names("ctr.add"), key=lambda e: e["ts"])
want(len(set(e["tid"] for e in adds)) == 1, "the calls run on one worker")
want(all(adds[k]["ts"] + adds[k]["dur"] <= adds[k + 1]["ts"] + 1 for k in range(len(adds) - 1)), "calls do not overlap")
# flows: every s has an f with the same id, f at its X's start
s = {e["id"]: e for e in ev if e["ph"] == "s"}
f = {e["id"]: e for e in ev if e["ph"] == "f"}
want(len(s) == len(X) and set(s) == set(f), "one flow per run")
want(all(s[k]["ts"] <= f[k]["ts"] for k in s), "flows go forward in time")
meta = [e for e in ev if e["ph"] == "M" and e["name"] == "thread_name"]
want(any(m["args"]["name"].startswith("worker pid") for m in meta), "worker tracks are named")
want(d["otherData"]["dropped"] == 0, "nothing dropped")
if fails:
    print("\n".join(fails)); sys.exit(1)
PY
out=$(python3 "$W/check.py" "$W/trace.json" 2>&1)
check "the trace is valid JSON with the known script's events (names, counts, nesting, order, flows)" '[ $? -eq 0 ]' "$out"

# --job: only that job's work.
cat > "$W/job.lua" <<'LUA'
local tide = require("tide")
local f = tide.remote(function(x) return x end):options({name = "jobtask"})
local r = {}
for i = 1, 4 do r[i] = f:remote(i) end
tide.get(r)
print("JOB OK")
LUA
jid=$($T submit "$W/job.lua" 2>&1 | grep -o 'job-[0-9-]*' | head -1)
for _ in $(seq 1 100); do $T job status "$jid" 2>/dev/null | grep -q SUCCEEDED && break; sleep 0.1; done
$T timeline --job "$jid" -o "$W/job.json" 2>"$W/err"; st=$?
out=$(python3 -c "
import json, sys
X = [e for e in json.load(open('$W/job.json'))['traceEvents'] if e['ph'] == 'X']
names = sorted(set(e['name'] for e in X))
print(len(X), names)
sys.exit(0 if len(X) == 4 and names == ['jobtask'] else 1)" 2>&1)
check "timeline --job keeps the job's 4 tasks and nothing else" '[ $st -eq 0 ] && [ -n "$jid" ]' "$jid $out $(cat "$W/err")"
out=$($T timeline --job job-nope 2>&1); st=$?
check "timeline --job with an unknown job fails naming it" '[ $st -eq 1 ] && echo "$out" | grep -q "no job job-nope"' "$out"
out=$($T timeline --jobs x 2>&1); st=$?
check "a bad flag is a usage error" '[ $st -eq 2 ] && echo "$out" | grep -q "unknown option --jobs"' "$out"
# A node joins: the head records the work it sends there on that node's track.
TIDE_SESSION_DIR="$W/n1" $T start --address 127.0.0.1:$PORT --key "$TIDE_SESSION_DIR/cluster.key" --num-cpus 1 \
  > "$W/n1.out" 2>&1
cat > "$W/remote.lua" <<'LUA'
local tide = require("tide")
local f = tide.remote(function(x) return x end):options({name = "remote", scheduling_strategy = {node_id = "node-1"}})
local r = {}
for i = 1, 3 do r[i] = f:remote(i) end
print("REMOTE", #tide.get(r))
LUA
out=$($T run --address local "$W/remote.lua" 2>&1)
$T timeline --local -o "$W/multi.json" 2>"$W/err"
res=$(python3 -c "
import json
X = [e for e in json.load(open('$W/multi.json'))['traceEvents'] if e['ph'] == 'X' and e['name'] == 'remote']
print(len(X), sorted(set((e['pid'], e['tid']) for e in X)))" 2>&1)
check "work sent to node-1 is on node-1's track (pid 1)" 'echo "$out" | grep -q "REMOTE	3" && [ "$res" = "3 [(1, 0)]" ]' \
  "$out $res $(cat "$W/n1.out" "$W/err")"
# Both nodes' runs on one clock: node-1's own 3 on its worker, the head's
# 3 on node-1's "sent" track, flow ids unique, node-1 running each after
# the head sent it (its runs lie within the head's view of them).
two_nodes() {
  python3 -c "
import json
d = json.load(open('$1'))
X = [e for e in d['traceEvents'] if e['ph'] == 'X' and e['name'] == 'remote']
own = [e for e in X if e['pid'] == 1 and e['tid'] != 0]
seen = [e for e in X if e['pid'] == 1 and e['tid'] == 0]
flows = [e['id'] for e in d['traceEvents'] if e['ph'] == 's']
ok = len(own) == 3 and len(seen) == 3 and len(flows) == len(set(flows)) and min(e['ts'] for e in X) >= 0
ok = ok and min(e['ts'] for e in own) + 2000 >= min(e['ts'] for e in seen)
ok = ok and sorted(d['otherData']['nodes']) == ['node-0', 'node-1']
print('ok' if ok else (len(own), len(seen), len(flows), len(set(flows)), d['otherData'].get('nodes')))" 2>&1
}
# On the head, without --local: node-1's own ring too, read there.
$T timeline -o "$W/cluster.json" 2>"$W/err"; st=$?
res=$(two_nodes "$W/cluster.json")
check "timeline on a head has every node's work: node-1's runs on its worker, read there, on the head's clock" \
  '[ $st -eq 0 ] && [ "$res" = ok ]' "$res $(cat "$W/err")"
# Each node keeps what it ran: node-1's own trace has the runs on its
# worker, and --merge puts both on one clock.
TIDE_SESSION_DIR="$W/n1" $T timeline --local -o "$W/n1.json" 2>"$W/err"
$T timeline --merge "$W/multi.json" "$W/n1.json" -o "$W/merged.json" 2>>"$W/err"; st=$?
res=$(two_nodes "$W/merged.json")
check "timeline --merge joins the head's and node-1's traces on one clock (3 runs seen by each, flow ids unique)" \
  '[ $st -eq 0 ] && [ "$res" = ok ]' "$res $(cat "$W/err")"
out=$($T timeline --merge 2>&1); st=$?
check "timeline --merge without files is a usage error" '[ $st -eq 2 ] && echo "$out" | grep -q "needs trace files"' "$out"
out=$($T timeline --merge "$W/n1.out" 2>&1); st=$?
check "timeline --merge of a file that is no trace says so" '[ $st -eq 1 ] && echo "$out" | grep -q "is not a trace of tide timeline"' "$out"
TIDE_SESSION_DIR="$W/n1" $T stop >/dev/null 2>&1
$T stop >/dev/null 2>&1

# The ring is bounded: the oldest records go and are counted.
cat > "$W/ring.lua" <<'LUA'
local tide = require("tide")
local f = tide.remote(function(x) return x end):options({name = "r"})
local r = {}
for i = 1, 10 do r[i] = f:remote(i) end
tide.get(r)
local ok, t = pcall(require("tide.timeline").trace)
if not ok then print("ERR", t) return end
local x = 0
for _, e in ipairs(t.traceEvents) do if e.ph == "X" then x = x + 1 end end
print("RING", x, t.otherData.dropped)
LUA
out=$(TIDE_TIMELINE_EVENTS=4 $T run --num-cpus 2 "$W/ring.lua" 2>&1)
check "a ring of 4 keeps the last 4 runs and counts 6 dropped" 'echo "$out" | grep -q "RING	4	6"' "$out"
out=$(TIDE_TIMELINE=0 $T run --num-cpus 2 "$W/ring.lua" 2>&1)
check "TIDE_TIMELINE=0 turns recording off, and tide.timeline says so" 'echo "$out" | grep -q "ERR.*recording is off"' "$out"
# The same on a daemon, through the CLI (the reason crosses the RPC).
S0=$(mktemp -d /tmp/tide-tl0-XXXXXX); rmdir "$S0"
TIDE_TIMELINE=0 TIDE_SESSION_DIR=$S0 $T start --head --port 0 --num-cpus 1 >/dev/null 2>&1
out=$(TIDE_SESSION_DIR=$S0 $T timeline -o "$W/off.json" 2>&1); st=$?
TIDE_SESSION_DIR=$S0 $T stop >/dev/null 2>&1; rm -rf "$S0"
check "tide timeline on a node with TIDE_TIMELINE=0 says recording is off (exit 1, no file)" \
  '[ $st -eq 1 ] && echo "$out" | grep -q "recording is off on this node" && [ ! -e "$W/off.json" ]' "$out"
echo "1..$n"

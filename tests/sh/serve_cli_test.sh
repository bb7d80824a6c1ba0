#!/bin/sh
# `tide serve run` and `tide serve status` as a user runs them: the contract
# app (examples/serve_app.lua) served in a subprocess, talked to with the
# project's own HTTP client (tests/lua/httpc.lua run as a script) and, when
# it is installed, with curl.  TAP output.
cd "$(dirname "$0")/../.."
P=18330
P2=18331
TIDE=bin/tide
tmp=$(mktemp -d)
n=0
pids=""
cleanup() {
  for p in $pids; do kill "$p" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT

ok() { n=$((n + 1)); echo "ok $n - $1"; }
notok() { n=$((n + 1)); echo "not ok $n - $1"; shift; for l in "$@"; do echo "# $l"; done; }
check() {  # check NAME CMD...: ok when CMD succeeds
  name=$1; shift
  if "$@" >"$tmp/out" 2>&1; then ok "$name"; else notok "$name" "$(head -c 600 "$tmp/out")"; fi
}
# http METHOD PORT PATH [BODY]: prints the status line then the body.
http() { $TIDE run tests/lua/httpc.lua "$@" 2>&1; }
wait_healthz() {  # wait_healthz PORT LOG
  i=0
  while [ $i -lt 100 ]; do
    if http GET "$1" /-/healthz 2>/dev/null | head -1 | grep -q '^200$'; then return 0; fi
    i=$((i + 1)); sleep 0.2
  done
  return 1
}
# listening HEXADDR PORT: a LISTEN socket on that address (in /proc/net/tcp form).
listening() {
  hp=$(printf '%04X' "$2")
  awk -v a="$1:$hp" '$2 == a && $4 == "0A" {f = 1} END {exit !f}' /proc/net/tcp
}

# -- Start the contract app ---------------------------------------------------------
$TIDE serve run --port $P examples/serve_app.lua >"$tmp/serve.log" 2>&1 &
spid=$!
pids="$pids $spid"
if wait_healthz $P; then ok "tide serve run examples/serve_app.lua answers /-/healthz"
else notok "tide serve run examples/serve_app.lua answers /-/healthz" "$(cat "$tmp/serve.log")"; fi

# The port answers from the moment it is bound; the line follows soon after.
for i in $(seq 50); do grep -q "listening on http://127.0.0.1:$P" "$tmp/serve.log" && break; sleep 0.1; done
if grep -q "listening on http://127.0.0.1:$P" "$tmp/serve.log"; then ok "it logs the address it listens on"
else notok "it logs the address it listens on" "$(cat "$tmp/serve.log")"; fi
# Malformed HTTP is logged too, with no request line.
if command -v python3 >/dev/null 2>&1; then
  python3 -c "import socket,sys; s=socket.create_connection(('127.0.0.1',$P)); s.sendall(b'GARBAGE\r\n\r\n'); s.recv(4096)"
  sleep 0.2
  if grep -q '^127\.0\.0\.1 - - \[.*\] "-" 400 ' "$tmp/serve.log"; then ok "a malformed request is in the access log as a 400"
  else notok "a malformed request is in the access log as a 400" "$(grep HTTP "$tmp/serve.log" | tail -3)"; fi
else ok "a malformed request is in the access log as a 400 # SKIP no python3"; fi

# -- The contract -----------------------------------------------------------------------
out=$(http POST $P /echo '{"x": 1}')
if [ "$(echo "$out" | head -1)" = 200 ] && echo "$out" | grep -q '"got":{"x":1}' &&
   echo "$out" | grep -q '"method":"POST"'; then ok "POST /echo returns the JSON it got"
else notok "POST /echo returns the JSON it got" "$out"; fi

out=$(http GET $P /count)
if [ "$out" = "$(printf '200\n1\n2\n3\n4\n5')" ]; then ok "GET /count streams 1..5"
else notok "GET /count streams 1..5" "$out"; fi

out=$(http POST $P /jobs/work '{"x": 21}')
id=$(echo "$out" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
if [ "$(echo "$out" | head -1)" = 202 ] && [ -n "$id" ]; then ok "POST /jobs/work answers 202 with a job id"
else notok "POST /jobs/work answers 202 with a job id" "$out"; fi

i=0; job=""
while [ $i -lt 50 ] && [ -n "$id" ]; do
  job=$(http GET $P "/jobs/$id")
  echo "$job" | grep -q '"status":"succeeded"' && break
  i=$((i + 1)); sleep 0.2
done
if echo "$job" | grep -q '"status":"succeeded"' && echo "$job" | grep -q '"answer":42' &&
   echo "$job" | grep -q '"progress":1'; then ok "GET /jobs/<id> resolves to succeeded with the result"
else notok "GET /jobs/<id> resolves to succeeded with the result" "$job"; fi

out=$(http DELETE $P /jobs/job-0000000000000000)
if [ "$(echo "$out" | head -1)" = 404 ]; then ok "DELETE of an unknown job is a 404"
else notok "DELETE of an unknown job is a 404" "$out"; fi

out=$(http GET $P /nowhere)
if [ "$(echo "$out" | head -1)" = 404 ]; then ok "unknown paths are 404"
else notok "unknown paths are 404" "$out"; fi

out=$(http GET $P /-/routes)
if echo "$out" | grep -q '"\\*/echo":"echo"' && echo "$out" | grep -q 'jobs'; then ok "/-/routes lists the routes"
else notok "/-/routes lists the routes" "$out"; fi

out=$(http GET $P /-/metrics)
if echo "$out" | grep -q '^tide_serve_requests_total{deployment="echo",route="/echo",code="200"} [1-9]' &&
   echo "$out" | grep -q '^tide_serve_request_duration_seconds_count{deployment="echo",route="/echo"} [1-9]' &&
   echo "$out" | grep -q '^tide_serve_replicas{deployment="echo",route="/echo"} 2$'; then
  ok "/-/metrics counts requests per deployment, route and status, with a latency histogram"
else notok "/-/metrics counts requests per deployment, route and status, with a latency histogram" "$out"; fi
if command -v promtool >/dev/null 2>&1; then
  pout=$(curl -s http://127.0.0.1:$P/-/metrics | promtool check metrics 2>&1)
  if [ $? -eq 0 ]; then ok "promtool accepts /-/metrics"; else notok "promtool accepts /-/metrics" "$pout"; fi
else
  ok "promtool accepts /-/metrics # SKIP promtool not installed"
fi

# -- tide serve status ---------------------------------------------------------------------
out=$($TIDE serve status --port $P 2>&1); rc=$?
if [ $rc -eq 0 ] && echo "$out" | grep -q '"echo":{"route":"\\*/echo","replicas":2' &&
   echo "$out" | grep -q '"count"' && echo "$out" | grep -q '"jobs"'; then
  ok "tide serve status prints the deployments and their replicas"
else notok "tide serve status prints the deployments and their replicas" "rc=$rc" "$out"; fi

out=$($TIDE serve status --port 1 2>&1); rc=$?
if [ $rc -eq 1 ] && echo "$out" | grep -q 'no serve ingress'; then
  ok "tide serve status without a server exits 1 with a message"
else notok "tide serve status without a server exits 1 with a message" "rc=$rc" "$out"; fi

$TIDE serve >"$tmp/out" 2>&1; rc=$?
if [ $rc -eq 2 ]; then ok "tide serve without a subcommand exits 2"
else notok "tide serve without a subcommand exits 2" "rc=$rc" "$(cat "$tmp/out")"; fi

$TIDE serve status --bogus >"$tmp/out" 2>&1; rc=$?
if [ $rc -eq 2 ]; then ok "tide serve status with an unknown flag exits 2"
else notok "tide serve status with an unknown flag exits 2" "rc=$rc" "$(cat "$tmp/out")"; fi

# -- Safety: the address ------------------------------------------------------------------
if [ -r /proc/net/tcp ]; then
  if listening 0100007F $P && ! listening 00000000 $P; then ok "binds 127.0.0.1 by default"
  else notok "binds 127.0.0.1 by default" "$(grep -i ":$(printf '%04X' $P) " /proc/net/tcp)"; fi
else
  ok "binds 127.0.0.1 by default # SKIP no /proc/net/tcp"
fi

# -- curl, when installed ----------------------------------------------------------------
if command -v curl >/dev/null 2>&1; then
  out=$(curl -s -m 10 -d '{"x": 2}' http://127.0.0.1:$P/echo)
  c1=$(curl -s -m 10 -N http://127.0.0.1:$P/count)
  jid=$(curl -s -m 10 -d '{"x": 5}' http://127.0.0.1:$P/jobs/work | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
  sleep 0.5
  j=$(curl -s -m 10 http://127.0.0.1:$P/jobs/$jid)
  if echo "$out" | grep -q '"got":{"x":2}' && [ "$c1" = "$(printf '1\n2\n3\n4\n5')" ] &&
     echo "$j" | grep -q '"answer":10'; then
    ok "curl gets JSON, a stream of chunks, and a job result"
  else notok "curl gets JSON, a stream of chunks, and a job result" "$out" "$c1" "$j"; fi
else
  ok "curl gets JSON, a stream of chunks, and a job result # SKIP curl not installed"
fi

# -- Stopping --------------------------------------------------------------------------------
kill -INT $spid 2>/dev/null
i=0
while kill -0 $spid 2>/dev/null && [ $i -lt 50 ]; do i=$((i + 1)); sleep 0.1; done
if kill -0 $spid 2>/dev/null; then notok "SIGINT stops tide serve run" "still running after 5 s"
else
  wait $spid; rc=$?
  if [ $rc -eq 130 ]; then ok "SIGINT stops tide serve run (exit 130)"
  else notok "SIGINT stops tide serve run (exit 130)" "rc=$rc" "$(tail -5 "$tmp/serve.log")"; fi
fi
if ! http GET $P /-/healthz >/dev/null 2>&1; then ok "the port is closed afterwards"
else notok "the port is closed afterwards"; fi

# -- --host 0.0.0.0 -----------------------------------------------------------------------
$TIDE serve run --access-log off --host 0.0.0.0 --port $P2 examples/serve_app.lua >"$tmp/serve2.log" 2>&1 &
spid2=$!
pids="$pids $spid2"
if wait_healthz $P2 && [ -r /proc/net/tcp ] && listening 00000000 $P2; then
  ok "--host 0.0.0.0 listens on every interface"
elif [ ! -r /proc/net/tcp ]; then ok "--host 0.0.0.0 listens on every interface # SKIP no /proc/net/tcp"
else notok "--host 0.0.0.0 listens on every interface" "$(cat "$tmp/serve2.log")"; fi
if ! grep -q 'HTTP/1' "$tmp/serve2.log"; then ok "--access-log off: no access log"
else notok "--access-log off: no access log" "$(cat "$tmp/serve2.log")"; fi
kill -TERM $spid2 2>/dev/null
i=0
while kill -0 $spid2 2>/dev/null && [ $i -lt 50 ]; do i=$((i + 1)); sleep 0.1; done
if kill -0 $spid2 2>/dev/null; then notok "SIGTERM stops tide serve run" "still running after 5 s"
else ok "SIGTERM stops tide serve run"; fi

# -- Errors in the app ------------------------------------------------------------------
cat >"$tmp/bad.lua" <<'EOF'
local serve = require("tide.serve")
serve.run({serve.deployment{name = "x", bogus = true, call = function() end}})
EOF
timeout 30 $TIDE serve run --port $P2 "$tmp/bad.lua" >"$tmp/out" 2>&1; rc=$?
if [ $rc -eq 1 ] && grep -q "unknown key 'bogus'" "$tmp/out"; then
  ok "an app with a bad deployment exits 1 naming the problem"
else notok "an app with a bad deployment exits 1 naming the problem" "rc=$rc" "$(head -5 "$tmp/out")"; fi

$TIDE serve run --port $P2 >"$tmp/out" 2>&1; rc=$?
if [ $rc -eq 2 ]; then ok "tide serve run without an app exits 2"
else notok "tide serve run without an app exits 2" "rc=$rc" "$(head -5 "$tmp/out")"; fi

# Two servers on one port: the second fails clearly.
$TIDE serve run --port $P2 examples/serve_app.lua >"$tmp/serve3.log" 2>&1 &
spid3=$!
pids="$pids $spid3"
wait_healthz $P2
timeout 30 $TIDE serve run --port $P2 examples/serve_app.lua >"$tmp/out" 2>&1; rc=$?
if [ $rc -eq 1 ] && grep -qi "cannot listen" "$tmp/out"; then ok "a port in use is an error naming the port"
else notok "a port in use is an error naming the port" "rc=$rc" "$(head -5 "$tmp/out")"; fi
kill -TERM $spid3 2>/dev/null

# -- A replica that crashes its process -----------------------------------------------
# With --num-cpus 1 every lightweight actor shares one worker process, so
# the segfault takes every replica there with it; before, it took the serve
# state actor too and `tide serve run` died of an uncaught ActorDiedError.
while kill -0 $spid3 2>/dev/null; do sleep 0.1; done
cat >"$tmp/crash.lua" <<'EOF'
local serve = require("tide.serve")
local Crash = serve.deployment{name = "crash", route = "/crash", num_replicas = 2,
  call = function(self, req)
    if req.query.boom then local ffi = require("ffi"); return ffi.cast("int*", 0)[0] end
    return "fine"
  end}
local Ok = serve.deployment{name = "ok", route = "/ok", call = function() return "ok" end}
local Jobs = serve.deployment{name = "jobs", route = "/jobs",
  jobs = {work = function(self, req, job) return {answer = req.json.x * 2} end}}
local Err = serve.deployment{name = "err", route = "/err",
  call = function() error("secret detail") end}
serve.run({Crash, Ok, Jobs, Err})
EOF
$TIDE serve run --num-cpus 1 --port $P2 "$tmp/crash.lua" >"$tmp/crash.log" 2>&1 &
cpid=$!
pids="$pids $cpid"
wait_healthz $P2
code=$(curl -s -m 10 -o "$tmp/body" -w '%{http_code}' "http://127.0.0.1:$P2/crash?boom=1")
eid=$(sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p' "$tmp/body")
if [ "$code" = 503 ] && grep -q 'ActorDiedError' "$tmp/body" && [ -n "$eid" ] &&
   grep -q "error $eid: GET /crash .*signal 11" "$tmp/crash.log"; then
  ok "a request whose handler segfaults gets a 503 with an error id; the log says why"
else notok "a request whose handler segfaults gets a 503 with an error id; the log says why" "$code" "$(cat "$tmp/body")" "$(tail -5 "$tmp/crash.log")"; fi
good=0; i=0
while [ $i -lt 20 ]; do
  [ "$(curl -s -m 15 "http://127.0.0.1:$P2/ok")" = ok ] && good=$((good + 1))
  i=$((i + 1)); sleep 0.1
done
if [ $good -eq 20 ]; then ok "after the crash, another route answers every request (20 of 20)"
else notok "after the crash, another route answers every request (20 of 20)" "$good of 20" "$(tail -5 "$tmp/crash.log")"; fi
out=$(curl -s -m 15 "http://127.0.0.1:$P2/crash")
if [ "$out" = fine ]; then ok "the crashed route answers again from a replacement replica"
else notok "the crashed route answers again from a replacement replica" "$out" "$(tail -5 "$tmp/crash.log")"; fi
jid=$(curl -s -m 10 -d '{"x": 4}' "http://127.0.0.1:$P2/jobs/work" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
i=0; j=""
while [ $i -lt 50 ] && [ -n "$jid" ]; do
  j=$(curl -s -m 10 "http://127.0.0.1:$P2/jobs/$jid")
  echo "$j" | grep -q '"status":"succeeded"' && break
  i=$((i + 1)); sleep 0.2
done
if echo "$j" | grep -q '"answer":8'; then ok "jobs still work: the serve state lives in a process of its own"
else notok "jobs still work: the serve state lives in a process of its own" "id=$jid" "$j" "$(tail -5 "$tmp/crash.log")"; fi
# A handler error: the client gets an id, the log the message and traceback.
code=$(curl -s -m 10 -o "$tmp/body" -w '%{http_code}' "http://127.0.0.1:$P2/err")
eid=$(sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p' "$tmp/body")
if [ "$code" = 500 ] && [ -n "$eid" ] && ! grep -q 'secret\|traceback\|\.lua' "$tmp/body"; then
  ok "a handler error is a 500 with an error id and no message, traceback or path"
else notok "a handler error is a 500 with an error id and no message, traceback or path" "$code" "$(cat "$tmp/body")"; fi
sleep 0.3
if grep -q "^\[serve\] error $eid: GET /err (deployment err): TaskError: .*secret detail" "$tmp/crash.log" &&
   grep -q 'stack traceback' "$tmp/crash.log"; then ok "the log has the message and traceback under that id"
else notok "the log has the message and traceback under that id" "$(tail -8 "$tmp/crash.log")"; fi
if grep -q '^127\.0\.0\.1 - - \[[0-9]*/[A-Z][a-z]*/[0-9]*:[0-9:]* [-+][0-9]*\] "GET /err HTTP/1\.1" 500 [0-9]*$' "$tmp/crash.log" &&
   grep -q '"GET /ok HTTP/1.1" 200 2$' "$tmp/crash.log" && grep -q '"GET /crash?boom=1 HTTP/1.1" 503 ' "$tmp/crash.log"; then
  ok "tide serve run writes an access log in common log format to the console"
else notok "tide serve run writes an access log in common log format to the console" "$(grep HTTP/1 "$tmp/crash.log" | tail -5)"; fi
curl -s -m 10 -o /dev/null "http://127.0.0.1:$P2/crash?boom=1"
sleep 1
if kill -0 $cpid 2>/dev/null && grep -q 'died; starting a replacement' "$tmp/crash.log" &&
   ! grep -q '^tide: ' "$tmp/crash.log"; then
  ok "tide serve run stays up through two crashes and logs the replacements"
else notok "tide serve run stays up through two crashes and logs the replacements" "$(tail -8 "$tmp/crash.log")"; fi
kill -TERM $cpid 2>/dev/null

# -- A large stream, a slow reader and fast ones --------------------------------------
# 80 chunks of 1 MiB: more than the ingress's per-connection output limit,
# so before pacing a slow reader was dropped (and the cancel crashed the
# replica's worker). A reader with a 4 KiB receive buffer that sleeps first
# must get every byte, with the 0-chunk, while the server's memory stays
# flat; fast curls meanwhile get all 80 MiB.
if command -v python3 >/dev/null 2>&1; then
cat >"$tmp/big.lua" <<'EOF'
local serve = require("tide.serve")
local Big = serve.deployment{name = "big", route = "/big", call = function(self, req)
  local mib = string.rep("x", 1024 * 1024)
  return serve.stream(function(send) for i = 1, tonumber(req.query.n) do send(mib) end end)
end}
serve.run({Big})
EOF
cat >"$tmp/slow.py" <<'EOF'
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect(("127.0.0.1", int(sys.argv[1])))
s.sendall(("GET /big?n=%s HTTP/1.1\r\nHost: x\r\n\r\n" % sys.argv[2]).encode())
time.sleep(float(sys.argv[3]))
data = bytearray()
while True:
    b = s.recv(1 << 20)
    if not b: break
    data += b
    if data.endswith(b"\r\n0\r\n\r\n"): break
head, _, body = bytes(data).partition(b"\r\n\r\n")
n = 0
while True:  # de-chunk
    line, _, body = body.partition(b"\r\n")
    k = int(line, 16) if line else -1
    if k <= 0: break
    n += len(body[:k]); body = body[k + 2:]
print(head.split(b"\r\n")[0].decode(), n, "complete" if k == 0 else "truncated")
EOF
# rss PID: the process's and its children's resident KiB.
rss() { ps -o rss= -p "$1" --ppid "$1" | awk '{s += $1} END {print s}'; }
$TIDE serve run --access-log "$tmp/access.log" --port $P "$tmp/big.lua" >"$tmp/big.log" 2>&1 &
bpid=$!
pids="$pids $bpid"
wait_healthz $P
curl -s -m 20 -o /dev/null "http://127.0.0.1:$P/big?n=2"
base=$(rss $bpid)
python3 "$tmp/slow.py" $P 80 4 >"$tmp/slow.out" 2>&1 &
slow=$!
sleep 2
fast=""
for i in 1 2; do fast="$fast $(curl -s -m 30 -o /dev/null -w '%{http_code}:%{size_download}' "http://127.0.0.1:$P/big?n=80")"; done
peak=$(rss $bpid)
wait $slow
grow=$(( (peak - base) / 1024 ))
if [ "$(cat "$tmp/slow.out")" = "HTTP/1.1 200 OK 83886080 complete" ]; then
  ok "a slow reader gets the whole 80 MiB stream"
else notok "a slow reader gets the whole 80 MiB stream" "$(cat "$tmp/slow.out")" "$(tail -5 "$tmp/big.log")"; fi
if [ "$fast" = " 200:83886080 200:83886080" ]; then ok "fast readers meanwhile get all of it"
else notok "fast readers meanwhile get all of it" "$fast"; fi
if [ "$grow" -lt 48 ]; then ok "memory stays bounded while the reader sleeps (grew $grow MiB)"
else notok "memory stays bounded while the reader sleeps (grew $grow MiB)"; fi
if kill -0 $bpid 2>/dev/null && ! grep -q 'died' "$tmp/big.log"; then ok "no replica died"
else notok "no replica died" "$(tail -5 "$tmp/big.log")"; fi
if [ "$(grep -c '"GET /big?n=80 HTTP/1.1" 200 83886080$' "$tmp/access.log")" = 3 ] && ! grep -q HTTP/1 "$tmp/big.log"; then
  ok "--access-log FILE: the requests are logged there, with their sizes"
else notok "--access-log FILE: the requests are logged there, with their sizes" "$(cat "$tmp/access.log")"; fi
kill -TERM $bpid 2>/dev/null
else
  for t in "a slow reader gets the whole 80 MiB stream" "fast readers meanwhile get all of it" \
           "memory stays bounded while the reader sleeps" "no replica died" \
           "--access-log FILE: the requests are logged there, with their sizes"; do ok "$t # SKIP no python3"; done
fi

echo "1..$n"

#!/bin/sh
# Hostile input against a head's TCP port, from peers without the cluster
# key: frame headers claiming huge frames, many connections each claiming
# a frame of the largest size allowed, garbage, half-open and a thousand
# connections. The head must close them, stay within a memory bound
# (VmRSS from /proc, sampled every 20 ms while the peers send) and keep
# serving a real driver attached over TCP. Last, the head goes silent
# under a waiting driver, which must not wait for ever.
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
. tests/sh/lib.sh
if ! command -v python3 >/dev/null; then echo "ok 1 - hostile peers # SKIP python3 not found"; echo "1..1"; exit 0; fi
D=$(mktemp -d /tmp/tide-hostile-XXXXXX)
trap 'TIDE_SESSION_DIR=$D/head $T stop >/dev/null 2>&1; rm -rf "$D"' EXIT
PORT=$((19000 + $$ % 1000))
MiB=1048576
BOUND=$((96 * 1024))  # KiB the head may grow by under each attack

cat > $D/peer.py <<'PY'
# usage: peer.py MODE PORT PID NCONN CLAIM SEND_MIB SECONDS NSRC
#   frames:   a ZMTP 3.0 greeting naming CURVE, then a command frame whose
#             header claims CLAIM bytes, then SEND_MIB MiB of its body
#   garbage:  random bytes from the first byte on
#   halfopen: part of a greeting, then silence
# Connections come from NSRC loopback addresses (127.0.0.2 on; 0: the
# default). Prints the head's VmRSS before (base_kb) and its peak while
# sending, and how many connections the head had closed after 2 s and at
# the end (SECONDS; or 1 s after everything was sent).
import os, select, socket, struct, sys, time
mode, port, pid, nconn = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
claim, send_mib, seconds, nsrc = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]), int(sys.argv[8])
def rss_kb():
    try:
        for line in open("/proc/%d/status" % pid):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1
greeting = b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\0") + b"\0" * 32
base = peak = rss_kb()
socks = []
for i in range(nconn):
    s = socket.socket()
    if nsrc:
        s.bind(("127.0.0.%d" % (2 + i % nsrc), 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    socks.append(s)
head = {"frames": greeting + bytes([0x06]) + struct.pack(">Q", claim),
        "garbage": os.urandom(4096), "halfopen": greeting[:11]}[mode]
for s in socks:
    try:
        s.sendall(head)
    except OSError:
        pass
    s.setblocking(False)
left = {s: (send_mib << 20) if mode != "halfopen" else 0 for s in socks}
closed, sent, closed_2s = set(), 0, None
body = b"\0" * 65536 if mode == "frames" else os.urandom(65536)
t0 = time.time()
t_end = t0 + seconds
while time.time() < t_end:
    live = [s for s in socks if s not in closed]
    if not live:
        break
    r, w, _ = select.select(live, [s for s in live if left[s] > 0], [], 0.02)
    for s in r:
        try:
            if not s.recv(65536):
                closed.add(s)
        except OSError:
            closed.add(s)
    for s in w:
        if s in closed:
            continue
        try:
            k = s.send(body[: min(len(body), left[s])])
            left[s] -= k
            sent += k
        except BlockingIOError:
            pass
        except OSError:
            closed.add(s)
    peak = max(peak, rss_kb())
    if closed_2s is None and time.time() - t0 >= 2:
        closed_2s = len(closed)
    if mode != "halfopen" and all(left[s] == 0 or s in closed for s in socks):
        t_end = min(t_end, time.time() + 1.0)
print("base_kb=%d peak_kb=%d grew_kb=%d closed=%d closed_2s=%s open=%d sent_mib=%d" % (
    base, peak, peak - base, len(closed), closed_2s if closed_2s is not None else len(closed),
    nconn - len(closed), sent >> 20))
PY
attack() { python3 $D/peer.py "$@" 2>&1; }
val() { echo "$1" | sed -n "s/.*$2=\([0-9-]*\).*/\1/p"; }

TIDE_SESSION_DIR=$D/head $T start --head --port $PORT --num-cpus 1 >/dev/null 2>&1
PID=$(cat $D/head/node.pid)
KEY=$D/head/cluster.key
cat > $D/driver.lua <<'LUA'
local tide = require("tide")
local f = tide.remote(function(s) return #s + 1 end)
local big = string.rep("z", 40 * 1024 * 1024)  -- crosses the link as many messages
print("DRIVER", tide.get(f:remote("abc"), {timeout = 20}), tide.get(f:remote(big), {timeout = 60}))
LUA
driver() { timeout 90 $T run --address 127.0.0.1:$PORT --key $KEY $D/driver.lua 2>&1; }
out=$(driver)
check "a driver attached over TCP runs tasks (a 40 MiB argument too)" 'echo "$out" | grep -q "DRIVER	4	41943041"' "$out"

r=$(attack frames $PORT $PID 4 $((256 * MiB)) 256 5 0)
echo "# 4 connections claiming 256 MiB frames: $r"
check "frame headers claiming 256 MiB are refused at the header: the head stays within 96 MiB of where it was" \
  '[ "$(val "$r" grew_kb)" -lt $BOUND ] && [ "$(val "$r" open)" = 0 ] && [ "$(val "$r" sent_mib)" -lt 64 ]' "$r"

r=$(attack frames $PORT $PID 200 $MiB 1 5 8)
echo "# 200 connections from 8 addresses claiming 1 MiB frames: $r"
check "200 connections sending 1 MiB frames before the handshake: the head stays within 96 MiB" \
  '[ "$(val "$r" grew_kb)" -lt $BOUND ] && [ "$(val "$r" open)" = 0 ]' "$r"

r=$(attack garbage $PORT $PID 50 0 4 5 0)
echo "# 50 connections sending garbage: $r"
check "connections sending garbage are closed, the head stays within 96 MiB" \
  '[ "$(val "$r" grew_kb)" -lt $BOUND ] && [ "$(val "$r" open)" = 0 ]' "$r"

# Half-open from one address: 16 may wait for their handshake, the rest
# are closed at once; a driver from another address gets in meanwhile,
# and the 16 are closed when their 10 s are up.
attack halfopen $PORT $PID 100 0 0 13 1 > $D/halfopen.out &
apid=$!
sleep 1
out=$(driver)
check "while one address holds 100 half-open connections, a driver from another runs tasks" \
  'echo "$out" | grep -q "DRIVER	4	41943041"' "$out"
wait $apid
r=$(cat $D/halfopen.out)
echo "# 100 half-open connections from one address: $r"
check "... the head kept at most 16 of them open (the rest closed at once) and closed those after the handshake time" \
  '[ "$(val "$r" closed_2s)" -ge 84 ] && [ "$(val "$r" open)" = 0 ]' "$r"

r=$(attack halfopen $PORT $PID 1000 0 0 3 10)
echo "# 1000 half-open connections from 10 addresses: $r"
# (64, give or take a few: a connection that a driver closed just before
# may lend its socket, already seen as past its handshake, to one of them.)
check "1000 half-open connections from 10 addresses: about 64 held, the head stays within 96 MiB" \
  '[ "$(val "$r" closed_2s)" -ge 930 ] && [ "$(val "$r" grew_kb)" -lt $BOUND ]' "$r"

lines=$(grep -c "refused a connection\|without a handshake" $D/head/node.log)
st=$(TIDE_SESSION_DIR=$D/head $T status 2>&1)
check "refusals are counted in tide status but the log is not flooded ($lines lines), and names the peers" \
  '[ "$lines" -lt 40 ] && echo "$st" | grep -Eq "refused \(no valid cluster key\): [0-9]{3,}" &&
   grep -Eq "refused a connection from 127\.0\.0\.[0-9]+: no valid cluster key" $D/head/node.log &&
   ! grep -q "from tcp://" $D/head/node.log' "$st $(grep refused $D/head/node.log | head -5)"

out=$(driver)
check "after all that the head still runs a driver's tasks" 'echo "$out" | grep -q "DRIVER	4	41943041"' "$out"
rss=$(sed -n 's/^VmRSS:[^0-9]*\([0-9]*\).*/\1/p' /proc/$PID/status)
echo "# head VmRSS at the end: $rss KiB"
check "the head is still alive" 'kill -0 $PID'

# A head that goes silent without closing its connections (its machine
# hangs or the network drops them; here SIGSTOP): a driver attached over
# TCP, waiting in a get, stops with a clear error when ZeroMQ's heartbeats
# go unanswered for 10 s (before, it waited for ever). This get has no
# timeout: the link's failure alone ends it.
cat > $D/wait.lua <<'LUA'
local tide = require("tide")
local r = tide.remote(function() tide.sleep(120) return 1 end):remote()
io.stdout:write("WAITING\n"); io.stdout:flush()
print("GOT", pcall(tide.get, r))
LUA
(timeout 100 $T run --address 127.0.0.1:$PORT --key $KEY $D/wait.lua > $D/wait.out 2>&1; echo "rc=$?" >> $D/wait.out) &
dpid=$!
for i in $(seq 100); do grep -q WAITING $D/wait.out 2>/dev/null && break; sleep 0.1; done
kill -STOP $PID
t0=$(date +%s.%N)
wait $dpid
took=$(echo "$(date +%s.%N) - $t0" | bc)
kill -CONT $PID
out=$(cat $D/wait.out)
check "a driver over TCP whose head stops answering stops with a clear error within 15 s ($took s)" \
  'echo "$out" | grep -q "lost the connection to the node" && echo "$out" | grep -q "rc=1" && [ "$(echo "$took < 15" | bc)" = 1 ]' "$out"

# A get with a timeout returns in time whatever the link does: the driver
# gives up on its own (timeout * 1.05 + 1 s) when no answer comes, and drops
# the answer that comes late. First the head stopped whole (its ZeroMQ
# heartbeats too, but the 3 s are up before the link's 10 s); then only its
# main loop (gdb runs sleep() on thread 1 while ZeroMQ's threads answer the
# heartbeats, so the link never fails): before, the get waited as long as
# the head did.
cat > $D/tmo.lua <<'LUA'
local tide = require("tide")
-- (No CPU: the stopped driver above may have left a task holding one.)
local slow = tide.remote({num_cpus = 0}, function(x, s) tide.sleep(s) return x + 1 end)
local r = slow:remote(0, 120)
io.stdout:write("WAITING\n"); io.stdout:flush()
local ok, err = pcall(tide.get, r, {timeout = 3})
io.stdout:write("GOT ", tostring(ok), " ", tostring(err), "\n"); io.stdout:flush()
-- The head comes back meanwhile; its late answers to the get above must
-- not be taken for the answers to these.
tide.cancel(r)
print("AFTER", tide.get(slow:remote(41, 5), {timeout = 60}), tide.get(slow:remote(1, 0), {timeout = 60}))
LUA
# freeze CMD THAW: runs the driver, freezes the head with CMD once it
# waits, THAW once the get returned; sets took (seconds to the GOT line).
freeze() {
  rm -f $D/tmo.out
  (timeout 100 $T run --address 127.0.0.1:$PORT --key $KEY $D/tmo.lua > $D/tmo.out 2>&1; echo "rc=$?" >> $D/tmo.out) &
  dpid=$!
  for i in $(seq 200); do grep -q WAITING $D/tmo.out 2>/dev/null && break; sleep 0.1; done
  eval "$1"
  t0=$(date +%s.%N)
  for i in $(seq 300); do grep -q "^GOT\|^rc=" $D/tmo.out && break; sleep 0.05; done
  took=$(echo "$(date +%s.%N) - $t0" | bc)
  eval "$2"
  wait $dpid
  out=$(cat $D/tmo.out)
}
freeze 'kill -STOP $PID' 'kill -CONT $PID'
check "a driver over TCP whose head is stopped gets GetTimeoutError from get(timeout = 3) in time ($took s), then runs tasks again" \
  'echo "$out" | grep -q "^GOT false GetTimeoutError" && [ "$(echo "$took < 6.5" | bc)" = 1 ] &&
   echo "$out" | grep -q "AFTER	42	2" && echo "$out" | grep -q "rc=0"' "$out"
if command -v gdb >/dev/null && gdb -p $PID -batch -ex 'thread 1' >/dev/null 2>&1; then
  freeze 'gdb -p $PID -batch -ex "thread 1" -ex "call (unsigned int)sleep(12)" >$D/gdb.out 2>&1 & gpid=$!' 'wait $gpid'
  check "... and when only its main loop hangs while ZeroMQ answers heartbeats ($took s)" \
    'echo "$out" | grep -q "^GOT false GetTimeoutError" && [ "$(echo "$took < 6.5" | bc)" = 1 ] &&
     echo "$out" | grep -q "AFTER	42	2" && echo "$out" | grep -q "rc=0"' "$out $(tail -3 $D/gdb.out)"
else
  ok "... and when only its main loop hangs # SKIP gdb cannot attach here"
fi
check "the head is alive after being frozen" 'kill -0 $PID'
echo "1..$n"

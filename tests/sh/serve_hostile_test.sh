#!/bin/sh
# Hostile clients against the serve ingress of a real `tide serve run`:
# garbage, a request line and headers of megabytes, a body claiming
# 100 GiB, bodies and headers sent a byte a second (slowloris), half-open
# and half-closed connections, 2,500 idle connections from one address
# (the good client's own), and 64 connections pipelining 256 KiB requests
# without reading an answer. Meanwhile curl posts to /echo twice a second
# and must be answered quickly; the serve process and its workers (VmRSS
# from /proc, sampled every 50 ms) must stay within a bound and come back
# near where they were; and the process must be up at the end and stop
# cleanly (exit status 130 on SIGTERM).
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
. tests/sh/lib.sh
for c in python3 curl; do
  if ! command -v $c >/dev/null; then echo "ok 1 - hostile HTTP clients # SKIP $c not found"; echo "1..1"; exit 0; fi
done
D=$(mktemp -d /tmp/tide-serve-hostile-XXXXXX)
SP=
trap '[ -n "$SP" ] && kill $SP 2>/dev/null; rm -rf "$D"' EXIT
PORT=$((24000 + $$ % 1000))

cat > $D/atk.py <<'PY'
# usage: atk.py PORT PID SECONDS GROUP...   GROUP = MODE:COUNT:NSRC
# Runs the groups' connections at once against the ingress at PORT for
# SECONDS (less once every connection is closed), while a well-behaved
# client (curl) posts to /echo twice a second. Prints one line per group
# (g_<mode>_closed, _closed_2s, _open, _sent_kib, statuses) and the
# figures: VmRSS of PID and its descendants before (base_kb), at the peak,
# and 3 s after the attack's sockets closed (after_kb); the good client's
# answers (probes, probes_ok) and slowest time (probe_max_ms).
import os, random, resource, select, socket, subprocess, sys, time
port, pid, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
groups = [g.split(":") for g in sys.argv[4:]]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

detail = {}
def tree_rss():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = open("/proc/%s/stat" % d).read()
            except OSError:
                continue
            kids.setdefault(int(st.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    total, todo = 0, [pid]
    detail.clear()
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for line in open("/proc/%d/status" % p):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    detail[p] = int(line.split()[1])
        except OSError:
            pass
    return total

MiB = 1 << 20
def pipelined(n):
    body = b'{"x":"' + b"a" * (n - 8) + b'"}'
    return (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body
# mode -> (first bytes, bytes sent after them (a chunk, repeated), total
# cap of those, bytes per second (0: as fast as the socket takes them),
# whether to read answers)
def plan(mode):
    if mode == "garbage":    return os.urandom(4096), os.urandom(65536), 16 * MiB, 0, True
    if mode == "bigline":    return b"GET /", b"a" * 65536, 8 * MiB, 0, True
    if mode == "bigheaders": return b"GET /echo HTTP/1.1\r\nHost: x\r\n", (b"X-Pad: " + b"a" * 1000 + b"\r\n") * 64, 8 * MiB, 0, True
    if mode == "biglength":  return (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: 107374182400\r\n\r\n"), b"\0" * 65536, 64 * MiB, 0, True
    if mode == "trickle":    return (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"), b"a", 1 << 40, 1, True
    if mode == "slowloris":  return b"", b"GET /echo HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: b\r\n" * 1000, 1 << 40, 1, True
    if mode == "halfopen":   return b"GET /echo HTTP/1.1\r\nHo", b"", 0, 0, True
    if mode == "halfclose":  return b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", b"", 0, 0, True
    if mode == "idle":       return b"", b"", 0, 0, True
    if mode == "pipeline":   return b"", pipelined(256 * 1024), 64 * MiB, 0, False
    raise SystemExit("unknown mode " + mode)

class Conn: pass
conns = []
made = {}
# Refused at once, these reconnect until the end: pressure all along.
AGAIN = ("garbage", "bigline", "bigheaders", "biglength")
def connect(mode, i, nsrc):
    first, chunk, cap, rate, read = plan(mode)
    c = Conn()
    c.mode, c.chunk, c.left, c.rate, c.read, c.i, c.nsrc = mode, chunk, cap, rate, read, i, nsrc
    c.off, c.status, c.closed, c.sent, c.next = 0, None, None, 0, 0
    made[mode] = made.get(mode, 0) + 1
    c.s = socket.socket()
    if nsrc:
        c.s.bind(("127.0.0.%d" % (2 + i % nsrc), 0))
    c.s.settimeout(5)
    try:
        c.s.connect(("127.0.0.1", port))
        c.s.sendall(first)
        if mode in ("halfopen", "halfclose"):
            c.s.shutdown(socket.SHUT_WR)
    except OSError:
        c.closed = time.time() - t0
    c.s.setblocking(False)
    conns.append(c)
    return c
base = tree_rss()
t0 = time.time()
for mode, count, nsrc in groups:
    for i in range(int(count)):
        connect(mode, i, int(nsrc))
connect_s = time.time() - t0

probes, next_probe = [], 0
def probe():
    return subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-m", "10", "-w", "%{http_code} %{time_total}",
                             "-H", "Content-Type: application/json", "-d", '{"x":1}',
                             "http://127.0.0.1:%d/echo" % port], stdout=subprocess.PIPE)
peak, peak_detail = base, {}
t_end = t0 + seconds
by_fd = {}
while time.time() < t_end:
    now = time.time()
    if now >= next_probe:
        probes.append(probe())
        next_probe = now + 0.5
    live = [c for c in conns if c.closed is None]
    if not live:
        break
    by_fd, pl = {}, select.poll()
    for c in live:
        ev = (select.POLLIN if c.read else 0) | (select.POLLOUT if c.left > 0 and (c.rate == 0 or now >= c.next) else 0)
        if ev:
            by_fd[c.s.fileno()] = c
            pl.register(c.s.fileno(), ev)
    evs = pl.poll(50) if by_fd else time.sleep(0.05) or []
    r = [by_fd[fd] for fd, e in evs if e & (select.POLLIN | select.POLLHUP | select.POLLERR)]
    w = [by_fd[fd] for fd, e in evs if e & select.POLLOUT]
    for c in r:
        s = c.s
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if not data:
            c.closed = time.time() - t0
            if c.mode in AGAIN and time.time() < t_end - 0.5:
                c.s.close()
                connect(c.mode, c.i, c.nsrc)
        elif c.status is None and data.startswith(b"HTTP/1."):
            c.status = data[9:12].decode()
    for c in w:
        s = c.s
        if c.closed is not None:
            continue
        n = min(len(c.chunk) - c.off, c.left, 1 if c.rate else 1 << 30)
        try:
            k = s.send(c.chunk[c.off:c.off + n])
        except BlockingIOError:
            continue
        except OSError:
            c.closed = time.time() - t0
            continue
        c.off = (c.off + k) % len(c.chunk)
        c.left -= k
        c.sent += k
        if c.rate:
            c.next = now + 1.0 / c.rate
    cur = tree_rss()
    if cur > peak:
        peak, peak_detail = cur, dict(detail)
    if all(c.closed is not None or (c.left == 0 and not c.read) for c in conns) and t_end > time.time() + 1:
        t_end = time.time() + 1
for c in conns:
    c.s.close()
time.sleep(3)
after = tree_rss()
codes, times = [], []
for p in probes:
    out = p.communicate()[0].decode().split()
    codes.append(out[0] if out else "000")
    times.append(float(out[1]) if len(out) > 1 else 99.0)
if os.environ.get("ATK_DEBUG"):
    print("# peak by process", peak_detail, "codes", codes, "times", times)
for mode, count, nsrc in groups:
    g = [c for c in conns if c.mode == mode]
    st = {}
    for c in g:
        st[c.status] = st.get(c.status, 0) + 1
    print("g_%s conns=%d count=%d closed=%d closed_2s=%d open=%d sent_kib=%d max_sent_kib=%d statuses=%s" % (
        mode, made[mode], len(g), sum(c.closed is not None for c in g), sum(c.closed is not None and c.closed <= connect_s + 2 for c in g),
        sum(c.closed is None for c in g), sum(c.sent for c in g) >> 10, max(c.sent for c in g) >> 10,
        ",".join("%s:%d" % (k, v) for k, v in sorted(st.items(), key=str))))
print("base_kb=%d peak_kb=%d grew_kb=%d after_kb=%d kept_kb=%d probes=%d probes_ok=%d probe_max_ms=%d connect_ms=%d" % (
    base, peak, peak - base, after, after - base, len(codes), codes.count("200"), max(times) * 1000, connect_s * 1000))
PY
atk() { python3 $D/atk.py $PORT $SP "$@" 2>&1; }
val() { echo "$1" | sed -n "s/.*$2=\([0-9-]*\).*/\1/p"; }
gval() { echo "$1" | grep "^g_$2 " | sed -n "s/.*$3=\([^ ]*\).*/\1/p"; }
rss() { python3 - $SP <<'PY'
import os, sys
pid, kids, total = int(sys.argv[1]), {}, 0
for d in os.listdir("/proc"):
    if d.isdigit():
        try: kids.setdefault(int(open("/proc/%s/stat" % d).read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
        except OSError: pass
todo = [pid]
while todo:
    p = todo.pop(); todo += kids.get(p, [])
    try: total += sum(int(l.split()[1]) for l in open("/proc/%d/status" % p) if l.startswith("VmRSS:"))
    except OSError: pass
print(total)
PY
}
MiB=1024

TIDE_SESSION_DIR=$D/s $T serve run --port $PORT --access-log off examples/serve_app.lua > $D/serve.log 2>&1 &
SP=$!
for i in $(seq 150); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' -d '{"x":1}' http://127.0.0.1:$PORT/echo)" = 200 ] && break
  sleep 0.2
done
base0=$(rss)
check "tide serve run answers curl (process tree VmRSS $base0 KiB)" \
  '[ "$(curl -s -d "{\"x\":1}" http://127.0.0.1:$PORT/echo)" = "{\"got\":{\"x\":1},\"path\":\"\\/echo\",\"method\":\"POST\"}" ] ||
   curl -s -d "{\"x\":1}" http://127.0.0.1:$PORT/echo | grep -q "\"x\":1"' "$(cat $D/serve.log)"

# Garbage and oversized requests, each connection opened again as soon as
# the ingress closed it, for 6 s.
r=$(atk 6 garbage:50:4 bigline:20:4 bigheaders:20:4 biglength:20:4)
echo "$r" | sed 's/^/# /'
check "garbage gets 400, a request line of 8 MiB 414, 8 MiB of headers 431, Content-Length 100 GiB 413, each closed after little was read" \
  '[ "$(gval "$r" garbage statuses)" = "400:$(gval "$r" garbage count)" ] &&
   [ "$(gval "$r" bigline statuses)" = "414:$(gval "$r" bigline count)" ] &&
   [ "$(gval "$r" bigheaders statuses)" = "431:$(gval "$r" bigheaders count)" ] &&
   [ "$(gval "$r" biglength statuses)" = "413:$(gval "$r" biglength count)" ] &&
   for g in garbage bigline bigheaders biglength; do [ "$(gval "$r" $g open)" = 0 ] && [ "$(gval "$r" $g max_sent_kib)" -lt 4096 ] || exit 1; done' "$r"
check "... meanwhile curl got 200 every time, within 2 s ($(val "$r" probes_ok)/$(val "$r" probes), slowest $(val "$r" probe_max_ms) ms), and the processes grew by less than 32 MiB ($(val "$r" grew_kb) KiB)" \
  '[ "$(val "$r" probes)" -ge 4 ] && [ "$(val "$r" probes_ok)" = "$(val "$r" probes)" ] && [ "$(val "$r" probe_max_ms)" -lt 2000 ] &&
   [ "$(val "$r" grew_kb)" -lt $((32 * MiB)) ]' "$r"

# Slow and silent clients, for 36 s (the ingress allows 30 s to receive a
# request, and closes a connection idle for 30 s).
r=$(atk 36 slowloris:200:4 trickle:50:4 halfopen:100:4 halfclose:20:4 idle:2500:0)
echo "$r" | sed 's/^/# /'
check "slowloris (headers a byte a second) and a body trickling a byte a second get 408 and are closed within the 30 s" \
  '[ "$(gval "$r" slowloris statuses)" = "408:200" ] && [ "$(gval "$r" trickle statuses)" = "408:50" ] &&
   [ "$(gval "$r" slowloris open)" = 0 ] && [ "$(gval "$r" trickle open)" = 0 ]' "$r"
check "half-open (part of a request, then FIN) and half-closed (a request, then FIN) connections are closed at once" \
  '[ "$(gval "$r" halfopen closed_2s)" = 100 ] && [ "$(gval "$r" halfclose closed_2s)" = 20 ]' "$r"
check "2,500 idle connections from the good client's own address: it keeps 256 (the rest closed at once), closed when idle 30 s" \
  '[ "$(gval "$r" idle closed_2s)" -ge 2240 ] && [ "$(gval "$r" idle open)" = 0 ]' "$r"
check "... meanwhile curl got 200 every time, within 2 s ($(val "$r" probes_ok)/$(val "$r" probes), slowest $(val "$r" probe_max_ms) ms), and the processes grew by less than 32 MiB ($(val "$r" grew_kb) KiB)" \
  '[ "$(val "$r" probes)" -ge 30 ] && [ "$(val "$r" probes_ok)" = "$(val "$r" probes)" ] && [ "$(val "$r" probe_max_ms)" -lt 2000 ] &&
   [ "$(val "$r" grew_kb)" -lt $((32 * MiB)) ]' "$r"

# 64 connections from 8 addresses pipeline 256 KiB echoes (64 MiB each)
# and never read. The ingress holds at most 64 MiB of pipelined requests
# over all connections (beyond it, a connection with a request queued
# reads no more); what the process took goes back once they close.
r=$(atk 10 pipeline:64:8)
echo "$r" | sed 's/^/# /'
check "64 connections pipelining without reading: the processes grew by less than 320 MiB ($(val "$r" grew_kb) KiB) and came back within 64 MiB 3 s after they closed ($(val "$r" kept_kb) KiB)" \
  '[ "$(val "$r" grew_kb)" -lt $((320 * MiB)) ] && [ "$(val "$r" kept_kb)" -lt $((64 * MiB)) ]' "$r"
# (The replicas are full meanwhile: a request that finds every one at
# max_ongoing_requests gets 503 with Retry-After at once, by design.)
check "... meanwhile curl was answered within 3 s every time, 200 at least 4 times in 5 ($(val "$r" probes_ok)/$(val "$r" probes), slowest $(val "$r" probe_max_ms) ms)" \
  '[ "$(val "$r" probes)" -ge 10 ] && [ "$(val "$r" probe_max_ms)" -lt 3000 ] &&
   [ $(($(val "$r" probes_ok) * 5)) -ge $(($(val "$r" probes) * 4)) ]' "$r"

t=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' -d '{"x":1}' http://127.0.0.1:$PORT/echo)
sleep 2
end=$(rss)
echo "# process tree VmRSS: $base0 KiB at the start, $end KiB at the end:" $(ps -o rss=,args= -p $SP --ppid $SP | awk '{print $1 " KiB (" $2 " " $3 ")"}')
check "after all that curl gets 200 ($t s) and the processes are within 64 MiB of where they started ($base0 -> $end KiB)" \
  '[ "${t%% *}" = 200 ] && [ $((end - base0)) -lt $((64 * MiB)) ]' "$t"
check "the serve process never crashed: up at the end, no replica died" \
  'kill -0 $SP && ! grep -q "died\|Segmentation\|panic" $D/serve.log' "$(tail -20 $D/serve.log)"
kill -TERM $SP
wait $SP
st=$?
SP=
check "tide serve run stops on SIGTERM with exit status 130 ($st)" '[ $st = 130 ]' "$(tail -20 $D/serve.log)"
echo "1..$n"

#!/bin/sh
# Session directories and the package cache on a shared host: a directory
# another user made first (or a link, or one others can write) is refused
# and nothing outside it is touched; `tide stop` signals only the daemon
# that holds the session's lock, never a pid a stale or forged node.pid
# names; a start after a crash does not take a dead daemon's socket for a
# live node; a package is named by the BLAKE2b of its contents, and a
# changed package in the cache is unpacked again, never run.
# The other-user cases need root (they run a second user, tidetest2, made
# here when missing); without root they are skipped.
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
no() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "# $2" | head -20; }
skip() { n=$((n + 1)); echo "ok $n - # SKIP $1"; }
check() { if eval "$2"; then ok "$1"; else no "$1" "$3"; fi; }
W=$(mktemp -d /tmp/tide-sec-test-XXXXXX)
SLEEP=""
cleanup() {
  for s in "$W"/s-*; do [ -d "$s" ] && TIDE_SESSION_DIR=$s $T stop >/dev/null 2>&1; done
  [ -n "$SLEEP" ] && kill "$SLEEP" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
PORT=$((23000 + $$ % 1000))
# Gone, or a zombie its parent (an init that reaps late) has not collected.
gone() { ! kill -0 "$1" 2>/dev/null || grep -q '^State:.*Z' /proc/"$1"/status 2>/dev/null; }

# -- Another user's directory (root only) -------------------------------------
OTHER=""
if [ "$(id -u)" = 0 ]; then
  id tidetest2 >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin tidetest2 >/dev/null 2>&1
  id tidetest2 >/dev/null 2>&1 && OTHER=tidetest2
fi
as_other() { setpriv --reuid="$OTHER" --regid="$(id -g "$OTHER")" --clear-groups sh -c "$1"; }
if [ -n "$OTHER" ]; then
  chmod 1777 "$W"  # like /tmp: anyone may make a directory in it
  echo precious > "$W/victim"
  # The attack of issue 12: the other user makes the session directory
  # first, open to all, with node.pid and node.log linked to our file.
  as_other "mkdir -m 777 $W/s-foreign && ln -s $W/victim $W/s-foreign/node.pid &&
            ln -s $W/victim $W/s-foreign/node.log"
  out=$(TIDE_SESSION_DIR=$W/s-foreign $T start --head --port $PORT 2>&1)
  rc=$?
  check "start refuses a session directory another user owns, naming it and why" \
    '[ $rc -ne 0 ] && echo "$out" | grep -q "$W/s-foreign" && echo "$out" | grep -q "owned by uid $(id -u tidetest2)"' "$out"
  check "nothing outside the refused directory was touched (the linked file keeps its contents)" \
    '[ "$(cat "$W/victim")" = precious ] && [ "$(stat -c %U "$W/victim")" = root ]'
  check "no file was made in it" '[ "$(ls -A "$W/s-foreign" | tr "\n" " ")" = "node.log node.pid " ]' "$(ls -la "$W/s-foreign")"
  out=$(TIDE_SESSION_DIR=$W/s-foreign $T run --address local /dev/null 2>&1)
  check "a driver does not attach to a node in another user's session directory" \
    '[ $? -ne 0 ] && echo "$out" | grep -q "owned by uid"' "$out"
  out=$(TIDE_SESSION_DIR=$W/s-foreign $T stop 2>&1)
  check "stop refuses it too" '[ $? -ne 0 ] && echo "$out" | grep -q "owned by uid"' "$out"
  # A link to a directory of ours, made by the other user.
  mkdir -m 700 "$W/mine"
  as_other "ln -s $W/mine $W/s-link"
  out=$(TIDE_SESSION_DIR=$W/s-link $T start --head --port $PORT 2>&1)
  check "start refuses a session directory that is a symbolic link" \
    '[ $? -ne 0 ] && echo "$out" | grep -q "$W/s-link.*symbolic link"' "$out"
  check "the linked-to directory got no files" '[ -z "$(ls -A "$W/mine")" ]' "$(ls -la "$W/mine")"
  # The package cache, made first by the other user.
  as_other "mkdir -m 755 $W/cache-foreign"
else
  for t in "start refuses another user's session directory" "nothing outside it was touched" \
           "no file was made in it" "a driver does not attach there" "stop refuses it" \
           "start refuses a symbolic link" "the linked-to directory got no files"; do
    skip "$t (needs root for a second user)"
  done
fi

# -- Our own directory, but not private ---------------------------------------
mkdir -m 777 "$W/s-open" && chmod 777 "$W/s-open"
out=$(TIDE_SESSION_DIR=$W/s-open $T start --head --port $PORT 2>&1)
check "start refuses a session directory others can write, saying so" \
  '[ $? -ne 0 ] && echo "$out" | grep -q "$W/s-open: other users can write to it (mode 0777)"' "$out"
check "and makes no file in it" '[ -z "$(ls -A "$W/s-open")" ]' "$(ls -la "$W/s-open")"
mkdir -m 755 "$W/s-a" && chmod 755 "$W/s-a"
out=$(TIDE_SESSION_DIR=$W/s-a $T start --head --port $PORT --num-cpus 1 2>&1)
check "a session directory of ours that others can only read is used, made 0700" \
  '[ $? -eq 0 ] && [ "$(stat -c %a "$W/s-a")" = 700 ]' "$out"

# -- tide stop signals only the daemon ----------------------------------------
sleep 100 &
SLEEP=$!
dpid=$(cat "$W/s-a/node.pid")
echo "$SLEEP" > "$W/s-a/node.pid"  # forged while the daemon runs
out=$(TIDE_SESSION_DIR=$W/s-a $T stop 2>&1)
sleep 0.3
check "stop stops the daemon that holds the session lock, whatever node.pid says" \
  'echo "$out" | grep -q "stopped the node (pid $dpid)" && gone $dpid' "$out"
check "the process a forged node.pid named is not signalled" 'kill -0 $SLEEP' "$out"
# A stale node.pid after a crash names a pid that is now someone else's.
echo "$SLEEP" > "$W/s-a/node.pid"
out=$(TIDE_SESSION_DIR=$W/s-a $T stop 2>&1)
rc=$?
sleep 0.3
check "stop with a stale node.pid naming a live unrelated process signals nothing and says so" \
  '[ $rc -ne 0 ] && kill -0 $SLEEP && echo "$out" | grep -q "pid $SLEEP, which does not hold the session lock: not signalled"' "$out"
out=$(TIDE_SESSION_DIR=$W/s-a $T start --head --port $PORT --num-cpus 1 2>&1)
check "start after it takes no stale node.pid for a live node" \
  '[ $? -eq 0 ] && [ "$(cat "$W/s-a/node.pid")" != "$SLEEP" ]' "$out"
TIDE_SESSION_DIR=$W/s-a $T stop >/dev/null 2>&1

# A process that is not tide holding the lock (POSIX record lock) is not
# signalled either.
if command -v python3 >/dev/null; then
  mkdir -m 700 "$W/s-l"
  python3 -c 'import fcntl, sys, time
f = open(sys.argv[1], "w"); fcntl.lockf(f, fcntl.LOCK_EX); time.sleep(60)' "$W/s-l/node.lock" &
  LOCKER=$!
  sleep 0.5
  out=$(TIDE_SESSION_DIR=$W/s-l $T stop 2>&1)
  rc=$?
  check "stop does not signal a lock holder that is not a tide process" \
    '[ $rc -ne 0 ] && kill -0 $LOCKER && echo "$out" | grep -q "pid $LOCKER holds the lock .* not a tide process: not signalled"' "$out"
  out=$(TIDE_SESSION_DIR=$W/s-l $T start --head --port 0 2>&1)
  check "start sees the session as taken while its lock is held" \
    '[ $? -ne 0 ] && echo "$out" | grep -q "already running here (pid $LOCKER)"' "$out"
  kill $LOCKER
else
  skip "stop does not signal a non-tide lock holder (needs python3)"
  skip "start sees the session as taken while its lock is held (needs python3)"
fi

# -- A crash leaves node.sock behind (issue 12 item 9) --------------------------
out=$(TIDE_SESSION_DIR=$W/s-a $T start --head --port $PORT --num-cpus 1 2>&1)
hpid=$(cat "$W/s-a/node.pid")
kill -9 "$hpid"
i=0
while [ $i -lt 100 ] && ! gone "$hpid"; do sleep 0.05; i=$((i + 1)); done
# Its main thread is a zombie; its other threads may still hold the lock.
out=$(TIDE_SESSION_DIR=$W/s-a $T start --head --port $PORT --num-cpus 1 2>&1)
check "a head starts at once after a kill -9 of the last one" '[ $? -eq 0 ]' "$out"
hpid=$(cat "$W/s-a/node.pid")
kill -9 "$hpid"
sleep 0.5
check "a killed head leaves its socket (the crash this covers)" '[ -S "$W/s-a/node.sock" ]'
DEAD=$((PORT + 7))
t0=$(date +%s)
out=$(TIDE_SESSION_DIR=$W/s-a $T start --address 127.0.0.1:$DEAD --key "$W/s-a/cluster.key" --num-cpus 1 2>&1)
rc=$?
check "joining a port where nothing listens, after a crash, does not claim it joined" \
  '[ $rc -ne 0 ] && ! echo "$out" | grep -q "joined" && echo "$out" | grep -q "nothing is listening at 127.0.0.1:$DEAD"' "$out"
check "it waited for the node rather than trusting the old socket" '[ $(($(date +%s) - t0)) -ge 5 ]'
out=$(TIDE_SESSION_DIR=$W/s-a $T stop 2>&1)
check "the node that gave up left no daemon and no socket" \
  '[ $? -ne 0 ] && echo "$out" | grep -q "no node is running" && [ ! -e "$W/s-a/node.sock" ]' "$out"
out=$(TIDE_SESSION_DIR=$W/s-a $T start --head --port $PORT --num-cpus 1 2>&1)
check "a head starts again in the session a killed one left" '[ $? -eq 0 ] && echo "$out" | grep -q "node started"' "$out"
TIDE_SESSION_DIR=$W/s-a $T stop >/dev/null 2>&1

# -- Listening addresses (issue 12 item 9) -----------------------------------------
listens() { ss -Hltn "sport = :$2" 2>/dev/null | awk '{print $4}' | grep -qx "$1:$2"; }
out=$(TIDE_SESSION_DIR=$W/s-a $T start --head --port $PORT --num-cpus 1 2>&1)
check "a head listens on loopback unless --host says otherwise" \
  'listens 127.0.0.1 $PORT && ! listens 0.0.0.0 $PORT' "$(ss -ltn 2>&1 | grep ":$PORT")"
check "the start banner says other machines cannot reach it, and how to change that" \
  'echo "$out" | grep -q "other machines cannot reach it: it listens on 127.0.0.1 only" &&
   grep -q "loopback only: --host ADDR" "$W/s-a/node.log"' "$out"
out=$(TIDE_SESSION_DIR=$W/s-j $T start --address 127.0.0.1:$PORT --key "$W/s-a/cluster.key" --num-cpus 1 2>&1)
check "a node that joins over loopback listens for the other nodes on loopback" \
  'echo "$out" | grep -q "joined the head" && grep -q "listening for other nodes on 127.0.0.1 port" "$W/s-j/node.log"' \
  "$out $(cat "$W/s-j/node.log")"
TIDE_SESSION_DIR=$W/s-j $T stop >/dev/null 2>&1
TIDE_SESSION_DIR=$W/s-a $T stop >/dev/null 2>&1
out=$(TIDE_SESSION_DIR=$W/s-a $T start --head --port $PORT --host 0.0.0.0 --num-cpus 1 2>&1)
check "--host 0.0.0.0 opens it to every interface" 'listens 0.0.0.0 $PORT' "$out $(ss -ltn 2>&1 | grep ":$PORT")"
TIDE_SESSION_DIR=$W/s-a $T stop >/dev/null 2>&1

# -- The package cache -----------------------------------------------------------
mkdir -p "$W/wd"
cat > "$W/wd/job.lua" <<'LUA'
print("JOB says", dofile("msg.lua"))
LUA
echo 'return "GOOD"' > "$W/wd/msg.lua"
# Runs job.lua from $W/wd as a job on the node in session $1 with cache $2;
# prints the job's log (or the submit error).
job() {
  out=$(cd / && TIDE_SESSION_DIR=$1 $T submit --working-dir "$W/wd" "$W/wd/job.lua" 2>&1) || { echo "$out"; return 1; }
  id=$(echo "$out" | sed -n 's/^submitted //p')
  i=0
  while [ $i -lt 50 ] && ! TIDE_SESSION_DIR=$1 $T job status "$id" 2>/dev/null | grep -Eq "SUCCEEDED|FAILED"; do
    sleep 0.2; i=$((i + 1))
  done
  TIDE_SESSION_DIR=$1 $T job logs "$id" 2>&1
}
start_pkg_head() {
  TIDE_PKG_CACHE=$2 TIDE_SESSION_DIR=$1 $T start --head --port 0 --num-cpus 1 >/dev/null 2>&1
}
C=$W/cache
start_pkg_head "$W/s-p" "$C"
out=$(job "$W/s-p" "$C")
check "a job with a shipped working directory runs from the cache" 'echo "$out" | grep -q "JOB says	GOOD"' "$out"
pkg=$(ls "$C" | grep '\.pkg$' | head -1)
check "the package is named by the BLAKE2b-256 of its contents" \
  '[ -n "$pkg" ] && [ "${pkg%.pkg}" = "$(b2sum -l 256 "$C/$pkg" | cut -d" " -f1)" ]' "$(ls -la "$C")"
check "the cache is private (0700)" '[ "$(stat -c %a "$C")" = 700 ]'
h=${pkg%.pkg}
echo 'return "PWNED"' > "$C/$h/msg.lua"
out=$(job "$W/s-p" "$C")
check "a file changed in the cache is detected and the package unpacked again, never run" \
  'echo "$out" | grep -q "JOB says	GOOD" && ! echo "$out" | grep -q PWNED' "$out"
check "the node log says the package was changed" 'grep -q "was changed after it was unpacked" "$W/s-p/node.log"'
echo 'return "PWNED"' > "$C/$h/msg.lua"
printf 'TDPKG1tampered' > "$C/$h.pkg"
out=$(job "$W/s-p" "$C")
check "a changed blob and tree are removed and the package installed again from what was sent" \
  'echo "$out" | grep -q "JOB says	GOOD" && [ "$(b2sum -l 256 "$C/$h.pkg" | cut -d" " -f1)" = "$h" ]' "$out"
ln -s "$W/victim2" "$C/$h/extra.lua" 2>/dev/null
out=$(job "$W/s-p" "$C")
check "a link planted in an unpacked package is removed with the package" \
  'echo "$out" | grep -q "JOB says	GOOD" && [ ! -L "$C/$h/extra.lua" ]' "$out"
TIDE_SESSION_DIR=$W/s-p $T stop >/dev/null 2>&1

mkdir -m 770 "$W/cache-open" && chmod 770 "$W/cache-open"
start_pkg_head "$W/s-q" "$W/cache-open"
out=$(job "$W/s-q" "$W/cache-open")
check "a package cache others can write is refused, naming it" \
  'echo "$out" | grep -q "$W/cache-open: other users can write to it" && ! echo "$out" | grep -q "JOB says"' "$out"
TIDE_SESSION_DIR=$W/s-q $T stop >/dev/null 2>&1
if [ -n "$OTHER" ]; then
  start_pkg_head "$W/s-r" "$W/cache-foreign"
  out=$(job "$W/s-r" "$W/cache-foreign")
  check "a package cache another user made is refused, naming it" \
    'echo "$out" | grep -q "$W/cache-foreign: it is owned by uid" && [ -z "$(ls -A "$W/cache-foreign")" ]' "$out"
  TIDE_SESSION_DIR=$W/s-r $T stop >/dev/null 2>&1
else
  skip "a package cache another user made is refused (needs root for a second user)"
fi
echo "1..$n"

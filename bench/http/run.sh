#!/bin/sh
# HTTP ingress benchmark. Prints JSON lines:
#  1. build/bench-http: in-process Tide C ingress + its own closed-loop client
#     (http_get_hello, http_post_echo_json), answered on the loop thread, then
#     through an inbox by another thread (--inbox: the Lua thread's path);
#  2. with wrk installed: `wrk -t1 -c32 -d5s` against `bench-http --serve`
#     (the C ingress alone in its process), and against nginx (1 worker,
#     `return 200 "ok"`, bench/http/nginx_plain.conf) when nginx is
#     installed, alternating for $TRIALS trials; then a summary line with the
#     medians and the ratio tide/nginx.
# Env: TRIALS (3), DURATION (5), CONNS (32). Everything on 127.0.0.1.
set -u
cd "$(dirname "$0")/../.."
TRIALS=${TRIALS:-3}; DUR=${DURATION:-5}; CONNS=${CONNS:-32}
TPORT=18090; NPORT=18081
NPREFIX=/tmp/tide-bench-nginx
BODY='{"id":42,"name":"peer","tags":["a","b","c"],"value":3.5,"ok":true}'
make -s build/bench-http >&2 || exit 1

build/bench-http -c "$CONNS" -d "$DUR" -w 1
build/bench-http --inbox -c "$CONNS" -d "$DUR" -w 1

command -v wrk >/dev/null || { echo "run.sh: wrk not installed; skipping the wrk comparison" >&2; exit 0; }

srv_pid=""
cleanup() {
  [ -n "$srv_pid" ] && kill "$srv_pid" 2>/dev/null
  if [ -s $NPREFIX/nginx.pid ]; then kill -QUIT "$(cat $NPREFIX/nginx.pid)" 2>/dev/null; fi
}
trap cleanup EXIT INT TERM

wait_up() {  # url
  i=0
  while [ $i -lt 50 ]; do
    curl -s --max-time 1 "$1" >/dev/null 2>&1 && return 0
    sleep 0.1; i=$((i + 1))
  done
  echo "run.sh: $1 did not answer" >&2; return 1
}

run_wrk() {  # system metric url [body]
  if [ -n "${4:-}" ]; then b=$4; else b=""; fi
  line=$(WRK_BODY=$b timeout 60 wrk -t1 -c"$CONNS" -d"${DUR}s" -s bench/http/wrk_report.lua "$3" |
         sed -n 's/^WRKJSON {/{/p')
  [ -n "$line" ] || { echo "run.sh: wrk gave nothing for $3" >&2; return 1; }
  echo "$line" | sed "s/^{/{\"system\":\"$1\",\"metric\":\"$2\",\"client\":\"wrk -t1 -c$CONNS -d${DUR}s\",/"
}

build/bench-http --serve $TPORT & srv_pid=$!
wait_up http://127.0.0.1:$TPORT/-/healthz || exit 1
have_nginx=0
if command -v nginx >/dev/null; then
  mkdir -p $NPREFIX
  if nginx -p $NPREFIX/ -e $NPREFIX/error.log -c "$PWD/bench/http/nginx_plain.conf" &&
     wait_up http://127.0.0.1:$NPORT/hello; then have_nginx=1; fi
fi

out=$(mktemp)
t=1
while [ $t -le "$TRIALS" ]; do
  run_wrk tide_c_ingress http_get_hello http://127.0.0.1:$TPORT/hello | tee -a "$out"
  [ $have_nginx = 1 ] && run_wrk nginx_return http_get_hello http://127.0.0.1:$NPORT/hello | tee -a "$out"
  run_wrk tide_c_ingress http_post_echo_json http://127.0.0.1:$TPORT/echo "$BODY" | tee -a "$out"
  t=$((t + 1))
done

median() {  # system metric field
  grep "\"system\":\"$1\",\"metric\":\"$2\"" "$out" |
    sed -n "s/.*\"$3\":\([0-9.]*\).*/\1/p" | sort -n | awk '{v[NR]=$1} END {if (NR) print v[int((NR+1)/2)]; else print 0}'
}
tg=$(median tide_c_ingress http_get_hello rps); tp=$(median tide_c_ingress http_get_hello p99_ms)
tpost=$(median tide_c_ingress http_post_echo_json rps)
ng=$(median nginx_return http_get_hello rps); np=$(median nginx_return http_get_hello p99_ms)
awk -v tg="$tg" -v tp="$tp" -v ng="$ng" -v np="$np" -v tpost="$tpost" -v n="$TRIALS" 'BEGIN {
  printf "{\"summary\":\"median of %d wrk trials\",\"tide_get_rps\":%s,\"tide_get_p99_ms\":%s,\"tide_post_echo_rps\":%s", n, tg, tp, tpost
  if (ng > 0) printf ",\"nginx_return_get_rps\":%s,\"nginx_return_get_p99_ms\":%s,\"tide_over_nginx\":%.2f", ng, np, tg / ng
  printf "}\n" }'
rm -f "$out"

#!/bin/sh
# The dashboard in a real browser: headless Chromium loads each page from a
# live head, its DOM must show the numbers `tide list --json` gives, and a
# screenshot of each page is kept in build/dashboard-PAGE.png. Without
# Chromium (Debian chromium) every check is a SKIP.
cd "$(dirname "$0")/../.."
T=${TIDE_BIN:-$(pwd)/bin/tide}  # TIDE_BIN: another build (build/asan/tide)
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
no() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "# $(echo "$2" | head -c 600 | tr '\n' '|')"; }
check() { if eval "$2"; then ok "$1"; else no "$1" "$3"; fi; }
PAGES="overview nodes actors tasks objects placement-groups jobs"
CHROME=$(command -v chromium || command -v chromium-browser || command -v google-chrome)
if [ -z "$CHROME" ]; then
  for p in $PAGES; do n=$((n + 1)); echo "ok $n - the $p page in Chromium # SKIP chromium not installed"; done
  echo "1..$n"
  exit 0
fi
export TIDE_SESSION_DIR=$(mktemp -d /tmp/tide-dash-test-XXXXXX)
W=$(mktemp -d /tmp/tide-dash-work-XXXXXX)
trap '$T stop >/dev/null 2>&1; rm -rf "$W" "$TIDE_SESSION_DIR"' EXIT
DPORT=$((23000 + $$ % 1000))
$T start --head --num-cpus 2 --port 0 --dashboard-port $DPORT >"$W/start" 2>&1
D=http://127.0.0.1:$DPORT
mkdir -p build

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
# The page's DOM after its scripts ran, and a screenshot of it.
dom() {
  url="$D/$1"; [ "$1" = overview ] && url="$D/"
  timeout 60 "$CHROME" --headless=new --no-sandbox --disable-gpu --virtual-time-budget=4000 \
    --dump-dom "$url" 2>/dev/null
  timeout 60 "$CHROME" --headless=new --no-sandbox --disable-gpu --virtual-time-budget=4000 \
    --window-size=1280,720 --screenshot="build/dashboard-$1.png" "$url" >/dev/null 2>&1
}
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

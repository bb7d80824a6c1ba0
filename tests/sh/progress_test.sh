#!/bin/sh
# tide.progress: into a pipe at most one plain line per interval however
# many updates and bars; nothing with TIDE_PROGRESS=0; on a terminal (a pty
# through script(1)) bars redrawn in place with \r, stacked, with the
# driver's and its tasks' prints written whole above them; in a task, plain
# lines through print; bad arguments named.
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
no() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "# $2"; }
check() { if eval "$2"; then ok "$1"; else no "$1" "$3"; fi; }
W=$(mktemp -d /tmp/tide-progress-test-XXXXXX)
trap 'rm -rf "$W"' EXIT

# Three bars (one per "stage"), thousands of updates over about 4 s, and
# prints from the driver and from tasks.
cat > "$W/job.lua" <<'LUA'
local tide = require("tide")
local say = tide.remote(function(i) print("task says " .. i) return i end)
local secs = tonumber(arg[1]) or 4
local a = tide.progress(nil, {desc = "read", unit = "rows"})
local b = tide.progress(nil, {desc = "map", unit = "rows"})
local c = tide.progress(secs * 100, {desc = "write"})
local refs, i = {}, 0
local start = require("tide.core").now()
while require("tide.core").now() - start < secs do
  i = i + 1
  a:update(10); b:update(7)
  if i % 20 == 0 then c:update() end
  if i % 400 == 0 then refs[#refs + 1] = say:remote(i); print("driver says " .. i) end
  tide.sleep(0.0005)
end
tide.get(refs)
a:close(); b:close(); c:close()
print("UPDATES " .. i * 2 + math.floor(i / 20))
LUA

# 4 s / 0.5 s: at most 9 periodic lines (the first comes at once), and a
# last line for each of the 3 bars.
TIDE_PROGRESS_INTERVAL=0.5 $T run --num-cpus 2 "$W/job.lua" 4 > "$W/out" 2> "$W/err" </dev/null
lines=$(wc -l < "$W/err")
ups=$(sed -n 's/^UPDATES //p' "$W/out")
check "into a pipe: $ups updates of 3 bars in 4 s make $lines lines (<= 12, interval 0.5 s)" \
  '[ -n "$ups" ] && [ "$ups" -gt 1000 ] && [ "$lines" -le 12 ] && [ "$lines" -ge 4 ]' "$(cat "$W/err")"
check "a plain line holds every bar, with counts and rates" \
  'grep -q "^read: [0-9]* rows \[.* rows/s, .*\] | map: [0-9]* rows \[.*\] | write: .*%.*ETA" "$W/err"' "$(cat "$W/err")"
check "each bar that ran an interval ends with a last line" \
  'tail -3 "$W/err" | grep -q "^read: " && tail -3 "$W/err" | grep -q "^write: .*in 0:0"' "$(cat "$W/err")"
check "no escape codes or carriage returns in a pipe" '! grep -q "$(printf "\r")" "$W/err" && ! grep -q "$(printf "\033")" "$W/err"'
check "prints are untouched in a pipe" 'grep -q "^driver says 400$" "$W/out" && grep -q "task says 400$" "$W/out"' "$(cat "$W/out")"
# The default interval is 5 s: a 4 s job writes the first line only.
$T run --num-cpus 2 "$W/job.lua" 2 > "$W/out" 2> "$W/err" </dev/null
check "with the default 5 s interval a 2 s job writes one line" '[ "$(wc -l < "$W/err")" -eq 1 ]' "$(cat "$W/err")"

TIDE_PROGRESS=0 $T run --num-cpus 2 "$W/job.lua" 1 > "$W/out" 2> "$W/err" </dev/null
check "TIDE_PROGRESS=0 writes nothing" '[ ! -s "$W/err" ] && grep -q UPDATES "$W/out"' "$(cat "$W/err")"

# A terminal: script(1) gives the driver a pty.
if command -v script >/dev/null 2>&1; then
  COLUMNS=100 script -q -c "$T run --num-cpus 2 $W/job.lua 2" /dev/null > "$W/tty" 2>&1 </dev/null
  cat > "$W/screen.py" <<'PY'
import re, sys
s = open(sys.argv[1], "rb").read().decode("utf-8", "replace")
# Plays the bytes on a screen: \r, \n, ESC[K (erase to the end), ESC[nA (up).
screen, row, col, i = {}, 0, 0, 0
while i < len(s):
    m = re.match(r"\x1b\[(\d*)([A-Za-z])", s[i:])
    if m:
        k = int(m.group(1) or 1)
        if m.group(2) == "A": row -= k if m.group(1) else 1
        elif m.group(2) == "K":
            screen[row] = {c: ch for c, ch in screen.get(row, {}).items() if c < col}
        i += m.end(); continue
    ch = s[i]
    if ch == "\r": col = 0
    elif ch == "\n": row, col = row + 1, 0
    else: screen.setdefault(row, {})[col] = ch; col += 1
    i += 1
for r in range(max(screen) + 1):
    line = screen.get(r, {})
    print("".join(line.get(c, " ") for c in range(max(line) + 1 if line else 0)).rstrip())
PY
  python3 "$W/screen.py" "$W/tty" > "$W/screen"
  redraws=$(grep -o "$(printf '\r\033\[2K')" "$W/tty" | wc -l)
  check "on a terminal the bars are redrawn in place with \\r (ESC[2K), $redraws times" '[ "$redraws" -ge 10 ]' "$(head -c 600 "$W/tty" | od -c | head)"
  check "on a terminal three bars stack (ESC[1A moves up over them)" 'grep -q "$(printf "\033\[1A")" "$W/tty"'
  # What the user sees at the end: every print whole, above the bars' last states.
  check "the screen shows every print whole, then the three bars, then the script's last line" \
    'grep -c "^driver says [0-9]*$" "$W/screen" | grep -qv "^0$" && grep -c "task says [0-9]*$" "$W/screen" | grep -qv "^0$" &&
     [ "$(grep -vc "^driver says [0-9]*$\|task says [0-9]*$\|^read: \|^map: \|^write: \|^UPDATES" "$W/screen")" -eq 0 ] &&
     [ "$(tail -4 "$W/screen" | cut -c1-5 | tr "\n" " ")" = "read: map:  write UPDAT " ]' "$(cat "$W/screen")"
  check "no print is torn by a bar (each print line is whole on the screen)" \
    '[ "$(grep -c "says" "$W/screen")" -eq "$(grep -c "says [0-9]*$" "$W/screen")" ]' "$(cat "$W/screen")"
  # A line cut to the terminal's width is cut at a character (é is 2 bytes).
  cat > "$W/utf8.lua" <<'LUA'
local tide = require("tide")
local b = tide.progress(10, {desc = "xy" .. string.rep("\195\169", 60)})
b:update(); b:close()
LUA
  COLUMNS=40 script -q -c "$T run --num-cpus 1 $W/utf8.lua" /dev/null > "$W/utf8" 2>&1 </dev/null
  check "a bar cut to the terminal's width stays UTF-8" \
    'python3 -c "import sys; sys.stdin.buffer.read().decode(\"utf-8\")" < "$W/utf8" && grep -q "x" "$W/utf8"' \
    "$(od -c "$W/utf8" | head -5)"
else
  ok "terminal tests # SKIP script(1) is not installed (bsdutils)"
fi

# In a task a bar writes plain lines through print (to the driver).
cat > "$W/task.lua" <<'LUA'
local tide = require("tide")
local work = tide.remote(function()
  local bar = tide.progress(3000, {desc = "in task"})
  local core = require("tide.core")
  local t0 = core.now()
  for i = 1, 3000 do bar:update(); if i % 10 == 0 then tide.sleep(0.01) end end
  bar:close()
  return core.now() - t0
end)
print("TOOK", tide.get(work:remote()))
LUA
TIDE_PROGRESS_INTERVAL=1 $T run --num-cpus 2 "$W/task.lua" > "$W/out" 2> "$W/err" </dev/null
k=$(grep -c "in task: " "$W/out")
check "a task's bar reaches the driver through print, $k lines for 3000 updates over ~3 s" \
  '[ "$k" -ge 2 ] && [ "$k" -le 6 ] && grep -q "^(task.lua:2 pid=[0-9]*) in task: .*/3000" "$W/out"' "$(cat "$W/out" "$W/err")"

cat > "$W/bad.lua" <<'LUA'
local tide = require("tide")
for _, a in ipairs({{"x"}, {-1}, {10, {desk = "x"}}, {10, "x"}, {10, {desc = 5}}}) do
  local ok, err = pcall(tide.progress, a[1], a[2])
  print(ok, err)
end
local ok, err = pcall(function() tide.progress(1):update("a") end)
print(ok, err)
LUA
out=$($T run --num-cpus 1 "$W/bad.lua" 2>&1)
check "bad arguments are named" \
  'echo "$out" | grep -q "total must be a non-negative number or nil, got x" &&
   echo "$out" | grep -q "total must be a non-negative number or nil, got -1" &&
   echo "$out" | grep -q "unknown option .desk." && echo "$out" | grep -q "options must be a table, got string" &&
   echo "$out" | grep -q "desc must be a string" && echo "$out" | grep -q "n must be a number, got string" &&
   ! echo "$out" | grep -q "^true"' "$out"
echo "1..$n"

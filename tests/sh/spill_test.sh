#!/bin/sh
# The spill file on a real small disk (a tmpfs, so root): space freed there
# is reused and given back, so rounds of put-and-release never fill it; and
# with the disk full, put says so and every object stored before stays
# readable, byte for byte.
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
n=0
check() { n=$((n + 1)); if eval "$2"; then echo "ok $n - $1"; else echo "not ok $n - $1"; echo "$3" | sed 's/^/# /'; fi; }
W=$(mktemp -d /tmp/tide-spill-test-XXXXXX)
trap 'umount "$W/big" "$W/small" 2>/dev/null; rm -rf "$W"' EXIT
mkdir -p "$W/big" "$W/small"
if [ "$(id -u)" != 0 ] || ! mount -t tmpfs -o size=48m tmpfs "$W/big" 2>/dev/null ||
   ! mount -t tmpfs -o size=8m tmpfs "$W/small" 2>/dev/null; then
  echo "ok 1 - # SKIP needs root to mount a small tmpfs"
  echo "1..1"
  exit 0
fi

cat > "$W/rounds.lua" <<'LUA'
local tide = require("tide")
local dir = arg[1]
local function used()  -- bytes in use on the spill disk
  local p = io.popen("df -B1 --output=used " .. dir .. " | tail -1")
  local v = tonumber(p:read("*a"))
  p:close()
  return v
end
local MiB = 1024 * 1024
for round = 1, 6 do
  local refs = {}
  for i = 1, 10 do refs[i] = tide.put(string.rep(string.char(64 + i), 3 * MiB)) end  -- 30 MiB, store 16
  local spilled = tide.stats().spilled_bytes
  local ok = true
  for i = 1, 10 do ok = ok and tide.get(refs[i]) == string.rep(string.char(64 + i), 3 * MiB) end
  refs = nil
  collectgarbage(); collectgarbage()
  tide.get(tide.put(1))  -- the released refs reach the node
  print(string.format("ROUND %d spilled %d ok %s after %d disk %d", round, spilled, tostring(ok),
    tide.stats().spilled_bytes, used()))
end
LUA
out=$(TIDE_SPILL_DIR="$W/big" timeout 120 $T run --object-store-memory 16e6 "$W/rounds.lua" "$W/big" 2>&1)
check "six rounds of put-and-release, 30 MiB each through a 16 MB store, on a 48 MiB spill disk" \
  '[ "$(echo "$out" | grep -c "ok true")" = 6 ] && echo "$out" | grep -q "^ROUND 6 spilled [1-9]"' "$out"
check "... spilled_bytes goes back to 0 when the objects go" \
  '[ "$(echo "$out" | grep -c "after 0 ")" = 6 ]' "$out"
check "... and so does the disk space (punched out, the file cut back)" \
  '! echo "$out" | awk "/^ROUND/ && \$NF > 4194304 { bad = 1 } END { exit !bad }"' "$out"

cat > "$W/full.lua" <<'LUA'
local tide = require("tide")
local MiB = 1024 * 1024
local refs, stored, err = {}, 0, nil
for i = 1, 12 do  -- 36 MiB: the store holds 16 MB, the disk 8 MiB
  local ok, r = pcall(tide.put, string.rep(string.char(64 + i), 3 * MiB))
  if not ok then err = tostring(r); break end
  refs[i] = r
  stored = i
end
print("STORED", stored)
print("ERR", err)
local good = 0
for i = 1, stored do
  if tide.get(refs[i]) == string.rep(string.char(64 + i), 3 * MiB) then good = good + 1 end
end
print("READABLE", good)
LUA
out=$(TIDE_SPILL_DIR="$W/small" timeout 120 $T run --object-store-memory 16e6 "$W/full.lua" 2>&1)
stored=$(echo "$out" | sed -n 's/^STORED	//p')
check "with the spill disk full, put fails saying so" \
  'echo "$out" | grep -q "^ERR	.*no space left on the spill disk"' "$out"
check "... and every object stored before stays readable, byte for byte" \
  '[ -n "$stored" ] && [ "$stored" -ge 5 ] && echo "$out" | grep -q "^READABLE	$stored$"' "$out"
echo "1..$n"

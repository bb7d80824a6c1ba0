#!/bin/sh
# What make lint checks, kept true by make test: no include across the
# layers (scripts/check-layers.sh), the size limits of the C sources
# (scripts/check-sizes.sh), luacheck clean over stdlib, examples
# and the Lua tests, cppcheck clean over the C sources when installed.
cd "$(dirname "$0")/../.." || exit 1
. tests/sh/lib.sh
out=$(sh scripts/check-layers.sh 2>&1)
check "no include crosses a layer (engine/ no Lua or gpu/, gpu/ no Lua)" '[ $? -eq 0 ]' "$out"
out=$(sh scripts/check-sizes.sh 2>&1)
check "no C file over 1,200 lines, no function over 120, engine/node.c under 800" '[ $? -eq 0 ]' "$out"
if command -v luacheck >/dev/null; then
  out=$(luacheck -q --no-color stdlib examples tests/lua 2>&1)
  check "luacheck finds nothing in stdlib, examples and tests/lua" '[ $? -eq 0 ]' "$(echo "$out" | grep -E ':[0-9]+:' | head -20)"
else
  no "luacheck finds nothing" "luacheck not installed (scripts/deps.sh installs lua-check)"
fi
if command -v cppcheck >/dev/null; then
  out=$(cppcheck -q --error-exitcode=1 --enable=warning,performance engine lua gpu cmd 2>&1)
  check "cppcheck finds nothing in the C sources" '[ $? -eq 0 ]' "$out"
else
  skip "cppcheck finds nothing in the C sources" "cppcheck not installed"
fi
plan

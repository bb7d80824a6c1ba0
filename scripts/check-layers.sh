#!/bin/sh
# The layers of DESIGN §8, checked on the sources: engine/ includes no Lua,
# tensor or binding header; gpu/ no Lua or binding header.  (The build also
# compiles each layer with only its own include paths; this catches the
# system Lua headers, which every layer can see.)  Run by make before it
# links bin/tide, and by make lint.
cd "$(dirname "$0")/.." || exit 1
LUA_HDRS='lua\.h|lauxlib\.h|lualib\.h|luajit\.h|luaconf\.h'
lua_own=$(ls lua/*.h 2>/dev/null | sed 's|lua/||; s|\.|\\.|g' | paste -sd'|' -)
gpu_own=$(ls gpu/*.h 2>/dev/null | sed 's|gpu/||; s|\.|\\.|g' | paste -sd'|' -)
bad=0
report() {  # files pattern why
  hits=$(grep -nE "^[[:space:]]*#[[:space:]]*include[[:space:]]*[<\"]($2)[>\"]" $1 2>/dev/null)
  [ -z "$hits" ] && return
  echo "$hits" | sed "s|\$| ($3)|" >&2
  bad=1
}
report "engine/*.c engine/*.h" "$LUA_HDRS|$lua_own" "engine/ must not use Lua or lua/"
report "engine/*.c engine/*.h" "$gpu_own" "engine/ must not use gpu/"
report "gpu/*.c gpu/*.h" "$LUA_HDRS|$lua_own" "gpu/ must not use Lua or lua/"
[ $bad -eq 0 ] || { echo "check-layers: an include crosses a layer (DESIGN §8)" >&2; exit 1; }

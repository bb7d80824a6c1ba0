-- luacheck configuration (make lint).
std = "luajit"
max_line_length = 120
-- Lightweight actors replace os.exit so that it ends only the actor.
files["stdlib/tide/boot.lua"] = {ignore = {"122"}}
files["tests/**"] = {max_line_length = false}
files["bench/**"] = {max_line_length = false}

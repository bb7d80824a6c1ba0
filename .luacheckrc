-- luacheck configuration (make lint).
std = "luajit"
max_line_length = 120
-- Serve handlers and jobs take (self, req, job) whether they use them or not.
unused_args = false
-- Lightweight actors replace os.exit so that it ends only the actor.
files["stdlib/tide/boot.lua"] = {ignore = {"122"}}
-- Tests hold values alive in variables they never read (refs that keep
-- objects), shadow small names on purpose, and set globals that remote
-- functions must capture.
files["tests/**"] = {
  max_line_length = false,
  ignore = {"211", "221", "231", "241", "311", "421", "431"},
  globals = {"GLOBAL_FACTOR", "GLOBAL_HELPER", "arg"},
}
files["bench/**"] = {max_line_length = false}

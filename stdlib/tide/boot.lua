-- tide.boot: sets up a worker's Lua state (a task worker or one actor):
-- function capture hooks, print forwarded to the driver with its origin,
-- error formatting, and os.exit ending only a lightweight actor.
local M = {}

local function errfmt(err, tb, name)
  local core = require("tide.core")
  local ctx = core.context()
  local e = {traceback = tb or "", task = name, pid = ctx.pid}
  if type(err) == "table" and type(err.kind) == "string" then
    -- keep_kind: the stdlib's own failures that name what went wrong
    -- elsewhere (tide.rdt: the producer died, the tensor is gone).
    if err.kind == "TaskCancelledError" or err.keep_kind then
      e.kind, e.message = err.kind, err.message
    else
      e.kind = "TaskError"
      e.message = err.kind .. ": " .. tostring(err.message)
      e.cause = {kind = err.kind, message = err.message, traceback = err.traceback}
    end
  else
    e.kind = "TaskError"
    e.message = tostring(err)
  end
  return e
end

M.errfmt = errfmt

function M.setup(is_actor)
  require("tide.capture").install()
  local reg = debug.getregistry()
  reg["tide.hook.errfmt"] = errfmt
  local core = require("tide.core")
  local select, tostring, concat, format = select, tostring, table.concat, string.format
  _G.print = function(...)
    local n = select("#", ...)
    local parts = {}
    for i = 1, n do parts[i] = tostring((select(i, ...))) end
    local ctx = core.context()
    core.print(format("(%s pid=%d) %s\n", ctx.name or ctx.worker_id, ctx.pid, concat(parts, "\t")))
  end
  if is_actor then
    os.exit = function() error({__tide_exit = true}, 0) end
  end
end

return M

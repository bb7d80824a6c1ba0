-- The head's key-value store: where the ranks of a collective group meet
-- (addresses, stream keys, NCCL ids). Workers and drivers reach it with
-- core.call_node("kv_put" | "kv_get" | "kv_del", ...); a node passes those
-- on to its head. It lives in the driver's private RPC state, which
-- lua/core_driver.c (td_core_driver_rpc) loads this module into. On a head with a
-- store (head.db) every string key is kept there too, and comes back after
-- a restart.
local M = {}

-- Adds kv_put, kv_get and kv_del to ops; core is that state's tide.core.
-- Each is an entry of td__rpc_table (lua/core_driver.c), whose flags make
-- a node relay them to its head; ops takes no name the table lacks.
function M.install(ops, core)
  local kv = {}
  for k, v in pairs(core.persisted("kv")) do
    local ok, val = pcall(core.decode, v)
    if ok then kv[k] = val end
  end
  local function keep(k, v)
    if type(k) == "string" then core.persist("kv", k, v ~= nil and core.encode(v) or nil) end
  end
  function ops.kv_put(k, v)
    kv[k] = v
    pcall(keep, k, v)
    return true
  end
  function ops.kv_get(k)
    return kv[k]
  end
  function ops.kv_del(k)
    kv[k] = nil
    pcall(keep, k, nil)
    return true
  end
end

return M

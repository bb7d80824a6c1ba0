-- tide.collective: groups of tasks or actors with a rank and a world size,
-- and collectives over CPU f32 tensors (DESIGN §5): allreduce (sum, avg,
-- max, min), allgather, reduce_scatter, broadcast, send/recv, barrier.
-- Ranks are 0-based as in NCCL and MPI. The bytes move through a region of
-- the node's shared-memory store with the bandwidth-optimal ring of
-- gpu/ring.c; CUDA tensors use NCCL through tide.tensor.nccl_comm.
local core = require("tide.core")
local cc = require("tide.collective_c")

local M = {}

local CAP = 1024 * 1024      -- bytes per rank-to-rank channel
local groups, default = {}, nil
local owners = {}            -- group -> the task or actor that made it

-- Groups last for the task or actor that made them: a worker process
-- reused by a later task does not hand it someone else's group.
local function owner()
  local ctx = core.context()
  return ctx.actor_id and ("a" .. ctx.actor_id) or ("t" .. tostring(ctx.task_id))
end

local function sleep(s)
  local tide = require("tide")
  tide.sleep(s)
end

-- C.init_group(world_size, rank, name) -> group (also the default group).
function M.init_group(world, rank, name, opts)
  if type(world) ~= "number" or world < 1 or world % 1 ~= 0 then
    error("init_group: world_size must be a positive integer", 2)
  end
  if type(rank) ~= "number" or rank < 0 or rank >= world or rank % 1 ~= 0 then
    error(string.format("init_group: rank must be an integer in 0..%d", world - 1), 2)
  end
  if type(name) ~= "string" or name == "" then error("init_group: name must be a string", 2) end
  if not core.call_node then error("init_group: call it inside tasks or actors", 2) end
  local timeout = opts and opts.timeout or 60
  local key = "tide.collective:" .. name .. ":" .. world
  local bytes = cc.region_bytes(world, CAP)
  local off
  if rank == 0 then
    off = cc.alloc(bytes)
    local g = cc.attach(off, bytes, world, rank, CAP, true)
    core.call_node("kv_put", key, off)
    groups[name], default, owners[g] = g, g, owner()
    return g
  end
  local waited = 0
  repeat
    off = core.call_node("kv_get", key)
    if not off then
      if waited > timeout then error("init_group: rank 0 of " .. name .. " did not appear", 2) end
      sleep(0.002)
      waited = waited + 0.002
    end
  until off
  local g = cc.attach(off, bytes, world, rank, CAP, false)
  groups[name], default, owners[g] = g, g, owner()
  return g
end

local function group(name)
  local g = name and groups[name] or default
  if not g or owners[g] ~= owner() then
    error("no collective group here: call init_group first (in this task or actor)", 3)
  end
  return g
end

function M.allreduce(t, op, name) return group(name):allreduce(t, op or "sum") end
function M.reduce_scatter(t, out, op, name) return group(name):reduce_scatter(t, out, op or "sum") end
function M.allgather(t, out, name) return group(name):allgather(t, out) end
function M.broadcast(t, root, name) return group(name):broadcast(t, root or 0) end
function M.send(t, peer, name) return group(name):send(t, peer) end
function M.recv(t, peer, name) return group(name):recv(t, peer) end
function M.barrier(name) return group(name):barrier() end

-- Elements of rank's chunk in reduce_scatter of count elements.
function M.chunk_count(count, world, rank) return cc.chunk_count(count, world, rank) end

function M.destroy_group(name)
  local g = groups[name]
  if g then g:destroy(); groups[name] = nil end
  if default == g then default = nil end
end

return M

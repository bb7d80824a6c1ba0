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

-- Waits for rank 0 to publish key in the node's KV.
local function await_key(key, name, timeout)
  local waited = 0
  while true do
    local v = core.call_node("kv_get", key)
    if v then return v end
    if waited > timeout then error("init_group: rank 0 of " .. name .. " did not appear", 4) end
    sleep(0.002)
    waited = waited + 0.002
  end
end

-- NCCL groups for CUDA tensors: rank 0 makes the unique id and passes it
-- through the node's KV; every rank then joins the communicator.
local function init_nccl(world, rank, name, opts)
  local T = require("tide.tensor")
  local key = "tide.collective.nccl:" .. name .. ":" .. world
  local id
  if rank == 0 then
    id = T.nccl_unique_id()
    core.call_node("kv_put", key, id)
  else
    id = await_key(key, name, opts.timeout or 60)
  end
  local comm = T.nccl_comm(world, id, rank, opts.device or "cuda:0")
  local g = {nccl = comm, device = opts.device or "cuda:0"}
  groups[name], default, owners[g] = g, g, owner()
  return g
end

-- C.init_group(world_size, rank, name [, {backend = "ring" | "nccl", device, timeout}])
-- -> group (also the default group).
function M.init_group(world, rank, name, opts)
  if type(world) ~= "number" or world < 1 or world % 1 ~= 0 then
    error("init_group: world_size must be a positive integer", 2)
  end
  if type(rank) ~= "number" or rank < 0 or rank >= world or rank % 1 ~= 0 then
    error(string.format("init_group: rank must be an integer in 0..%d", world - 1), 2)
  end
  if type(name) ~= "string" or name == "" then error("init_group: name must be a string", 2) end
  if not core.call_node then error("init_group: call it inside tasks or actors", 2) end
  opts = opts or {}
  if opts.backend == "nccl" then return init_nccl(world, rank, name, opts) end
  if opts.backend ~= nil and opts.backend ~= "ring" then
    error("init_group: backend must be \"ring\" (CPU tensors) or \"nccl\" (CUDA tensors)", 2)
  end
  local timeout = opts.timeout or 60
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
  off = await_key(key, name, timeout)
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

-- With an NCCL group, allgather and reduce_scatter return new tensors
-- (the communicator's API) and also copy into out when it is given.
local function nccl_out(res, out)
  if out then out:copy(res) end
  return out or res
end

function M.allreduce(t, op, name)
  local g = group(name)
  if g.nccl then return g.nccl:allreduce(t, op or "sum") end
  return g:allreduce(t, op or "sum")
end
function M.reduce_scatter(t, out, op, name)
  local g = group(name)
  if g.nccl then return nccl_out(g.nccl:reduce_scatter(t, op or "sum"), out) end
  return g:reduce_scatter(t, out, op or "sum")
end
function M.allgather(t, out, name)
  local g = group(name)
  if g.nccl then return nccl_out(g.nccl:allgather(t), out) end
  return g:allgather(t, out)
end
function M.broadcast(t, root, name)
  local g = group(name)
  if g.nccl then return g.nccl:broadcast(t, root or 0) end
  return g:broadcast(t, root or 0)
end
function M.send(t, peer, name)
  local g = group(name)
  if g.nccl then return g.nccl:send(t, peer) end
  return g:send(t, peer)
end
function M.recv(t, peer, name)
  local g = group(name)
  if g.nccl then return g.nccl:recv(t, peer) end
  return g:recv(t, peer)
end
function M.barrier(name)
  local g = group(name)
  if g.nccl then
    -- A one-element allreduce is NCCL's barrier.
    local T = require("tide.tensor")
    return g.nccl:allreduce(T.zeros({1}):to(g.device or "cuda:0"))
  end
  return g:barrier()
end

-- Elements of rank's chunk in reduce_scatter of count elements.
function M.chunk_count(count, world, rank) return cc.chunk_count(count, world, rank) end

function M.destroy_group(name)
  local g = groups[name]
  if g then
    if g.nccl then g.nccl:destroy() else g:destroy() end
    groups[name] = nil
  end
  if default == g then default = nil end
end

return M

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
local my_rank = {}           -- group -> this process's rank in it
local actor_ranks = {}       -- group -> {actor id = rank} of its ranks that are actors (tide.rdt)
local spans = setmetatable({}, {__mode = "k"})  -- group -> nodes it spans

-- Groups last for the task or actor that made them: a worker process
-- reused by a later task does not hand it someone else's group.
local owner = cc.owner_key

local function sleep(s)
  local tide = require("tide")
  tide.sleep(s)
end

-- Waits for who (rank 0 unless told) to publish key in the head's KV.
local function await_key(key, name, timeout, who)
  local waited = 0
  while true do
    local v = core.call_node("kv_get", key)
    if v then return v end
    if waited > timeout then error("init_group: " .. (who or "rank 0") .. " of " .. name .. " did not appear", 4) end
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
  -- Which actor is which rank (tide.rdt sends to an actor by its rank).
  local mine = core.context().actor_id or ""  -- "": a task
  core.call_node("kv_put", key .. ":actor:" .. rank, mine)
  local ar = {}
  for r = 0, world - 1 do
    local a = r == rank and mine or await_key(key .. ":actor:" .. r, name, opts.timeout or 60, "rank " .. r)
    if a ~= "" then ar[a] = r end
  end
  groups[name], default, owners[g], my_rank[g], actor_ranks[g] = g, g, owner(), rank, ar
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
  for _, k in ipairs({"timeout", "op_timeout"}) do
    local v = opts[k]
    if v ~= nil and (type(v) ~= "number" or v < 0 or v ~= v) then
      error("init_group: " .. k .. " must be a number of seconds >= 0, got " .. tostring(v), 2)
    end
  end
  local timeout = opts.timeout or 60
  local base = "tide.collective:" .. name .. ":" .. world
  local bytes = cc.region_bytes(world, CAP)
  if world == 1 then
    local g = cc.attach(cc.alloc(bytes), bytes, 1, 0, CAP, true)
    local a = core.context().actor_id
    groups[name], default, owners[g], my_rank[g], actor_ranks[g] = g, g, owner(), 0, a and {[a] = 0} or {}
    return g
  end
  -- Rendezvous through the head's KV: every rank says where it is (its
  -- node, and a port for streams from the other nodes' ranks); rank 0
  -- gathers them into the group's table with a fresh secret for the
  -- streams. A nonce per rank tells this incarnation's table from a stale
  -- one left by an earlier group of the same name.
  local node = core.context().node_id
  local host = os.getenv("TIDE_COLL_HOST") or "127.0.0.1"
  local net = cc.net_listen(host)
  local me = {node = node, host = host, port = net:port(), nonce = cc.random_hex():sub(1, 16),
              actor = core.context().actor_id}
  core.call_node("kv_put", base .. ":rank:" .. rank, me)
  local tbl
  if rank == 0 then
    local ranks = {me}
    for r = 1, world - 1 do ranks[r + 1] = await_key(base .. ":rank:" .. r, name, timeout, "rank " .. r) end
    tbl = {ranks = ranks, secret = cc.random_hex(), id = cc.random_hex():sub(1, 16),
           plain = os.getenv("TIDE_COLL_PLAIN") == "1"}
    core.call_node("kv_put", base .. ":table", tbl)
  else
    local waited = 0
    while true do
      tbl = core.call_node("kv_get", base .. ":table")
      if type(tbl) == "table" and tbl.ranks[rank + 1] and tbl.ranks[rank + 1].nonce == me.nonce then break end
      if waited > timeout then error("init_group: rank 0 of " .. name .. " did not appear", 2) end
      sleep(0.002)
      waited = waited + 0.002
    end
  end
  -- Nodes in the order of their first rank; this node's ranks in order.
  local leaders, mine, hosts, ports, names, seen, ar = {}, {}, {}, {}, {}, {}, {}
  for r = 0, world - 1 do
    local e = tbl.ranks[r + 1]
    if e.actor then ar[e.actor] = r end
    hosts[r + 1], ports[r + 1], names[r + 1] = e.host, e.port, e.node
    if not seen[e.node] then seen[e.node] = true; leaders[#leaders + 1] = r end
    if e.node == node then mine[#mine + 1] = r end
  end
  local lrank
  for i, r in ipairs(mine) do if r == rank then lrank = i - 1 end end
  -- This node's ranks share a ring in its store; the first makes it (its
  -- headers zeroed) before the others are told where it is.
  local off, lbytes, g
  local lkey = base .. ":local:" .. node .. ":" .. tbl.id
  if #mine > 1 then
    lbytes = cc.region_bytes(#mine, CAP)
    if lrank == 0 then
      off = cc.alloc(lbytes)
      local lg = cc.attach(off, lbytes, #mine, 0, CAP, true)
      if #leaders == 1 then g = lg else lg:destroy() end
      core.call_node("kv_put", lkey, off)
    else
      off = await_key(lkey, name, timeout, "rank " .. mine[1])
    end
  end
  if #leaders == 1 then
    -- One node: the shared-memory ring alone, as before.
    net:close()
    g = g or cc.attach(off, lbytes, world, rank, CAP, false)
  else
    net:join(rank, hosts, ports, names, tbl.secret, tbl.plain, timeout, opts.op_timeout or 0)
    g = cc.attach_net(net, world, rank, lrank == 0 and leaders or nil, off, lbytes, #mine, lrank, CAP, false)
  end
  -- Everyone is in: the rendezvous keys go (a later group of the same
  -- name starts clean).
  g:barrier()
  core.call_node("kv_del", base .. ":rank:" .. rank)
  if rank == 0 then core.call_node("kv_del", base .. ":table") end
  if off and lrank == 0 then core.call_node("kv_del", lkey) end
  spans[g] = #leaders
  groups[name], default, owners[g], my_rank[g], actor_ranks[g] = g, g, owner(), rank, ar
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

-- Nodes the group's ranks are on (1: shared memory only).
function M.num_nodes(name) return spans[group(name)] or 1 end

-- Elements of rank's chunk in reduce_scatter of count elements.
function M.chunk_count(count, world, rank) return cc.chunk_count(count, world, rank) end

-- For tide.rdt (direct tensor transport): the group named (or, without a
-- name, the only one) this task or actor joined -> name, rank, and the
-- device of an NCCL group (nil for the CPU ring); nil, and the names when
-- there are several, when there is none to use.
function M._rdt_group(name)
  local me = owner()
  if name then
    local g = groups[name]
    if g and owners[g] == me then return name, my_rank[g], g.nccl and g.device or nil end
    return nil
  end
  local found, names = nil, {}
  for n, g in pairs(groups) do
    if owners[g] == me then found = n; names[#names + 1] = n end
  end
  if #names > 1 then
    table.sort(names)
    return nil, table.concat(names, ", ")
  end
  if found then return M._rdt_group(found) end
end

-- For tide.rdt: the rank of actor aid in this task's or actor's group
-- named name, or nil when that actor is not one of its ranks.
function M._rdt_rank_of(name, aid)
  local g = groups[name]
  if not g or owners[g] ~= owner() then return nil end
  return actor_ranks[g][aid]
end

function M.destroy_group(name)
  local g = groups[name]
  if g then
    if g.nccl then g.nccl:destroy() else g:destroy() end
    groups[name] = nil
  end
  if default == g then default = nil end
end

return M

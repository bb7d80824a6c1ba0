-- tide.rdt: tensors between actors without the object store (Ray's
-- "direct transport", @ray.method(tensor_transport = ...)). A method
-- declared with tide.method({tensor_transport = "collective"}, fn) keeps
-- the tensor it returns in its actor's memory; the object store holds only
-- a descriptor (shape, dtype, group, rank, a token). Passing the ref to a
-- call on another actor of the same collective group moves the tensor
-- straight from producer to consumer with the group's send/recv; anywhere
-- else the ref resolves through the object path, fetched from the producer
-- when needed. The design is in docs/architecture.md ("Tensors between
-- actors"); the API in docs/api.md ("Direct tensor transport").
local core = require("tide.core")

local M = {}

local type, pairs, ipairs, select, setmetatable, getmetatable, error, tostring, next =
  type, pairs, ipairs, select, setmetatable, getmetatable, error, tostring, next
local format, unpack, newproxy = string.format, unpack, newproxy

-- -- Declarations (the caller's side) ----------------------------------------

local METHOD = {}          -- metatable of what tide.method returns
M.METHOD = METHOD
local TRANSPORTS = {collective = true}
local METHOD_OPTS = {tensor_transport = "string", group = "string"}

-- tide.method(opts, fn): a method of tide.actor{...} whose tensor result
-- travels directly.
function M.method(opts, fn)
  if type(opts) ~= "table" or type(fn) ~= "function" then
    error("tide.method: expected an options table and a function", 2)
  end
  for k, v in pairs(opts) do
    if not METHOD_OPTS[k] then
      error(format("tide.method: unknown option '%s' (it takes tensor_transport and group)", tostring(k)), 2)
    end
    if type(v) ~= METHOD_OPTS[k] then
      error(format("tide.method: option '%s' must be a %s, got %s", k, METHOD_OPTS[k], type(v)), 2)
    end
  end
  if not TRANSPORTS[opts.tensor_transport] then
    error(format("tide.method: tensor_transport must be \"collective\" (the actor's collective group), got %s",
      tostring(opts.tensor_transport)), 2)
  end
  return setmetatable({fn = fn, group = opts.group or false}, METHOD)
end

-- Every actor method call and task submission goes through dispatch's
-- single entry, so any actor can produce, send, receive and free.
local function dispatch(self, op, ...)
  return require("tide.rdt")._op(self, op, ...)
end

-- class -> the class to register (declarations replaced by their
-- functions, the hidden entry added) and {method = group | false} or nil.
function M.prepare_class(class)
  local out, methods = {}, nil
  for k, v in pairs(class) do
    if getmetatable(v) == METHOD then
      out[k] = v.fn
      methods = methods or {}
      methods[k] = v.group
    else
      out[k] = v
    end
  end
  out.__tide_rdt = dispatch
  -- The declarations go with the class's definition too, so a handle from
  -- tide.get_actor finds them there (M.methods_in).
  out.__tide_rdt_methods = methods
  return out, methods
end

-- The declarations in a class's encoded definition (core.get_actor's
-- third value), or nil: none, or a definition this process cannot load.
function M.methods_in(def)
  if type(def) ~= "string" then return nil end
  local ok, class = pcall(core.decode, def)
  return ok and type(class) == "table" and rawget(class, "__tide_rdt_methods") or nil
end

-- -- Refs this process made (the owner's side) -------------------------------

-- ref -> {actor, token, proxy}. Weak keys: when the ref is collected, its
-- proxy's __gc queues the free.
local owned = setmetatable({}, {__mode = "k"})
local pending = {}
local seq, prefix = 0, nil

local function new_token()
  if not prefix then
    local ctx = core.context()
    prefix = format("%s/%s/%d/%s", ctx.node_id, ctx.worker_id, ctx.pid, tostring({}):match("0x%x+") or "")
  end
  seq = seq + 1
  return prefix .. "/" .. seq
end

local function track(ref, actor, token)
  local proxy = newproxy(true)
  getmetatable(proxy).__gc = function()
    pending[#pending + 1] = {actor = actor, token = token}
  end
  owned[ref] = {actor = actor, token = token, proxy = proxy}
end

-- Sends the queued frees. Calls from one caller to one actor run in
-- order, so a free never overtakes this caller's sends and fetches.
local function flush()
  local list = pending
  pending = {}
  for i = 1, #list do core.actor_call(list[i].actor, "__tide_rdt", 1, "free", list[i].token) end
end

-- Whether this process may hold refs to directly transported tensors (the
-- only case in which call arguments need looking at).
function M.active()
  if pending[1] then flush() end
  return next(owned) ~= nil
end

local REF_MT
local function is_ref(v)
  REF_MT = REF_MT or debug.getregistry()["tide.ObjectRef"]
  return getmetatable(v) == REF_MT
end

-- Arguments for a call on actor aid: for each ref to a tensor held by
-- another actor, this caller asks the producer to send it to aid (which
-- it does only when aid is in its group) and puts in the ref's place a
-- receive call on aid. Calls from one caller to one actor run in order,
-- so every producer and consumer meet their sends and receives in the
-- order this caller made them (as Ray's __ray_send__ / __ray_recv__), and
-- the receive runs before the call, which finds the tensor it left.
-- The producer first answers an offer (whether, and to which rank, it
-- will send), which the receive reads before it blocks: a producer that
-- will not send (it left the group, the tensor is gone, the offer
-- raised) never leaves its consumer waiting in the group's recv.
function M.args_for_actor(aid, ...)
  local n, args, done = select("#", ...), nil, nil
  for i = 1, n do
    local v = select(i, ...)
    local o = is_ref(v) and owned[v]
    if o and o.actor ~= aid then
      args = args or {...}
      done = done or {}
      local r = done[v]
      if not r then
        local offer = core.actor_call(o.actor, "__tide_rdt", 1, "offer", o.token, aid)
        core.actor_call(o.actor, "__tide_rdt", 1, "send", o.token, aid)
        -- In a table, so that the receive gets the ref (not its value, or
        -- its failure before running) and names the producer if it died.
        r = core.actor_call(aid, "__tide_rdt", 1, "recv", v, o.token, {offer})
        done[v] = r
      end
      args[i] = r
    end
  end
  if args then return unpack(args, 1, n) end
  return ...
end

-- Arguments for a task (or an actor's constructor): each such ref becomes
-- a fetch of the tensor from its producer through the object store.
function M.args_for_task(...)
  local n, args = select("#", ...), nil
  for i = 1, n do
    local v = select(i, ...)
    local o = is_ref(v) and owned[v]
    if o then
      args = args or {...}
      args[i] = core.actor_call(o.actor, "__tide_rdt", 1, "fetch", o.token)
    end
  end
  if args then return unpack(args, 1, n) end
  return ...
end

-- handle:method(...) for a method declared with tide.method.
function M.call(aid, name, group, ...)
  local token = new_token()
  local ref = core.actor_call(aid, "__tide_rdt", 1, "call", name, token, group, M.args_for_actor(aid, ...))
  track(ref, aid, token)
  return ref
end

-- -- Descriptors and received tensors -----------------------------------------

local DESC = {__tide_module = "tide.rdt"}   -- a tensor held by its producer
DESC.__index = DESC
M.DESC = DESC
local LOCAL = {__tide_module = "tide.rdt"}  -- a tensor received into this actor

local held, nheld, held_bytes = {}, 0, 0    -- producer: token -> {parts, skel, bytes}
local held_group = {}                       -- producer: token -> its group's name
local received = {}                         -- consumer: token -> value, until a call decodes it
local recent = setmetatable({}, {__mode = "v"})  -- the same ref twice in one call
local counts = {sent = 0, sent_bytes = 0, fetched = 0, received = 0, received_bytes = 0, freed = 0}

DESC.__tide_ser = function(d)
  return core.encode({"desc", d.token, d.actor, d.group, d.rank, d.shapes, d.device, d.method, d.skel or false,
    d.dtypes})
end
DESC.__tostring = function(d)
  return format("DirectTensor(%s from actor %s, rank %d of %s, %d tensor%s)", d.token, d.actor, d.rank, d.group,
    #d.shapes, #d.shapes == 1 and "" or "s")
end

-- A result's tensors: the tensor itself (no skeleton), or, for a plain
-- table, every tensor in it at any depth, in the order met, and a copy of
-- the table with {[SLOT] = i} in each tensor's place (its other values
-- travel inside the descriptor); nil when there is no tensor.
local SLOT = "__tide_rdt_slot"

local function split(v, is_tensor)
  if is_tensor(v) then return {v}, false end
  if type(v) ~= "table" or getmetatable(v) ~= nil then return nil end
  local parts, path = {}, {}
  local function walk(x)
    if path[x] then error("tensor_transport = \"collective\": the result's tables hold a cycle", 0) end
    path[x] = true
    local out = {}
    for k, e in pairs(x) do
      if is_tensor(e) then
        parts[#parts + 1] = e
        out[k] = {[SLOT] = #parts}
      elseif type(e) == "table" and getmetatable(e) == nil then
        out[k] = walk(e)
      else
        out[k] = e
      end
    end
    path[x] = nil
    return out
  end
  local skel = walk(v)
  if not parts[1] then return nil end
  return parts, skel
end

-- The value a skeleton and its tensors make (a new table each time).
local function join(parts, skel)
  if not skel then return parts[1] end
  local function build(x)
    local out = {}
    for k, e in pairs(x) do
      if type(e) == "table" then out[k] = e[SLOT] and parts[e[SLOT]] or build(e) else out[k] = e end
    end
    return out
  end
  return build(skel)
end
LOCAL.__tide_ser = function(l) return core.encode({"local", l.token}) end

-- Decodes a descriptor: the tensor itself where it is held or was received,
-- else the descriptor (tide.get fetches it; M.seen tells it to look).
function M.__tide_deser(blob)
  local t = core.decode(blob)
  if t[1] == "local" then
    local x = received[t[2]]
    if x then
      received[t[2]] = nil
      recent[t[2]] = x
      return x
    end
    x = recent[t[2]]
    if x then return x end
    error("direct tensor transport: tensor " .. tostring(t[2]) .. " was not received by this actor", 0)
  end
  local h = held[t[2]]
  if h then return join(h.parts, h.skel) end
  M.seen = true
  return setmetatable({token = t[2], actor = t[3], group = t[4], rank = t[5], shapes = t[6], device = t[7],
    method = t[8], skel = t[9] or false, dtypes = t[10]}, DESC)
end

-- An error whose kind reaches the caller as it is (tide.boot's errfmt).
local function fail(kind, message)
  error({kind = kind, message = message, keep_kind = true}, 0)
end

-- The tensor a descriptor names, through the object store (tide.get's
-- path, and a consumer outside the group).
function M.fetch(d, timeout)
  local ref = core.actor_call(d.actor, "__tide_rdt", 1, "fetch", d.token)
  return require("tide").get(ref, timeout and {timeout = timeout})
end

-- -- The hidden entry's operations (in actors) -------------------------------

local ops = {}

local STATUS_OK = 1

-- A 24-bit tag of a token (exact in an f32), so a receiver notices a
-- transfer that is not the one it asked for.
local function tag(token)
  local h = 0
  for i = 1, #token do h = (h * 31 + token:byte(i)) % 16777213 end
  return h
end

local function coll() return require("tide.collective") end

-- A worker sends its frames (the results of the calls before this one)
-- when it waits; the group's send and recv block the process in C without
-- waiting, so each side waits once first, or a peer could wait on a
-- result that sits in this process's buffer while it blocks.
local function flush_frames() require("tide").sleep(0) end

-- The producer's group for a result: the one named, or its only group.
local function producer_group(name, method)
  local gname, rank, device = coll()._rdt_group(name or nil)
  if gname then return gname, rank, device end
  local why = rank
  if name then
    fail("TaskError", format("%s: tensor_transport = \"collective\" names group '%s', which this actor has not"
      .. " joined (tide.collective.init_group)", method, name))
  elseif why then
    fail("TaskError", format("%s: this actor is in several collective groups (%s); name one with"
      .. " tide.method({tensor_transport = \"collective\", group = ...}, fn)", method, why))
  end
  fail("TaskError", format("%s: tensor_transport = \"collective\" needs a collective group: call"
    .. " tide.collective.init_group in this actor first", method))
end

-- A tensor the group can carry (any dtype), made contiguous.
local function carried(v, name, gname, want)
  if v:device() ~= want then
    fail("TaskError", format("%s: group '%s' carries %s tensors; the method returned one on %s", name, gname,
      want, v:device()))
  end
  return v:contiguous()
end

-- Runs the declared method; a tensor result (or the tensors of a table
-- result) stays here, its descriptor goes to the store.
function ops.call(self, name, token, group, ...)
  local fn = rawget(self, "__class")[name]
  if type(fn) ~= "function" then fail("TaskError", format("the actor has no method '%s'", tostring(name))) end
  local v = fn(self, ...)
  local ok, parts, skel = pcall(split, v, require("tide.tensor").is_tensor)
  if not ok then fail("TaskError", name .. ": " .. tostring(parts)) end
  if not parts then return v end
  local gname, rank, device = producer_group(group, name)
  local want, shapes, dtypes, bytes = device or "cpu", {}, {}, 0
  for i = 1, #parts do
    parts[i] = carried(parts[i], name, gname, want)
    shapes[i], dtypes[i], bytes = parts[i]:shape(), parts[i]:dtype(), bytes + parts[i]:nbytes()
  end
  local old = held[token]
  if old == nil then nheld = nheld + 1 else held_bytes = held_bytes - old.bytes end
  held[token], held_group[token] = {parts = parts, skel = skel, bytes = bytes}, gname
  held_bytes = held_bytes + bytes
  return setmetatable({token = token, actor = core.context().actor_id, group = gname, rank = rank,
    shapes = shapes, dtypes = dtypes, skel = skel, device = want, method = name}, DESC)
end

local function header(device, a, b)
  local T = require("tide.tensor")
  local h = T.from_table({a, b})
  if device then h = h:to(device) end
  return h
end

-- Producer: sends the tensor of token to actor `to` when that actor is in
-- the tensor's group (the consumer's receive decides the same way, from
-- the same group), a header first (a tag of the token, so a receiver
-- notices a transfer it did not ask for). Nothing held (the method failed
-- or returned no tensor): nothing to send, and the consumer's receive
-- does not wait for it.
-- The rank send(token, to) sends to, or false when it will not send.
local function send_rank(token, to)
  if not held[token] then return false end
  local C, group = coll(), held_group[token]
  if not C._rdt_group(group) then return false end  -- this actor left the group
  return C._rdt_rank_of(group, to) or false
end

function ops.offer(_, token, to) return send_rank(token, to) end

function ops.send(_, token, to)
  local dst = send_rank(token, to)
  if not dst then return false end
  local h, C, group = held[token], coll(), held_group[token]
  local _, _, device = C._rdt_group(group)
  flush_frames()
  C.send(header(device, STATUS_OK, tag(token)), dst, group)
  for i = 1, #h.parts do C.send(h.parts[i], dst, group) end
  counts.sent, counts.sent_bytes = counts.sent + 1, counts.sent_bytes + h.bytes
  return true
end

function ops.fetch(_, token)
  local h = held[token]
  if not h then
    fail("ObjectLostError", format("actor %s no longer holds tensor %s: its last ref was dropped",
      tostring(core.context().actor_id), token))
  end
  counts.fetched = counts.fetched + 1
  return join(h.parts, h.skel)
end

function ops.free(_, token)
  local h = held[token]
  if not h then return false end
  held[token], held_group[token] = nil, nil
  nheld, held_bytes = nheld - 1, held_bytes - h.bytes
  counts.freed = counts.freed + 1
  return true
end

-- A failed receive (the producer's process exited, its node or stream
-- failed): ActorDiedError once the node has the producer dead, with its
-- reason; ObjectLostError if it still lives.
local function recv_failed(d, err)
  local state, reason
  for _ = 1, 100 do
    state, reason = core.actor_state(d.actor)
    if state == "DEAD" then break end
    require("tide").sleep(0.05)
  end
  local who = format("actor %s (rank %d of group %s)", d.actor, d.rank, d.group)
  if state == "DEAD" then
    fail("ActorDiedError", format("%s, which held the tensor its method %s returned, died before sending it: %s"
      .. " (%s)", who, d.method or "?", tostring(reason or "dead"), tostring(err)))
  end
  fail("ObjectLostError", format("receiving the tensor that method %s of %s returned failed: %s", d.method or "?",
    who, tostring(err)))
end

-- Consumer in the group: receives what the producer's send (which the
-- caller queued on it) sends.
local function pull(d, token, device)
  local T, C = require("tide.tensor"), coll()
  local h = header(device, 0, 0)
  flush_frames()
  local ok, err = pcall(C.recv, h, d.rank, d.group)
  if not ok then recv_failed(d, err) end
  local hv = (device and h:to("cpu") or h):to_table()
  if hv[1] ~= STATUS_OK or hv[2] ~= tag(token) then
    fail("ObjectLostError", format("group %s: rank %d sent another transfer than the one asked for (another"
      .. " send/recv between the same ranks interleaved)", d.group, d.rank))
  end
  local parts, bytes = {}, 0
  for i, shape in ipairs(d.shapes) do
    local t = T.empty(shape, {device = device or "cpu", dtype = d.dtypes[i]})
    ok, err = pcall(C.recv, t, d.rank, d.group)
    if not ok then recv_failed(d, err) end
    parts[i], bytes = t, bytes + t:nbytes()
  end
  counts.received, counts.received_bytes = counts.received + 1, counts.received_bytes + bytes
  return join(parts, d.skel)
end

-- The producer's offer: the rank it will send to, or false. A producer
-- that died or failed raises here, not in the group's recv.
local function read_offer(d, offer)
  local ok, v = pcall(require("tide").get, offer)
  if ok then return v end
  if type(v) == "table" and v.kind == "ActorDiedError" then
    fail("ActorDiedError", format("actor %s (rank %d of group %s), which held the tensor its method %s returned,"
      .. " died before sending it: %s", d.actor, d.rank, d.group, d.method or "?", tostring(v.message)))
  end
  if type(v) == "table" then fail(v.kind or "ObjectLostError", tostring(v.message)) end
  error(v, 0)
end

-- Consumer: gets the value a descriptor names (directly from a fellow
-- group member, else through the object store) and keeps it for the call
-- that follows, whose argument is this call's result.
function ops.recv(_, d, token, offer)
  local T = require("tide.tensor")
  local t
  if T.is_tensor(d) then
    t = d  -- this actor holds it
  elseif getmetatable(d) ~= DESC then
    return d  -- no tensor, or a table this actor holds: the value passes as it is
  else
    local gname, rank, device = coll()._rdt_group(d.group)
    local to = gname and rank ~= d.rank and read_offer(d, offer[1])
    if to and to ~= rank then
      fail("ObjectLostError", format("group %s: actor %s sends the tensor to rank %d, but this actor is rank %d"
        .. " (the two hold different views of the group)", d.group, d.actor, to, rank))
    end
    if to then
      t = pull(d, token, device)
    else
      local ok, v = pcall(M.fetch, d)
      if not ok then
        if type(v) == "table" then fail(v.kind or "ObjectLostError", tostring(v.message)) end
        error(v, 0)
      end
      t = v
    end
  end
  received[token] = t
  return setmetatable({token = token}, LOCAL)
end

function M._op(self, op, ...)
  local f = ops[op]
  if not f then error("tide.rdt: unknown operation " .. tostring(op), 2) end
  return f(self, ...)
end

-- Counters of this actor (or process): tensors held and their bytes,
-- transfers sent and received directly, fetches through the store, frees.
function M.stats()
  local s = {held = nheld, held_bytes = held_bytes}
  for k, v in pairs(counts) do s[k] = v end
  return s
end

return M

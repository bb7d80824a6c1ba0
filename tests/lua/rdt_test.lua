-- Direct tensor transport (tide.method with tensor_transport =
-- "collective"): a tensor an actor returns stays with it and goes straight
-- to a consumer in its collective group; the ref still works everywhere
-- else; the producer frees it when the last ref is gone; a producer that
-- dies fails its consumers instead of hanging them.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 4})

local N = 4 * 1024 * 1024  -- 16 MiB of f32
local MB = 4 * N

local Worker = tide.actor({
  setup = function(self, world, rank, name)
    require("tide.collective").init_group(world, rank, name)
    self.log = {}
    return rank
  end,
  make = tide.method({tensor_transport = "collective"}, function(_, n, seed)
    return require("tide.tensor").randn({n}, {seed = seed})
  end),
  -- A table of tensors at two depths, with other values among them.
  make_kv = tide.method({tensor_transport = "collective"}, function(_, n, seed)
    local T = require("tide.tensor")
    return {h = T.randn({n}, {seed = seed}), kv = {T.randn({2, n}, {seed = seed + 1}), T.randn({3}, {seed = seed + 2})},
      step = 7, name = "layer"}
  end),
  make_plain = function(_, n, seed) return require("tide.tensor").randn({n}, {seed = seed}) end,
  -- Every dtype the group carries: bf16 activations, i64 token ids, u8 bytes.
  make_typed = tide.method({tensor_transport = "collective"}, function()
    local T = require("tide.tensor")
    return {h = T.from_table({1.5, -2, 3.25}, {dtype = "bf16"}), ids = T.from_table({2 ^ 40 + 7, 3}, {dtype = "i64"}),
      b = T.from_table({255, 0, 7}, {dtype = "u8"}), f = T.from_table({0.5}, {dtype = "f16"})}
  end),
  check_typed = function(_, x)
    local function same(t, dt, want)
      if t:dtype() ~= dt then return false end
      local v = t:to_table()
      for i = 1, #want do if v[i] ~= want[i] then return false end end
      return #v == #want
    end
    return same(x.h, "bf16", {1.5, -2, 3.25}) and same(x.ids, "i64", {2 ^ 40 + 7, 3}) and same(x.b, "u8", {255, 0, 7})
      and same(x.f, "f16", {0.5})
  end,
  make_number = tide.method({tensor_transport = "collective"}, function() return 42 end),
  make_named = tide.method({tensor_transport = "collective", group = "nowhere"}, function()
    return require("tide.tensor").zeros({4})
  end),
  -- Whether x is exactly randn({n}, {seed = seed}), and its shape.
  check = function(_, x, n, seed)
    local T = require("tide.tensor")
    return {same = T.is_tensor(x) and x:to_bytes() == T.randn({n}, {seed = seed}):to_bytes(),
            n = T.is_tensor(x) and x:numel() or -1}
  end,
  -- Whether x is exactly what make_kv(n, seed) returns.
  check_kv = function(_, x, n, seed)
    local T = require("tide.tensor")
    local function same(a, b) return T.is_tensor(a) and a:to_bytes() == b:to_bytes() end
    return type(x) == "table" and same(x.h, T.randn({n}, {seed = seed}))
      and same(x.kv[1], T.randn({2, n}, {seed = seed + 1})) and same(x.kv[2], T.randn({3}, {seed = seed + 2}))
      and x.step == 7 and x.name == "layer" and #x.kv == 2
  end,
  keep = function(self, x) self.kept = x; return x:numel() end,
  drop = function(self) self.kept = nil; collectgarbage(); collectgarbage() end,
  append = function(self, x) self.log[#self.log + 1] = x:numel(); return #self.log end,
  get_log = function(self) return self.log end,
  echo = function(_, v) return v end,
  busy = function(_, s) require("tide").sleep(s); return true end,
  leave = function(_, name) require("tide.collective").destroy_group(name); return true end,
  stats = function() return require("tide.rdt").stats() end,
})

local function pair(name)
  local p = Worker:options({own_process = true}):remote()
  local c = Worker:options({own_process = true}):remote()
  tide.get({p:setup(2, 0, name), c:setup(2, 1, name)}, {timeout = 60})
  return p, c
end

local p, c = pair("rdt-a")
local check_task = tide.remote({num_cpus = 0}, function(x, n, seed)
  local T = require("tide.tensor")
  return T.is_tensor(x) and x:to_bytes() == T.randn({n}, {seed = seed}):to_bytes()
end)

local r = p:make(N, 7)

t.test("a consumer in the group gets the producer's tensor, byte for byte, sent directly", function()
  local out = tide.get(c:check(r, N, 7), {timeout = 60})
  t.ok(out.same, "the bytes differ")
  t.eq(out.n, N)
  local ps, cs = tide.get(p:stats()), tide.get(c:stats())
  t.eq(ps.held, 1, "the producer holds it")
  t.eq(ps.held_bytes, MB)
  t.eq(ps.sent, 1, "sent directly")
  t.eq(ps.fetched, 0, "not through the object store")
  t.eq(cs.received, 1)
  t.eq(cs.received_bytes, MB)
end)

t.local_test("the object store does not carry the payload (a plain method's does)", function()
  local base = tide.stats().store_used
  local r2 = p:make(N, 8)
  t.eq(tide.get(c:keep(r2), {timeout = 60}), N)
  local direct = tide.stats().store_used - base
  t.ok(direct < MB / 4, "direct: the store grew by " .. direct .. " bytes")
  tide.get(c:drop())
  local r3 = p:make_plain(N, 9)
  t.eq(tide.get(c:keep(r3), {timeout = 60}), N)
  local plain = tide.stats().store_used - base
  t.ok(plain >= MB, "through the store: it grew by only " .. plain .. " bytes")
  tide.get(c:drop())
end)

t.test("the ref works everywhere else: tide.get, a plain task, an actor outside the group", function()
  local fetched0 = tide.get(p:stats()).fetched
  local x = tide.get(r, {timeout = 60})
  t.eq(x:to_bytes(), require("tide.tensor").randn({N}, {seed = 7}):to_bytes(), "tide.get")
  local xs = tide.get({r}, {timeout = 60})
  t.eq(xs[1]:to_bytes(), x:to_bytes(), "tide.get of a list")
  t.ok(tide.get(check_task:remote(r, N, 7), {timeout = 60}), "a plain task")
  local o = Worker:options({own_process = true}):remote()
  local out = tide.get(o:check(r, N, 7), {timeout = 60})
  t.ok(out.same, "an actor outside the group")
  t.eq(tide.get(o:stats()).received, 0, "not directly")
  t.eq(tide.get(p:stats()).fetched - fetched0, 4, "each fetched from the producer through the store")
  tide.kill(o)
end)

t.test("several in flight arrive in order", function()
  local sizes = {1001, 2002, 3003, 4004, 5005}
  local refs = {}
  for i, n in ipairs(sizes) do refs[i] = p:make(n, i) end
  local outs = {}
  for i, n in ipairs(sizes) do
    c:append(refs[i])
    outs[i] = c:check(refs[i], n, i)
  end
  for i = 1, #sizes do t.ok(tide.get(outs[i], {timeout = 60}).same, "transfer " .. i) end
  t.deep_eq(tide.get(c:get_log()), sizes)
end)

t.test("two actors that exchange tensors both ways do not wait on each other", function()
  -- Each is the other's consumer: the sends and receives the caller queued
  -- meet in its order (a consumer asking for its own send would queue it
  -- behind the producer's own pending receive).
  local ra, rb = p:make(65536, 21), c:make(65536, 22)
  local oa, ob = p:check(rb, 65536, 22), c:check(ra, 65536, 21)
  t.ok(tide.get(oa, {timeout = 20}).same, "producer got the consumer's tensor")
  t.ok(tide.get(ob, {timeout = 20}).same, "consumer got the producer's tensor")
end)

t.test("a table of tensors travels directly, every tensor at any depth, its other values with it", function()
  local before = tide.get(p:stats())
  local n = 1000
  local r2 = p:make_kv(n, 21)
  t.ok(tide.get(c:check_kv(r2, n, 21), {timeout = 60}), "the consumer's table differs")
  local ps = tide.get(p:stats())
  t.eq(ps.sent - before.sent, 1, "sent directly")
  t.eq(ps.sent_bytes - before.sent_bytes, (n + 2 * n + 3) * 4, "all three tensors' bytes")
  t.eq(ps.held_bytes - before.held_bytes, (n + 2 * n + 3) * 4)
  t.eq(ps.fetched - before.fetched, 0, "not through the object store")
  local x = tide.get(r2, {timeout = 60})
  t.eq(x.step, 7, "tide.get of the ref gives the table")
  t.eq(x.kv[1]:numel(), 2 * n)
  t.ok(tide.get(check_task:remote(r2, n, 21), {timeout = 60}) == false, "a plain task gets the table, not a tensor")
  x, r2 = nil, nil
  collectgarbage(); collectgarbage()
  tide.get(p:stats())  -- sends the queued frees (earlier tests' refs may go too)
  local freed = ps.held_bytes - tide.get(p:stats()).held_bytes
  t.ok(freed >= (n + 2 * n + 3) * 4, "freed with the ref: " .. freed .. " bytes")
end)

t.test("tensors of every dtype go directly, dtype and bytes kept", function()
  local sent0, fetched0 = tide.get(p:stats()).sent, tide.get(p:stats()).fetched
  t.ok(tide.get(c:check_typed(p:make_typed()), {timeout = 60}), "a consumer in the group")
  t.eq(tide.get(p:stats()).sent, sent0 + 1, "sent directly")
  local x = tide.get(p:make_typed(), {timeout = 60})
  t.eq(x.ids:dtype(), "i64")
  t.eq(x.ids:to_table()[1], 2 ^ 40 + 7, "tide.get through the store")
  t.eq(tide.get(p:stats()).fetched, fetched0 + 1)
end)

t.test("a handle from tide.get_actor knows the class's declarations: its calls send directly too", function()
  local np = Worker:options({own_process = true, name = "rdt-named-producer"}):remote()
  local nc = Worker:options({own_process = true}):remote()
  tide.get({np:setup(2, 0, "rdt-named"), nc:setup(2, 1, "rdt-named")}, {timeout = 60})
  local h = tide.get_actor("rdt-named-producer")
  local out = tide.get(nc:check(h:make(4096, 21), 4096, 21), {timeout = 60})
  t.ok(out.same, "the bytes differ")
  local st = tide.get(h:stats())
  t.eq(st.sent, 1, "sent directly, not through the store")
  t.eq(st.fetched, 0)
  t.eq(tide.get(h:make_plain(8, 3)):numel(), 8, "its plain methods still plain")
  tide.kill(np)
  tide.kill(nc)
end)

t.test("a result that is not a tensor passes as it is; bad declarations and kinds are named", function()
  local n = p:make_number()
  t.eq(tide.get(n), 42)
  t.eq(tide.get(c:echo(n)), 42)
  t.raises(function() tide.get(p:make_named()) end, "names group 'nowhere', which this actor has not joined")
  local loner = Worker:remote()
  t.raises(function() tide.get(loner:make(4, 1)) end, "needs a collective group: call tide.collective.init_group")
  tide.kill(loner)
  t.raises(function() tide.method({tensor_transport = "nccl2"}, function() end) end,
    "tensor_transport must be \"collective\"")
  t.raises(function() tide.method({transport = "collective"}, function() end) end, "unknown option 'transport'")
  t.raises(function() tide.method(function() end) end, "expected an options table and a function")
end)

t.test("dropping the last ref frees the tensor in the producer", function()
  t.ok(tide.get(p:stats()).held > 0)
  r = nil
  local held
  for _ = 1, 50 do
    collectgarbage()
    collectgarbage()
    held = tide.get(p:stats()).held  -- this call also sends the queued frees first
    if held == 0 then break end
    tide.sleep(0.05)
  end
  t.eq(held, 0, "tensors still held")
  t.eq(tide.get(p:stats()).held_bytes, 0)
end)

t.test("a producer that left its group sends nothing, and its consumer gets the tensor through the store", function()
  local r2 = p:make(N, 11)
  local before = tide.get(p:stats())
  tide.get(p:leave("rdt-a"), {timeout = 60})
  local out = tide.get(c:check(r2, N, 11), {timeout = 30})
  t.ok(out.same, "the bytes differ")
  local ps = tide.get(p:stats())
  t.eq(ps.fetched - before.fetched, 1, "fetched through the object store")
  t.eq(ps.sent - before.sent, 0, "not sent directly")
end)

t.test("a producer that dies fails its consumer (ActorDiedError naming it), never hangs", function()
  local p2, c2 = pair("rdt-b")
  local r2 = p2:make(N, 3)
  tide.wait({r2}, {timeout = 60})
  p2:busy(30)  -- the consumer's request queues behind this: it waits in recv
  local out = c2:check(r2, N, 3)
  tide.sleep(0.5)
  local t0 = os.time()
  tide.kill(p2)
  local e = t.raises(function() tide.get(out, {timeout = 30}) end)
  t.eq(e.kind, "ActorDiedError", tostring(e))
  t.ok(tostring(e.message):find(p2._id, 1, true), "names the producer: " .. tostring(e.message))
  t.ok(os.time() - t0 < 20, "took " .. (os.time() - t0) .. " s")
  local e2 = t.raises(function() tide.get(r2, {timeout = 30}) end)
  t.eq(e2.kind, "ActorDiedError", "tide.get of the ref: " .. tostring(e2))
  tide.kill(c2)
end)

t.done()

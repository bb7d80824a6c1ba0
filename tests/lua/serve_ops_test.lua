-- tide.serve operations over real HTTP: back-pressure (503 + Retry-After),
-- client disconnects cancelling streams, replica death and replacement,
-- retries of idempotent requests, redeploys that keep in-flight requests,
-- batching, jobs across redeploys, restarting the ingress with limits.
-- Run: bin/tide run tests/lua/serve_ops_test.lua
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 4})
local serve = require("tide.serve")

local PORT = 18310

local sc = dofile("tests/lua/serve_client.lua")
local client, await, run, at_once = sc.client, sc.await, sc.runner(PORT), sc.at_once

local function poll_until(pred, timeout)
  local deadline = os.time() + (timeout or 10)
  repeat
    serve.poll(0.05)
    if pred() then return true end
  until os.time() > deadline
  return false
end

local function live_replicas(name)
  local s = serve.status()[name]
  local n = 0
  for _, r in ipairs(s and s.replicas or {}) do
    if not r.draining then n = n + 1 end
  end
  return n, s
end

local Marks = tide.actor({
  init = function(self) self.m = {} end,
  set = function(self, k, v) self.m[k] = v end,
  incr = function(self, k) self.m[k] = (self.m[k] or 0) + 1; return self.m[k] end,
  get = function(self, k) return self.m[k] end,
})
local marks = Marks:options({name = "marks"}):remote()
tide.get(marks:get("x"))

local function version(v, route)
  return serve.deployment{
    name = "ver", route = route or "/ver", num_replicas = 1,
    call = function(self, req)
      if req.query.slow then tide.sleep(tonumber(req.query.slow)) end
      return {v = v, actor_id = tide.get_runtime_context().actor_id}
    end,
  }
end

local function jobs_version(v)
  return serve.deployment{
    name = "jobs2", route = "/jobs2", num_replicas = 1,
    jobs = {
      long = function(self, req, job)
        for i = 1, 10 do job:progress(i / 10); tide.sleep(0.1) end
        return {v = v}
      end,
    },
  }
end

local app = {
  serve.deployment{
    name = "slow", route = "/slow", num_replicas = 1, max_ongoing_requests = 1,
    call = function(self, req)
      tide.sleep(tonumber(req.query.s) or 1)
      return {slept = true}
    end,
  },
  serve.deployment{
    name = "gen", route = "/gen",
    call = function(self, req)
      local key, sse = req.query.key, req.query.sse == "1"
      return serve.stream(function(send)
        local m = tide.get_actor("marks")
        for i = 1, 200 do
          tide.get(m:set(key, i))
          send(sse and tostring(i) or (i .. "\n"))
          tide.sleep(0.05)
        end
      end, {sse = sse})
    end,
  },
  serve.deployment{
    name = "die", route = "/die", num_replicas = 1,
    call = function(self, req)
      if req.query.exit then os.exit(1) end
      return {actor_id = tide.get_runtime_context().actor_id}
    end,
  },
  serve.deployment{
    name = "die2", route = "/die2", num_replicas = 2,
    call = function(self, req)
      local me = tide.get_runtime_context().actor_id
      if req.query.exit then
        local m = tide.get_actor("marks")
        if not tide.get(m:get("died")) then
          tide.get(m:set("died", me))
          os.exit(1)
        end
      end
      return {actor_id = me}
    end,
  },
  serve.deployment{
    name = "batched", route = "/batched",
    call = serve.batch{max_batch_size = 4, batch_wait_timeout_s = 0.05}(function(self, reqs)
      local out = {}
      for i, r in ipairs(reqs) do out[i] = {size = #reqs, x = tonumber(r.query.x)} end
      return out
    end),
  },
  serve.deployment{
    name = "badbatch", route = "/badbatch",
    call = serve.batch{max_batch_size = 4, batch_wait_timeout_s = 0.01}(function(self, reqs)
      if reqs[1].query.raise then error("batch handler failed") end
      if reqs[1].query.short then -- one result short of the batch
        local out = {}
        for i = 1, #reqs - 1 do out[i] = {ok = i} end
        return out
      end
      return {}
    end),
  },
  serve.deployment{
    name = "victim", route = "/victim", num_replicas = 2,
    call = function(self, req)
      tide.sleep(tonumber(req.query.s) or 0)
      return {actor_id = tide.get_runtime_context().actor_id}
    end,
  },
  version(1),
  jobs_version(1),
}

local port = serve.run(app, {port = PORT, blocking = false})
t.test("serve.run (non-blocking) returns the port", function() t.eq(port, PORT) end)

t.test("back-pressure: 503 with Retry-After when every replica is at max_ongoing_requests", function()
  local first = client(function(httpc, p)
    return httpc.get(p, "/slow?s=1.0")
  end):remote(PORT)
  local second = client(function(httpc, p)
    -- Wait until the first request occupies the only replica.
    httpc.wait_for(p, "/-/status", function(r)
      return r.json and r.json.deployments.slow.ongoing >= 1
    end, 20, tide.sleep)
    return httpc.get(p, "/slow?s=0")
  end):remote(PORT)
  local r = await({first, second})
  t.eq(r[1].status, 200)
  t.eq(r[1].json.slept, true)
  t.eq(r[2].status, 503)
  t.ok(r[2].headers["retry-after"], "a Retry-After header")
  t.ok(tonumber(r[2].headers["retry-after"]) >= 1, r[2].headers["retry-after"])
  t.ok(r[2].json and r[2].json.error, "a JSON error body")
  t.ok(serve.status().slow.rejected >= 1, "the rejection is counted")
  -- The replica has room again.
  local after = run(function(httpc, p) return httpc.get(p, "/slow?s=0") end)
  t.eq(after.status, 200)
end)

t.test("back-pressure: the 503 leaves the connection usable", function()
  local r = run(function(httpc, p)
    local hold = httpc.connect(p)
    hold:send_raw(httpc.format_request("GET", "/slow?s=0.8"))
    httpc.wait_for(p, "/-/status", function(s)
      return s.json and s.json.deployments.slow.ongoing >= 1
    end, 20, tide.sleep)
    local c = httpc.connect(p)
    local busy = c:get("/slow?s=0")
    local health = c:get("/-/healthz")
    local first = hold:read_response()
    local again = c:get("/slow?s=0")
    c:close(); hold:close()
    return {busy = busy.status, first = first.status, again = again.status, health = health.status}
  end)
  t.eq(r.busy, 503)
  t.eq(r.health, 200, "/-/healthz answers while every replica is busy")
  t.eq(r.first, 200)
  t.eq(r.again, 200)
end)

t.test("disconnect: a client that closes mid-stream cancels the generator", function()
  local r = run(function(httpc, p)
    local c = httpc.connect(p)
    c:send_raw(httpc.format_request("GET", "/gen?key=plain"))
    local head = c:read_head()
    local got = {}
    for i = 1, 3 do got[i] = c:read_chunk() end
    c:close()
    return {status = head.status, got = table.concat(got)}
  end)
  t.eq(r.status, 200)
  t.eq(r.got, "1\n2\n3\n")
  serve.poll(0.3)
  local n1 = tide.get(marks:get("plain"))
  serve.poll(0.6)
  local n2 = tide.get(marks:get("plain"))
  t.ok(n1 and n1 >= 3, "the generator ran: " .. tostring(n1))
  t.ok(n1 < 20, "it stopped soon after the close: " .. tostring(n1))
  t.eq(n2, n1, "the generator stopped advancing")
  t.eq(serve.status().gen.replicas[1].ongoing, 0, "the request is no longer counted as ongoing")
end)

t.test("disconnect: an SSE client that resets the connection cancels the generator", function()
  local r = run(function(httpc, p)
    local c = httpc.connect(p)
    c:send_raw(httpc.format_request("GET", "/gen?key=sse&sse=1"))
    local head = c:read_head()
    local first = c:read_chunk()
    c:close({reset = true})
    return {status = head.status, ct = head.headers["content-type"], first = first}
  end)
  t.eq(r.status, 200)
  t.ok(r.ct:find("text/event-stream", 1, true), r.ct)
  t.eq(r.first, "data: 1\n\n")
  serve.poll(0.3)
  local n1 = tide.get(marks:get("sse"))
  serve.poll(0.6)
  t.eq(tide.get(marks:get("sse")), n1, "the generator stopped advancing")
end)

t.test("disconnect: the server keeps serving streams after clients left", function()
  local r = run(function(httpc, p)
    local c = httpc.connect(p)
    c:send_raw(httpc.format_request("GET", "/gen?key=again"))
    c:read_head()
    local a = c:read_chunk()
    c:close()
    return {a = a, health = httpc.get(p, "/-/healthz").status}
  end)
  t.eq(r.a, "1\n")
  t.eq(r.health, 200)
end)

t.test("replica death: os.exit in a handler fails that request with a 5xx JSON error", function()
  local before = run(function(httpc, p) return httpc.get(p, "/die") end)
  t.eq(before.status, 200)
  local r = run(function(httpc, p) return httpc.post(p, "/die?exit=1", {json = {}}) end)
  t.ok(r.status >= 500 and r.status <= 599, "status " .. r.status .. ": " .. r.body)
  t.ok(r.json and type(r.json.error) == "string", "JSON error body: " .. r.body)
  t.ok(r.json and r.json.error:find("died", 1, true), "the error says the replica died: " .. r.body)
  -- The controller replaces the replica; later requests succeed on the new one.
  local replaced = poll_until(function()
    local n, s = live_replicas("die")
    return n == 1 and s.replicas[1].id ~= before.json.actor_id
  end, 10)
  t.ok(replaced, "a new replica replaced the dead one")
  local after = run(function(httpc, p) return httpc.get(p, "/die") end)
  t.eq(after.status, 200)
  t.ok(after.json.actor_id ~= before.json.actor_id, "served by the new replica")
end)

t.test("replica death: an idempotent GET is retried on another replica", function()
  local r = run(function(httpc, p) return httpc.get(p, "/die2?exit=1") end)
  local died = tide.get(marks:get("died"))
  t.ok(died, "a replica died")
  t.eq(r.status, 200, r.body)
  t.ok(r.json and r.json.actor_id ~= died, "answered by the other replica")
  t.ok(poll_until(function() return live_replicas("die2") == 2 end, 10), "two live replicas again")
end)

-- Kills (tide.kill) the replica of `name` that has a request in flight.
-- The replicas' handles are kept by the serve state actor.
local function kill_busy_replica(name)
  local busy
  assert(poll_until(function()
    for _, rep in ipairs(serve.status()[name].replicas) do
      if rep.ongoing > 0 and not rep.draining then busy = rep.id; return true end
    end
  end, 10), "no request in flight")
  local state = tide.get_actor("tide.serve.state", {namespace = "serve"})
  for _, h in ipairs(tide.get(state:replicas(name))) do
    if h._id == busy then tide.kill(h); return busy end
  end
  error("no handle for replica " .. tostring(busy))
end

t.test("replica killed mid-request: a GET is retried on the other replica", function()
  local ref = client(function(httpc, p) return httpc.get(p, "/victim?s=1") end):remote(PORT)
  local killed = kill_busy_replica("victim")
  local r = await(ref)
  t.eq(r.status, 200, r.body)
  t.ok(r.json.actor_id ~= killed, "answered by the other replica")
end)

t.test("replica killed mid-request: a POST fails with 503 and a JSON ActorDiedError", function()
  t.ok(poll_until(function() return live_replicas("victim") == 2 end, 10), "two live replicas first")
  local ref = client(function(httpc, p) return httpc.post(p, "/victim?s=1", {json = {}}) end):remote(PORT)
  local killed = kill_busy_replica("victim")
  local r = await(ref)
  t.eq(r.status, 503, r.body)
  t.eq(r.json and r.json.kind, "ActorDiedError", r.body)
  t.ok(type(r.json.error) == "string" and #r.json.error > 0, r.body)
  t.ok(poll_until(function()
    local n, s = live_replicas("victim")
    if n ~= 2 then return false end
    for _, rep in ipairs(s.replicas) do if rep.id == killed then return false end end
    return true
  end, 10), "the killed replica was replaced")
  local after = run(function(httpc, p)
    local out = {}
    for i = 1, 4 do out[i] = httpc.post(p, "/victim", {json = {}}).status end
    return out
  end)
  t.deep_eq(after, {200, 200, 200, 200})
  t.ok(serve.status().victim.errors >= 1, "the failure is counted")
end)

t.test("redeploy: the in-flight request finishes on the old version, new ones reach the new", function()
  local old = run(function(httpc, p) return httpc.get(p, "/ver") end)
  t.eq(old.json.v, 1)
  local slow = client(function(httpc, p) return httpc.get(p, "/ver?slow=1.2") end):remote(PORT)
  t.ok(poll_until(function() return serve.status().ver.replicas[1].ongoing == 1 end, 10),
    "the slow request is in flight")
  serve.deploy(version(2))
  local during = run(function(httpc, p) return httpc.get(p, "/ver") end)
  t.eq(during.json.v, 2, "new requests reach the new version")
  local s = serve.status().ver
  local draining = 0
  for _, rep in ipairs(s.replicas) do if rep.draining then draining = draining + 1 end end
  t.eq(draining, 1, "the old replica drains while its request runs")
  local slow_r = await(slow)
  t.eq(slow_r.status, 200)
  t.eq(slow_r.json.v, 1, "the in-flight request completed on the old version")
  t.eq(slow_r.json.actor_id, old.json.actor_id)
  t.ok(poll_until(function() return #serve.status().ver.replicas == 1 end, 10),
    "the drained replica is stopped")
  local final = run(function(httpc, p)
    local out = {}
    for i = 1, 5 do out[i] = httpc.get(p, "/ver").json.v end
    return out
  end)
  t.deep_eq(final, {2, 2, 2, 2, 2})
end)

t.test("redeploy: a new route for the same name moves the deployment", function()
  serve.deploy(version(3, "/ver3"))
  serve.poll(0.3)
  local r = run(function(httpc, p) return {new = httpc.get(p, "/ver3"), routes = httpc.get(p, "/-/routes")} end)
  t.eq(r.new.status, 200)
  t.eq(r.new.json.v, 3)
  t.eq(r.routes.json["/ver3"], "ver")
  t.eq(r.routes.json["/ver"], nil, "the old route is gone")
end)

t.test("batching: concurrent requests reach the handler in batches of up to 4", function()
  local r = run(function(httpc, p)
    local paths = {}
    for i = 1, 10 do paths[i] = "/batched?x=" .. i end
    return at_once(httpc, p, paths)
  end)
  local biggest = 0
  for i = 1, 10 do
    t.eq(r[i].status, 200, r[i].body)
    t.eq(r[i].json.x, i, "each request gets its own result")
    t.ok(r[i].json.size <= 4, "batch size " .. r[i].json.size .. " <= max_batch_size")
    biggest = math.max(biggest, r[i].json.size)
  end
  t.ok(biggest > 1, "the handler saw batches larger than 1 (largest " .. biggest .. ")")
end)

t.test("batching: a lone request runs after batch_wait_timeout_s as a batch of 1", function()
  local r = run(function(httpc, p) return httpc.get(p, "/batched?x=99") end)
  t.eq(r.status, 200)
  t.deep_eq(r.json, {size = 1, x = 99})
end)

t.test("batching: handler errors and wrong result counts fail each request with 500", function()
  local r = run(function(httpc, p)
    return {raise = httpc.get(p, "/badbatch?raise=1"), count = httpc.get(p, "/badbatch")}
  end)
  -- The client gets an error id; the message is in the server's log.
  t.eq(r.raise.status, 500)
  t.ok(r.raise.json and r.raise.json.id and not r.raise.body:find("batch handler failed", 1, true), r.raise.body)
  t.eq(r.count.status, 500)
  t.ok(r.count.json and r.count.json.id and not r.count.body:find("one result per request", 1, true), r.count.body)
end)

t.test("batching: a handler one result short fails every request of the batch, not only the last", function()
  local short = "/badbatch?short=1"
  local r = run(function(httpc, p) return at_once(httpc, p, {short, short, short, short}) end)
  for i = 1, 4 do t.eq(r[i].status, 500, "request " .. i .. ": " .. tostring(r[i].body)) end
end)

t.test("jobs: a job survives a redeploy of its deployment", function()
  local id = run(function(httpc, p) return httpc.post(p, "/jobs2/long", {json = {}}).json.id end)
  t.ok(poll_until(function()
    local r = run(function(httpc, p, jid) return httpc.get(p, "/jobs2/" .. jid).json end, id)
    return r.status == "running"
  end, 10), "the job is running")
  serve.deploy(jobs_version(2))
  local final
  t.ok(poll_until(function()
    final = run(function(httpc, p, jid) return httpc.get(p, "/jobs2/" .. jid).json end, id)
    return final.status ~= "pending" and final.status ~= "running"
  end, 20), "the job finished")
  t.eq(final.status, "succeeded", "status after the redeploy: " .. tostring(final.status)
    .. " " .. tostring(final.error))
  t.ok(final.result and (final.result.v == 1 or final.result.v == 2), "a result")
end)

t.test("shutdown and restart with limits: max_body_bytes -> 413, request_timeout_ms -> 504", function()
  serve.shutdown()
  local p2 = serve.run({
    serve.deployment{name = "small", route = "/small", call = function(self, req) return {n = #req.body} end},
    serve.deployment{name = "lazy", route = "/lazy", call = function(self, req) tide.sleep(2); return "late" end},
  }, {port = PORT + 1, blocking = false, max_body_bytes = 1024, request_timeout_ms = 500})
  t.eq(p2, PORT + 1)
  local r = await(client(function(httpc, p)
    return {
      ok = httpc.post(p, "/small", {body = string.rep("a", 1000), headers = {["Content-Type"] = "text/plain"}}),
      big = httpc.post(p, "/small", {body = string.rep("a", 2048), headers = {["Content-Type"] = "text/plain"}}),
      late = httpc.get(p, "/lazy", {timeout = 5}),
      old = pcall(httpc.get, p - 1, "/-/healthz", {timeout = 1}),
      metrics = httpc.get(p, "/-/metrics"),
    }
  end):remote(PORT + 1))
  t.eq(r.ok.status, 200)
  t.eq(r.ok.json.n, 1000)
  t.eq(r.big.status, 413)
  t.eq(r.late.status, 504)
  -- counted as what the client got, not as a client that left (499)
  t.ok(r.metrics.body:find('tide_serve_requests_total{deployment="lazy",route="/lazy",code="504"} 1', 1, true)
    and not r.metrics.body:find('route="/lazy",code="499"', 1, true), r.metrics.body)
  t.eq(r.old, false, "the first ingress is gone")
  t.deep_eq(serve.status().ver, nil, "deployments from before the shutdown are gone")
end)

serve.shutdown()
t.done()

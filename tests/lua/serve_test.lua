-- tide.serve over real HTTP: deployments, the contract app (echo, count,
-- jobs), request and response objects, routing, keep-alive, pipelining,
-- limits, streaming and SSE, load balancing, composition, /-/ endpoints and
-- `tide serve status`.  The client (tests/lua/httpc.lua) runs inside tasks
-- while the driver keeps the ingress served with serve.poll.
-- Run: bin/tide run tests/lua/serve_test.lua
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 4, resources = {accel = 4}})
local serve = require("tide.serve")
local cjson = require("cjson")

local PORT = 18300

local sc = dofile("tests/lua/serve_client.lua")
local client, run = sc.client, sc.runner(PORT)

-- -- The app -------------------------------------------------------------------

local Echo = serve.deployment{
  name = "echo", route = "/echo", num_replicas = 2,
  init = function(self) self.hits = 0 end,
  call = function(self, req)
    self.hits = self.hits + 1
    return {got = req.json, path = req.path, method = req.method}
  end,
}
local Count = serve.deployment{
  name = "count", route = "/count",
  call = function(self, req)
    return serve.stream(function(send) for i = 1, 5 do send(tostring(i) .. "\n") end end)
  end,
}
local Jobs = serve.deployment{
  name = "jobs", route = "/jobs",
  jobs = {
    work = function(self, req, job)
      job:progress(0.5); return {answer = req.json.x * 2}
    end,
    slow = function(self, req, job)
      for i = 1, 10 do job:progress(i / 10); tide.sleep(0.1) end
      return {done = true}
    end,
    fail = function(self, req, job) error("the job broke") end,
    forever = function(self, req, job)
      local mark = tide.get_actor("marks")
      for i = 1, 400 do tide.get(mark:set("forever", i)); tide.sleep(0.05) end
      return "never"
    end,
  },
}
-- A plain actor the handlers write marks into, read by the tests.
local Marks = tide.actor({
  init = function(self) self.m = {} end,
  set = function(self, k, v) self.m[k] = v end,
  get = function(self, k) return self.m[k] end,
})
local marks = Marks:options({name = "marks"}):remote()
tide.get(marks:get("x"))

local Info = serve.deployment{
  name = "info", route = "/info", num_replicas = 1,
  init = function(self) self.hits = 0; self.tag = "set-in-init" end,
  call = function(self, req)
    self.hits = self.hits + 1
    return {
      method = req.method, path = req.path, subpath = req.subpath, query = req.query,
      header = req.headers["x-test"], ua = req.headers["user-agent"], body = req.body,
      json = req.json, hits = self.hits, tag = self.tag,
      body_len = #req.body,
    }
  end,
}
local Resp = serve.deployment{
  name = "resp", route = "/resp",
  call = function(self, req)
    local k = req.subpath
    if k == "/created" then
      return serve.response{status = 201, headers = {["X-Custom"] = "yes", Location = "/resp/1"},
        body = {made = 1}}
    elseif k == "/teapot" then
      return serve.response{status = 418, body = {error = "short and stout"}}
    elseif k == "/missing" then
      return serve.response{status = 404, body = "nothing here"}
    elseif k == "/unavailable" then
      return serve.response{status = 503, headers = {["Retry-After"] = "7"}, body = {error = "busy"}}
    elseif k == "/text" then
      return "plain text"
    elseif k == "/table" then
      return {a = 1, list = {1, 2, 3}, nested = {b = "c"}}
    elseif k == "/array" then
      return {10, 20, 30}
    elseif k == "/html" then
      return serve.response{headers = {["Content-Type"] = "text/html"}, body = "<p>hi</p>"}
    elseif k == "/raise" then
      error("handler exploded")
    elseif k == "/raise-response" then
      error(serve.response{status = 403, body = {error = "forbidden"}})
    elseif k == "/nil" then
      return nil
    elseif k == "/nocontent" then
      return serve.response{status = 204}
    elseif k == "/big" then
      return string.rep("0123456789abcdef", 5 * 65536) -- 5 MiB
    elseif k == "/utf8" then
      return {s = "h\195\169llo \226\156\147", got = req.json}
    elseif k == "/taskfail" then
      return tide.get(tide.remote(function() error("inner task failure") end):remote())
    elseif k == "/midfail" then
      return serve.stream(function(send) send("a"); send("b"); error("boom mid-stream") end)
    elseif k == "/earlyfail" then
      return serve.stream(function() error("boom before the first chunk") end)
    elseif k == "/midfail-slow" then
      return serve.stream(function(send)
        send("a"); tide.sleep(0.1); send("b"); tide.sleep(0.1); error("boom mid-stream")
      end)
    elseif k == "/hang" then
      tide.sleep(0.5)
      return "late"
    end
    return serve.response{status = 400, body = {error = "unknown case " .. k}}
  end,
}
local Methods = serve.deployment{
  name = "methods", route = "/m",
  methods = {
    GET = function(self, req) return {verb = "get"} end,
    POST = function(self, req) return serve.response{status = 201, body = {verb = "post", json = req.json}} end,
    DELETE = function(self, req) return {verb = "delete"} end,
  },
}
local Sleepy = serve.deployment{
  name = "sleepy", route = "/sleepy",
  call = function(self, req)
    tide.sleep(tonumber(req.query.s) or 0)
    return {n = tonumber(req.query.n)}
  end,
}
local Ticker = serve.deployment{
  name = "ticker", route = "/ticker",
  call = function(self, req)
    local n, dt = tonumber(req.query.n) or 4, tonumber(req.query.dt) or 0.2
    return serve.stream(function(send)
      for i = 1, n do
        send("tick " .. i .. "\n")
        if i < n then tide.sleep(dt) end
      end
    end)
  end,
}
local Events = serve.deployment{
  name = "events", route = "/events",
  call = function(self, req)
    return serve.stream(function(send)
      send("hello")
      send({n = 2})
      send("two\nlines")
      send("\n")
      send("cr\r\nlf\rend")
    end, {sse = true})
  end,
}
local Who = serve.deployment{
  name = "who", route = "/who", num_replicas = 2,
  init = function(self) self.id = tostring(math.random(1, 1e9)) end,
  call = function(self, req)
    local ctx = tide.get_runtime_context()
    return {actor_id = ctx.actor_id, pid = ctx.pid, id = self.id}
  end,
}
local Double = serve.deployment{
  name = "double", route = "/double",
  call = function(self, x)
    if type(x) == "table" and x.query then x = tonumber(x.query.x) end  -- over HTTP
    tide.sleep(0.3)
    return x * 2
  end,
  extra_methods = {
    triple = function(self, x) return x * 3 end,
  },
}
local Front = serve.deployment{
  name = "front", route = "/front", num_replicas = 1,
  init = function(self) self.inflight, self.max_inflight = 0, 0 end,
  call = function(self, req)
    self.inflight = self.inflight + 1
    if self.inflight > self.max_inflight then self.max_inflight = self.inflight end
    local h = serve.get_handle("double")
    local x = tonumber(req.query.x)
    local ok, doubled = pcall(tide.get, h:remote(x))
    self.inflight = self.inflight - 1
    if not ok then error(doubled) end
    local tripled = tide.get(h:method("triple", x))
    return {doubled = doubled, tripled = tripled, max_inflight = self.max_inflight}
  end,
}
local Res = serve.deployment{
  name = "res", route = "/res", num_replicas = 2, resources = {accel = 1},
  call = function(self, req) return "ok" end,
}
local Secure = serve.deployment{
  name = "secure", route = "/secure", job_token = "s3cret",
  jobs = {work = function(self, req, job) return {ok = true} end},
}
local Nested = serve.deployment{
  name = "nested", route = "/echo/deeper",
  call = function(self, req) return {nested = true, path = req.path} end,
}

local port = serve.run({Echo, Count, Jobs, Info, Resp, Methods, Sleepy, Ticker, Events, Who,
  Double, Front, Res, Nested, Secure}, {port = PORT, blocking = false})

-- -- Tests -------------------------------------------------------------------------

t.test("serve.run returns the port it listens on", function()
  t.eq(port, PORT)
end)

t.test("contract echo: JSON in, JSON 200 out with path and method", function()
  local r = run(function(httpc, p) return httpc.post(p, "/echo/x", {json = {a = 1, b = {"c"}}}) end)
  t.eq(r.status, 200)
  t.ok(r.headers["content-type"]:find("application/json", 1, true), r.headers["content-type"])
  t.deep_eq(r.json, {got = {a = 1, b = {"c"}}, path = "/echo/x", method = "POST"})
  t.eq(tonumber(r.headers["content-length"]), #r.body)
end)

t.test("contract echo: GET without a body gives got = nil", function()
  local r = run(function(httpc, p) return httpc.get(p, "/echo") end)
  t.eq(r.status, 200)
  t.deep_eq(r.json, {path = "/echo", method = "GET"})
end)

t.test("contract count: streams 1..5 as a chunked response", function()
  local r = run(function(httpc, p) return httpc.get(p, "/count") end)
  t.eq(r.status, 200)
  t.eq(r.headers["transfer-encoding"], "chunked")
  t.eq(r.body, "1\n2\n3\n4\n5\n")
  t.eq(#r.chunks, 5, "one HTTP chunk per send")
  for i, c in ipairs(r.chunks) do t.eq(c.data, i .. "\n") end
end)

t.test("contract jobs: POST -> 202 {id}, GET -> succeeded with progress and result", function()
  local r = run(function(httpc, p)
    local sub = httpc.post(p, "/jobs/work", {json = {x = 21}})
    local id = sub.json and sub.json.id
    local last = httpc.wait_for(p, "/jobs/" .. tostring(id), function(g)
      return g.json and g.json.status == "succeeded"
    end, 20)
    return {sub = sub, last = last}
  end)
  t.eq(r.sub.status, 202)
  t.eq(type(r.sub.json.id), "string")
  t.ok(r.sub.json.status == "pending", "a new job is pending")
  t.eq(r.last.status, 200)
  t.eq(r.last.json.status, "succeeded")
  t.deep_eq(r.last.json.result, {answer = 42})
  t.eq(r.last.json.progress, 1)
  t.eq(r.last.json.error, nil)
end)

t.test("jobs: progress is reported while running, then the result", function()
  local r = run(function(httpc, p)
    local id = httpc.post(p, "/jobs/slow", {json = {}}).json.id
    local seen, statuses = {}, {}
    local deadline = httpc.now() + 20
    while httpc.now() < deadline do
      local g = httpc.get(p, "/jobs/" .. id).json
      statuses[g.status] = true
      if g.status == "running" then seen[#seen + 1] = g.progress end
      if g.status ~= "pending" and g.status ~= "running" then return {final = g, seen = seen, statuses = statuses} end
      tide.sleep(0.05)
    end
    return {seen = seen, statuses = statuses}
  end)
  t.ok(r.final, "the job finished")
  t.eq(r.final.status, "succeeded")
  t.deep_eq(r.final.result, {done = true})
  t.ok(r.statuses.running, "status running was seen")
  t.ok(#r.seen >= 2, "several progress values seen while running: " .. #r.seen)
  local rising = false
  for i = 2, #r.seen do
    t.ok(r.seen[i] >= r.seen[i - 1], "progress never goes back")
    if r.seen[i] > r.seen[1] then rising = true end
  end
  t.ok(rising, "progress advanced while running")
end)

t.test("jobs: a job that raises ends failed with an error and no result", function()
  local r = run(function(httpc, p)
    local id = httpc.post(p, "/jobs/fail", {json = {}}).json.id
    return httpc.wait_for(p, "/jobs/" .. id, function(g)
      return g.json and g.json.status ~= "pending" and g.json.status ~= "running"
    end, 20)
  end)
  t.eq(r.json.status, "failed")
  t.eq(r.json.error, "the job broke", "the job's message, without file:line or traceback")
  t.ok(type(r.json.error_id) == "string" and #r.json.error_id == 16, "an error id for the log")
  t.eq(r.json.result, nil)
end)

t.test("jobs: DELETE cancels a running job, and it stops running", function()
  local r = run(function(httpc, p)
    local id = httpc.post(p, "/jobs/forever", {json = {}}).json.id
    httpc.wait_for(p, "/jobs/" .. id, function(g) return g.json.status == "running" end, 20)
    tide.sleep(0.3)
    local del = httpc.delete(p, "/jobs/" .. id)
    tide.sleep(0.2)
    local after = httpc.get(p, "/jobs/" .. id)
    return {id = id, del = del, after = after}
  end)
  t.eq(r.del.status, 200)
  t.eq(r.del.json.status, "cancelled")
  t.eq(r.after.json.status, "cancelled")
  local n1 = tide.get(marks:get("forever"))
  t.ok(n1 and n1 > 0, "the job ran before it was cancelled")
  serve.poll(0.5)
  local n2 = tide.get(marks:get("forever"))
  t.eq(n2, n1, "the cancelled job stopped advancing")
end)

t.test("jobs: with job_token, job routes need Authorization: Bearer <token>", function()
  local r = run(function(httpc, p)
    local auth = {Authorization = "Bearer s3cret"}
    local out = {none = httpc.post(p, "/secure/work", {json = {}}),
      wrong = httpc.post(p, "/secure/work", {json = {}, headers = {Authorization = "Bearer nope"}}),
      good = httpc.post(p, "/secure/work", {json = {}, headers = auth})}
    local id = out.good.json.id
    out.get_none = httpc.get(p, "/secure/" .. id)
    out.del_none = httpc.delete(p, "/secure/" .. id)
    for _ = 1, 200 do
      out.done = httpc.get(p, "/secure/" .. id, {headers = auth})
      if out.done.json and out.done.json.status == "succeeded" then break end
      tide.sleep(0.05)
    end
    return out
  end)
  t.eq(r.none.status, 401)
  t.ok(r.none.headers["www-authenticate"] and r.none.headers["www-authenticate"]:find("Bearer", 1, true),
    "a WWW-Authenticate: Bearer challenge")
  t.eq(r.wrong.status, 401)
  t.eq(r.good.status, 202)
  t.ok(r.good.json.id:match("^job%-%x+$") and #r.good.json.id == 20, r.good.body)
  t.eq(r.get_none.status, 401)
  t.eq(r.del_none.status, 401)
  t.eq(r.done.json.status, "succeeded")
end)

t.test("jobs: records are capped at max_jobs (finished ones make room) and expire after job_ttl_s", function()
  local st = tide.get_actor("tide.serve.state", {namespace = "serve"})
  tide.get(st:set_limits(2, 3600))
  local ok, r = pcall(run, function(httpc, p)
    local function done(id)
      return httpc.wait_for(p, "/jobs/" .. id, function(g)
        return g.json and g.json.status ~= "pending" and g.json.status ~= "running" end, 20)
    end
    local out = {}
    local a = httpc.post(p, "/jobs/work", {json = {x = 1}}).json.id; done(a)
    local b = httpc.post(p, "/jobs/work", {json = {x = 2}}).json.id; done(b)
    out.third = httpc.post(p, "/jobs/work", {json = {x = 3}})      -- a makes room
    done(out.third.json.id)
    out.a_gone = httpc.get(p, "/jobs/" .. a).status
    out.b_kept = httpc.get(p, "/jobs/" .. b).status
    local f1 = httpc.post(p, "/jobs/forever", {json = {}}).json.id
    local f2 = httpc.post(p, "/jobs/forever", {json = {}}).json.id
    out.full = httpc.post(p, "/jobs/work", {json = {x = 4}})       -- two running: no room
    httpc.delete(p, "/jobs/" .. f1); httpc.delete(p, "/jobs/" .. f2)
    return out
  end)
  tide.get(st:set_limits(10000, 0))
  local ok2, r2 = pcall(run, function(httpc, p)
    local id = httpc.post(p, "/jobs/work", {json = {x = 5}}).json.id
    httpc.wait_for(p, "/jobs/" .. id, function(g) return g.json and g.json.status == "succeeded" end, 20)
    tide.sleep(1.1)
    httpc.post(p, "/jobs/work", {json = {x = 6}})                  -- the next submit sweeps
    return {expired = httpc.get(p, "/jobs/" .. id).status}
  end)
  tide.get(st:set_limits(10000, 3600))
  t.ok(ok, tostring(r))
  t.ok(ok2, tostring(r2))
  t.eq(r.third.status, 202, "a finished record makes room")
  t.eq(r.a_gone, 404, "the oldest finished record was let go")
  t.eq(r.b_kept, 200)
  t.eq(r.full.status, 503, "at max_jobs with every job running, a new one is refused: " .. r.full.body)
  t.ok(r.full.body:find("too many jobs", 1, true), r.full.body)
  t.eq(r2.expired, 404, "a finished record expires after job_ttl_s")
end)

t.test("jobs: unknown job ids give 404 JSON; unknown job names are not jobs", function()
  local r = run(function(httpc, p)
    return {get = httpc.get(p, "/jobs/job-0123456789abcdef"), del = httpc.delete(p, "/jobs/job-0123456789abcdef"),
      post = httpc.post(p, "/jobs/nosuchjob", {json = {}})}
  end)
  t.eq(r.get.status, 404)
  t.ok(r.get.json and r.get.json.error, "a JSON error")
  t.eq(r.del.status, 404)
  t.ok(r.post.status >= 400 and r.post.status < 500, "POST to an unknown job name: " .. r.post.status)
end)

t.test("jobs: progress streams as Server-Sent Events until the job ends", function()
  local r = run(function(httpc, p)
    local id = httpc.post(p, "/jobs/slow", {json = {}}).json.id
    return httpc.get(p, "/jobs/" .. id .. "/events", {timeout = 20})
  end)
  t.eq(r.status, 200)
  t.ok(r.headers["content-type"]:find("text/event-stream", 1, true), r.headers["content-type"])
  local events = {}
  for data in r.body:gmatch("data: ([^\n]*)\n\n") do events[#events + 1] = cjson.decode(data) end
  t.ok(#events >= 3, "several events: " .. #events)
  t.eq(events[#events].status, "succeeded")
  t.deep_eq(events[#events].result, {done = true})
end)

t.test("request object: method, path, subpath, query, headers, body, json", function()
  local r = run(function(httpc, p)
    return {
      get = httpc.get(p, "/info/a/b?x=1&y=hello%20world&z=a+b&flag",
        {headers = {["X-Test"] = "hi there", ["User-Agent"] = "httpc"}}),
      raw = httpc.post(p, "/info", {body = "just bytes", headers = {["Content-Type"] = "text/plain"}}),
      json = httpc.post(p, "/info", {json = {list = {1, 2}, s = "x"}}),
    }
  end)
  local g = r.get.json
  t.eq(g.method, "GET")
  t.eq(g.path, "/info/a/b")
  t.eq(g.subpath, "/a/b")
  t.deep_eq(g.query, {x = "1", y = "hello world", z = "a b", flag = ""})
  t.eq(g.header, "hi there", "header names are lowercased")
  t.eq(g.ua, "httpc")
  t.eq(g.body, "")
  t.eq(g.json, nil)
  t.eq(r.raw.json.body, "just bytes")
  t.eq(r.raw.json.json, nil, "a text body is not decoded")
  t.eq(r.raw.json.method, "POST")
  t.deep_eq(r.json.json.json, {list = {1, 2}, s = "x"})
  t.deep_eq(cjson.decode(r.json.json.body), {list = {1, 2}, s = "x"}, "req.body is the raw JSON text")
end)

t.test("request object: invalid JSON with a JSON content type gives 400", function()
  local r = run(function(httpc, p)
    return httpc.post(p, "/info", {body = "{not json", headers = {["Content-Type"] = "application/json"}})
  end)
  t.eq(r.status, 400)
  t.ok(r.json and r.json.error, "a JSON error body")
end)

t.test("deployments: init runs once per replica; state persists across calls", function()
  local r = run(function(httpc, p)
    local c = httpc.connect(p)
    local out = {}
    for i = 1, 3 do out[i] = c:get("/info").json end
    c:close()
    return out
  end)
  t.eq(r[1].tag, "set-in-init")
  t.eq(r[2].hits, r[1].hits + 1)
  t.eq(r[3].hits, r[1].hits + 2)
end)

t.test("serve.response: 201 with custom headers and a JSON body", function()
  local r = run(function(httpc, p) return httpc.post(p, "/resp/created", {json = {}}) end)
  t.eq(r.status, 201)
  t.eq(r.headers["x-custom"], "yes")
  t.eq(r.headers["location"], "/resp/1")
  t.deep_eq(r.json, {made = 1})
  t.ok(r.headers["content-type"]:find("json", 1, true), "table bodies are JSON")
end)

t.test("serve.response: 4xx and 5xx statuses are returned as given", function()
  local r = run(function(httpc, p)
    return {httpc.get(p, "/resp/teapot"), httpc.get(p, "/resp/missing"), httpc.get(p, "/resp/unavailable")}
  end)
  t.eq(r[1].status, 418)
  t.deep_eq(r[1].json, {error = "short and stout"})
  t.eq(r[2].status, 404)
  t.eq(r[2].body, "nothing here")
  t.ok(r[2].headers["content-type"]:find("text/plain", 1, true), r[2].headers["content-type"])
  t.eq(r[3].status, 503)
  t.eq(r[3].headers["retry-after"], "7")
end)

t.test("return values: table -> JSON 200, string -> text/plain 200, nil -> empty 200", function()
  local r = run(function(httpc, p)
    return {tbl = httpc.get(p, "/resp/table"), arr = httpc.get(p, "/resp/array"),
      txt = httpc.get(p, "/resp/text"), html = httpc.get(p, "/resp/html"), none = httpc.get(p, "/resp/nil")}
  end)
  t.eq(r.tbl.status, 200)
  t.ok(r.tbl.headers["content-type"]:find("application/json", 1, true))
  t.deep_eq(r.tbl.json, {a = 1, list = {1, 2, 3}, nested = {b = "c"}})
  t.deep_eq(r.arr.json, {10, 20, 30})
  t.eq(r.txt.status, 200)
  t.ok(r.txt.headers["content-type"]:find("text/plain", 1, true), r.txt.headers["content-type"])
  t.eq(r.txt.body, "plain text")
  t.eq(r.html.headers["content-type"], "text/html")
  t.eq(r.html.body, "<p>hi</p>")
  t.eq(r.none.status, 200)
  t.eq(r.none.body, "")
end)

-- A 500 tells the client an error id, never the message or traceback (they
-- carry server paths); the server logs them under that id (serve_cli_test).
local function opaque_500(r, secret)
  t.eq(r.status, 500)
  t.ok(r.json and type(r.json.id) == "string" and r.json.id:match("^%x+$") and #r.json.id == 16,
    "a 16-hex-digit error id: " .. r.body)
  t.eq(r.json and r.json.error, "internal server error")
  t.ok(not r.body:find(secret, 1, true) and not r.body:find("traceback", 1, true)
    and not r.body:find(".lua", 1, true), "no message, traceback or path: " .. r.body)
end

t.test("handler errors: 500 JSON with an error id only; error(serve.response{...}) as given", function()
  local r = run(function(httpc, p)
    return {boom = httpc.get(p, "/resp/raise"), boom2 = httpc.get(p, "/resp/raise"),
      resp = httpc.get(p, "/resp/raise-response")}
  end)
  opaque_500(r.boom, "handler exploded")
  t.ok(r.boom.json.id ~= r.boom2.json.id, "each failure has its own id")
  t.eq(r.resp.status, 403)
  t.deep_eq(r.resp.json, {error = "forbidden"})
end)

t.test("responses: 204 without a body, a 5 MiB body, UTF-8 JSON, HEAD", function()
  local r = run(function(httpc, p)
    local c = httpc.connect(p)
    local out = {nocontent = c:get("/resp/nocontent"), big = c:get("/resp/big"),
      utf8 = c:post("/resp/utf8", {json = {u = "\195\188"}}), head = c:request("HEAD", "/resp/text")}
    out.after_head = c:get("/resp/text")
    c:close()
    return out
  end)
  t.eq(r.nocontent.status, 204)
  t.eq(r.nocontent.body, "")
  t.eq(r.big.status, 200)
  t.eq(#r.big.body, 5 * 1024 * 1024)
  t.eq(r.big.body:sub(1, 16), "0123456789abcdef")
  t.deep_eq(r.utf8.json, {s = "h\195\169llo \226\156\147", got = {u = "\195\188"}})
  t.eq(r.head.status, 200)
  t.eq(r.head.headers["content-length"], tostring(#"plain text"))
  t.eq(r.head.body, "", "no body for HEAD")
  t.eq(r.after_head.body, "plain text", "the connection is still in sync after HEAD")
end)

t.test("handler errors: a failed task inside a handler gives an opaque 500 too", function()
  local r = run(function(httpc, p) return httpc.get(p, "/resp/taskfail") end)
  opaque_500(r, "inner task failure")
end)

-- Reads a streamed response until the server ends or cuts it.
local function read_stream(httpc, p, path)
  local c = httpc.connect(p)
  c:send_raw(httpc.format_request("GET", path))
  local ok, head = pcall(c.read_head, c, {timeout = 5})
  if not ok then c:close(); return {err = head} end
  local got, finished = {}, false
  local ok2, err = pcall(function()
    while true do
      local d = c:read_chunk({timeout = 5})
      if not d then finished = true; break end
      got[#got + 1] = d
    end
  end)
  c:close()
  return {status = head.status, chunks = got, finished = finished, err = not ok2 and err or nil}
end

t.test("streaming: a generator that fails after sending (with pauses) truncates the response", function()
  local r = run(function(httpc, p) return read_stream(httpc, p, "/resp/midfail-slow") end)
  t.eq(r.status, 200, tostring(r.err))
  t.deep_eq(r.chunks, {"a", "b"})
  t.eq(r.finished, false, "no terminating chunk: the client can tell the stream failed")
end)

t.test("streaming: a generator that fails right after sending still delivers what it sent", function()
  local r = run(function(httpc, p) return read_stream(httpc, p, "/resp/midfail") end)
  t.eq(r.status, 200, "the status line and headers arrive: " .. tostring(r.err))
  t.deep_eq(r.chunks, {"a", "b"})
  t.eq(r.finished, false, "no terminating chunk")
end)

t.test("streaming: a generator that fails before sending anything is seen as failed", function()
  local r = run(function(httpc, p) return read_stream(httpc, p, "/resp/earlyfail") end)
  t.ok(r.err or (r.status >= 500) or not r.finished,
    "a 5xx or a truncated stream, not a clean empty 200")
  local after = run(function(httpc, p) return httpc.get(p, "/resp/text") end)
  t.eq(after.body, "plain text")
end)

t.test("a client that leaves before its response does not leak an ongoing request", function()
  local r = run(function(httpc, p)
    local c = httpc.connect(p)
    c:send_raw(httpc.format_request("GET", "/resp/hang"))
    tide.sleep(0.1)
    c:close()
    tide.sleep(0.6)
    return httpc.get(p, "/-/status").json.deployments.resp
  end)
  t.eq(r.ongoing, 0)
  local after = run(function(httpc, p) return httpc.get(p, "/resp/text") end)
  t.eq(after.body, "plain text")
end)

t.test("methods: handlers chosen by HTTP method; others get 405", function()
  local r = run(function(httpc, p)
    return {get = httpc.get(p, "/m"), post = httpc.post(p, "/m", {json = {k = "v"}}),
      del = httpc.delete(p, "/m/1"), put = httpc.request(p, "PUT", "/m", {body = "x"})}
  end)
  t.deep_eq(r.get.json, {verb = "get"})
  t.eq(r.post.status, 201)
  t.deep_eq(r.post.json, {verb = "post", json = {k = "v"}})
  t.deep_eq(r.del.json, {verb = "delete"})
  t.eq(r.put.status, 405)
end)

t.test("routing: longest prefix wins; /echoes and unknown paths are 404", function()
  local r = run(function(httpc, p)
    return {nested = httpc.get(p, "/echo/deeper/x"), echo = httpc.get(p, "/echo/deep"),
      echoes = httpc.get(p, "/echoes"), none = httpc.get(p, "/nope"), root = httpc.get(p, "/")}
  end)
  t.deep_eq(r.nested.json, {nested = true, path = "/echo/deeper/x"})
  t.eq(r.echo.json.path, "/echo/deep")
  t.eq(r.echoes.status, 404)
  t.eq(r.none.status, 404)
  t.ok(r.none.json and r.none.json.error, "404 has a JSON error")
  t.eq(r.root.status, 404)
end)

t.test("/-/healthz, /-/routes and /-/status", function()
  local r = run(function(httpc, p)
    return {h = httpc.get(p, "/-/healthz"), routes = httpc.get(p, "/-/routes"), status = httpc.get(p, "/-/status")}
  end)
  t.eq(r.h.status, 200)
  t.eq(r.routes.status, 200)
  t.eq(r.routes.json["/echo"], "echo")
  t.eq(r.routes.json["/count"], "count")
  t.eq(r.routes.json["/jobs"], "jobs")
  t.eq(r.routes.json["/echo/deeper"], "nested")
  t.eq(r.status.status, 200)
  local d = r.status.json.deployments
  t.eq(d.echo.route, "/echo")
  t.eq(d.echo.replicas, 2)
  t.eq(d.info.replicas, 1)
  t.ok(d.echo.requests >= 2, "requests are counted")
end)

t.test("serve.status(): deployments with routes, replicas and counters", function()
  local s = serve.status()
  t.ok(s.echo and s.count and s.jobs, "every deployment is listed")
  t.eq(s.echo.route, "/echo")
  t.eq(#s.echo.replicas, 2)
  t.eq(#s.info.replicas, 1)
  for _, rep in ipairs(s.echo.replicas) do
    t.eq(type(rep.id), "string"); t.eq(#rep.id, 16)  -- the actor id: 16 hex digits
    t.eq(rep.ongoing, 0)
    t.eq(rep.draining, false)
  end
  t.ok(s.echo.requests >= 2)
end)

t.test("keep-alive: several requests on one connection", function()
  local r = run(function(httpc, p)
    local c = httpc.connect(p)
    local out = {}
    out[1] = c:post("/echo", {json = {i = 1}})
    out[2] = c:get("/count")
    out[3] = c:get("/-/healthz")
    out[4] = c:get("/nope")
    out[5] = c:post("/echo", {json = {i = 5}})
    out.closed = c:is_closed(0.1)
    c:close()
    return out
  end)
  t.eq(r[1].json.got.i, 1)
  t.eq(r[2].body, "1\n2\n3\n4\n5\n")
  t.eq(r[3].status, 200)
  t.eq(r[4].status, 404)
  t.eq(r[5].json.got.i, 5)
  t.eq(r.closed, false, "the connection stays open")
end)

t.test("pipelining: two requests in one write get responses in order", function()
  local r = run(function(httpc, p)
    local c = httpc.connect(p)
    -- The first is slower than the second; answers must still come in order.
    c:send_raw(httpc.format_request("GET", "/sleepy?s=0.3&n=1") .. httpc.format_request("GET", "/sleepy?s=0&n=2")
      .. httpc.format_request("POST", "/echo", {json = {n = 3}}))
    local out = {c:read_response(), c:read_response(), c:read_response()}
    c:close()
    return out
  end)
  t.eq(r[1].json.n, 1)
  t.eq(r[2].json.n, 2)
  t.eq(r[3].json.got.n, 3)
end)

t.test("HTTP/1.0 and Connection: close end the connection after the response", function()
  local r = run(function(httpc, p)
    local a = httpc.connect(p)
    local r10 = a:request("GET", "/echo", {http10 = true})
    local closed10 = a:is_closed(2)
    a:close()
    local b = httpc.connect(p)
    local rc = b:request("GET", "/echo", {close = true})
    local closed11 = b:is_closed(2)
    b:close()
    return {r10 = r10, closed10 = closed10, rc = rc, closed11 = closed11}
  end)
  t.eq(r.r10.status, 200)
  t.eq(r.r10.json.method, "GET")
  t.ok(r.closed10, "HTTP/1.0 without keep-alive closes")
  t.eq(r.rc.status, 200)
  t.ok(r.closed11, "Connection: close closes")
end)

t.test("malformed HTTP gets 400 and the server keeps serving", function()
  local r = run(function(httpc, p)
    local out = {}
    local bad = {
      "GARBAGE\r\n\r\n",
      "GET /echo HTTP/9.9\r\n\r\n",
      "GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
      "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
      "GET /echo HTTP/1.1\r\nBad Header Without Colon\r\n\r\n",
      "\0\1\2\3\4\5\r\n\r\n",
    }
    for i, raw in ipairs(bad) do
      local c = httpc.connect(p)
      c:send_raw(raw)
      local ok, resp = pcall(c.read_response, c, {timeout = 5})
      out[i] = ok and resp.status or ("no response: " .. tostring(resp))
      c:close()
    end
    -- A client that sends half a request and goes away.
    local c = httpc.connect(p)
    c:send_raw("POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
    c:close({reset = true})
    out.after = httpc.post(p, "/echo", {json = {still = "alive"}})
    out.health = httpc.get(p, "/-/healthz")
    return out
  end)
  for i = 1, 6 do t.eq(r[i], 400, "malformed request " .. i) end
  t.eq(r.after.status, 200)
  t.eq(r.after.json.got.still, "alive")
  t.eq(r.health.status, 200)
end)

t.test("limits: a body over 1 MiB gets 413, huge headers 431, a huge URL 414", function()
  local r = run(function(httpc, p)
    local out = {}
    -- Announce a large body: the server can answer before reading it.
    local c = httpc.connect(p)
    c:send_raw("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 2000000\r\n\r\n"
      .. string.rep("x", 1000))
    local ok, resp = pcall(c.read_response, c, {timeout = 5})
    out.announced = ok and resp.status or tostring(resp)
    out.announced_json = ok and resp.json
    c:close()
    -- Send it all (the server may stop reading once it has answered).
    c = httpc.connect(p)
    local sent = pcall(c.send_raw, c, httpc.format_request("POST", "/echo", {body = string.rep("y", 1536 * 1024)}))
    ok, resp = pcall(c.read_response, c, {timeout = 5})
    out.sent = ok and resp.status or ("sent " .. tostring(sent) .. ": " .. tostring(resp))
    c:close()
    -- Chunked bodies count too.
    c = httpc.connect(p)
    local chunk = string.rep("z", 256 * 1024)
    local parts = {"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"}
    for _ = 1, 6 do parts[#parts + 1] = string.format("%x\r\n%s\r\n", #chunk, chunk) end
    parts[#parts + 1] = "0\r\n\r\n"
    pcall(c.send_raw, c, table.concat(parts))
    ok, resp = pcall(c.read_response, c, {timeout = 5})
    out.chunked = ok and resp.status or tostring(resp)
    c:close()
    out.headers = httpc.get(p, "/echo", {headers = {["X-Big"] = string.rep("h", 20000)}}).status
    out.url = httpc.get(p, "/echo?" .. string.rep("q", 20000)).status
    out.just_under = httpc.post(p, "/info", {body = string.rep("u", 1000 * 1000),
      headers = {["Content-Type"] = "text/plain"}})
    return out
  end)
  t.eq(r.announced, 413)
  t.ok(r.announced_json and r.announced_json.error, "413 has a JSON error body")
  t.eq(r.sent, 413)
  t.eq(r.chunked, 413)
  t.eq(r.headers, 431)
  t.eq(r.url, 414)
  t.eq(r.just_under.status, 200)
  t.eq(r.just_under.json.body_len, 1000 * 1000)
end)

t.test("streaming: chunks are flushed as they are sent, not at the end", function()
  local r = run(function(httpc, p) return httpc.get(p, "/ticker?n=4&dt=0.25") end)
  t.eq(r.status, 200)
  t.eq(r.headers["transfer-encoding"], "chunked")
  t.eq(#r.chunks, 4)
  t.eq(r.body, "tick 1\ntick 2\ntick 3\ntick 4\n")
  -- The handler sleeps 0.75 s in all between its first and last send.
  local spread = r.chunks[4].t - r.chunks[1].t
  t.ok(spread > 0.4, string.format("first chunk arrived %.3f s before the last", spread))
end)

t.test("streaming: Server-Sent Events with serve.stream(fn, {sse = true})", function()
  local r = run(function(httpc, p) return httpc.get(p, "/events") end)
  t.eq(r.status, 200)
  t.ok(r.headers["content-type"]:find("text/event-stream", 1, true), r.headers["content-type"])
  t.eq(r.headers["cache-control"], "no-cache")
  -- Per the SSE spec a value with line breaks (\n, \r\n or \r) is one
  -- data: line per line: "\n" alone is two empty ones (data "\n"), and no
  -- bare \r can end a line early in a client's parser.
  t.eq(r.body, 'data: hello\n\ndata: {"n":2}\n\ndata: two\ndata: lines\n\n' ..
    'data: \ndata: \n\ndata: cr\ndata: lf\ndata: end\n\n')
  t.eq(#r.chunks, 5, "one chunk per event")
end)

t.test("load balancing: sequential requests spread over both replicas", function()
  local r = run(function(httpc, p)
    local ids = {}
    local c = httpc.connect(p)
    for _ = 1, 40 do
      local g = c:get("/who").json
      ids[g.actor_id] = (ids[g.actor_id] or 0) + 1
    end
    c:close()
    return ids
  end)
  local n = 0
  for _ in pairs(r) do n = n + 1 end
  t.eq(n, 2, "both replicas answered")
end)

t.test("load balancing: concurrent requests go to the less loaded replica", function()
  -- Two slow requests at once: power of two choices puts them on different replicas.
  local Slow2 = serve.deployment{
    name = "slow2", route = "/slow2", num_replicas = 2,
    call = function(self, req)
      tide.sleep(0.4)
      return {actor_id = tide.get_runtime_context().actor_id}
    end,
  }
  serve.deploy(Slow2)
  local r = run(function(httpc, p)
    local out = {}
    for round = 1, 3 do
      local a, b = httpc.connect(p), httpc.connect(p)
      a:send_raw(httpc.format_request("GET", "/slow2"))
      tide.sleep(0.05)
      b:send_raw(httpc.format_request("GET", "/slow2"))
      out[round] = {a:read_response().json.actor_id, b:read_response().json.actor_id}
      a:close(); b:close()
    end
    return out
  end)
  for round = 1, 3 do
    t.ok(r[round][1] ~= r[round][2], "round " .. round .. ": both replicas used at once")
  end
end)

t.test("resources: each replica holds its resources", function()
  local avail = tide.available_resources()
  t.eq(avail.accel, 2, "2 replicas x accel = 1 of 4")
  local r = run(function(httpc, p) return httpc.get(p, "/res") end)
  t.eq(r.body, "ok")
end)

t.test("composition: a handler calls another deployment through its handle", function()
  local r = run(function(httpc, p)
    -- Two requests at once: the waiting handler must not block the replica.
    local a, b = httpc.connect(p), httpc.connect(p)
    a:send_raw(httpc.format_request("GET", "/front?x=21"))
    b:send_raw(httpc.format_request("GET", "/front?x=5"))
    local ra, rb = a:read_response(), b:read_response()
    a:close(); b:close()
    return {ra, rb, httpc.get(p, "/double?x=4")}
  end)
  t.eq(r[1].status, 200, r[1].body)
  t.eq(r[1].json.doubled, 42)
  t.eq(r[1].json.tripled, 63)
  t.eq(r[2].json.doubled, 10)
  t.eq(r[2].json.tripled, 15)
  t.eq(math.max(r[1].json.max_inflight, r[2].json.max_inflight), 2,
    "the front replica served both requests while it waited")
  t.eq(r[3].body, "8")
end)

t.test("composition: serve.get_handle from the driver", function()
  local h = serve.get_handle("double")
  t.eq(tide.get(h:remote(7)), 14)
  t.eq(tide.get(h:method("triple", 7)), 21)
  t.raises(function() serve.get_handle("no-such-deployment"):remote(1) end, "no replicas")
end)

t.test("tide serve status prints the /-/status JSON", function()
  local r = run(function(httpc, p)
    local h = io.popen("bin/tide serve status --port " .. p .. " 2>&1; echo rc=$?")
    local out = h:read("*a")
    h:close()
    local h2 = io.popen("bin/tide serve status --port 1 2>&1; echo rc=$?")
    local bad = h2:read("*a")
    h2:close()
    return {out = out, bad = bad}
  end)
  t.ok(r.out:find("rc=0", 1, true), r.out)
  local json = r.out:match("^(.-)\nrc=")
  local ok, st = pcall(cjson.decode, json)
  t.ok(ok, "JSON output: " .. r.out)
  t.eq(st.deployments.echo.replicas, 2)
  t.eq(st.deployments.echo.route, "/echo")
  t.ok(st.deployments.jobs, "jobs listed")
  t.ok(r.bad:find("rc=1", 1, true), r.bad)
  t.ok(r.bad:find("no serve ingress", 1, true), r.bad)
end)

t.test("serve.deployment: bad specs raise at once, naming the problem", function()
  t.raises(function() serve.deployment("x") end, "expected a table")
  t.raises(function() serve.deployment{route = "/x", call = function() end} end, "'name' is required")
  t.raises(function() serve.deployment{name = "x", call = function() end, bogus = 1} end, "unknown key 'bogus'")
  t.raises(function() serve.deployment{name = "x"} end, "give 'call', 'methods' or 'jobs'")
  t.raises(function() serve.deployment{name = "x", route = "x", call = function() end} end, "must start with /")
  t.raises(function() serve.deployment{name = "x", num_replicas = "2", call = function() end} end,
    "'num_replicas' must be a number")
  t.raises(function()
    serve.deployment{name = "x", num_replicas = 2, autoscaling = {}, call = function() end}
  end, "not both")
  t.raises(function()
    serve.deployment{name = "x", autoscaling = {min_replicas = 3, max_replicas = 1}, call = function() end}
  end, "exceeds")
  t.raises(function() serve.deployment{name = "x", autoscaling = {mx = 1}, call = function() end} end,
    "unknown autoscaling key")
  t.raises(function() serve.deploy("nope") end, "serve.deploy")
  t.raises(function() serve.response{status = 99} end, "status")
  t.raises(function() serve.stream("not a function") end, "serve.stream")
end)

t.test("the default route is /<name>", function()
  serve.deploy(serve.deployment{name = "plain", call = function() return "plain!" end})
  local r = run(function(httpc, p) return httpc.get(p, "/plain") end)
  t.eq(r.body, "plain!")
end)

serve.shutdown()
t.test("serve.shutdown stops the ingress", function()
  local r = tide.get(client(function(httpc, p)
    local ok, err = pcall(httpc.get, p, "/-/healthz", {timeout = 2})
    return {ok = ok, err = tostring(err)}
  end):remote(PORT))
  t.eq(r.ok, false)
  t.ok(r.err:find("refused", 1, true), r.err)
end)
t.done()

-- tide.serve: HTTP endpoints declared in Lua (DESIGN §5). Deployments are
-- actors (replicas); the C ingress routes requests to them by path prefix
-- and power-of-two-choices load balancing, with no Lua in the driver per
-- request. Replicas run __serve below, which yields a header item and body
-- chunks that the ingress turns into a response (chunked when streaming).
local tide = require("tide")
local core = require("tide.core")
local cjson = require("cjson")

local M = {}

local type, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, error, pcall, xpcall =
  type, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, error, pcall, xpcall
local format, concat, floor, ceil = string.format, table.concat, math.floor, math.ceil

local STATE_ACTOR = "tide.serve.state"

-- -- Response helpers ----------------------------------------------------

local Stream = {}
Stream.__index = Stream
local Response = {}
Response.__index = Response

-- serve.stream(fn [, {sse = true, content_type = ...}]): fn(send) sends chunks.
function M.stream(fn, opts)
  if type(fn) ~= "function" then error("serve.stream: expected a function(send)", 2) end
  return setmetatable({fn = fn, opts = opts or {}}, Stream)
end

-- serve.response{status = 201, headers = {...}, body = "..." | table}
function M.response(t)
  if type(t) ~= "table" then error("serve.response: expected a table", 2) end
  local st = t.status or 200
  if type(st) ~= "number" or st < 100 or st > 599 then
    error("serve.response: status must be a number from 100 to 599", 2)
  end
  return setmetatable({status = st, headers = t.headers or {}, body = t.body}, Response)
end

local function header_item(kind, status, headers, body)
  local parts = {kind .. tostring(floor(status)) .. "\n"}
  for k, v in pairs(headers) do
    local ks, vs = tostring(k), tostring(v)
    if not ks:find("[\r\n:]") and not vs:find("[\r\n]") then
      parts[#parts + 1] = ks .. ": " .. vs .. "\n"
    end
  end
  parts[#parts + 1] = "\n"
  if body then parts[#parts + 1] = body end
  return concat(parts)
end

local function encode_body(v, headers)
  if type(v) == "table" then
    headers["Content-Type"] = headers["Content-Type"] or "application/json"
    return cjson.encode(v)
  elseif v == nil then
    return ""
  end
  headers["Content-Type"] = headers["Content-Type"] or "text/plain; charset=utf-8"
  return tostring(v)
end

local function send_full(status, headers, body)
  tide.yield(header_item("F", status, headers, body))
end

local function send_error(status, msg)
  send_full(status, {["Content-Type"] = "application/json"}, cjson.encode({error = msg}))
end

local function send_result(res)
  local mt = getmetatable(res)
  if mt == Stream then
    local sse = res.opts.sse
    local ct = res.opts.content_type or (sse and "text/event-stream" or "text/plain; charset=utf-8")
    tide.yield(header_item("C", res.opts.status or 200, {["Content-Type"] = ct, ["Cache-Control"] = "no-cache"}))
    local room, n_since, bytes_since = core.stream_room, 0, 0
    local function send(chunk)
      if type(chunk) == "table" then chunk = cjson.encode(chunk) end
      chunk = tostring(chunk)
      if sse then
        -- One data: line per line of the value (SSE ends lines at \r\n, \r or \n).
        chunk = "data: " .. chunk:gsub("\r\n?", "\n"):gsub("\n", "\ndata: ") .. "\n\n"
      end
      -- Back-pressure: waits while the ingress holds the stream's window
      -- of items (its client reads slowly), so memory stays bounded. Asked
      -- after 256 KiB or 64 chunks: a round trip per token would make
      -- small chunks several times slower.
      n_since, bytes_since = n_since + 1, bytes_since + #chunk
      if room and (bytes_since >= 262144 or n_since >= 64) then
        room()
        n_since, bytes_since = 0, 0
      end
      tide.yield(chunk)
    end
    res.fn(send)
    return
  end
  if mt == Response then
    local headers = {}
    for k, v in pairs(res.headers) do headers[k] = v end
    return send_full(res.status, headers, encode_body(res.body, headers))
  end
  local headers = {}
  send_full(200, headers, encode_body(res, headers))
end

local function parse_query(q)
  local t = {}
  for pair in q:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    local function unesc(s)
      return (s:gsub("+", " "):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
    end
    t[unesc(k)] = unesc(v)
  end
  return t
end

-- -- Jobs -------------------------------------------------------------------

-- A job id is all a client needs to read or cancel a job: 64 bits from
-- the OS's random source, not math.random (predictable from its seed, and
-- reseeded by any user code in the same Lua state).
local function job_id()
  local f = io.open("/dev/urandom", "rb")
  local b = f and f:read(8)
  if f then f:close() end
  if not b or #b ~= 8 then error("serve: cannot read /dev/urandom for a job id", 0) end
  return "job-" .. b:gsub(".", function(c) return format("%02x", c:byte()) end)
end
M._job_id = job_id  -- for tests

local function state_actor()
  return tide.get_actor(STATE_ACTOR, {namespace = "serve"})
end

-- The job object handlers receive.
local Job = {}
Job.__index = Job
function Job:progress(p, note)
  if type(p) ~= "number" then error("job:progress: expected a number", 2) end
  self._state:progress(self.id, p, note)
end

-- -- Replica side -------------------------------------------------------------

-- Builds the actor class of a deployment's replicas.
local function replica_class(d)
  local user_init, call, methods, jobs, token = d.init, d.call, d.methods, d.jobs, d.job_token
  local class = {}
  class.init = function(self, ...)
    if user_init then user_init(self, ...) end
  end
  class.__serve = function(self, req)
    local serve = require("tide.serve")
    return serve._handle(self, req, call, methods, jobs, token)
  end
  class.__job = function(self, id, name, req)
    local serve = require("tide.serve")
    return serve._run_job(self, id, name, req, jobs)
  end
  -- Composition: handle:remote(...) calls `call`, handle:method(name, ...) any method.
  if call then class.call = call end
  for k, v in pairs(d.extra) do class[k] = v end
  return class
end

function M._handle(self, req, call, methods, jobs, token)
  req.query = parse_query(req.query_string or "")
  local sub = req.path:sub(#req.route + 1)
  req.subpath = sub
  local ct = req.headers["content-type"] or ""
  if req.body ~= "" then
    if ct:find("json", 1, true) then
      local ok, v = pcall(cjson.decode, req.body)
      if not ok then return send_error(400, "request body is not valid JSON: " .. tostring(v)) end
      req.json = v
    elseif req.body:match("^%s*[%[{]") then
      -- A JSON-looking body sent without a JSON content type (curl -d).
      local ok, v = pcall(cjson.decode, req.body)
      if ok then req.json = v end
    end
  end
  if jobs then
    local name = sub:match("^/([%w_%-]+)$")
    local jobish = (req.method == "POST" and name and jobs[name]) or sub:match("^/job%-%x+")
    if jobish and token and req.headers["authorization"] ~= "Bearer " .. token then
      return send_full(401, {["Content-Type"] = "application/json", ["WWW-Authenticate"] = 'Bearer realm="tide"'},
        cjson.encode({error = "this deployment's job routes need Authorization: Bearer <token>"}))
    end
    if req.method == "POST" and name and jobs[name] then
      -- A job given as {run = fn, validate = fn}: the request is checked
      -- here, so a bad one gets its answer at once instead of a job that
      -- can only fail.  nil/true accepts (req may have been changed: the
      -- job gets it as changed); a string is a 400; a serve.response is sent.
      local j = jobs[name]
      if type(j) == "table" and j.validate then
        local okv, why = xpcall(j.validate, debug.traceback, self, req)
        if not okv then
          if type(why) == "table" and getmetatable(why) == Response then return send_result(why) end
          error(tostring(why), 0)
        end
        if type(why) == "table" and getmetatable(why) == Response then return send_result(why) end
        if why ~= nil and why ~= true then return send_error(400, tostring(why)) end
      end
      local id = job_id()
      local st = state_actor()
      local accepted, why = tide.get(st:submit(id, req.deployment, name, req))
      if not accepted then
        return send_full(503, {["Content-Type"] = "application/json", ["Retry-After"] = "5"},
          cjson.encode({error = why or "too many jobs"}))
      end
      return send_full(202, {["Content-Type"] = "application/json", Location = req.route .. "/" .. id},
        cjson.encode({id = id, status = "pending"}))
    end
    local id, rest = sub:match("^/(job%-%x+)(.*)$")
    if id then
      local st = state_actor()
      if req.method == "DELETE" and rest == "" then
        local rec = tide.get(st:cancel(id))
        if not rec then return send_error(404, "no job " .. id) end
        return send_full(200, {["Content-Type"] = "application/json"}, cjson.encode(rec))
      elseif req.method == "GET" and rest == "" then
        local rec = tide.get(st:get(id))
        if not rec then return send_error(404, "no job " .. id) end
        return send_full(200, {["Content-Type"] = "application/json"}, cjson.encode(rec))
      elseif req.method == "GET" and rest == "/events" then
        return send_result(M.stream(function(send)
          local last
          while true do
            local rec = tide.get(st:get(id))
            if not rec then send({error = "no job " .. id}); return end
            local enc = cjson.encode(rec)
            if enc ~= last then send(enc); last = enc end
            if rec.status ~= "pending" and rec.status ~= "running" then return end
            tide.sleep(0.05)
          end
        end, {sse = true}))
      end
    end
  end
  local handler = methods and methods[req.method] or call
  if not handler then
    if methods and not call then return send_error(405, "method " .. req.method .. " not allowed") end
    return send_error(404, "no handler for " .. req.path)
  end
  local ok, res = xpcall(handler, debug.traceback, self, req)
  if not ok then
    if type(res) == "table" and getmetatable(res) == Response then return send_result(res) end
    -- os.exit in a lightweight actor ends the replica: let it through.
    if type(res) == "table" and rawget(res, "__tide_exit") then error(res, 0) end
    if type(res) == "table" then
      local okj, enc = pcall(cjson.encode, res)
      res = okj and enc or tostring(res)
    end
    -- The call fails: the ingress logs the message and traceback under an
    -- error id and answers 500 with the id only (no server paths leak).
    error(tostring(res), 0)
  end
  return send_result(res)
end

function M._run_job(self, id, name, req, jobs)
  local st = state_actor()
  local job = setmetatable({id = id, _state = st}, Job)
  st:progress(id, 0, nil, "running")
  local j = jobs[name]
  return (type(j) == "table" and j.run or j)(self, req, job)
end

-- Cluster-side job state, kept in a named actor (not in any replica): jobs
-- survive the replica that accepted them and are retried on another one
-- if the replica running them dies.
local State = {
  set_replicas = function(self, dep, handles) self.replicas[dep] = handles end,
  set_limits = function(self, max_jobs, ttl) self.max_jobs, self.ttl = max_jobs, ttl end,
  replicas = function(self, dep) return self.replicas[dep] end,
  progress = function(self, id, p, note, status)
    local rec = self.jobs[id]
    if not rec or rec.status == "cancelled" then return end
    rec.progress = p
    if note then rec.note = note end
    if status then rec.status = status end
  end,
  get = function(self, id) return self.jobs[id] end,
  cancel = function(self, id)
    local rec = self.jobs[id]
    if not rec then return nil end
    if rec.status == "pending" or rec.status == "running" then
      rec.status = "cancelled"
      local ref = self.refs[id]
      if ref then require("tide").cancel(ref) end
      self:_finished(id)
    end
    return rec
  end,
  -- Finished records wait in `done`, oldest first, to expire after `ttl`
  -- seconds or to make room when the table holds `max_jobs` records.
  _finished = function(self, id)
    if self.done_at[id] then return end
    self.done_at[id] = os.time()
    self.done[#self.done + 1] = id
    self.reqs[id] = nil
  end,
  _evict = function(self, need_room)
    local now, done = os.time(), self.done
    local i = self.done_head
    while i <= #done do
      local id = done[i]
      local at = self.done_at[id]
      if not (need_room and self.count >= self.max_jobs) and now - at < self.ttl then break end
      self.jobs[id], self.done_at[id], done[i] = nil, nil, false
      self.count = self.count - 1
      i = i + 1
    end
    self.done_head = i
    if i > 1024 and i > #done / 2 then  -- compact the queue now and then
      local rest = {}
      for k = i, #done do rest[#rest + 1] = done[k] end
      self.done, self.done_head = rest, 1
    end
  end,
  list = function(self)
    local out = {}
    for _, r in pairs(self.jobs) do out[#out + 1] = r end
    return out
  end,
}

-- Launching and watching a job: the accepting call returns at once; a
-- second call of this actor (a coroutine) waits for the job.
State.start = function(self, id)
  local tide_ = require("tide")
  local rec = self.jobs[id]
  local tries = 0
  while rec and rec.status ~= "cancelled" do
    local reps = self.replicas[rec.deployment] or {}
    if #reps == 0 then rec.status = "failed"; rec.error = "no replicas"; self:_finished(id); return end
    local h = reps[math.random(1, #reps)]
    local ref = h:__job(id, rec.job, self.reqs[id])
    self.refs[id] = ref
    local ok, res = pcall(tide_.get, ref)
    self.refs[id] = nil
    if rec.status == "cancelled" then return end
    if ok then
      rec.status, rec.result, rec.progress = "succeeded", res, 1
      self:_finished(id)
      return
    end
    tries = tries + 1
    if type(res) == "table" and res.kind == "ActorDiedError" and tries < 3 then
      rec.status = "pending"
    else
      rec.status = "failed"
      -- The record shows the job's own message, without the file:line
      -- prefixes (server paths) or traceback; the log has all of it under
      -- the record's error_id.
      local full = type(res) == "table" and tostring(res.message) or tostring(res)
      local short = full:match("^[^\n]*")
      repeat local before = short; short = short:gsub("^[^:%s]+:%d+: ", "") until short == before
      local f = io.open("/dev/urandom", "rb")
      local b = f and f:read(8) or tostring(os.time())
      if f then f:close() end
      rec.error = short
      rec.error_id = b:gsub(".", function(c) return format("%02x", c:byte()) end)
      io.stderr:write(format("[serve] error %s: job %s (%s of deployment %s) failed: %s\n",
        rec.error_id, id, rec.job, rec.deployment, full))
      if type(res) == "table" and res.kind == "TaskCancelledError" then rec.status = "cancelled" end
      self:_finished(id)
      return
    end
  end
end

State.init = function(self)
  self.jobs, self.refs, self.replicas, self.reqs = {}, {}, {}, {}
  self.done, self.done_at, self.done_head, self.count = {}, {}, 1, 0
  self.max_jobs, self.ttl = 10000, 3600
end
-- -> true, or false and why: at max_jobs records, with none finished to
-- let go, a new job is refused (the client gets 503) instead of growing
-- the table without bound.
State.submit = function(self, id, dep, name, req)
  self:_evict(self.count >= self.max_jobs)
  if self.count >= self.max_jobs then
    return false, format("too many jobs: %d are pending or running (max_jobs); retry later", self.count)
  end
  self.count = self.count + 1
  self.jobs[id] = {id = id, status = "pending", progress = 0, job = name, deployment = dep}
  self.reqs[id] = req
  self.me = self.me or require("tide").get_actor("tide.serve.state", {namespace = "serve"})
  self.me:start(id) -- fire and forget: runs concurrently in this actor
  return true
end

-- -- Deployments --------------------------------------------------------------

local DEPLOY_KEYS = {
  name = "string", route = "string", init = "function", call = "function", methods = "table",
  num_replicas = "number", autoscaling = "table", resources = "table", max_ongoing_requests = "number",
  jobs = "table", num_cpus = "number", num_gpus = "number", max_restarts = "number",
  user_config = "table", extra_methods = "table", job_token = "string",
}

local Deployment = {}
Deployment.__index = Deployment

function M.deployment(spec)
  if type(spec) ~= "table" then error("serve.deployment: expected a table", 2) end
  for k, v in pairs(spec) do
    local want = DEPLOY_KEYS[k]
    if not want then error(format("serve.deployment: unknown key '%s'", tostring(k)), 2) end
    if type(v) ~= want then
      error(format("serve.deployment: '%s' must be a %s, got %s", k, want, type(v)), 2)
    end
  end
  if not spec.name then error("serve.deployment: 'name' is required", 2) end
  if not spec.call and not spec.methods and not spec.jobs then
    error("serve.deployment: give 'call', 'methods' or 'jobs'", 2)
  end
  local route = spec.route or ("/" .. spec.name)
  if route:sub(1, 1) ~= "/" then error("serve.deployment: 'route' must start with /", 2) end
  if spec.num_replicas and spec.autoscaling then
    error("serve.deployment: give 'num_replicas' or 'autoscaling', not both", 2)
  end
  local a = spec.autoscaling
  if a then
    for k in pairs(a) do
      if k ~= "min_replicas" and k ~= "max_replicas" and k ~= "target_ongoing_requests"
         and k ~= "upscale_delay_s" and k ~= "downscale_delay_s" then
        error(format("serve.deployment: unknown autoscaling key '%s'", tostring(k)), 2)
      end
    end
    if (a.min_replicas or 1) > (a.max_replicas or 1) then
      error("serve.deployment: autoscaling min_replicas exceeds max_replicas", 2)
    end
  end
  for jn, j in pairs(spec.jobs or {}) do
    if type(jn) ~= "string" or not jn:match("^[%w_%-]+$") then
      error(format("serve.deployment: job name '%s' must be letters, digits, _ or -", tostring(jn)), 2)
    end
    if type(j) == "table" then
      if type(j.run) ~= "function" then error(format("serve.deployment: jobs.%s.run must be a function", jn), 2) end
      if j.validate ~= nil and type(j.validate) ~= "function" then
        error(format("serve.deployment: jobs.%s.validate must be a function", jn), 2)
      end
    elseif type(j) ~= "function" then
      error(format("serve.deployment: jobs.%s must be a function or {run = fn, validate = fn}", jn), 2)
    end
  end
  if spec.methods then
    for m, f in pairs(spec.methods) do
      if type(f) ~= "function" then error(format("serve.deployment: methods.%s must be a function", m), 2) end
    end
  end
  local d = setmetatable({}, Deployment)
  for k, v in pairs(spec) do d[k] = v end
  d.route = route
  d.extra = spec.extra_methods or {}
  return d
end

-- serve.batch{max_batch_size = n, batch_wait_timeout_s = s}(fn): fn(self, reqs)
-- receives a batch and returns one result per request.
function M.batch(opts)
  opts = opts or {}
  local max = opts.max_batch_size or 8
  local wait = opts.batch_wait_timeout_s or 0.01
  if type(max) ~= "number" or max < 1 then error("serve.batch: max_batch_size must be >= 1", 2) end
  return function(fn)
    local key = tostring(fn)
    return function(self, req)
      local tide_ = require("tide")
      local queues = rawget(self, "__batches") or {}
      self.__batches = queues
      local q = queues[key]
      if not q then q = {}; queues[key] = q end
      local slot = {req = req}
      q[#q + 1] = slot
      local function run(batch)
        local reqs = {}
        for i, s in ipairs(batch) do reqs[i] = s.req end
        local ok, res = pcall(fn, self, reqs)
        -- Too few or too many results: which belongs to which is unknown,
        -- so every request of the batch fails.
        local bad = ok and (type(res) ~= "table" or #res ~= #batch)
        for i, s in ipairs(batch) do
          s.done = true
          if not ok then s.err = res
          elseif bad then s.err = "serve.batch: the handler must return one result per request"
          else s.result = res[i] end
        end
      end
      if #q >= max then
        queues[key] = nil
        run(q)
      elseif #q == 1 then
        -- The first request of a batch waits for company, then runs it.
        local waited = 0
        while not slot.done and waited < wait do tide_.sleep(0.001); waited = waited + 0.001 end
        if not slot.done and queues[key] == q then
          queues[key] = nil
          run(q)
        end
      end
      while not slot.done do tide_.sleep(0.001) end
      if slot.err then error(slot.err, 0) end
      return slot.result
    end
  end
end

-- -- Handles (composition) ------------------------------------------------------

local Handle = {}
Handle.__index = Handle
Handle.__tide_module = "tide.serve"
Handle.__tide_ser = function(h) return core.encode({h.name}) end
function M.__tide_deser(s) return M.get_handle(core.decode(s)[1]) end

function M.get_handle(name)
  return setmetatable({name = name, cache = nil, at = -1}, Handle)
end

local function pick(h)
  local now = os.time()
  if not h.cache or now - h.at >= 1 then
    h.cache = tide.get(state_actor():replicas(h.name)) or {}
    h.at = now
  end
  if #h.cache == 0 then error("serve: deployment " .. h.name .. " has no replicas", 3) end
  return h.cache[math.random(1, #h.cache)]
end

-- handle:remote(...) calls the deployment's `call` on a replica -> ObjectRef.
function Handle:remote(...)
  return pick(self):call(...)
end

-- handle:method("name", ...) calls another method (extra_methods) -> ObjectRef.
function Handle:method(name, ...)
  local r = pick(self)
  return r[name](r, ...)
end

-- handle:broadcast("name", ...) calls a method on every replica the
-- deployment has now (asked afresh, not from the pick cache) -> an array of
-- ObjectRefs, one per replica: for changes every replica must make, such
-- as loading new weights.  Replicas started later do not get the call.
function Handle:broadcast(name, ...)
  local reps = tide.get(state_actor():replicas(self.name)) or {}
  local refs = {}
  for i, r in ipairs(reps) do refs[i] = r[name](r, ...) end
  return refs
end

-- -- Running ------------------------------------------------------------------------

local running = {deps = {}, order = {}}

local function log(fmt, ...)
  io.stderr:write(format("[serve] " .. fmt .. "\n", ...))
end

local function new_replica(d, cls)
  return cls:options({
    max_concurrency = d.max_ongoing_requests or 100,
    num_cpus = d.num_cpus or (d.resources and d.resources.CPU) or 0,
    num_gpus = d.num_gpus, resources = d.resources, max_restarts = d.max_restarts or 0,
  }):remote()
end

-- Tells the ingress the replicas of a deployment.
local function route_to(st, name)
  local ids = {}
  for i, r in ipairs(st.replicas) do ids[i] = r._id end
  core.serve_replicas(name, ids)
end

-- Tells the serve state (which waits for it).
local function tell_state(st, name)
  -- The state actor has a process of its own, so a replica's crash cannot
  -- take it down; should it die anyway, the ingress keeps serving (only
  -- jobs and handles need it), so its failure is logged, never raised.
  local ok, err = pcall(function() return tide.get(running.state:set_replicas(name, st.replicas)) end)
  if not ok then log("cannot publish the replicas of %s to the serve state: %s", name, tostring(err)) end
end

-- Tells the ingress, then the serve state.
local function publish(st, name)
  route_to(st, name)
  tell_state(st, name)
end

-- serve.deploy(app): creates or replaces deployments; returns at once.
-- Redeploying a name starts new replicas, moves traffic to them, and lets
-- the old ones finish what they have before they are stopped. Every route
-- reaches the ingress before the serve state (an actor, which may still
-- be starting) is told: a request that comes as soon as the port answers
-- finds its route, not a 404.
function M.deploy(app)
  if getmetatable(app) == Deployment then app = {app} end
  if type(app) ~= "table" then error("serve.deploy: expected a deployment or an array of them", 2) end
  for _, d in ipairs(app) do
    if getmetatable(d) ~= Deployment then error("serve.deploy: expected deployments from serve.deployment", 2) end
  end
  if not running.started then M.start() end
  for _, d in ipairs(app) do
    local cls = tide.actor(replica_class(d))
    local a = d.autoscaling
    local n = a and (a.min_replicas or 1) or (d.num_replicas or 1)
    local old = running.deps[d.name]
    core.serve_deployment(d.name, d.route, d.max_ongoing_requests or 100)
    local st = {spec = d, cls = cls, replicas = {}, draining = old and old.draining or {},
      up_since = nil, down_since = nil}
    for i = 1, n do st.replicas[i] = new_replica(d, cls) end
    if old then
      for _, r in ipairs(old.replicas) do st.draining[#st.draining + 1] = r end
      log("redeploying %s: %d new replicas, %d draining", d.name, n, #old.replicas)
    else
      running.order[#running.order + 1] = d.name
    end
    running.deps[d.name] = st
    route_to(st, d.name)
  end
  for _, d in ipairs(app) do tell_state(running.deps[d.name], d.name) end
end

-- Starts the HTTP ingress (serve.run does it for you).
function M.start(opts)
  if running.started then return running.port end
  opts = opts or {}
  local cli = debug.getregistry()["tide.cli_opts"] or {}
  local host = opts.host or cli.serve_host or "127.0.0.1"
  local port = opts.port or tonumber(cli.serve_port) or 8000
  -- The access log: on (stderr) under `tide serve run`, off in other
  -- drivers unless asked; "off", "-" (stderr) or a file name.
  local alog = opts.access_log or cli.serve_access_log or (cli.serving and "-" or "off")
  if type(alog) ~= "string" or alog == "" then
    error("serve.start: access_log must be \"off\", \"-\" (stderr) or a file name", 2)
  end
  local St = tide.actor(State)
  -- own_process: the state never shares a process with user handlers, so
  -- a replica that crashes its process (a segfault in C code) leaves it be.
  running.state = St:options({name = STATE_ACTOR, namespace = "serve", max_concurrency = 10000,
    get_if_exists = true, own_process = true}):remote()
  local max_jobs, ttl = opts.max_jobs or 10000, opts.job_ttl_s or 3600
  if type(max_jobs) ~= "number" or max_jobs < 1 then error("serve.start: max_jobs must be a number >= 1", 2) end
  if type(ttl) ~= "number" or ttl < 0 then error("serve.start: job_ttl_s must be a number >= 0", 2) end
  -- Attached to a node (--address), the ingress runs in that node's
  -- daemon (core.serve_* are its control ops), whose dashboard and
  -- /metrics then show the deployments; it stops when this process goes.
  -- No nils before alog: an RPC's argument list would end at the first.
  -- The state first (its process may take a while to start), so the port
  -- opens only when the deployments can follow at once.
  tide.get(running.state:set_limits(max_jobs, ttl))
  running.port = core.serve_start(host, port, opts.max_body_bytes or 0, opts.request_timeout_ms or 0, alog)
  running.host = host
  running.started = true
  if core.is_client then
    log("listening on http://%s:%d (in the node this driver is attached to)", host, running.port)
  else
    log("listening on http://%s:%d", host, running.port)
  end
  return running.port
end

-- Serves for `seconds`: an embedded node is pumped here; an attached
-- driver's ingress runs in its node, so the driver only waits.
local function wait(seconds)
  if core.pump then core.pump(seconds) else tide.sleep(seconds) end
end

local tick_once
-- The controller must outlive any one failure (a replica's creation that
-- raises, a state call that fails): it logs and goes on.
local function tick(now)
  local ok, err = xpcall(tick_once, debug.traceback, now)
  if not ok then log("controller: %s", tostring(err)) end
end

tick_once = function(now)
  local stats = core.serve_stats()
  for name, st in pairs(running.deps) do
    local s = stats[name]
    if s then
      local ongoing, live = 0, {}
      for _, r in ipairs(s.replicas) do
        if not r.draining then ongoing = ongoing + r.ongoing end
        live[r.id] = r
      end
      -- Replace replicas that died.
      local changed = false
      for i, h in ipairs(st.replicas) do
        local state = core.actor_state(h._id)
        if state == "DEAD" then
          log("replica %s of %s died; starting a replacement", tostring(h._id), name)
          st.replicas[i] = new_replica(st.spec, st.cls)
          core.serve_remove(name, h._id)
          changed = true
        end
      end
      -- Autoscaling on ongoing requests per replica, with delays against flapping.
      local a = st.spec.autoscaling
      if a then
        local target = a.target_ongoing_requests or 2
        local n = #st.replicas
        local want = math.max(a.min_replicas or 1, math.min(a.max_replicas or 1, ceil(ongoing / target)))
        if want > n then
          st.down_since = nil
          st.up_since = st.up_since or now
          if now - st.up_since >= (a.upscale_delay_s or 0.5) then
            log("scaling %s up from %d to %d replicas (%d ongoing, target %g per replica)",
              name, n, want, ongoing, target)
            for i = n + 1, want do st.replicas[i] = new_replica(st.spec, st.cls) end
            st.up_since = nil
            changed = true
          end
        elseif want < n then
          st.up_since = nil
          st.down_since = st.down_since or now
          if now - st.down_since >= (a.downscale_delay_s or 2) then
            log("scaling %s down from %d to %d replicas (%d ongoing, target %g per replica)",
              name, n, want, ongoing, target)
            for i = n, want + 1, -1 do
              st.draining[#st.draining + 1] = st.replicas[i]
              st.replicas[i] = nil
            end
            st.down_since = nil
            changed = true
          end
        else
          st.up_since, st.down_since = nil, nil
        end
      end
      if changed then publish(st, name) end
      -- Stop drained replicas once their requests are done.
      for i = #st.draining, 1, -1 do
        local h = st.draining[i]
        local r = live[h._id]
        if not r or r.ongoing == 0 then
          core.serve_remove(name, h._id)
          tide.kill(h)
          table.remove(st.draining, i)
        end
      end
    end
  end
end

-- serve.run(app [, {host, port, blocking = true}]): deploys and serves.
-- Under `tide serve run` it blocks until the process is stopped.
function M.run(app, opts)
  opts = opts or {}
  if not running.started then M.start(opts) end
  M.deploy(app)
  if opts.blocking == false then return running.port end
  local rb = require("tide.rawbench")
  local last = 0
  while true do
    wait(0.05)
    local now = rb.now()
    if now - last >= 0.25 then
      last = now
      tick(now)
    end
  end
end

-- serve.poll(seconds): serves for a while (for drivers that also do other work).
function M.poll(seconds)
  local rb = require("tide.rawbench")
  local t_end = rb.now() + (seconds or 0)
  local last = 0
  repeat
    wait(0.02)
    local mono = rb.now()
    if mono - last >= 0.25 then last = mono; tick(mono) end
  until mono >= t_end
end

function M.status()
  return core.serve_stats()
end

function M.shutdown()
  if not running.started then return end
  for _, st in pairs(running.deps) do
    for _, h in ipairs(st.replicas) do tide.kill(h) end
    for _, h in ipairs(st.draining) do tide.kill(h) end
  end
  core.serve_stop()
  running = {deps = {}, order = {}}
end

return M

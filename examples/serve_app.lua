-- The tide.serve contract app: JSON in and out, a stream of chunks, and
-- async jobs.  Run it and talk to it with curl:
--
--   bin/tide serve run examples/serve_app.lua            # 127.0.0.1:8000
--   curl -s -d '{"x": 1}' http://127.0.0.1:8000/echo     # {"got":{"x":1},"path":"/echo","method":"POST"}
--   curl -sN http://127.0.0.1:8000/count                 # 1 2 3 4 5, one chunk each
--   curl -s -d '{"x": 21}' http://127.0.0.1:8000/jobs/work   # 202 {"id":"job-...","status":"pending"}
--   curl -s http://127.0.0.1:8000/jobs/job-...  # {"status":"succeeded","progress":1,"result":{"answer":42},...}
--   curl -s -X DELETE http://127.0.0.1:8000/jobs/job-... # cancels a job still pending or running
--   bin/tide serve status                                # deployments, replicas, counters
local serve = require("tide.serve")

local Echo = serve.deployment{
  name = "echo", route = "/echo", num_replicas = 2,
  init = function(self) self.hits = 0 end,
  call = function(self, req)            -- a table becomes a JSON 200; a string text/plain 200
    self.hits = self.hits + 1
    return {got = req.json, path = req.path, method = req.method}
  end,
}

local Count = serve.deployment{
  name = "count", route = "/count",
  call = function(self, req)            -- streaming: chunks are flushed as they are sent
    return serve.stream(function(send) for i = 1, 5 do send(tostring(i) .. "\n") end end)
  end,
}

local Jobs = serve.deployment{
  name = "jobs", route = "/jobs",
  jobs = {                              -- POST /jobs/work -> 202 {"id": ...}
    work = function(self, req, job)     -- GET /jobs/<id> -> {"status", "progress", "result"}
      job:progress(0.5); return {answer = req.json.x * 2}
    end,                                -- DELETE /jobs/<id> cancels
  },
}

serve.run({Echo, Count, Jobs})          -- blocks, serving, when run by `tide serve run`

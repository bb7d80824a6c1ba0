-- tide.http: a small HTTP/1.1 client over TCP, written with LuaJIT's ffi
-- (socket/connect/send/recv/poll/close from libc), so scripts, examples
-- and the serving tests need nothing installed (tests/lua/httpc.lua is this
-- module under its old name).  Works in the driver and inside tasks, but it
-- blocks: a driver that serves (tide.serve) must call it from a task.
--
--   local httpc = require("tide.http")
--   local r = httpc.request(port, "POST", "/echo", {json = {x = 1}})
--   r.status, r.headers["content-type"], r.body, r.json, r.chunks
--
--   local c = httpc.connect(port)           -- keep-alive: several requests
--   c:request("GET", "/a"); c:request("GET", "/b"); c:close()
--   c:send_raw("GET /a HTTP/1.1\r\n...")    -- raw bytes (pipelining, garbage)
--   local r = c:read_response()             -- one response off the wire
--   local h = c:read_head(); local data, t = c:read_chunk()  -- step by step
--
-- Responses: {status, reason, version, headers (lowercased names; repeated
-- headers joined with ", "), body, json (when the body decodes as JSON),
-- chunked, chunks = {{data = s, t = seconds}, ...} (chunked responses:
-- each chunk as it arrived and the monotonic time it arrived), closed (the
-- server closed the connection after it)}.
-- Errors raise strings starting with "httpc: " ("httpc: timeout ...",
-- "httpc: connection closed ...", "httpc: connect ...").
--
-- Run as a script it is a tiny curl for shell tests:
--   bin/tide run tests/lua/httpc.lua METHOD PORT PATH [BODY]
-- prints "STATUS\n" then the body; exit status 0 when it got a response.
local ffi = require("ffi")
local bit = require("bit")

local function cdef(s) pcall(ffi.cdef, s) end
cdef[[
typedef struct httpc_sockaddr_in {
  uint16_t sin_family; uint16_t sin_port; uint32_t sin_addr; uint8_t sin_zero[8];
} httpc_sockaddr_in;
typedef struct httpc_pollfd { int fd; short events; short revents; } httpc_pollfd;
typedef struct httpc_timespec { long tv_sec; long tv_nsec; } httpc_timespec;
]]
cdef "int socket(int domain, int type, int protocol);"
cdef "int connect(int fd, const void *addr, uint32_t len);"
cdef "long send(int fd, const void *buf, size_t n, int flags);"
cdef "long recv(int fd, void *buf, size_t n, int flags);"
cdef "int poll(void *fds, unsigned long nfds, int timeout);"
cdef "int close(int fd);"
cdef "int fcntl(int fd, int cmd, ...);"
cdef "int setsockopt(int fd, int level, int name, const void *val, uint32_t len);"
cdef "int shutdown(int fd, int how);"
cdef "int clock_gettime(int clk, void *ts);"
cdef "char *strerror(int errnum);"

local C = ffi.C
local AF_INET, SOCK_STREAM = 2, 1
local POLLIN, POLLOUT = 0x1, 0x4
local MSG_NOSIGNAL = 0x4000
local F_GETFL, F_SETFL, O_NONBLOCK = 3, 4, 0x800
local EINTR, EAGAIN, EINPROGRESS = 4, 11, 115
local IPPROTO_TCP, TCP_NODELAY = 6, 1
local SOL_SOCKET, SO_LINGER = 1, 13

local M = {}
M.default_timeout = 10

local ts = ffi.new("httpc_timespec")
-- Other modules declare clock_gettime with their own struct type (the
-- first declaration wins): a void * converts to whichever it is.
local ts_ptr = ffi.cast("void *", ts)
function M.now()
  C.clock_gettime(1, ts_ptr) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local now = M.now

local function errstr()
  local e = ffi.errno()
  return ffi.string(C.strerror(e)), e
end

local json_ok, cjson = pcall(require, "cjson")

local function ip4(host)
  if host == "localhost" then host = "127.0.0.1" end
  local a, b, c, d = host:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then error("httpc: only dotted IPv4 hosts are supported, got " .. tostring(host), 3) end
  -- sin_addr in network byte order: the bytes a.b.c.d in memory.
  local bytes = ffi.new("uint8_t[4]", tonumber(a), tonumber(b), tonumber(c), tonumber(d))
  return ffi.cast("uint32_t *", bytes)[0]
end

local Conn = {}
Conn.__index = Conn

local pfd = ffi.new("httpc_pollfd[1]")
local function wait_fd(fd, events, deadline)
  while true do
    local ms = math.floor((deadline - now()) * 1000)
    if ms < 0 then return false end
    pfd[0].fd, pfd[0].events, pfd[0].revents = fd, events, 0
    local n = C.poll(pfd, 1, ms)
    if n > 0 then return true end
    if n == 0 then return false end
    if ffi.errno() ~= EINTR then error("httpc: poll: " .. errstr(), 0) end
  end
end

-- httpc.connect(port | host, port [, {timeout = s}]) -> conn
function M.connect(host, port, opts)
  if type(host) == "number" then host, port, opts = "127.0.0.1", host, port end
  opts = opts or {}
  local timeout = opts.timeout or M.default_timeout
  local fd = C.socket(AF_INET, SOCK_STREAM, 0)
  if fd < 0 then error("httpc: socket: " .. errstr(), 2) end
  local fl = C.fcntl(fd, F_GETFL, ffi.new("int", 0))
  C.fcntl(fd, F_SETFL, ffi.new("int", bit.bor(fl, O_NONBLOCK)))
  local one = ffi.new("int[1]", 1)
  C.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, one, 4)
  local sa = ffi.new("httpc_sockaddr_in")
  sa.sin_family = AF_INET
  sa.sin_port = bit.rshift(bit.bswap(port), 16) -- htons
  sa.sin_addr = ip4(host)
  local rc = C.connect(fd, sa, ffi.sizeof(sa))
  if rc ~= 0 then
    local msg, e = errstr()
    if e ~= EINPROGRESS then
      C.close(fd)
      error(string.format("httpc: connect %s:%d: %s", host, port, msg), 2)
    end
    if not wait_fd(fd, POLLOUT, now() + timeout) then
      C.close(fd)
      error(string.format("httpc: connect %s:%d: timeout", host, port), 2)
    end
    -- A refused connection shows up on the first recv/send; probe it.
    rc = C.connect(fd, sa, ffi.sizeof(sa))
    msg, e = errstr()
    if rc ~= 0 and e ~= 106 then -- EISCONN
      C.close(fd)
      error(string.format("httpc: connect %s:%d: %s", host, port, msg), 2)
    end
  end
  return setmetatable({fd = fd, host = host, port = port, buf = "", eof = false,
    timeout = timeout, last_t = now()}, Conn)
end

-- conn:send_raw(bytes): writes all of it (raises on error).
function Conn:send_raw(s)
  local p = ffi.cast("const char *", s)
  local off, n = 0, #s
  local deadline = now() + self.timeout
  while off < n do
    local w = C.send(self.fd, p + off, n - off, MSG_NOSIGNAL)
    if w > 0 then off = off + tonumber(w)
    else
      local msg, e = errstr()
      if e == EAGAIN then
        if not wait_fd(self.fd, POLLOUT, deadline) then error("httpc: timeout sending", 2) end
      elseif e ~= EINTR then
        error("httpc: send: " .. msg, 2)
      end
    end
  end
end

local rbuf = ffi.new("char[65536]")
-- Reads what is available (waiting until the deadline); false at EOF.
function Conn:fill(deadline)
  if self.eof then return false end
  while true do
    local r = C.recv(self.fd, rbuf, 65536, 0)
    if r > 0 then
      self.buf = self.buf .. ffi.string(rbuf, r)
      self.last_t = now()
      return true
    elseif r == 0 then
      self.eof = true
      return false
    else
      local msg, e = errstr()
      if e == EAGAIN then
        if not wait_fd(self.fd, POLLIN, deadline) then
          error("httpc: timeout waiting for the server", 0)
        end
      elseif e == 104 then -- ECONNRESET
        self.eof, self.reset = true, true
        return false
      elseif e ~= EINTR then
        error("httpc: recv: " .. msg, 0)
      end
    end
  end
end

local function deadline_of(self, opts)
  return now() + ((opts and opts.timeout) or self.timeout)
end

-- Returns the next line (without CRLF) or raises at EOF.
function Conn:read_line(deadline)
  while true do
    local i = self.buf:find("\r\n", 1, true)
    if i then
      local line = self.buf:sub(1, i - 1)
      self.buf = self.buf:sub(i + 2)
      return line
    end
    if not self:fill(deadline) then
      error("httpc: connection closed before a full line (" .. #self.buf .. " bytes buffered)", 0)
    end
  end
end

function Conn:read_n(n, deadline)
  while #self.buf < n do
    if not self:fill(deadline) then
      error(string.format("httpc: connection closed with %d of %d body bytes", #self.buf, n), 0)
    end
  end
  local s = self.buf:sub(1, n)
  self.buf = self.buf:sub(n + 1)
  return s
end

-- conn:read_head([opts]) -> response table without the body; afterwards
-- read the body with conn:read_chunk() (chunked) or conn:read_body().
function Conn:read_head(opts)
  local deadline = deadline_of(self, opts)
  local line = self:read_line(deadline)
  local ver, status, reason = line:match("^HTTP/(%d%.%d) (%d%d%d) ?(.*)$")
  if not ver then error("httpc: bad status line " .. string.format("%q", line), 0) end
  local r = {version = ver, status = tonumber(status), reason = reason, headers = {},
    header_list = {}, t_head = self.last_t}
  while true do
    local h = self:read_line(deadline)
    if h == "" then break end
    local k, v = h:match("^([^:]+):%s*(.-)%s*$")
    if not k then error("httpc: bad header line " .. string.format("%q", h), 0) end
    k = k:lower()
    r.header_list[#r.header_list + 1] = {k, v}
    r.headers[k] = r.headers[k] and (r.headers[k] .. ", " .. v) or v
  end
  local te = (r.headers["transfer-encoding"] or ""):lower()
  r.chunked = te:find("chunked", 1, true) ~= nil
  r.length = tonumber(r.headers["content-length"])
  local conn_h = (r.headers["connection"] or ""):lower()
  r.keep_alive = not conn_h:find("close", 1, true) and (ver == "1.1" or conn_h:find("keep-alive", 1, true) ~= nil)
  self.cur = r
  if (opts and opts.method == "HEAD") or r.status == 204 or r.status == 304 or
     (r.status >= 100 and r.status < 200) then
    r.length, r.chunked, r.no_body = 0, false, true
  end
  return r
end

-- conn:read_chunk([opts]) -> data, t (arrival time), or nil at the end of a
-- chunked body.
function Conn:read_chunk(opts)
  local r = self.cur
  if not r or not r.chunked then error("httpc: read_chunk needs a chunked response", 2) end
  if r.done then return nil end
  local deadline = deadline_of(self, opts)
  local line = self:read_line(deadline)
  local n = tonumber(line:match("^(%x+)"), 16)
  if not n then error("httpc: bad chunk size line " .. string.format("%q", line), 0) end
  if n == 0 then
    -- Trailers, then the blank line.
    while self:read_line(deadline) ~= "" do end
    r.done = true
    return nil
  end
  local data = self:read_n(n, deadline)
  local t = self.last_t
  if self:read_n(2, deadline) ~= "\r\n" then error("httpc: chunk not followed by CRLF", 0) end
  return data, t
end

-- conn:read_body([opts]) -> the whole body of the current response (chunks
-- collected into r.chunks).
function Conn:read_body(opts)
  local r = self.cur
  local deadline = deadline_of(self, opts)
  if r.chunked then
    r.chunks = r.chunks or {}
    local parts = {}
    for _, c in ipairs(r.chunks) do parts[#parts + 1] = c.data end
    while true do
      local data, t = self:read_chunk(opts)
      if not data then break end
      r.chunks[#r.chunks + 1] = {data = data, t = t}
      parts[#parts + 1] = data
    end
    r.body = table.concat(parts)
  elseif r.length then
    r.body = self:read_n(r.length, deadline)
  else
    -- No length: the body runs to the end of the connection.
    while self:fill(deadline) do end
    r.body = self.buf
    self.buf = ""
  end
  r.t_end = self.last_t
  if json_ok and r.body ~= "" then
    local ok, v = pcall(cjson.decode, r.body)
    if ok then r.json = v end
  end
  if not r.keep_alive then
    r.closed = true
  end
  self.cur = nil
  return r.body
end

-- conn:read_response([opts]) -> response (head and body).
function Conn:read_response(opts)
  local r = self:read_head(opts)
  self:read_body(opts)
  return r
end

-- Builds the bytes of a request.
-- opts: headers = {name = value} or {{name, value}, ...}, body = string,
-- json = table (sets Content-Type), http10 = true, close = true (Connection: close),
-- host = "..." (default "127.0.0.1").
function M.format_request(method, path, opts)
  opts = opts or {}
  local body = opts.body
  local lines = {string.format("%s %s HTTP/%s", method, path, opts.http10 and "1.0" or "1.1")}
  local have = {}
  local function add(k, v)
    lines[#lines + 1] = k .. ": " .. tostring(v)
    have[k:lower()] = true
  end
  local hs = opts.headers or {}
  if hs[1] then for _, kv in ipairs(hs) do add(kv[1], kv[2]) end
  else for k, v in pairs(hs) do add(k, v) end end
  if opts.json ~= nil then
    body = cjson.encode(opts.json)
    if not have["content-type"] then add("Content-Type", "application/json") end
  end
  if not have["host"] then add("Host", opts.host or "127.0.0.1") end
  if opts.close and not have["connection"] then add("Connection", "close") end
  if body and not have["content-length"] and not have["transfer-encoding"] then
    add("Content-Length", #body)
  elseif not body and (method == "POST" or method == "PUT") and not have["content-length"] then
    add("Content-Length", 0)
  end
  return table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")
end

-- conn:request(method, path [, opts]) -> response; the connection stays
-- open for the next request when the server keeps it alive.
function Conn:request(method, path, opts)
  opts = opts or {}
  local t0 = now()
  self:send_raw(M.format_request(method, path, opts))
  local r = self:read_head({timeout = opts.timeout, method = method})
  if opts.head_only then return r end
  self:read_body({timeout = opts.timeout})
  r.t_start = t0
  return r
end

function Conn:get(path, opts) return self:request("GET", path, opts) end
function Conn:post(path, opts) return self:request("POST", path, opts) end
function Conn:delete(path, opts) return self:request("DELETE", path, opts) end

-- True when the server has closed its side (reads EOF without waiting long).
function Conn:is_closed(wait)
  if self.eof then return true end
  local ok, more = pcall(self.fill, self, now() + (wait or 0.2))
  if not ok then return false end -- timeout: still open
  return not more
end

-- conn:close([{reset = true}]): closes the socket (reset: RST instead of FIN).
function Conn:close(opts)
  if self.fd and self.fd >= 0 then
    if opts and opts.reset then
      local lg = ffi.new("int[2]", 1, 0)
      C.setsockopt(self.fd, SOL_SOCKET, SO_LINGER, lg, 8)
    end
    C.close(self.fd)
    self.fd = -1
  end
end

-- httpc.request(port | {host, port}, method, path [, opts]) -> response, on
-- a connection of its own (closed afterwards).
function M.request(where, method, path, opts)
  local host, port = "127.0.0.1", where
  if type(where) == "table" then host, port = where.host or where[1], where.port or where[2] end
  local c = M.connect(host, port, opts)
  local ok, r = pcall(c.request, c, method, path, opts)
  c:close()
  if not ok then error(r, 0) end
  return r
end

function M.get(port, path, opts) return M.request(port, "GET", path, opts) end
function M.post(port, path, opts) return M.request(port, "POST", path, opts) end
function M.delete(port, path, opts) return M.request(port, "DELETE", path, opts) end

-- Polls GET path until fn(response) is true or the timeout passes;
-- returns the last response.  sleep(seconds) defaults to a busy-free poll().
function M.wait_for(port, path, fn, timeout, sleep)
  local deadline = now() + (timeout or 10)
  local last
  repeat
    local ok, r = pcall(M.get, port, path, {timeout = 2})
    if ok then
      last = r
      if fn(r) then return r end
    end
    if sleep then sleep(0.05) else C.poll(nil, 0, 50) end
  until now() > deadline
  return last
end

-- M.main(args): the tiny curl of tests/lua/httpc.lua's script mode,
--   bin/tide run tests/lua/httpc.lua METHOD PORT PATH [BODY]
-- prints "STATUS\n" then the body; exits 0 when it got a response.
function M.main(args)
  local method, port, path, body = args[1], tonumber(args[2]), args[3], args[4]
  if not (method and port and path) then
    io.stderr:write("usage: tide run tests/lua/httpc.lua METHOD PORT PATH [BODY]\n")
    os.exit(2)
  end
  local headers = {}
  if body and body:match("^%s*[%[{]") then headers["Content-Type"] = "application/json" end
  local ok, r = pcall(M.request, port, method, path, {body = body, headers = headers,
    timeout = tonumber(os.getenv("HTTPC_TIMEOUT") or "") or 10})
  if not ok then
    io.stderr:write(tostring(r) .. "\n")
    os.exit(1)
  end
  io.write(r.status, "\n", r.body)
  if r.body:sub(-1) ~= "\n" then io.write("\n") end
  io.flush()
  os.exit(0)
end

return M

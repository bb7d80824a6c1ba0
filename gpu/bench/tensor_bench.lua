-- Tensor-layer benchmarks, one JSON line per metric:
--   matmul_<M>x<K>x<N>      T.matmul through the Lua binding against plain
--                           OpenBLAS cblas_sgemm (LuaJIT FFI, same shapes,
--                           same process, same run) on the CPU; against
--                           the device's nominal peak on CUDA (f32, bf16)
--   gpt_train_tokens_per_s  tiny GPT training step with its breakdown
--                           (forward / backward / optimizer / data, and per
--                           op), plus model FLOPs utilization on CUDA
--
--   tide run gpu/bench/tensor_bench.lua [cpu|cuda:0] [quick]
-- Env: TIDE_PEAK_TFLOPS_F32 / TIDE_PEAK_TFLOPS_BF16 override the peak table.
local T = require("tide.tensor")
local GPT = require("tide.nn.gpt")
local D = require("tide.nn.corpus")
local cjson = require("cjson")
local ffi = require("ffi")

local device = arg and arg[1] or "cpu"
local quick = arg and arg[2] == "quick"
local on_gpu = device ~= "cpu"

ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } td_bench_ts;
int clock_gettime(int clk, td_bench_ts *ts);
void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta,
                 float *C, int ldc);
int openblas_get_num_threads(void);
]])
local ts = ffi.new("td_bench_ts")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local function sync() if on_gpu then T.synchronize() end end

local function emit(t)
  t.system = "tide"
  t.device = on_gpu and T.device_name(0) or "cpu"
  io.write(cjson.encode(t), "\n")
  io.flush()
end

-- Median seconds of fn() over trials, each trial timing `reps` calls.
local function time_it(fn, reps, trials)
  fn() -- warm up
  sync()
  local s = {}
  for i = 1, trials do
    local t0 = now()
    for _ = 1, reps do fn() end
    sync()
    s[i] = (now() - t0) / reps
  end
  table.sort(s)
  return s[math.floor((trials + 1) / 2)]
end

-- Nominal dense peaks (TFLOP/s) by device name; MFU is reported against them.
local PEAKS = {
  {"H200", 67, 989}, {"H100", 67, 989}, {"A100", 19.5, 312}, {"L40S", 91.6, 362},
  {"A10", 31.2, 125}, {"L4", 30.3, 121},
}
local function peak_tflops(dtype)
  local env = os.getenv(dtype == "bf16" and "TIDE_PEAK_TFLOPS_BF16" or "TIDE_PEAK_TFLOPS_F32")
  if env then return tonumber(env) end
  local name = on_gpu and T.device_name(0) or ""
  for _, p in ipairs(PEAKS) do
    if name:find(p[1], 1, true) then return dtype == "bf16" and p[3] or p[2] end
  end
  return nil
end

-- -- matmul --------------------------------------------------------------------

local shapes = on_gpu and {{1024, 1024, 1024}, {4096, 4096, 4096}, {8192, 8192, 8192},
                           {16384, 768, 3072}}
                       or {{1024, 128, 384}, {1024, 512, 128}, {1024, 128, 256},
                           {256, 256, 256}, {512, 512, 512}, {1024, 1024, 1024}}
if quick then shapes = {shapes[1], shapes[2]} end

for _, sh in ipairs(shapes) do
  local M, K, N = sh[1], sh[2], sh[3]
  local flops = 2 * M * N * K
  local reps = math.max(1, math.floor((on_gpu and 2e12 or 2e9) / flops))
  local trials = quick and 3 or 7
  if not on_gpu then
    local a = T.randn({M, K}, {seed = 1})
    local b = T.randn({K, N}, {seed = 2})
    local c = T.empty({M, N})
    local opts = {out = c}
    local t_tide = time_it(function() T.matmul(a, b, opts) end, reps, trials)
    -- plain OpenBLAS on the same shapes, buffers from the FFI
    local fa = ffi.new("float[?]", M * K)
    local fb = ffi.new("float[?]", K * N)
    local fc = ffi.new("float[?]", M * N)
    local ab, bb = a:to_bytes(), b:to_bytes()
    ffi.copy(fa, ab, #ab)
    ffi.copy(fb, bb, #bb)
    local t_blas = time_it(function()
      ffi.C.cblas_sgemm(101, 111, 111, M, N, K, 1, fa, K, fb, N, 0, fc, N)
    end, reps, trials)
    -- same numbers from both
    local d = T.sub(c, T.from_bytes(ffi.string(fc, M * N * 4), {M, N}))
    assert(T.dot(d, d) < 1e-6 * M * N, "tide and OpenBLAS disagree")
    emit({metric = string.format("matmul_%dx%dx%d", M, K, N), value = flops / t_tide / 1e9,
          unit = "GFLOP/s", limit = flops / t_blas / 1e9, limit_name = "openblas_sgemm",
          fraction_of_limit = t_blas / t_tide, time_us = t_tide * 1e6,
          openblas_threads = ffi.C.openblas_get_num_threads()})
  else
    for _, dt in ipairs({"f32", "bf16"}) do
      local a = T.randn({M, K}, {seed = 1}):to(device, dt)
      local b = T.randn({K, N}, {seed = 2}):to(device, dt)
      local c = T.empty({M, N}, {device = device})
      local opts = {out = c}
      local t = time_it(function() T.matmul(a, b, opts) end, reps, trials)
      local peak = peak_tflops(dt)
      emit({metric = string.format("matmul_%s_%dx%dx%d", dt, M, K, N), value = flops / t / 1e12,
            unit = "TFLOP/s", limit = peak, limit_name = "nominal dense peak",
            fraction_of_limit = peak and flops / t / 1e12 / peak or nil, time_us = t * 1e6})
    end
  end
end

-- -- GPT training step ------------------------------------------------------------

local cfg, B, CTX
if on_gpu then
  cfg = {vocab_size = 256, n_layer = 12, n_head = 12, n_embd = 768, block_size = 1024}
  B, CTX = 8, 1024
  if quick then cfg.n_layer, B, CTX, cfg.block_size = 4, 4, 256, 256 end
else
  cfg = {vocab_size = 256, n_layer = 4, n_head = 4, n_embd = 128, block_size = 64}
  B, CTX = 16, 64
end
local model = GPT.new(cfg, {seed = 1, device = device})
local text = assert(D.bible_kjv({max_bytes = 2000000}))
local batches = D.batcher(text, B, CTX, 1)

-- per-op time: wrap the tensor functions (synchronizing on CUDA so that the
-- time lands on the op that spent it)
local op_time, wrapped = {}, {}
local function wrap_ops()
  for k, f in pairs(T) do
    if type(f) == "function" and not k:find("^_") and k ~= "synchronize" then
      wrapped[k] = f
      T[k] = function(...)
        local t0 = now()
        local a, b, c = f(...)
        sync()
        op_time[k] = (op_time[k] or 0) + now() - t0
        return a, b, c
      end
    end
  end
end
local function unwrap_ops() for k, f in pairs(wrapped) do T[k] = f end end

local steps = quick and 5 or (on_gpu and 20 or 30)
local tf, tb, to, td = 0, 0, 0, 0
local last_loss
for step = 0, steps do
  local t0 = now()
  local x, y = batches(step)
  if on_gpu then x, y = x:to(device), y:to(device) end
  sync()
  local t1 = now()
  local _, loss = model:forward(x, y)
  sync()
  local t2 = now()
  model:zero_grad()
  model:backward()
  sync()
  local t3 = now()
  model:step({lr = 1e-3})
  sync()
  local t4 = now()
  if step > 0 then -- step 0 warms up (allocations, cuBLAS heuristics)
    td, tf, tb, to = td + t1 - t0, tf + t2 - t1, tb + t3 - t2, to + t4 - t3
  end
  last_loss = loss
end
local per = (td + tf + tb + to) / steps
local tokens = B * CTX
-- per-op breakdown from a few extra steps with every op timed
wrap_ops()
local extra = quick and 2 or 5
for step = 1, extra do
  local x, y = batches(1000 + step)
  model:forward(x, y)
  model:zero_grad()
  model:backward()
  model:step({lr = 1e-3})
end
unwrap_ops()
local ops = {}
for k, v in pairs(op_time) do ops[k] = v / extra * 1e3 end
-- model FLOPs per token: 6 * params (matmuls, fwd + bwd) + attention
local N = model:num_params()
local attn = 12 * cfg.n_layer * CTX * cfg.n_embd -- 6 * 2 * L * T * C (fwd+bwd QK^T and AV)
local flops_per_token = 6 * N + attn
local achieved = flops_per_token * tokens / per
local peak = on_gpu and peak_tflops("f32") or nil
emit({metric = "gpt_train_tokens_per_s", value = tokens / per, unit = "tokens/s",
      config = cfg, batch = B, context = CTX, params = N, steps = steps, loss = last_loss,
      step_ms = per * 1e3,
      breakdown_ms = {data = td / steps * 1e3, forward = tf / steps * 1e3,
                      backward = tb / steps * 1e3, optimizer = to / steps * 1e3},
      ops_ms = ops, model_tflops = achieved / 1e12,
      mfu = peak and achieved / (peak * 1e12) or nil, mfu_peak_tflops = peak,
      mfu_dtype = peak and "f32" or nil})

/* Tide GPU layer error codes: one table of messages for tensors, ops,
 * devices and collectives.  Uses only libc.
 *
 * Every function in gpu/ that can fail returns 0 or a negative TD_GPU_E*
 * code.  CUDA, cuBLAS and NCCL codes are mapped at the plugin boundary; the
 * plugin leaves the library's own message in a per-thread detail string that
 * td_gpu_last_detail() returns.
 */
#ifndef TD_GPU_ERR_H
#define TD_GPU_ERR_H

#define TD_GPU_ERRDEF(_)                                   \
  _(NOMEM, "out of memory")                                \
  _(INVAL, "invalid argument")                             \
  _(SHAPE, "shape mismatch")                               \
  _(DTYPE, "unsupported dtype for this operation")         \
  _(DEVICE, "tensors are on different devices")            \
  _(NODEV, "no GPU: CUDA device not available")            \
  _(PLUGIN, "CUDA plugin could not be loaded")             \
  _(CUDA, "CUDA error")                                    \
  _(CUBLAS, "cuBLAS error")                                \
  _(NCCL, "NCCL error")                                    \
  _(RANGE, "index out of range")                           \
  _(FORMAT, "malformed serialized tensor")                 \
  _(IO, "transport error")                                 \
  _(UNSUPPORTED, "operation not supported on this device") \
  _(PEER, "a peer rank's process exited")

/* clang-format off */
/* Each code's place in the table (0, 1, ...), for the codes below. */
enum {
#define TD_GPU__EIDX(name, msg) TD_GPU__I##name,
  TD_GPU_ERRDEF(TD_GPU__EIDX)
#undef TD_GPU__EIDX
  TD_GPU__ECOUNT /* how many TD_GPU_E* codes there are */
};

/* Negative like td.h's TD_E* codes (which are -1001 down), in a range of
 * their own: TD_GPU_ENOMEM is -2001.  Returned as they are. */
enum {
  TD_GPU_OK = 0,
  TD_GPU__EFIRST = -2000, /* TD_GPU_E* codes are below it */
#define TD_GPU__ENUM(name, msg) TD_GPU_E##name = TD_GPU__EFIRST - 1 - TD_GPU__I##name,
  TD_GPU_ERRDEF(TD_GPU__ENUM)
#undef TD_GPU__ENUM
  TD_GPU__ELAST = TD_GPU__EFIRST - TD_GPU__ECOUNT /* the lowest TD_GPU_E* code */
};
/* clang-format on */

/* Returns the static message for 0 or a TD_GPU_E* code, "unknown error"
 * for anything else (td_strerror names td.h's codes).  Never NULL. */
const char *td_gpu_strerror(int err);

/* Sets the per-thread detail text of the last failure (library messages
 * such as cudaGetErrorString).  fmt is printf-style. */
void td_gpu_set_detail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Returns the per-thread detail text, "" when none; owned by the thread. */
const char *td_gpu_last_detail(void);

/* Clears the per-thread detail text. */
void td_gpu_clear_detail(void);

#endif

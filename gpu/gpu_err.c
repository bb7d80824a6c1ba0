/* Tide GPU layer error messages (see gpu_err.h). */
#include "gpu_err.h"

#include <stdarg.h>
#include <stdio.h>

static const char *const td__gpu_msgs[] = {
#define TD_GPU__MSG(name, msg) msg,
    TD_GPU_ERRDEF(TD_GPU__MSG)
#undef TD_GPU__MSG
};

static __thread char td__gpu_detail[256];

const char *td_gpu_strerror(int err) {
  if (err == 0) return "success";
  if (err < TD_GPU__EFIRST && err >= TD_GPU__ELAST) return td__gpu_msgs[TD_GPU__EFIRST - 1 - err];
  return "unknown error";
}

void td_gpu_set_detail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(td__gpu_detail, sizeof(td__gpu_detail), fmt, ap);
  va_end(ap);
}

const char *td_gpu_last_detail(void) { return td__gpu_detail; }

void td_gpu_clear_detail(void) { td__gpu_detail[0] = '\0'; }

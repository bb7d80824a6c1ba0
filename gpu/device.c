/* Tide devices: CPU op table selection and the dlopen()ed CUDA plugin
 * (see device.h). */
#include "device.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu_err.h"
#include "tensor.h"

static struct {
  pthread_once_t once;             /* guards the one load attempt */
  const td_cuda_plugin_t *plugin;  /* loaded plugin or NULL */
  int err;                         /* why plugin is NULL */
  char why[512];                   /* detail of the failure */
  int ndev;                        /* CUDA devices reported by the plugin */
} td__dev = {PTHREAD_ONCE_INIT, NULL, 0, "", 0};

/* Forwards the plugin's error text into this thread's detail string. */
static void td__detail_hook(const char *fmt, ...) {
  char buf[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  td_gpu_set_detail("%s", buf);
}

/* A GPU is present when the NVIDIA driver exposes a device node; checking
 * that first keeps CPU-only machines from loading CUDA libraries at all. */
static int td__gpu_present(void) {
  if (getenv("TIDE_FORCE_CUDA_PLUGIN")) return 1;
  return access("/dev/nvidia0", F_OK) == 0 ||
         access("/proc/driver/nvidia/gpus", F_OK) == 0;
}

static void td__plugin_path(char *buf, size_t n) {
  const char *env = getenv("TIDE_CUDA_PLUGIN");
  if (env && *env) {
    snprintf(buf, n, "%s", env);
    return;
  }
  char exe[PATH_MAX];
  ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (len <= 0) {
    snprintf(buf, n, "build/tide_cuda.so");
    return;
  }
  exe[len] = '\0';
  char *slash = strrchr(exe, '/');
  if (slash) *slash = '\0';
  snprintf(buf, n, "%s/../build/tide_cuda.so", exe);
}

static void td__load(void) {
  if (getenv("TIDE_DISABLE_CUDA") || !td__gpu_present()) {
    td__dev.err = TD_GPU_ENODEV;
    snprintf(td__dev.why, sizeof(td__dev.why), "no NVIDIA GPU device found");
    return;
  }
  char path[PATH_MAX + 64];
  td__plugin_path(path, sizeof(path));
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    td__dev.err = TD_GPU_EPLUGIN;
    snprintf(td__dev.why, sizeof(td__dev.why), "%s", dlerror());
    return;
  }
  td_cuda_plugin_get_fn get;
  *(void **)&get = dlsym(h, "td_cuda_plugin_get");
  const td_cuda_plugin_t *p = get ? get() : NULL;
  if (!p || p->abi != TD_CUDA_PLUGIN_ABI) {
    td__dev.err = TD_GPU_EPLUGIN;
    snprintf(td__dev.why, sizeof(td__dev.why), "%.300s: %s", path,
             p ? "plugin ABI version mismatch" : "td_cuda_plugin_get missing");
    return;
  }
  p->set_detail_hook(td__detail_hook);
  int n = 0;
  int rc = p->device_count(&n);
  if (rc || n <= 0) {
    td__dev.err = TD_GPU_ENODEV;
    const char *d = td_gpu_last_detail();
    snprintf(td__dev.why, sizeof(td__dev.why), "CUDA reports no device%s%.300s",
             d[0] ? ": " : "", d);
    return;
  }
  td__dev.ndev = n;
  td__dev.plugin = p;
}

const td_cuda_plugin_t *td_cuda_plugin(int *err) {
  pthread_once(&td__dev.once, td__load);
  if (!td__dev.plugin) {
    if (err) *err = td__dev.err;
    td_gpu_set_detail("%s", td__dev.why);
  }
  return td__dev.plugin;
}

int td_cuda_device_count(void) {
  pthread_once(&td__dev.once, td__load);
  return td__dev.plugin ? td__dev.ndev : 0;
}

const td_ops_t *td_device_ops(int dev, int *err) {
  if (dev == TD_CPU) return &td_cpu_ops;
  const td_cuda_plugin_t *p = td_cuda_plugin(err);
  if (!p) return NULL;
  if (dev < 0 || dev >= td__dev.ndev) {
    td_gpu_set_detail("cuda:%d does not exist (%d devices)", dev, td__dev.ndev);
    *err = TD_GPU_ENODEV;
    return NULL;
  }
  int rc = p->set_device(dev);
  if (rc) {
    *err = rc;
    return NULL;
  }
  return p->ops;
}

int td_device_alloc(int dev, void **ptr, size_t n) {
  int err = 0;
  if (!td_device_ops(dev, &err)) return err;
  return td__dev.plugin->malloc(ptr, n);
}

void td_device_free(int dev, void *ptr) {
  int err = 0;
  if (td_device_ops(dev, &err)) td__dev.plugin->free(ptr);
}

int td_device_memcpy(int dst_dev, void *dst, int src_dev, const void *src,
                     size_t n) {
  if (n == 0) return 0;
  if (dst_dev == TD_CPU && src_dev == TD_CPU) {
    memcpy(dst, src, n);
    return 0;
  }
  int err = 0;
  if (dst_dev == TD_CPU) {
    if (!td_device_ops(src_dev, &err)) return err;
    return td__dev.plugin->memcpy(dst, src, n, TD_D2H);
  }
  if (src_dev == TD_CPU) {
    if (!td_device_ops(dst_dev, &err)) return err;
    return td__dev.plugin->memcpy(dst, src, n, TD_H2D);
  }
  if (src_dev == dst_dev) {
    if (!td_device_ops(dst_dev, &err)) return err;
    return td__dev.plugin->memcpy(dst, src, n, TD_D2D);
  }
  /* Between two GPUs: through a host bounce buffer (simple, not fast). */
  void *tmp = malloc(n);
  if (!tmp) return TD_GPU_ENOMEM;
  int rc = td_device_memcpy(TD_CPU, tmp, src_dev, src, n);
  if (!rc) rc = td_device_memcpy(dst_dev, dst, TD_CPU, tmp, n);
  free(tmp);
  return rc;
}

/* Tide NCCL communicators (see nccl_comm.h). */
#include "nccl_comm.h"

#include <stdlib.h>

struct td_nccl {
  void *comm;  /* plugin's ncclComm_t */
  int rank;    /* this rank */
  int nranks;  /* ranks in the communicator */
  int dev;     /* CUDA device of this rank */
};

static const td_cuda_plugin_t *td__plug(int dev, int *err) {
  const td_ops_t *ops = td_device_ops(dev, err);
  return ops ? td_cuda_plugin(err) : NULL;
}

int td_nccl_unique_id(uint8_t *id) {
  int err = 0;
  const td_cuda_plugin_t *p = td_cuda_plugin(&err);
  return p ? p->nccl_get_unique_id(id) : err;
}

int td_nccl_new(td_nccl_t **out, int nranks, const uint8_t *id, int rank, int dev) {
  if (nranks < 1 || rank < 0 || rank >= nranks || dev < 0) return TD_GPU_EINVAL;
  int err = 0;
  const td_cuda_plugin_t *p = td__plug(dev, &err);
  if (!p) return err;
  td_nccl_t *c = calloc(1, sizeof(*c));
  if (!c) return TD_GPU_ENOMEM;
  int rc = p->nccl_comm_init(&c->comm, nranks, id, rank);
  if (rc) {
    free(c);
    return rc;
  }
  c->rank = rank;
  c->nranks = nranks;
  c->dev = dev;
  *out = c;
  return 0;
}

void td_nccl_free(td_nccl_t **c) {
  if (!c || !*c) return;
  int err = 0;
  const td_cuda_plugin_t *p = td__plug((*c)->dev, &err);
  if (p) p->nccl_comm_destroy((*c)->comm);
  free(*c);
  *c = NULL;
}

int td_nccl_rank(const td_nccl_t *c) { return c->rank; }
int td_nccl_size(const td_nccl_t *c) { return c->nranks; }
int td_nccl_device(const td_nccl_t *c) { return c->dev; }

/* Checks t is contiguous on the communicator's device; returns the plugin. */
static const td_cuda_plugin_t *td__ready(td_nccl_t *c, const td_tensor_t *t, int *err) {
  if (td_tensor_device(t) != c->dev) {
    *err = TD_GPU_EDEVICE;
    return NULL;
  }
  if (!td_tensor_is_contiguous(t)) {
    *err = TD_GPU_EINVAL;
    return NULL;
  }
  return td__plug(c->dev, err);
}

int td_nccl_allreduce(td_nccl_t *c, td_tensor_t *t, int op) {
  int err = 0;
  const td_cuda_plugin_t *p = td__ready(c, t, &err);
  if (!p) return err;
  return p->nccl_allreduce(c->comm, td_tensor_data(t), td_tensor_data(t),
                           (size_t)td_tensor_numel(t), td_tensor_dtype(t), op);
}

int td_nccl_allgather(td_nccl_t *c, const td_tensor_t *in, td_tensor_t *out) {
  int err = 0;
  const td_cuda_plugin_t *p = td__ready(c, in, &err);
  if (p && !td__ready(c, out, &err)) p = NULL;
  if (!p) return err;
  if (td_tensor_dtype(in) != td_tensor_dtype(out) ||
      td_tensor_numel(out) != td_tensor_numel(in) * c->nranks)
    return TD_GPU_ESHAPE;
  return p->nccl_allgather(c->comm, td_tensor_data(in), td_tensor_data(out),
                           (size_t)td_tensor_numel(in), td_tensor_dtype(in));
}

int td_nccl_reduce_scatter(td_nccl_t *c, const td_tensor_t *in, td_tensor_t *out, int op) {
  int err = 0;
  const td_cuda_plugin_t *p = td__ready(c, in, &err);
  if (p && !td__ready(c, out, &err)) p = NULL;
  if (!p) return err;
  if (td_tensor_dtype(in) != td_tensor_dtype(out) ||
      td_tensor_numel(in) != td_tensor_numel(out) * c->nranks)
    return TD_GPU_ESHAPE;
  return p->nccl_reduce_scatter(c->comm, td_tensor_data(in), td_tensor_data(out),
                                (size_t)td_tensor_numel(out), td_tensor_dtype(in), op);
}

int td_nccl_broadcast(td_nccl_t *c, td_tensor_t *t, int root) {
  int err = 0;
  const td_cuda_plugin_t *p = td__ready(c, t, &err);
  if (!p) return err;
  if (root < 0 || root >= c->nranks) return TD_GPU_EINVAL;
  return p->nccl_broadcast(c->comm, td_tensor_data(t), (size_t)td_tensor_numel(t),
                           td_tensor_dtype(t), root);
}

int td_nccl_send(td_nccl_t *c, const td_tensor_t *t, int peer) {
  int err = 0;
  const td_cuda_plugin_t *p = td__ready(c, t, &err);
  if (!p) return err;
  if (peer < 0 || peer >= c->nranks) return TD_GPU_EINVAL;
  return p->nccl_send(c->comm, td_tensor_data(t), (size_t)td_tensor_numel(t),
                      td_tensor_dtype(t), peer);
}

int td_nccl_recv(td_nccl_t *c, td_tensor_t *t, int peer) {
  int err = 0;
  const td_cuda_plugin_t *p = td__ready(c, t, &err);
  if (!p) return err;
  if (peer < 0 || peer >= c->nranks) return TD_GPU_EINVAL;
  return p->nccl_recv(c->comm, td_tensor_data(t), (size_t)td_tensor_numel(t),
                      td_tensor_dtype(t), peer);
}

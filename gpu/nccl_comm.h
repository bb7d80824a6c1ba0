/* Tide NCCL communicators for CUDA tensors: thin wrappers over the CUDA
 * plugin's NCCL entry points (device.h) that check tensors (contiguous, on
 * the communicator's device, sizes) and run each collective to completion.
 * Uses tensor.h and device.h.  Without a GPU every call returns
 * TD_GPU_ENODEV (or TD_GPU_EPLUGIN).
 *
 * Setup (DESIGN §5): rank 0 calls td_nccl_unique_id() and publishes the 128
 * bytes (the engine: through the head's KV store); every rank then calls
 * td_nccl_new() with the same id, nranks and its own rank.  Collectives
 * must be called by all ranks in the same order.  A communicator is used by
 * one thread; the caller owns it and frees it with td_nccl_free().
 */
#ifndef TD_NCCL_COMM_H
#define TD_NCCL_COMM_H

#include <stdint.h>

#include "device.h"
#include "tensor.h"

#define TD_NCCL_ID_BYTES 128

typedef struct td_nccl td_nccl_t;

/* Writes a new unique id into id (TD_NCCL_ID_BYTES bytes). */
int td_nccl_unique_id(uint8_t *id);
/* Joins communicator `id` as rank of nranks on CUDA device dev (blocks
 * until every rank has joined).  Caller owns *out. */
int td_nccl_new(td_nccl_t **out, int nranks, const uint8_t *id, int rank, int dev);
/* Destroys the communicator and NULLs *c; idempotent. */
void td_nccl_free(td_nccl_t **c);
int td_nccl_rank(const td_nccl_t *c);
int td_nccl_size(const td_nccl_t *c);
int td_nccl_device(const td_nccl_t *c);

/* In place on t (op: td_redop_t). */
int td_nccl_allreduce(td_nccl_t *c, td_tensor_t *t, int op);
/* out (nranks * numel(in) elements, same dtype) = every rank's in. */
int td_nccl_allgather(td_nccl_t *c, const td_tensor_t *in, td_tensor_t *out);
/* out (numel(in) / nranks elements) = this rank's slice of the reduction. */
int td_nccl_reduce_scatter(td_nccl_t *c, const td_tensor_t *in, td_tensor_t *out, int op);
/* In place: t of rank root is copied to every rank. */
int td_nccl_broadcast(td_nccl_t *c, td_tensor_t *t, int root);
int td_nccl_send(td_nccl_t *c, const td_tensor_t *t, int peer);
int td_nccl_recv(td_nccl_t *c, td_tensor_t *t, int peer);

#endif

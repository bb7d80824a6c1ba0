/* Tide collectives' reductions (internal to gpu/ and the collective
 * bindings): the element-wise op of an allreduce or reduce-scatter, for
 * every dtype of tensor.h.  Floats reduce as f32 (f16 and bf16 are widened,
 * reduced and rounded back to nearest even, as NCCL does); integers wrap
 * on overflow, as in C for unsigned types and in NCCL and PyTorch. */
#ifndef TD_REDUCE_H
#define TD_REDUCE_H

#include <stddef.h>

/* The reduction ops (the values of td_redop_t in device.h).  AVG reduces as
 * SUM; td_reduce_avg divides at the end. */
enum { TD_RING_SUM = 0, TD_RING_AVG = 1, TD_RING_MAX = 2, TD_RING_MIN = 3 };

/* 0 when op is defined on dtype; TD_GPU_EINVAL for an unknown op,
 * TD_GPU_EDTYPE for an unknown dtype or AVG of an integer dtype. */
int td_reduce_check(int dtype, int op);
/* dst[i] = op(a[i], b[i]) for the n elements of dtype.  dst may be a or b
 * (in place); nothing else overlaps.  max and min take a when neither is
 * greater (NaN, +0 and -0), so every rank that computes op(x, y) in the
 * same order gets the same bits. */
void td_reduce(void *dst, const void *a, const void *b, size_t n, int dtype, int op);
/* p[i] /= nranks for a float dtype (the last step of AVG); others untouched. */
void td_reduce_avg(void *p, size_t n, int dtype, int nranks);

#endif

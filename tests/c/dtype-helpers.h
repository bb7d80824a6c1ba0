/* Test helpers: element i of a buffer of any tensor dtype, as a double,
 * and back (the collectives' tests of every dtype). */
#ifndef TD_TEST_DTYPE_HELPERS_H
#define TD_TEST_DTYPE_HELPERS_H

#include <stddef.h>
#include <stdint.h>

#include "half.h"
#include "tensor.h"

static double dt_get(int dtype, const void *p, size_t i) {
  switch (dtype) {
    case TD_F16: return td__f16_to_f32(((const uint16_t *)p)[i]);
    case TD_BF16: return td__bf16_to_f32(((const uint16_t *)p)[i]);
    case TD_I32: return ((const int32_t *)p)[i];
    case TD_I64: return (double)((const int64_t *)p)[i];
    case TD_U8: return ((const uint8_t *)p)[i];
    default: return ((const float *)p)[i];
  }
}

static void dt_set(int dtype, void *p, size_t i, double v) {
  switch (dtype) {
    case TD_F16: ((uint16_t *)p)[i] = td__f32_to_f16((float)v); break;
    case TD_BF16: ((uint16_t *)p)[i] = td__f32_to_bf16((float)v); break;
    case TD_I32: ((int32_t *)p)[i] = (int32_t)v; break;
    case TD_I64: ((int64_t *)p)[i] = (int64_t)v; break;
    case TD_U8: ((uint8_t *)p)[i] = (uint8_t)v; break;
    default: ((float *)p)[i] = (float)v;
  }
}

#endif

/* Tide SIMD helpers for the CPU kernels of gpu/ (internal): a marker that
 * compiles a hot loop for AVX-512, AVX2 and baseline x86-64 with the
 * vectorizer's full cost model (GCC function multiversioning), and an exp
 * that vectorizes.  Uses only <stdint.h> and <string.h>. */
#ifndef TD_SIMD_H
#define TD_SIMD_H

#include <stdint.h>
#include <string.h>

/* Hot elementwise loops are compiled for AVX-512, AVX2 and baseline x86-64
 * and picked at load time (GCC function multiversioning), with the
 * vectorizer's full cost model; elsewhere they are plain C. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(__SANITIZE_ADDRESS__)
#define TD__HOT __attribute__((target_clones("avx512f", "avx2", "default"), optimize("O3")))
#else
#define TD__HOT
#endif

/* expf without a libm call, so loops using it vectorize: Cody-Waite range
 * reduction and a degree-6 polynomial; relative error < 1e-7 over the
 * clamped range [-87, 88]. */
static inline float td__exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round */
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return p * scale;
}

#endif

/* Shared by the CPU kernels' C sources: the dtype codes their Python bindings pass and the scalar
 * conversions between them and fp32. build.py hashes this header into every kernel's cache key. */
#ifndef LMS_DTYPES_H
#define LMS_DTYPES_H
#include <stdint.h>
#include <string.h>

#define LMS_INLINE static inline __attribute__((always_inline))

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* ---- scalar conversions -------------------------------------------------------------------- */

LMS_INLINE float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

LMS_INLINE uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

#ifdef __FLT16_MAX__
#define LMS_HAS_F16 1
LMS_INLINE float f16_to_f32(uint16_t h) {
  _Float16 x;
  memcpy(&x, &h, 2);
  return (float)x;
}
LMS_INLINE uint16_t f32_to_f16(float f) {
  _Float16 x = (_Float16)f;
  uint16_t h;
  memcpy(&h, &x, 2);
  return h;
}
#else
#define LMS_HAS_F16 0
LMS_INLINE float f16_to_f32(uint16_t h) { (void)h; return 0.f; }
LMS_INLINE uint16_t f32_to_f16(float f) { (void)f; return 0; }
#endif

LMS_INLINE float load1(const void* p, int64_t i, const int dt) {
  if (dt == DT_F32) return ((const float*)p)[i];
  if (dt == DT_BF16) return bf16_to_f32(((const uint16_t*)p)[i]);
  return f16_to_f32(((const uint16_t*)p)[i]);
}

LMS_INLINE void store1(void* p, int64_t i, float v, const int dt) {
  if (dt == DT_F32) ((float*)p)[i] = v;
  else if (dt == DT_BF16) ((uint16_t*)p)[i] = f32_to_bf16(v);
  else ((uint16_t*)p)[i] = f32_to_f16(v);
}

LMS_INLINE int dtype_size(int dt) { return dt == DT_F32 ? 4 : 2; }

#endif

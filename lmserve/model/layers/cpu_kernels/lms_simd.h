/* AVX-512 helpers shared by the CPU kernels' C sources (included where the target has AVX-512
 * F/BW/VL): masked loads and stores of 16 elements in any dtype code as fp32, fp32 -> bf16 with
 * round to nearest even, a vector exp, and SiLU-and-mul. build.py hashes this header into every
 * kernel's cache key. Every fused multiply-add here is an explicit FMA intrinsic and no product
 * feeds an add, so the result is the same under -ffp-contract=off (cpu_ops.c) and =fast
 * (paged_attention.c): the eager kernels and decode_step.c compute the same bits. */
#ifndef LMS_SIMD_H
#define LMS_SIMD_H
#include <immintrin.h>

#include "lms_dtypes.h"

LMS_INLINE __mmask16 mask16(int w) { return w >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (w > 0 ? w : 0)) - 1); }

LMS_INLINE __m512 ld16(const void* p, __mmask16 m, const int dt) { /* 16 elements -> fp32 */
  if (dt == DT_F32) return _mm512_maskz_loadu_ps(m, p);
  __m256i x = _mm256_maskz_loadu_epi16(m, p);
  if (dt == DT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
  return _mm512_cvtph_ps(x);
}

LMS_INLINE __m256i f32x16_to_bf16(__m512 v) { /* round to nearest even; NaN stays NaN */
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

LMS_INLINE __m512 ld16_round(__m512 v, const int dt) { /* v rounded to dt's precision, as fp32 */
  if (dt == DT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(f32x16_to_bf16(v)), 16));
  if (dt == DT_F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return v;
}

LMS_INLINE void st16(void* p, __m512 v, __mmask16 m, const int dt) {
  if (dt == DT_F32) _mm512_mask_storeu_ps(p, m, v);
  else if (dt == DT_BF16) _mm256_mask_storeu_epi16(p, m, f32x16_to_bf16(v));
  else _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), |r| <= ln2/2, degree-7
 * Taylor polynomial (relative error ~4e-9 before fp32 rounding). */
LMS_INLINE __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

/* out[r][i] = silu(x[r][i]) * x[r][I + i] for columns i0 <= i < i1 of rows 0 <= r < rows (x: gate | up,
 * row stride x_stride; out row stride out_stride, elements): silu(g) = g / (1 + exp(-g)) in fp32,
 * rounded to dt, times up, rounded to dt (torch's F.silu(gate) * up, op by op; the exp is exp512's,
 * not torch's, so a result can differ from torch's in the last bit, rarely). */
LMS_INLINE void silu_mul_span(const void* x, int64_t x_stride, void* out, int64_t out_stride, int64_t rows, int64_t I,
                              int64_t i0, int64_t i1, const int dt) {
  const int esz = dtype_size(dt);
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = 0; r < rows; r++) {
    const char* g = (const char*)x + r * x_stride * esz;
    const char* u = g + I * esz;
    char* o = (char*)out + r * out_stride * esz;
    for (int64_t i = i0; i < i1; i += 16) {
      const __mmask16 m = mask16((int)(i1 - i));
      const __m512 gv = ld16(g + i * esz, m, dt), uv = ld16(u + i * esz, m, dt);
      __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
      if (dt != DT_F32) s = ld16_round(s, dt);
      st16(o + i * esz, _mm512_mul_ps(s, uv), m, dt);
    }
  }
}

#endif

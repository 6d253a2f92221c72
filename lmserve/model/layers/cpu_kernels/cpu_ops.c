/* A decoder layer's small per-token ops fused into one pass each, for CPU.
 *
 * Why: at decode a layer's elementwise work is a few thousand numbers, so its cost is the number of
 * torch ops (a few microseconds of dispatch each), not arithmetic: HF's RMSNorm is ~8 ops, rotary
 * ~10 per tensor, SiLU-and-mul 3. Each function here is one call.
 *
 * Numerics: the fused ops compute what the pure-torch reference computes, op by op, with the same
 * rounding: fp32 arithmetic, and in bfloat16 every intermediate that torch materialises in bf16 is
 * rounded to bf16 at the same point (round to nearest even). The file is compiled with
 * -ffp-contract=off so that no product-then-add is fused into an FMA the reference does not do.
 * What can still differ, in the last fp32 bit: RMSNorm's mean of squares (here summed in fp64, then
 * rounded once: more exact than torch's fp32 sum), and exp() in SiLU (a Cephes-style polynomial,
 * ~1 ulp, like torch's vectorized exp).
 *
 * Layouts: row-major; "stride" arguments are elements between consecutive rows (tokens); within a
 * row elements are dense. dtypes (lms_dtypes.h): 0 = float32, 1 = bfloat16; float16 is refused.
 * Every function returns 0, or -1 for arguments it does not take (nothing written then).
 *
 * Built at first use by build.py (gcc -O3 -march=native -fopenmp, plus -ffp-contract=off).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lms_dtypes.h"

#define LMS_PAR_MIN 32768 /* elements below which an op stays on one thread (fork/join costs more) */
#define LMS_MAX_ROW 65536 /* longest row the fused ops take (their fp32 row buffer is on the stack) */

LMS_INLINE int ok_dtype(int dt) { return dt == DT_F32 || dt == DT_BF16; }

/* x rounded to dt's precision (the value torch would hold in a tensor of that dtype) */
LMS_INLINE float round_to(float x, const int dt) { return dt == DT_BF16 ? bf16_to_f32(f32_to_bf16(x)) : x; }

static void load_row(const void* p, int64_t n, int dt, float* out) {
  if (dt == DT_F32) {
    memcpy(out, p, (size_t)n * sizeof(float));
  } else {
    const uint16_t* h = (const uint16_t*)p;
    for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(h[i]);
  }
}

static void store_row(void* p, int64_t n, int dt, const float* v) {
  if (dt == DT_F32) {
    memcpy(p, v, (size_t)n * sizeof(float));
  } else {
    uint16_t* h = (uint16_t*)p;
    for (int64_t i = 0; i < n; i++) h[i] = f32_to_bf16(v[i]);
  }
}

LMS_INLINE const char* row_at(const void* base, int64_t row, int64_t stride, int dt) {
  return (const char*)base + row * stride * dtype_size(dt);
}

/* ---- RMSNorm (HF LlamaRMSNorm), optionally after the residual add ---------------------------
 * h = x (+ res, rounded to dt); res_out = h; var = mean(h^2), summed in fp64 and rounded to fp32 once
 * (the fp32 value nearest the exact mean for any realistic H, whatever the summation order;
 * torch's fp32 sum may differ from it in the last bit);
 * out = round(w * round(h * (1 / sqrt(var + eps)))). res may be NULL (then res_out is unused).
 * x, res: [T, H] with row strides; w [H]; out, res_out [T, H] contiguous. */
int lms_rms_norm(const void* x, int64_t x_stride, const void* res, int64_t res_stride, const void* w,
                 void* out, void* res_out, int64_t T, int64_t H, float eps, int dt, int nthreads) {
  if (!ok_dtype(dt) || T < 0 || H < 1 || H > LMS_MAX_ROW) return -1;
  const int es = dtype_size(dt);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * H >= LMS_PAR_MIN)
  for (int64_t t = 0; t < T; t++) {
    float h[H], wf[H], r[H];
    load_row(row_at(x, t, x_stride, dt), H, dt, h);
    if (res) {
      load_row(row_at(res, t, res_stride, dt), H, dt, r);
      for (int64_t i = 0; i < H; i++) h[i] = round_to(h[i] + r[i], dt);
      store_row((char*)res_out + t * H * es, H, dt, h);
    }
    double lanes[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= H; i += 8)
      for (int j = 0; j < 8; j++) lanes[j] += (double)h[i + j] * h[i + j];
    double sum = 0.0;
    for (; i < H; i++) sum += (double)h[i] * h[i];
    for (int j = 0; j < 8; j++) sum += lanes[j];
    const float inv = 1.0f / sqrtf((float)(sum / (double)H) + eps);
    load_row(w, H, dt, wf);
    for (i = 0; i < H; i++) r[i] = round_to(wf[i] * round_to(h[i] * inv, dt), dt);
    store_row((char*)out + t * H * es, H, dt, r);
  }
  return 0;
}

/* ---- rotary embedding, neox style ("rotate half") --------------------------------------------
 * For each token t and head: with x1 = x[:D/2], x2 = x[D/2:], c = cs[t][:D/2], s = cs[t][D/2:]:
 * out = cat(x1*c - x2*s, x2*c + x1*s), every product and sum rounded to dt (torch's op order).
 * x [T, heads, D] (row stride x_stride, heads dense) -> out [T, heads, D] contiguous; cs [T, D]. */
static void rope_rows(const void* x, int64_t x_stride, int64_t heads, const void* cs, int64_t cs_stride,
                      void* out, int64_t t, int64_t D, int dt) {
  const int64_t half = D / 2;
  float c[half], s[half], x1[half], x2[half], o[D];
  load_row(row_at(cs, t, cs_stride, dt), half, dt, c);
  load_row(row_at(cs, t, cs_stride, dt) + half * dtype_size(dt), half, dt, s);
  for (int64_t h = 0; h < heads; h++) {
    const char* xr = row_at(x, t, x_stride, dt) + h * D * dtype_size(dt);
    load_row(xr, half, dt, x1);
    load_row(xr + half * dtype_size(dt), half, dt, x2);
    for (int64_t i = 0; i < half; i++) {
      o[i] = round_to(round_to(x1[i] * c[i], dt) - round_to(x2[i] * s[i], dt), dt);
      o[half + i] = round_to(round_to(x2[i] * c[i], dt) + round_to(x1[i] * s[i], dt), dt);
    }
    store_row((char*)out + (t * heads + h) * D * dtype_size(dt), D, dt, o);
  }
}

int lms_rope_neox(const void* q, int64_t q_stride, int64_t hq, const void* k, int64_t k_stride, int64_t hk,
                  const void* cs, int64_t cs_stride, void* q_out, void* k_out, int64_t T, int64_t D, int dt,
                  int nthreads) {
  if (!ok_dtype(dt) || T < 0 || D < 2 || D % 2 || D > LMS_MAX_ROW || hq < 0 || hk < 0) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * (hq + hk) * D >= LMS_PAR_MIN)
  for (int64_t t = 0; t < T; t++) {
    rope_rows(q, q_stride, hq, cs, cs_stride, q_out, t, D, dt);
    rope_rows(k, k_stride, hk, cs, cs_stride, k_out, t, D, dt);
  }
  return 0;
}

/* ---- SiLU-and-mul ----------------------------------------------------------------------------
 * x [T, 2d] = gate | up (row stride x_stride) -> out [T, d] = round(round(silu(gate)) * up), with
 * silu(g) = g / (1 + exp(-g)) as torch computes it. */
LMS_INLINE float exp_f32(float x) { /* Cephes expf: ~1 ulp, vectorizable (no libm call) */
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365447504019f ? -87.3365447504019f : x;
  const float n = rintf(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return y * scale;
}

int lms_silu_mul(const void* x, int64_t x_stride, void* out, int64_t T, int64_t d, int dt, int nthreads) {
  if (!ok_dtype(dt) || T < 0 || d < 1 || d > LMS_MAX_ROW) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * d >= LMS_PAR_MIN)
  for (int64_t t = 0; t < T; t++) {
    float g[d], u[d];
    const char* xr = row_at(x, t, x_stride, dt);
    load_row(xr, d, dt, g);
    load_row(xr + d * dtype_size(dt), d, dt, u);
    for (int64_t i = 0; i < d; i++) g[i] = round_to(round_to(g[i] / (1.0f + exp_f32(-g[i])), dt) * u[i], dt);
    store_row((char*)out + t * d * dtype_size(dt), d, dt, g);
  }
  return 0;
}

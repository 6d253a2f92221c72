/* A decoder layer's small per-token ops (RMSNorm, rotary) fused into one pass each, and the GEMV on
 * llama.cpp's block-quantized weights, for CPU.
 *
 * Why: at decode a layer's elementwise work is a few thousand numbers, so its cost is the number of
 * torch ops (a few microseconds of dispatch each), not arithmetic: HF's RMSNorm is ~8 ops, rotary
 * ~10 per tensor. Each function here is one call. SiLU-and-mul (3 torch ops) is vectorised by hand
 * (lms_simd.h): scalar code lost to torch's kernels (benchmarks/README.md, "Kernel measurements").
 *
 * Numerics: the fused ops compute what the pure-torch reference computes, op by op, with the same
 * rounding: fp32 arithmetic, and in bfloat16 every intermediate that torch materialises in bf16 is
 * rounded to bf16 at the same point (round to nearest even). The file is compiled with
 * -ffp-contract=off so that no product-then-add is fused into an FMA the reference does not do.
 * What can still differ, in the last fp32 bit: RMSNorm's mean of squares (here summed in fp64, then
 * rounded once: more exact than torch's fp32 sum).
 *
 * Layouts: row-major; "stride" arguments are elements between consecutive rows (tokens); within a
 * row elements are dense. dtypes (lms_dtypes.h): 0 = float32, 1 = bfloat16; float16 is refused.
 * Every function returns 0, or -1 for arguments it does not take (nothing written then).
 *
 * Entry points and argument structs: lms_abi.h. Built at first use by build.py (gcc -O3
 * -march=native -fopenmp, plus -ffp-contract=off: build.py's UNIT_FLAGS).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"
#include "lms_abi.h"
#include "lms_dtypes.h"

#define LMS_PAR_MIN 32768 /* elements below which an op stays on one thread (fork/join costs more) */

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
int32_t lms_rms_norm(const LmsRmsNormArgs* a) {
  const void *x = a->x, *res = a->res, *w = a->weight;
  void *out = a->out, *res_out = a->res_out;
  const int64_t x_stride = a->x_stride, res_stride = a->res_stride, T = a->rows, H = a->hidden;
  const float eps = a->eps;
  const int dt = a->dtype, nthreads = a->num_threads;
  if (!ok_dtype(dt) || T < 0 || H < 1 || H > LMS_MAX_ROW) return LMS_ERR_ARGS;
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

int32_t lms_rope_neox(const LmsRopeArgs* a) {
  const void *q = a->q, *k = a->k, *cs = a->cos_sin;
  void *q_out = a->q_out, *k_out = a->k_out;
  const int64_t q_stride = a->q_stride, k_stride = a->k_stride, cs_stride = a->cs_stride, hq = a->num_q_heads,
                hk = a->num_kv_heads, T = a->rows, D = a->head_dim;
  const int dt = a->dtype, nthreads = a->num_threads;
  if (!ok_dtype(dt) || T < 0 || D < 2 || D % 2 || D > LMS_MAX_ROW || hq < 0 || hk < 0) return LMS_ERR_ARGS;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * (hq + hk) * D >= LMS_PAR_MIN)
  for (int64_t t = 0; t < T; t++) {
    rope_rows(q, q_stride, hq, cs, cs_stride, q_out, t, D, dt);
    rope_rows(k, k_stride, hk, cs, cs_stride, k_out, t, D, dt);
  }
  return 0;
}

/* ---- SiLU-and-mul ------------------------------------------------------------------------------
 * out [T, I] = silu(x[:, :I]) * x[:, I:] for x [T, 2I] (row stride x_stride), as lms_simd.h's
 * silu_mul_span computes it; out contiguous. -1 where the target has no AVX-512 (the binding then
 * reports the op absent). Parallel over rows and column chunks of at least 1024. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "lms_simd.h"
#define LMS_SILU 1
int32_t lms_silu_mul(const LmsSiluMulArgs* a) {
  const void* x = a->x;
  void* out = a->out;
  const int64_t x_stride = a->x_stride, T = a->rows, I = a->inter;
  const int dt = a->dtype, nthreads = a->num_threads;
  if (!ok_dtype(dt) || T < 0 || I < 1) return LMS_ERR_ARGS;
  const int64_t chunk = 1024, per_row = (I + chunk - 1) / chunk, items = T * per_row;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * I >= LMS_PAR_MIN)
  for (int64_t w = 0; w < items; w++) {
    const int64_t r = w / per_row, i0 = (w % per_row) * chunk, i1 = i0 + chunk < I ? i0 + chunk : I;
    silu_mul_span((const char*)x + r * x_stride * dtype_size(dt), x_stride, (char*)out + r * I * dtype_size(dt), I, 1,
                  I, i0, i1, dt);
  }
  return 0;
}
#else
#define LMS_SILU 0
int32_t lms_silu_mul(const LmsSiluMulArgs* a) {
  (void)a;
  return LMS_ERR_ARGS;
}
#endif
int32_t lms_silu_available(void) { return LMS_SILU; }

/* ---- GEMV on llama.cpp block-quantized weights, integer dot products (AVX-512 VNNI) ----------
 * out[r][n] = sum_k w[n][k] * xq[r][k] (+ bias[n]) for M <= 8 rows, where xq is x quantized per
 * block of 32 along K to 15 bits (q = round_half_even(x * 16256 / max|x|), scale dx = max|x| / 16256:
 * relative error 2^-15 of the block's largest element, far below the bf16 rounding of the torch
 * int4 path) and w the exact weight, w = d * u + m per block with u unsigned:
 *   nibbles = 1 (Q4_0 / Q4_1, u in 0..15): qw [N, K/2], a block's 16 bytes as in the GGUF file
 *     (byte j: value j in the low nibble, value j + 16 in the high one);
 *   nibbles = 0 (Q8_0, u = q + 128 in 0..255, m = -128 d): qw [N, K], per group of 4 blocks (the
 *     last group of a K that is not a multiple of 128 has 2) their values 0..15 block after block,
 *     then their values 16..31: what the nibble split of the file's Q4 bytes gives, so both formats
 *     share one activation layout.
 * d, m: [N, K/32] fp16 (the file's precision; Q4_0's m = -8 d and Q8_0's -128 d are exact in it).
 * The dot products: q = 128 a + b with a in -127..127 and b in -64..63 (exact), so u . q =
 * 128 (u . a) + (u . b), each an unsigned-by-signed byte dot (VPDPBUSD, four products a lane, int32,
 * cannot overflow: |u . a| <= 255 * 127 * 32). Per block: d dx (u . q) + m dx sum(q), in fp32.
 * K must be a multiple of 64 and at most 16384. x [M, K] (row stride x_stride, dtype xdt); bias [N]
 * in xdt or NULL (added after the product is rounded to xdt); out [M, N] (row stride out_stride) in
 * xdt. Parallel over N. */
#define LMS_QSCALE 16256.f /* 127 * 128: |q| <= 16256 keeps a = (q + 64) >> 7 within -127..127 */
#if LMS_QGEMV
#include <immintrin.h>

/* The activations of one row (XQ_GROUP_BYTES, cpu_ops.h): per group g of 4 blocks (128 values), 256
 * bytes: a of values 0..15 of the 4 blocks, a of values 16..31, then b likewise (a group of 2 blocks
 * leaves its upper halves 0). */

/* x rows -> the byte layout above, per-block scales dx and sums dx * sum(q) */
void quantize_rows(const void* x, int64_t x_stride, int64_t M, int xdt, int64_t K, int8_t* xq, float* dx,
                          float* xsum) {
  const int64_t nb = K / 32, row_bytes = (nb + 3) / 4 * XQ_GROUP_BYTES;
  float row[K];
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512i c64 = _mm512_set1_epi32(64);
  memset(xq, 0, (size_t)(M * row_bytes));
  for (int64_t r = 0; r < M; r++) {
    load_row(row_at(x, r, x_stride, xdt), K, xdt, row);
    for (int64_t b = 0; b < nb; b++) {
      const __m512 v0 = _mm512_loadu_ps(row + b * 32), v1 = _mm512_loadu_ps(row + b * 32 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
      const float inv = amax > 0.f ? LMS_QSCALE / amax : 0.f;
      const __m512 vinv = _mm512_set1_ps(inv);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vinv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vinv));
      const __m512i a0 = _mm512_srai_epi32(_mm512_add_epi32(q0, c64), 7), a1 = _mm512_srai_epi32(_mm512_add_epi32(q1, c64), 7);
      const __m512i b0 = _mm512_sub_epi32(q0, _mm512_slli_epi32(a0, 7)), b1 = _mm512_sub_epi32(q1, _mm512_slli_epi32(a1, 7));
      int8_t* dst = xq + r * row_bytes + (b / 4) * XQ_GROUP_BYTES + (b % 4) * 16;
      _mm_storeu_si128((__m128i*)dst, _mm512_cvtepi32_epi8(a0));
      _mm_storeu_si128((__m128i*)(dst + 64), _mm512_cvtepi32_epi8(a1));
      _mm_storeu_si128((__m128i*)(dst + 128), _mm512_cvtepi32_epi8(b0));
      _mm_storeu_si128((__m128i*)(dst + 192), _mm512_cvtepi32_epi8(b1));
      dx[r * nb + b] = amax / LMS_QSCALE;
      xsum[r * nb + b] = dx[r * nb + b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
  }
}

/* group g's weights as bytes: w[0] = values 0..15 of its blocks, w[1] = values 16..31 (zeros past a
 * 2-block group: `half` masks the loads to 32 bytes) */
LMS_INLINE void load_weight_group(const uint8_t* qw, const int nibbles, const int64_t n, const int64_t K,
                                  const int64_t g, const __mmask64 k, __m512i* w) {
  if (nibbles) {
    const __m512i v = _mm512_maskz_loadu_epi8(k, qw + n * (K / 2) + g * 64);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    w[0] = _mm512_and_si512(v, low4);
    w[1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
  } else {
    const uint8_t* p = qw + n * K + g * 128;
    const int64_t hi = k == ~(__mmask64)0 ? 64 : 32;
    w[0] = _mm512_maskz_loadu_epi8(k, p);
    w[1] = _mm512_maskz_loadu_epi8(k, p + hi);
  }
}

/* group g for M rows: acc[r] += (d dx) (u . q), lane l holding block 4g + l / 4 */
LMS_INLINE void qgemv_group(const int8_t* xq, const int64_t row_bytes, const float* dx, const __m512i* w,
                            const __m128 d4, const __mmask8 k4, const int64_t nb, const int64_t g, const int M,
                            __m512* acc) {
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  for (int r = 0; r < M; r++) {
    const int8_t* xp = xq + r * row_bytes + g * XQ_GROUP_BYTES;
    __m512i da = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_loadu_si512((const void*)xp));
    da = _mm512_dpbusd_epi32(da, w[1], _mm512_loadu_si512((const void*)(xp + 64)));
    __m512i db = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_loadu_si512((const void*)(xp + 128)));
    db = _mm512_dpbusd_epi32(db, w[1], _mm512_loadu_si512((const void*)(xp + 192)));
    const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(da, 7), db);
    const __m128 s4 = _mm_mul_ps(d4, _mm_maskz_loadu_ps(k4, dx + r * nb + 4 * g));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4)), acc[r]);
  }
}

LMS_INLINE void qgemv_rows(const int8_t* xq, const float* dx, const float* xsum, const uint8_t* qw, const uint16_t* d,
                           const uint16_t* m, const int nibbles, const int64_t n, const int64_t K, const int M,
                           float* res) {
  const int64_t nb = K / 32, full = nb / 4, row_bytes = (nb + 3) / 4 * XQ_GROUP_BYTES;
  const uint16_t* dn = d + n * nb;
  const uint16_t* mn = m + n * nb;
  __m512 acc0[LMS_QGEMV_MAX_ROWS], acc1[LMS_QGEMV_MAX_ROWS]; /* even / odd groups: two FMA chains */
  for (int r = 0; r < M; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
  const __mmask64 all = ~(__mmask64)0;
  int64_t g = 0;
  __m512i w0[2], w1[2];
  for (; g + 2 <= full; g += 2) {
    load_weight_group(qw, nibbles, n, K, g, all, w0);
    load_weight_group(qw, nibbles, n, K, g + 1, all, w1);
    qgemv_group(xq, row_bytes, dx, w0, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(dn + 4 * g))), 0xF, nb, g, M, acc0);
    qgemv_group(xq, row_bytes, dx, w1, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(dn + 4 * g + 4))), 0xF, nb, g + 1,
                M, acc1);
  }
  if (g < full) {
    load_weight_group(qw, nibbles, n, K, g, all, w0);
    qgemv_group(xq, row_bytes, dx, w0, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(dn + 4 * g))), 0xF, nb, g, M, acc0);
    g++;
  }
  if (nb % 4) { /* a last group of 2 blocks (K % 128 == 64) */
    load_weight_group(qw, nibbles, n, K, g, (__mmask64)0xFFFFFFFFu, w1);
    qgemv_group(xq, row_bytes, dx, w1, _mm_cvtph_ps(_mm_maskz_loadu_epi16(0x3, dn + 4 * g)), 0x3, nb, g, M, acc1);
  }
  for (int r = 0; r < M; r++) {
    __m512 macc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 16) {
      const __mmask16 k = nb - b >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - b)) - 1u);
      const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mn + b));
      macc = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, xsum + r * nb + b), macc);
    }
    res[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) + _mm512_reduce_add_ps(macc);
  }
}

/* output columns n0 <= n < n1 of all rows (row stride out_stride, dtype xdt) from the quantized
 * rows; a bias is added to the product rounded to xdt, as the eager path's qgemv(x) + bias does */
void qgemv_range(const int8_t* xq, const float* dx, const float* xsum, const uint8_t* qw, const uint16_t* d,
                 const uint16_t* m, const int nibbles, const int64_t K, const int rows, const void* bias, void* out,
                 const int64_t out_stride, const int xdt, const int64_t n0, const int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    float res[LMS_QGEMV_MAX_ROWS];
    switch (rows) { /* constant row counts keep the accumulators in registers */
      case 1: qgemv_rows(xq, dx, xsum, qw, d, m, nibbles, n, K, 1, res); break;
      case 2: qgemv_rows(xq, dx, xsum, qw, d, m, nibbles, n, K, 2, res); break;
      case 4: qgemv_rows(xq, dx, xsum, qw, d, m, nibbles, n, K, 4, res); break;
      default: qgemv_rows(xq, dx, xsum, qw, d, m, nibbles, n, K, rows, res); break;
    }
    const float b = bias ? load1(bias, n, xdt) : 0.f;
    for (int r = 0; r < rows; r++)
      store1((char*)out + r * out_stride * dtype_size(xdt), n, bias ? round_to(res[r], xdt) + b : res[r], xdt);
  }
}

int32_t lms_qgemv(const LmsQgemvArgs* a) {
  const void *x = a->x, *bias = a->bias;
  const uint8_t* qw = a->qw;
  const uint16_t *d = a->d, *m = a->m;
  void* out = a->out;
  const int64_t x_stride = a->x_stride, M = a->rows, N = a->n, K = a->k, out_stride = a->out_stride;
  const int xdt = a->dtype, nibbles = a->nibbles, nthreads = a->num_threads;
  if (!ok_dtype(xdt) || M < 1 || M > LMS_QGEMV_MAX_ROWS || N < 1 || K < 64 || K % 64 || K > LMS_QGEMV_MAX_K)
    return LMS_ERR_ARGS;
  const int64_t nb = K / 32;
  /* the quantized rows: 2 M K <= 256 KiB, on the stack (no allocation per call) */
  int8_t xq[M * ((nb + 3) / 4) * XQ_GROUP_BYTES] __attribute__((aligned(64)));
  float dx[M * nb + 4], xsum[M * nb];
  quantize_rows(x, x_stride, M, xdt, K, xq, dx, xsum);
#pragma omp parallel num_threads(nthreads)
  {
    int64_t n0, n1;
    thread_share(N, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
    qgemv_range(xq, dx, xsum, qw, d, m, nibbles, K, (int)M, bias, out, out_stride, xdt, n0, n1);
  }
  return 0;
}
#else
int32_t lms_qgemv(const LmsQgemvArgs* a) {
  (void)a;
  return LMS_ERR_ARGS;
}
#endif

/* 1 where lms_qgemv has its AVX-512 VNNI path; 0 where it is absent (the binding does not offer it) */
int32_t lms_qgemv_available(void) { return LMS_QGEMV; }

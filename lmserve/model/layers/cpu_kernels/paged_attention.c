/* Paged decode attention for CPU: one query token per sequence, its context read in place
 * from the paged KV cache through the block table (no gather copy).
 *
 * Layouts (row-major):
 *   q, out       [num_seqs, Hq, D]     q_row_stride / out_row_stride elements between tokens;
 *                                      heads and dims dense
 *   kv_cache     [2, num_blocks, block_size, Hkv, D]   contiguous; index 0 = keys, 1 = values
 *   block_tables [num_seqs, bt_width]  int32, bt_row_stride elements between rows
 *   seq_lens     [num_seqs]            int32; sequence i attends to its first seq_lens[i] tokens
 *                                      (only the last sliding_window of them when that is > 0)
 * dtypes: 0 = float32, 1 = bfloat16 (uint16 bit patterns), 2 = float16; q, out and the cache
 * share one dtype.
 *
 * Work item = (sequence, kv head): its G = Hq / Hkv query heads are handled together, so each
 * K/V row is read from memory once. Two passes over the context: scores (then an exact
 * softmax in fp32), then the probability-weighted sum of the values. Parallel with OpenMP over
 * the work items.
 *
 * AVX-512 path (when the target has AVX-512 F/BW/VL):
 * - scores, 16 keys at a time: for each query head, 16 fp32 accumulators (one per key) over the
 *   head dim, then one transpose-and-add tree turns them into a vector of 16 scores (instead of
 *   16 horizontal sums). bfloat16 uses VDPBF16PS straight on the cache rows where the target has
 *   AVX512_BF16 (products exact, fp32 accumulation), else converts a 16-key tile to fp32 first.
 * - values: a tile of up to 8 heads x 32 columns of fp32 accumulators stays in registers while
 *   the value rows stream by. bfloat16 with AVX512_BF16: the probabilities are rounded to bf16
 *   (as the pure-torch reference does) and two value rows at a time go through VDPBF16PS.
 * Elsewhere: portable C that the compiler vectorizes (float16 always takes it).
 *
 * Entry points and argument structs: lms_abi.h; what paged_attention_amx.c and decode_step.c share
 * with this file: paged_attention.h. Built at first use by build.py (gcc -O3 -march=native -fopenmp).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lms_abi.h"
#include "lms_dtypes.h"
#include "paged_attention.h"
#if LMS_AVX512
#include <immintrin.h>
#endif

/* Fills S->kp/vp[0 .. n) with the key/value rows of context tokens t0 .. L-1 of sequence i,
 * kv head h (walking the block table once) and S->kp/vp[n .. count) with the zero row. */
LMS_INLINE void row_pointers(const Problem* P, int i, int h, int t0, int L, int count, const Scratch* S) {
  const int32_t* bt = P->block_tables + (int64_t)i * P->bt_row_stride;
  const int bs = P->block_size;
  const int64_t rs = (int64_t)P->Hkv * P->D * dtype_size(P->dt); /* bytes between two slots */
  const char* base = P->kv + (int64_t)h * P->D * dtype_size(P->dt);
  int j = 0;
  for (int t = t0; t < L;) {
    const int b = t / bs, off = t - b * bs;
    const int n = (bs - off) < (L - t) ? (bs - off) : (L - t);
    const char* p = base + ((int64_t)bt[b] * bs + off) * rs;
    for (int k = 0; k < n; k++, p += rs, j++) {
      S->kp[j] = p;
      S->vp[j] = p + P->plane_bytes;
    }
    t += n;
  }
  for (; j < count; j++) S->kp[j] = S->vp[j] = (const char*)S->zeros;
}

/* ---- portable path ------------------------------------------------------------------------- */

LMS_INLINE void item_portable(const Problem* P, int i, int h, const Scratch* S, const int dt) {
  const int G = P->G, D = P->D;
  const int L = P->seq_lens[i];
  const int t0 = (P->window > 0 && L > P->window) ? L - P->window : 0;
  const int n = L - t0;
  const int esz = dtype_size(dt);
  row_pointers(P, i, h, t0, L, n, S);
  const char* qrow = P->q + ((int64_t)i * P->q_row_stride + (int64_t)h * G * D) * esz;
  for (int g = 0; g < G; g++)
    for (int d = 0; d < D; d++) S->qf[g * D + d] = load1(qrow, (int64_t)g * D + d, dt) * P->scale;
  float* s = S->s;
  float* row = S->tile;
  for (int j = 0; j < n; j++) {
    for (int d = 0; d < D; d++) row[d] = load1(S->kp[j], d, dt);
    for (int g = 0; g < G; g++) {
      const float* qg = S->qf + g * D;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int d = 0; d < D; d++) acc += qg[d] * row[d];
      s[(int64_t)g * n + j] = acc;
    }
  }
  for (int g = 0; g < G; g++) {
    float* sg = s + (int64_t)g * n;
    float mx = sg[0];
    for (int j = 1; j < n; j++) mx = sg[j] > mx ? sg[j] : mx;
    float sum = 0.f;
    for (int j = 0; j < n; j++) {
      sg[j] = expf(sg[j] - mx);
      sum += sg[j];
    }
    S->l[g] = 1.f / sum;
  }
  memset(S->acc, 0, sizeof(float) * G * D);
  for (int j = 0; j < n; j++) {
    for (int d = 0; d < D; d++) row[d] = load1(S->vp[j], d, dt);
    for (int g = 0; g < G; g++) {
      const float p = s[(int64_t)g * n + j];
      float* ag = S->acc + g * D;
#pragma omp simd
      for (int d = 0; d < D; d++) ag[d] += p * row[d];
    }
  }
  char* orow = P->out + ((int64_t)i * P->out_row_stride + (int64_t)h * G * D) * esz;
  for (int g = 0; g < G; g++)
    for (int d = 0; d < D; d++) store1(orow, (int64_t)g * D + d, S->acc[g * D + d] * S->l[g], dt);
}

/* ---- AVX-512 path -------------------------------------------------------------------------- */
#if LMS_AVX512

#include "lms_simd.h"

/* Software prefetch of `count` rows of `bytes` each (the blocks of a sequence are scattered, so
 * the hardware prefetcher loses the stream at every block boundary). */
LMS_INLINE void prefetch_rows(const char* const* rows, int count, int bytes, const int hint) {
  for (int j = 0; j < count; j++)
    for (int b = 0; b < bytes; b += 64) {
      if (hint == 0) _mm_prefetch(rows[j] + b, _MM_HINT_T0);
      else _mm_prefetch(rows[j] + b, _MM_HINT_T1);
    }
}

/* Sums of 16 vectors at once: lane l of the result is the sum of a[TREE_SLOT[l]] (TREE_SLOT is
 * its own inverse, so the accumulator of key j goes to a[TREE_SLOT[j]]). 45 shuffles/adds
 * instead of 16 horizontal reductions. */
static const int TREE_SLOT[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

LMS_INLINE __m512 tree16(const __m512* a) {
  __m512 b[8], c[4], d[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; i++)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xee));
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 4], 0x88), _mm512_shuffle_f32x4(b[i], b[i + 4], 0xdd));
#pragma GCC unroll 2
  for (int i = 0; i < 2; i++) {
    const __m512d x = _mm512_castps_pd(c[i]), y = _mm512_castps_pd(c[i + 2]);
    d[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Scores of 16 keys (fp32 rows k[0..16), zero rows past the context) for each query head:
 * s[g * ns + j0 + j] = scale * (q_g . k_j) for the keys where `valid` is set. */
LMS_INLINE void scores_tile_f32(const float* const* k, const float* qf, int G, int D, int Dp, float scale,
                                float* s, int ns, int j0, __mmask16 valid) {
  const int full = D / 16;
  const __mmask16 tail = mask16(D - full * 16);
  for (int g = 0; g < G; g++) {
    const float* qg = qf + (int64_t)g * Dp;
    __m512 a[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
    for (int c = 0; c < full; c++) {
      const __m512 qc = _mm512_load_ps(qg + c * 16);
#pragma GCC unroll 16
      for (int j = 0; j < 16; j++) a[TREE_SLOT[j]] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(k[j] + c * 16), a[TREE_SLOT[j]]);
    }
    if (tail) {
      const __m512 qc = _mm512_load_ps(qg + full * 16);
#pragma GCC unroll 16
      for (int j = 0; j < 16; j++)
        a[TREE_SLOT[j]] = _mm512_fmadd_ps(qc, _mm512_maskz_loadu_ps(tail, k[j] + full * 16), a[TREE_SLOT[j]]);
    }
    _mm512_mask_storeu_ps(s + (int64_t)g * ns + j0, valid, _mm512_mul_ps(tree16(a), _mm512_set1_ps(scale)));
  }
}

#if LMS_DPBF16
LMS_INLINE __m512bh as_bh(__m512i x) { /* a bit cast (a plain vector cast goes through memory in gcc 12) */
  __m512bh y;
  memcpy(&y, &x, 64);
  return y;
}
LMS_INLINE __m512bh ld_bh(const void* p) {
  __m512bh y;
  memcpy(&y, p, 64);
  return y;
}

/* The same on bf16 rows with VDPBF16PS (32 dims per instruction); qb: [G][Dp] bf16. */
LMS_INLINE void scores_tile_bf16(const uint16_t* const* k, const uint16_t* qb, int G, int D, int Dp,
                                 float scale, float* s, int ns, int j0, __mmask16 valid) {
  const int full = D / 32;
  const int w = D - full * 32;
  const __mmask32 tail = w >= 32 ? 0xffffffffu : (__mmask32)((1ull << w) - 1);
  for (int g = 0; g < G; g++) {
    const uint16_t* qg = qb + (int64_t)g * Dp;
    __m512 a[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
    for (int c = 0; c < full; c++) {
      const __m512bh qc = ld_bh(qg + c * 32);
#pragma GCC unroll 16
      for (int j = 0; j < 16; j++)
        a[TREE_SLOT[j]] = _mm512_dpbf16_ps(a[TREE_SLOT[j]], qc, ld_bh(k[j] + c * 32));
    }
    if (w) {
      const __m512bh qc = ld_bh(qg + full * 32);
#pragma GCC unroll 16
      for (int j = 0; j < 16; j++)
        a[TREE_SLOT[j]] =
            _mm512_dpbf16_ps(a[TREE_SLOT[j]], qc, as_bh(_mm512_maskz_loadu_epi16(tail, k[j] + full * 32)));
    }
    _mm512_mask_storeu_ps(s + (int64_t)g * ns + j0, valid, _mm512_mul_ps(tree16(a), _mm512_set1_ps(scale)));
  }
}
#endif

/* Softmax of each row s[g][0 .. n): exp(s - max) written back (0 on [n, ns)), 1 / sum into
 * S->l[g]; with `to_bf16` also the bf16 copy S->pb. */
LMS_INLINE void softmax_avx512(const Scratch* S, int G, int n, int ns, const int to_bf16) {
  for (int g = 0; g < G; g++) {
    float* sg = S->s + (int64_t)g * ns;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < n; j += 16) mx = _mm512_mask_max_ps(mx, mask16(n - j), mx, _mm512_loadu_ps(sg + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < ns; j += 16) {
      const __m512 e = _mm512_maskz_mov_ps(mask16(n - j), exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + j), m)));
      _mm512_storeu_ps(sg + j, e);
      sum = _mm512_add_ps(sum, e);
      if (to_bf16) _mm256_storeu_si256((__m256i*)(S->pb + (int64_t)g * ns + j), f32x16_to_bf16(e));
    }
    S->l[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
}

/* out[g0 .. g0+NG) columns [c0, c0 + 32) = sum_j p[g][j] * v_j / sum: 2 * NG fp32 accumulators
 * stay in registers while the value rows stream by. Heads g >= G (NG is 1, 2, 4 or 8, to keep
 * the code small) read zero probabilities and are not stored. */
LMS_INLINE void pv_tile_f32(const Problem* P, const Scratch* S, int n, int ns, int g0, int c0, char* orow,
                            int pf_bytes, const int NG, const int dt) {
  const int D = P->D, G = P->G;
  const int esz = dtype_size(dt);
  const __mmask16 m0 = mask16(D - c0), m1 = mask16(D - c0 - 16);
  const float* p[8];
#pragma GCC unroll 8
  for (int g = 0; g < NG; g++) p[g] = g0 + g < G ? S->s + (int64_t)(g0 + g) * ns : S->zeros;
  __m512 a[8][2];
#pragma GCC unroll 8
  for (int g = 0; g < NG; g++) a[g][0] = a[g][1] = _mm512_setzero_ps();
  for (int j = 0; j < n; j++) {
    prefetch_rows(S->vp + j + 16, 1, pf_bytes, 0);
    const char* vp = S->vp[j] + c0 * esz;
    const __m512 v0 = ld16(vp, m0, dt), v1 = ld16(vp + 16 * esz, m1, dt);
#pragma GCC unroll 8
    for (int g = 0; g < NG; g++) {
      const __m512 pg = _mm512_set1_ps(p[g][j]);
      a[g][0] = _mm512_fmadd_ps(pg, v0, a[g][0]);
      a[g][1] = _mm512_fmadd_ps(pg, v1, a[g][1]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < NG; g++) {
    if (g0 + g >= G) break;
    const __m512 inv = _mm512_set1_ps(S->l[g0 + g]);
    char* op = orow + ((int64_t)(g0 + g) * D + c0) * esz;
    st16(op, _mm512_mul_ps(a[g][0], inv), m0, dt);
    st16(op + 16 * esz, _mm512_mul_ps(a[g][1], inv), m1, dt);
  }
}

#if LMS_DPBF16
/* The same for bf16 with VDPBF16PS: value rows j, j+1 interleaved into (v_j[c], v_j+1[c])
 * pairs, times the bf16 probability pair (p_j, p_j+1). The unpacks leave the columns of `lo` as
 * [0-3, 8-11, 16-19, 24-27] and of `hi` as [4-7, 12-15, 20-23, 28-31]; two permutes restore them. */
LMS_INLINE void pv_tile_bf16(const Problem* P, const Scratch* S, int n, int ns, int g0, int c0, char* orow,
                             int pf_bytes, const int NG) {
  const int D = P->D, G = P->G;
  const int w = D - c0;
  const __mmask32 mrow = w >= 32 ? 0xffffffffu : (__mmask32)((1ull << w) - 1);
  const __mmask16 m0 = mask16(D - c0), m1 = mask16(D - c0 - 16);
  const uint32_t* p[8];
#pragma GCC unroll 8
  for (int g = 0; g < NG; g++)
    p[g] = (const uint32_t*)(g0 + g < G ? S->pb + (int64_t)(g0 + g) * ns : (const uint16_t*)S->zeros);
  __m512 lo[8], hi[8];
#pragma GCC unroll 8
  for (int g = 0; g < NG; g++) lo[g] = hi[g] = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 2) { /* vp[n] is the zero row and p[g][n] == 0 when n is odd */
    prefetch_rows(S->vp + j + 16, 2, pf_bytes, 0);
    const __m512i r0 = _mm512_maskz_loadu_epi16(mrow, S->vp[j] + c0 * 2);
    const __m512i r1 = _mm512_maskz_loadu_epi16(mrow, S->vp[j + 1] + c0 * 2);
    const __m512bh x = as_bh(_mm512_unpacklo_epi16(r0, r1)), y = as_bh(_mm512_unpackhi_epi16(r0, r1));
#pragma GCC unroll 8
    for (int g = 0; g < NG; g++) {
      const __m512bh pg = as_bh(_mm512_set1_epi32((int)p[g][j / 2]));
      lo[g] = _mm512_dpbf16_ps(lo[g], x, pg);
      hi[g] = _mm512_dpbf16_ps(hi[g], y, pg);
    }
  }
  const __m512i ia = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i ib = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 8
  for (int g = 0; g < NG; g++) {
    if (g0 + g >= G) break;
    const __m512 inv = _mm512_set1_ps(S->l[g0 + g]);
    char* op = orow + ((int64_t)(g0 + g) * D + c0) * 2;
    st16(op, _mm512_mul_ps(_mm512_permutex2var_ps(lo[g], ia, hi[g]), inv), m0, DT_BF16);
    st16(op + 32, _mm512_mul_ps(_mm512_permutex2var_ps(lo[g], ib, hi[g]), inv), m1, DT_BF16);
  }
}
#endif

LMS_INLINE void item_avx512(const Problem* P, int i, int h, const Scratch* S, const int dt) {
  const int G = P->G, D = P->D, Dp = (D + 31) / 32 * 32;
  const int L = P->seq_lens[i];
  const int t0 = (P->window > 0 && L > P->window) ? L - P->window : 0;
  const int n = L - t0, ns = (n + 15) / 16 * 16;
  const int esz = dtype_size(dt);
  const int dp = dt == DT_BF16 && LMS_DPBF16; /* the VDPBF16PS passes */
  row_pointers(P, i, h, t0, L, ns + 16, S);
  /* the queries, zero-padded to Dp: bf16 as they are for VDPBF16PS, else fp32 */
  const char* qrow = P->q + ((int64_t)i * P->q_row_stride + (int64_t)h * G * D) * esz;
  for (int g = 0; g < G; g++)
    for (int c = 0; c < Dp; c += 16) {
      const __mmask16 m = mask16(D - c);
      if (dp) _mm256_store_si256((__m256i*)((uint16_t*)S->qf + g * Dp + c), _mm256_maskz_loadu_epi16(m, qrow + ((int64_t)g * D + c) * 2));
      else _mm512_store_ps(S->qf + g * Dp + c, ld16(qrow + ((int64_t)g * D + c) * esz, m, dt));
    }
  const int row_bytes = D * esz;
  /* values: prefetched (to L2) during the scores pass when they fit, else a few rows ahead */
  const int pv_early = (int64_t)n * row_bytes <= 256 * 1024;
  for (int j0 = 0; j0 < n; j0 += 16) {
    const __mmask16 valid = mask16(n - j0);
    if (j0 + 16 < n) prefetch_rows(S->kp + j0 + 16, 16, row_bytes, 0); /* the next tile's keys */
    if (pv_early) prefetch_rows(S->vp + j0, 16, row_bytes, 1);        /* this tile's values */
#if LMS_DPBF16
    if (dp) {
      scores_tile_bf16((const uint16_t* const*)(S->kp + j0), (const uint16_t*)S->qf, G, D, Dp, P->scale, S->s,
                       ns, j0, valid);
      continue;
    }
#endif
    if (dt == DT_F32) {
      scores_tile_f32((const float* const*)(S->kp + j0), S->qf, G, D, Dp, P->scale, S->s, ns, j0, valid);
    } else { /* convert the tile to fp32 first */
      const float* rows[16];
      for (int j = 0; j < 16; j++) {
        float* r = S->tile + j * Dp;
        for (int c = 0; c < D; c += 16) _mm512_storeu_ps(r + c, ld16(S->kp[j0 + j] + c * esz, mask16(D - c), dt));
        rows[j] = r;
      }
      scores_tile_f32(rows, S->qf, G, D, Dp, P->scale, S->s, ns, j0, valid);
    }
  }
  softmax_avx512(S, G, n, ns, dp);
  char* orow = P->out + ((int64_t)i * P->out_row_stride + (int64_t)h * G * D) * esz;
  for (int g0 = 0; g0 < G; g0 += 8) {
    const int ng = G - g0 < 8 ? G - g0 : 8;
    const int NG = ng > 4 ? 8 : ng > 2 ? 4 : ng;
    for (int c0 = 0; c0 < D; c0 += 32) {
      const int pf = !pv_early && g0 == 0 && c0 == 0 ? row_bytes : 0; /* whole rows, on the first pass */
#if LMS_DPBF16
      if (dp) {
        if (NG == 8) pv_tile_bf16(P, S, n, ns, g0, c0, orow, pf, 8);
        else if (NG == 4) pv_tile_bf16(P, S, n, ns, g0, c0, orow, pf, 4);
        else if (NG == 2) pv_tile_bf16(P, S, n, ns, g0, c0, orow, pf, 2);
        else pv_tile_bf16(P, S, n, ns, g0, c0, orow, pf, 1);
        continue;
      }
#endif
      if (NG == 8) pv_tile_f32(P, S, n, ns, g0, c0, orow, pf, 8, dt);
      else if (NG == 4) pv_tile_f32(P, S, n, ns, g0, c0, orow, pf, 4, dt);
      else if (NG == 2) pv_tile_f32(P, S, n, ns, g0, c0, orow, pf, 2, dt);
      else pv_tile_f32(P, S, n, ns, g0, c0, orow, pf, 1, dt);
    }
  }
}
#endif /* LMS_AVX512 */

/* ---- dispatch ------------------------------------------------------------------------------ */

static void item_portable_f16(const Problem* P, int i, int h, const Scratch* S) { item_portable(P, i, h, S, DT_F16); }
#if LMS_AVX512
static void item_f32(const Problem* P, int i, int h, const Scratch* S) { item_avx512(P, i, h, S, DT_F32); }
static void item_bf16(const Problem* P, int i, int h, const Scratch* S) { item_avx512(P, i, h, S, DT_BF16); }
#else
static void item_f32(const Problem* P, int i, int h, const Scratch* S) { item_portable(P, i, h, S, DT_F32); }
static void item_bf16(const Problem* P, int i, int h, const Scratch* S) { item_portable(P, i, h, S, DT_BF16); }
#endif

/* The item function of a decode call: the AMX path where it takes the call and a sequence's G
 * query heads fill at least ATTN_AMX_MIN_DECODE_HEADS of a 16-row tile (fewer waste most of the
 * tile and lose to AVX-512: benchmarks/README.md, "Kernel measurements"), else AVX-512 / portable C.
 * Either path gives the result its contract states; the choice only moves the speed. */
#define ATTN_AMX_MIN_DECODE_HEADS 6
item_fn pick_item(int dt, int head_dim, int block_size, int window, int G) {
#if LMS_ATTN_AMX
  if (G >= ATTN_AMX_MIN_DECODE_HEADS && attn_amx_takes(dt, head_dim, block_size, window)) return item_amx;
#else
  (void)head_dim, (void)block_size, (void)window, (void)G;
#endif
  return dt == DT_F32 ? item_f32 : dt == DT_BF16 ? item_bf16 : item_portable_f16;
}

/* A thread done with fn's items gives the AMX tile state back, if fn is the AMX path's. */
LMS_INLINE void release_tiles(item_fn fn) {
#if LMS_ATTN_AMX
  if (fn == item_amx) _tile_release();
#else
  (void)fn;
#endif
}

/* Whether fn is the AMX path's (which sets its own tile shape). */
int uses_tiles(item_fn fn) {
#if LMS_ATTN_AMX
  return fn == item_amx;
#else
  (void)fn;
  return 0;
#endif
}

/* Which path this build runs: 0 = portable C, 1 = AVX-512, 2 = AVX-512 with AVX512_BF16. */
int32_t lms_kernel_info(void) { return LMS_AVX512 + LMS_DPBF16; }

/* 1 if bf16 calls with head dim % 64 == 0, block size % 16 == 0 and no window run on AMX tiles
 * here (built with AMX-BF16 and the tile state granted), else 0. */
int32_t lms_attention_amx_info(void) {
#if LMS_ATTN_AMX
  return attn_amx_takes(DT_BF16, 64, 16, 0);
#else
  return 0;
#endif
}

/* 1 if dtype code `dt` is supported by this build. */
int32_t lms_supports_dtype(int32_t dt) { return dt == DT_F32 || dt == DT_BF16 || (dt == DT_F16 && LMS_HAS_F16); }

static size_t round64(size_t x) { return (x + 63) / 64 * 64; }

/* Byte sizes of one thread's Scratch (paged_attention.h). */
ScratchSizes scratch_sizes(int max_len, int G, int head_dim, int amx) {
  const size_t ns = (size_t)(max_len + 15) / 16 * 16 + 16, Dp = (size_t)(head_dim + 31) / 32 * 32;
  ScratchSizes z = {round64(sizeof(char*) * (ns + 16)), round64(sizeof(float) * G * ns),
                    round64(sizeof(uint16_t) * G * ns), round64(sizeof(float) * G * Dp),
                    round64(sizeof(float) * 16 * Dp), round64(sizeof(float) * G * head_dim),
                    round64(sizeof(float) * G), round64(sizeof(float) * (Dp > ns ? Dp : ns)), 0, 0, 0, 0, 0, 0};
  if (LMS_ATTN_AMX && amx) {
    const size_t n32 = (ns + 31) / 32 * 32, d64 = (size_t)(head_dim + 63) / 64 * 64;
    z.st = n32 * 64, z.vt = n32 / 32 * (d64 / 16) * 1024, z.qt = d64 / 32 * 1024, z.pt = n32 / 32 * 1024;
    z.ot = 4096;
  }
  z.total = 2 * z.kp + z.s + z.pb + z.qf + z.tile + z.acc + z.l + z.zeros + z.st + z.vt + z.qt + z.pt + z.ot;
  return z;
}

/* One thread's scratch: the buffer to free (NULL when out of memory), S pointing into it. */
char* scratch_alloc(const ScratchSizes* z, Scratch* S) {
  char* buf = (char*)aligned_alloc(64, z->total);
  if (!buf) return NULL;
  char* p = buf;
  S->kp = (const char**)p, p += z->kp;
  S->vp = (const char**)p, p += z->kp;
  S->s = (float*)p, p += z->s;
  S->pb = (uint16_t*)p, p += z->pb;
  S->qf = (float*)p, p += z->qf;
  S->tile = (float*)p, p += z->tile;
  S->acc = (float*)p, p += z->acc;
  S->l = (float*)p, p += z->l;
  S->zeros = (float*)p, p += z->zeros;
  S->st = (float*)p, p += z->st;
  S->vt = (uint16_t*)p, p += z->vt;
  S->qt = (uint16_t*)p, p += z->qt;
  S->pt = (uint16_t*)p, p += z->pt;
  S->ot = (float*)p;
  memset(S->zeros, 0, z->zeros);
  return buf;
}

/* Threads for a call of `work` multiply-adds in `items` work items: another thread pays for
 * itself past ~160k multiply-adds (waking it costs a few us). */
static int64_t threads_for(int64_t work, int num_threads, int64_t items) {
  int64_t nt = 1 + work / 160000;
  if (nt > num_threads) nt = num_threads;
  if (nt > items) nt = items;
  return nt < 1 ? 1 : nt;
}

/* Decode attention of num_seqs single-token queries; see the header comment for layouts.
 * Returns 0, or a negative LMS_ERR_* code (argument errors leave `out` untouched). */
int32_t lms_paged_decode(const LmsPagedDecodeArgs* a) {
  const void *q = a->q, *kv_cache = a->kv_cache;
  const int32_t *block_tables = a->block_tables, *seq_lens = a->seq_lens;
  void* out = a->out;
  const int64_t q_row_stride = a->q_row_stride, num_blocks = a->num_blocks, bt_row_stride = a->bt_row_stride,
                bt_width = a->bt_width, out_row_stride = a->out_row_stride;
  const int q_dtype = a->dtype, kv_dtype = a->kv_dtype, block_size = a->block_size, num_seqs = a->num_seqs,
            num_heads = a->num_heads, num_kv_heads = a->num_kv_heads, head_dim = a->head_dim,
            sliding_window = a->sliding_window, num_threads = a->num_threads;
  const float scale = a->scale;
  if (!lms_supports_dtype(q_dtype) || kv_dtype != q_dtype || num_seqs < 0 || num_heads <= 0 ||
      num_kv_heads <= 0 || num_heads % num_kv_heads || head_dim <= 0 || block_size <= 0)
    return LMS_ERR_ARGS;
  item_fn fn = pick_item(q_dtype, head_dim, block_size, sliding_window, num_heads / num_kv_heads);
  int max_len = 0;
  int64_t work = 0; /* multiply-adds of the scores pass */
  for (int i = 0; i < num_seqs; i++) {
    const int L = seq_lens[i];
    if (L < 1 || (int64_t)L > bt_width * block_size) return LMS_ERR_SEQ_LEN;
    const int t0 = (sliding_window > 0 && L > sliding_window) ? L - sliding_window : 0;
    const int32_t* bt = block_tables + (int64_t)i * bt_row_stride;
    for (int b = t0 / block_size; b <= (L - 1) / block_size; b++)
      if (bt[b] < 0 || bt[b] >= num_blocks) return LMS_ERR_BLOCK_ID;
    if (L - t0 > max_len) max_len = L - t0;
    work += (int64_t)(L - t0) * num_heads * head_dim;
  }
  if (num_seqs == 0) return LMS_OK;

  const int G = num_heads / num_kv_heads;
  const int esz = dtype_size(q_dtype);
  Problem P = {(const char*)q, q_row_stride, (const char*)kv_cache,
               num_blocks * block_size * num_kv_heads * (int64_t)head_dim * esz, block_size, block_tables,
               bt_row_stride, seq_lens, (char*)out, out_row_stride, num_kv_heads, head_dim, G, q_dtype,
               scale, sliding_window, NULL};
  const ScratchSizes sizes = scratch_sizes(max_len, G, head_dim, uses_tiles(fn));
  const int64_t nt = threads_for(work, num_threads, (int64_t)num_seqs * num_kv_heads);
  const int hpi = heads_per_item(num_seqs, num_kv_heads, (int)nt), items = num_seqs * num_kv_heads / hpi;
  int err = 0;

#pragma omp parallel num_threads((int)nt)
  {
    Scratch S;
    char* buf = scratch_alloc(&sizes, &S);
    if (!buf) {
#pragma omp atomic write
      err = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int w = 0; w < items; w++)
      if (buf) run_item(fn, &P, w, hpi, &S);
    release_tiles(fn);
    free(buf);
  }
  return err ? LMS_ERR_NOMEM : LMS_OK;
}

#if LMS_ATTN_AMX
#define ATTN_TILES_PER_ITEM 4 /* row tiles per work item of a chunk: its value tiles are built once */
#endif

/* Attention of num_seqs query chunks, on the AMX path only: sequence i's queries are rows
 * query_start_loc[i] .. query_start_loc[i + 1] of q / out, the last of its seq_lens[i] tokens
 * (query r of a chunk of qlen sees the first seq_lens[i] - qlen + r + 1; a decode is a chunk of
 * one); their keys / values already in the cache. Layouts as lms_paged_decode's; bf16 only, no
 * sliding window. Returns 0; LMS_ERR_ARGS when the AMX path does not take the call (nothing
 * written: lms_attention_amx_info, head dim % 64, block size % 16); other LMS_ERR_* as decode's. */
int32_t lms_paged_attention(const LmsPagedChunksArgs* a) {
#if LMS_ATTN_AMX
  const void *q = a->q, *kv_cache = a->kv_cache;
  const int32_t *block_tables = a->block_tables, *query_start_loc = a->query_start_loc, *seq_lens = a->seq_lens;
  void* out = a->out;
  const int64_t q_row_stride = a->q_row_stride, num_blocks = a->num_blocks, bt_row_stride = a->bt_row_stride,
                bt_width = a->bt_width, out_row_stride = a->out_row_stride;
  const int block_size = a->block_size, num_seqs = a->num_seqs, num_heads = a->num_heads,
            num_kv_heads = a->num_kv_heads, head_dim = a->head_dim, num_threads = a->num_threads;
  const float scale = a->scale;
  if (num_seqs < 0 || num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads || head_dim <= 0 ||
      block_size <= 0 || !attn_amx_takes(DT_BF16, head_dim, block_size, 0))
    return LMS_ERR_ARGS;
  const int G = num_heads / num_kv_heads;
  int max_len = 0;
  int64_t work = 0, items = 0;
  for (int i = 0; i < num_seqs; i++) {
    const int L = seq_lens[i], qlen = query_start_loc[i + 1] - query_start_loc[i];
    if (qlen < 0 || L < qlen || L < 1 || (int64_t)L > bt_width * block_size) return LMS_ERR_SEQ_LEN;
    const int32_t* bt = block_tables + (int64_t)i * bt_row_stride;
    for (int b = 0; b <= (L - 1) / block_size; b++)
      if (bt[b] < 0 || bt[b] >= num_blocks) return LMS_ERR_BLOCK_ID;
    if (L > max_len) max_len = L;
    const int tiles = (qlen * G + ATTN_AMX_ROWS - 1) / ATTN_AMX_ROWS;
    items += (int64_t)num_kv_heads * ((tiles + ATTN_TILES_PER_ITEM - 1) / ATTN_TILES_PER_ITEM);
    work += (int64_t)L * qlen * num_heads * head_dim;
  }
  if (items == 0) return LMS_OK;
  int32_t* list = (int32_t*)malloc(sizeof(int32_t) * 4 * (size_t)items); /* (i, h, t0, t1) */
  if (!list) return LMS_ERR_NOMEM;
  int64_t n = 0;
  for (int i = 0; i < num_seqs; i++) {
    const int qlen = query_start_loc[i + 1] - query_start_loc[i];
    const int tiles = (qlen * G + ATTN_AMX_ROWS - 1) / ATTN_AMX_ROWS;
    for (int t0 = 0; t0 < tiles; t0 += ATTN_TILES_PER_ITEM)
      for (int h = 0; h < num_kv_heads; h++, n++) {
        list[4 * n] = i, list[4 * n + 1] = h, list[4 * n + 2] = t0;
        list[4 * n + 3] = t0 + ATTN_TILES_PER_ITEM < tiles ? t0 + ATTN_TILES_PER_ITEM : tiles;
      }
  }
  Problem P = {(const char*)q, q_row_stride, (const char*)kv_cache,
               num_blocks * block_size * num_kv_heads * (int64_t)head_dim * 2, block_size, block_tables,
               bt_row_stride, seq_lens, (char*)out, out_row_stride, num_kv_heads, head_dim, G, DT_BF16,
               scale, 0, query_start_loc};
  const ScratchSizes sizes = scratch_sizes(max_len, G, head_dim, 1);
  const int64_t nt = threads_for(work, num_threads, items);
  int err = 0;
#pragma omp parallel num_threads((int)nt)
  {
    Scratch S;
    char* buf = scratch_alloc(&sizes, &S);
    if (!buf) {
#pragma omp atomic write
      err = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < items; w++)
      if (buf) attn_amx_item(&P, list[4 * w], list[4 * w + 1], list[4 * w + 2], list[4 * w + 3], &S);
    _tile_release();
    free(buf);
  }
  free(list);
  return err ? LMS_ERR_NOMEM : LMS_OK;
#else
  (void)a;
  return LMS_ERR_ARGS;
#endif
}

/* Stores the new keys/values: token t's rows k[t], v[t] ([Hkv, D] each, dense; k_row_stride /
 * v_row_stride elements between tokens) go to slot slots[t] of kv_cache ([2, num_slots, Hkv, D]
 * viewed flat); slots < 0 are skipped. Returns 0, or LMS_ERR_ARGS (nothing written) when a slot
 * is >= num_slots. */
int32_t lms_write_kv(const LmsWriteKvArgs* a) {
  const void *k = a->k, *v = a->v;
  void* kv_cache = a->kv_cache;
  const int64_t* slots = a->slots;
  const int64_t k_row_stride = a->k_row_stride, v_row_stride = a->v_row_stride, num_slots = a->num_slots,
                num_tokens = a->num_tokens, row_elems = a->row_elems;
  const int dtype = a->dtype;
  if (!lms_supports_dtype(dtype)) return LMS_ERR_ARGS;
  for (int64_t t = 0; t < num_tokens; t++)
    if (slots[t] >= num_slots) return LMS_ERR_ARGS;
  const int64_t esz = dtype_size(dtype), row = row_elems * esz;
  char* kc = (char*)kv_cache;
  char* vc = kc + num_slots * row;
  for (int64_t t = 0; t < num_tokens; t++) {
    if (slots[t] < 0) continue;
    memcpy(kc + slots[t] * row, (const char*)k + t * k_row_stride * esz, (size_t)row);
    memcpy(vc + slots[t] * row, (const char*)v + t * v_row_stride * esz, (size_t)row);
  }
  return LMS_OK;
}

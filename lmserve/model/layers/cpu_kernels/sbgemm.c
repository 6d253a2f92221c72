/* bf16 GEMM against a prepacked weight, fp32 accumulation: out[M, N] = bf16(x[M, K] @ W[N, K]^T + bias).
 *
 * Why: oneDNN's bf16 matmul falls well short of the AVX512-BF16 peak at the 16-64 rows of a decode
 * step (benchmarks/README.md, "Kernel measurements"); a decode-heavy batch spends most of its step in
 * those skinny matmuls. This kernel is the classic register-blocked
 * micro-kernel on VDPBF16PS: a 6 x 64 block of the output in 24 zmm accumulators, the weight packed
 * once into 64-column panels in the instruction's pair layout, each panel read from DRAM once per
 * call and then from L2 for the other row tiles (the next panel prefetched meanwhile). The work is
 * cut into items (sbgemm_items) so that a caller already inside a parallel region (the native
 * decode step, once it takes bf16 weights) can run its share of the same computation.
 *
 * Layout: K is even; panel p holds columns [64 p, 64 p + 64) of W^T as K / 2 groups of 64 pairs
 * (zero-padded past N): packed[((p * K/2 + kp) * 64 + j) * 2 + e] = W[64 p + j, 2 kp + e].
 * Invariants: each output element is one fixed-order fp32 sum over the K / 2 pairs (VDPBF16PS adds
 * both products of a pair into the accumulator), plus the bias, rounded once to bf16 (round to
 * nearest even), as oneDNN's bf16 linear rounds; so a row's result does not depend on M, on the
 * other rows or on the thread count (batch invariant). Threads split the panels, and the row tiles
 * too when there are fewer panels than threads.
 * Without AVX512-BF16 the library builds but lms_sbgemm_info() returns 0 and the caller keeps oneDNN.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lms_abi.h"
#include "lms_dtypes.h"
#include "sbgemm.h"

int32_t lms_sbgemm_info(void) { return LMS_SBGEMM; }

/* w [N, K] bf16 (K even) -> packed, ceil(N / 64) * K * 64 bf16 (layout above) */
void sb_pack(const uint16_t *w, uint16_t *packed, int64_t N, int64_t K, int num_threads) {
  const int64_t np = (N + SB_NR - 1) / SB_NR, K2 = K / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t p = 0; p < np; p++) {
    uint16_t *dst = packed + p * K * SB_NR;
    for (int j = 0; j < SB_NR; j++) {
      const int64_t n = p * SB_NR + j;
      for (int64_t kp = 0; kp < K2; kp++)
        for (int e = 0; e < 2; e++) dst[(kp * SB_NR + j) * 2 + e] = n < N ? w[n * K + 2 * kp + e] : 0;
    }
  }
}

void lms_sbgemm_pack(const LmsPackArgs *a) {
  sb_pack((const uint16_t *)a->weight, (uint16_t *)a->packed, a->n, a->k, a->num_threads);
}

/* Ranges for a parallel region of up to `threads` threads, zeroed (sbgemm_share steals without
 * them, so NULL on failure is fine); free() them. */
SbRange *sb_ranges(int threads) {
  SbRange *r = threads > 0 ? (SbRange *)aligned_alloc(64, sizeof(SbRange) * (size_t)threads) : NULL;
  if (r) memset(r, 0, sizeof(SbRange) * (size_t)threads);
  return r;
}

#if LMS_SBGEMM
#include <immintrin.h>

#include "lms_simd.h"

/* R rows (1..6, a compile-time constant after inlining) of x, row r at a[r], times one panel; ncols
 * of its 64 columns are stored at c[r] (add: added to the bf16 values there, in fp32, rounded once).
 * pf_lines cache lines from prefetch (a share of the next panel) are pulled toward L2 meanwhile, one
 * per k-pair step. */
LMS_INLINE void sb_tile(const int R, const uint16_t *const *a, const uint16_t *bp, int64_t K2, uint16_t *const *c,
                        int add, int ncols, const uint16_t *bias, const char *prefetch, int64_t pf_lines) {
  __m512 acc[SB_MR][4];
#pragma GCC unroll 6
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; kp++) {
    const uint16_t *b = bp + kp * 2 * SB_NR;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 32);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 64), b3 = (__m512bh)_mm512_loadu_si512(b + 96);
    if (kp < pf_lines) _mm_prefetch((const char *)prefetch + 64 * kp, _MM_HINT_T1);
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
      int32_t pair;
      memcpy(&pair, a[r] + 2 * kp, 4);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], x, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], x, b3);
    }
  }
  __m512 bv[4];
  for (int v = 0; v < 4; v++) bv[v] = bias ? ld16(bias + 16 * v, mask16(ncols - 16 * v), DT_BF16) : _mm512_setzero_ps();
#pragma GCC unroll 6
  for (int r = 0; r < R; r++)
    for (int v = 0; v < 4; v++) {
      const __mmask16 m = mask16(ncols - 16 * v);
      if (!m) continue;
      __m512 out = _mm512_add_ps(acc[r][v], bv[v]);
      if (add) out = _mm512_add_ps(ld16(c[r] + 16 * v, m, DT_BF16), out);
      _mm256_mask_storeu_epi16(c[r] + 16 * v, m, f32x16_to_bf16(out));
    }
}

void sb_panel_rows(int mr, const uint16_t *const *a, const uint16_t *bp, int64_t K2, uint16_t *const *c, int add,
                   int ncols, const uint16_t *bias, const char *prefetch, int64_t pf_lines) {
  switch (mr) {
    case 6: sb_tile(6, a, bp, K2, c, add, ncols, bias, prefetch, pf_lines); break;
    case 5: sb_tile(5, a, bp, K2, c, add, ncols, bias, prefetch, pf_lines); break;
    case 4: sb_tile(4, a, bp, K2, c, add, ncols, bias, prefetch, pf_lines); break;
    case 3: sb_tile(3, a, bp, K2, c, add, ncols, bias, prefetch, pf_lines); break;
    case 2: sb_tile(2, a, bp, K2, c, add, ncols, bias, prefetch, pf_lines); break;
    default: sb_tile(1, a, bp, K2, c, add, ncols, bias, prefetch, pf_lines); break;
  }
}

/* mr consecutive rows of x (row stride lda) times one panel into mr consecutive rows of c (stride ldc). */
static void sb_rows_times_panel(int mr, const uint16_t *a, int64_t lda, const uint16_t *bp, int64_t K2, uint16_t *c,
                                int64_t ldc, int ncols, const uint16_t *bias, const char *prefetch, int64_t pf_lines) {
  const uint16_t *ar[SB_MR];
  uint16_t *cr[SB_MR];
  for (int r = 0; r < mr; r++) ar[r] = a + r * lda, cr[r] = c + r * ldc;
  sb_panel_rows(mr, ar, bp, K2, cr, 0, ncols, bias, prefetch, pf_lines);
}

/* The work of a call: (panel, row group) items; rows are cut into groups only when there are fewer
 * panels than threads (then a thread takes a group of tiles of a panel, not a whole panel). */
typedef struct {
  int64_t np, ntiles, groups;
} SbWork;

LMS_INLINE SbWork sb_work(int64_t M, int64_t N, int nthreads) {
  SbWork w;
  w.np = (N + SB_NR - 1) / SB_NR;
  w.ntiles = (M + SB_MR - 1) / SB_MR;
  w.groups = 1;
  if (w.np < 2 * nthreads) {
    w.groups = (2 * nthreads + w.np - 1) / w.np;
    if (w.groups > w.ntiles) w.groups = w.ntiles;
  }
  return w;
}

/* Items [i0, i1) of the call's work (sb_work): tiles of near-equal height (32 rows: 6,6,5,5,5,5), the
 * same for every item count, so the split never changes a result. */
static void sbgemm_items(const uint16_t *x, int64_t lda, const uint16_t *packed, const uint16_t *bias, uint16_t *out,
                         int64_t ldo, int64_t M, int64_t N, int64_t K, SbWork w, int64_t i0, int64_t i1) {
  const int64_t K2 = K / 2;
  for (int64_t it = i0; it < i1; it++) {
    const int64_t p = it / w.groups, g = it % w.groups;
    const uint16_t *bp = packed + p * K * SB_NR;
    const int ncols = (int)(N - p * SB_NR < SB_NR ? N - p * SB_NR : SB_NR);
    const int64_t t0 = g * w.ntiles / w.groups, t1 = (g + 1) * w.ntiles / w.groups;
    int64_t m = 0;
    for (int64_t t = 0; t < t0; t++) m += (M - m + (w.ntiles - t) - 1) / (w.ntiles - t);
    for (int64_t t = t0; t < t1; t++) {
      const int mr = (int)((M - m + (w.ntiles - t) - 1) / (w.ntiles - t));
      /* every tile pulls its share of the first half of the next panel toward L2 (lines [t per, t per +
       * per), one per K-pair step; the schedule only moves speed, never a result) */
      const int64_t lines = 2 * K2;
      const int64_t per = (lines + w.ntiles - 1) / w.ntiles, first = t * per;
      const int64_t n_pf = (w.groups == 1 && p + 1 < w.np && first < lines) ? (lines - first < per ? lines - first : per) : 0;
      const char *pf = (const char *)(bp + K * SB_NR) + 64 * first;
      sb_rows_times_panel(mr, x + m * lda, lda, bp, K2, out + m * ldo + p * SB_NR, ldo, ncols,
                          bias ? bias + p * SB_NR : 0, pf, n_pf);
      m += mr;
    }
  }
}

LMS_INLINE int sbgemm_bad_args(int64_t lda, int64_t ldo, int64_t M, int64_t N, int64_t K) {
  return M < 0 || N < 1 || K < 2 || K % 2 || lda < K || ldo < N;
}

/* Thread tid's share (of nth) of out = x W^T + bias; every thread of the region calls it with the
 * same arguments. amx: the weight is lms_sbgemm_amx_pack's, so where K % AMX_KSTEP == 0 it is in
 * the tile layout and the AMX kernel runs (amx_share); else the items of the AVX-512 work (sb_work)
 * split in nth near-equal ranges. One place decides the kernel and the split, for lms_sbgemm(_amx)
 * and for the native decode step. */
void sbgemm_share(const uint16_t *x, int64_t lda, const uint16_t *packed, const uint16_t *bias, uint16_t *out,
                         int64_t ldo, int64_t M, int64_t N, int64_t K, int amx, int tid, int nth, SbThread *st) {
#if LMS_SBGEMM_AMX
  if (amx && K % AMX_KSTEP == 0) {
    amx_share(x, lda, packed, bias, out, ldo, M, N, K, tid, nth, st);
    return;
  }
#else
  (void)amx, (void)st;
#endif
  const SbWork w = sb_work(M, N, nth);
  const int64_t items = w.np * w.groups;
  sbgemm_items(x, lda, packed, bias, out, ldo, M, N, K, w, items * tid / nth, items * (tid + 1) / nth);
}

/* lms_sbgemm and lms_sbgemm_amx: one parallel region, each thread its sbgemm_share. */
int sbgemm_run(const uint16_t *x, int64_t lda, const uint16_t *packed, const uint16_t *bias, uint16_t *out,
                      int64_t ldo, int64_t M, int64_t N, int64_t K, int num_threads, int amx) {
  if (sbgemm_bad_args(lda, ldo, M, N, K)) return -1;
  if (M == 0) return 0;
  SbRange *ranges = amx ? sb_ranges(num_threads) : NULL;
#pragma omp parallel num_threads(num_threads)
  {
    SbThread st = {0, 0, ranges};
    sbgemm_share(x, lda, packed, bias, out, ldo, M, N, K, amx, omp_get_thread_num(), omp_get_num_threads(), &st);
#if LMS_SBGEMM_AMX
    if (st.amx_tiles) _tile_release();
#endif
  }
  free(ranges);
  return 0;
}

/* x [M, K] bf16 (row stride lda), packed from lms_sbgemm_pack, bias [N] bf16 or NULL, out [M, N] bf16
 * (row stride ldo). Returns 0, or -1 on bad sizes (nothing written). */
int32_t lms_sbgemm(const LmsGemmArgs *a) {
  return sbgemm_run((const uint16_t *)a->x, a->lda, (const uint16_t *)a->packed, (const uint16_t *)a->bias,
                    (uint16_t *)a->out, a->ldo, a->m, a->n, a->k, a->num_threads, 0);
}

#else
int32_t lms_sbgemm(const LmsGemmArgs *a) {
  (void)a;
  return LMS_ERR_ARGS;
}
#endif

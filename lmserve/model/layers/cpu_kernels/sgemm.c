/* fp32 GEMM for skinny activations against a prepacked weight: out[M, N] = x[M, K] @ W[N, K]^T + bias.
 *
 * Why: a decode step multiplies a few to a few dozen rows by every weight matrix, read from DRAM.
 * On an AVX2 CPU (no AVX-512) MKL's sgemm repacks the weight on each call and oneDNN's brgemm is
 * tuned for larger M; this kernel streams a weight packed once into 16-column panels and keeps a
 * 6 x 16 block of the output in 12 ymm registers (the classic AVX2 FMA micro-kernel), faster than
 * oneDNN at M = 32 and near the memory bandwidth at M = 1 on the AVX2 CPU it was tuned on
 * (benchmarks/cpu_gemm_microbench.py; figures in benchmarks/README.md, "Kernel measurements").
 *
 * Layout: panel p holds columns [16 p, 16 p + 16) of W^T as K consecutive groups of 16 floats
 * (zero-padded past N): packed[(p * K + k) * 16 + j] = W[16 p + j, k].
 * Invariants: each output element is one sequential fp32 sum over k = 0..K-1 (then + bias), so a
 * row's result does not depend on M or on the other rows (batch invariant). Threads split the
 * panels (OpenMP, the process's libgomp, which torch shares).
 * Without AVX2 + FMA the library builds but lms_sgemm_info() returns 0 and the caller keeps oneDNN.
 */
#include <stdint.h>
#include <string.h>

#include "lms_abi.h"

#define NR 16
#define MR 6

int32_t lms_sgemm_info(void) {
#if defined(__AVX2__) && defined(__FMA__)
#if defined(__AVX512F__)
  return 2; /* built, but an AVX-512 CPU: the caller prefers oneDNN's AVX-512 kernels */
#else
  return 1;
#endif
#else
  return 0;
#endif
}

void lms_sgemm_pack(const LmsPackArgs *a) {
  const float *w = (const float *)a->weight;
  float *packed = (float *)a->packed;
  const int64_t N = a->n, K = a->k;
  const int num_threads = a->num_threads;
  int64_t np = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t p = 0; p < np; p++) {
    float *dst = packed + p * K * NR;
    for (int j = 0; j < NR; j++) {
      int64_t n = p * NR + j;
      for (int64_t k = 0; k < K; k++) dst[k * NR + j] = n < N ? w[n * K + k] : 0.f;
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* R rows (1..6, a compile-time constant after inlining) of x times one panel. */
static inline __attribute__((always_inline)) void tile(const int R, const float *a, int64_t lda, const float *bp,
                                                       int64_t K, float *c, int64_t ldc, int ncols,
                                                       const float *bias, const float *prefetch) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    __m256 b0 = _mm256_loadu_ps(bp + k * NR), b1 = _mm256_loadu_ps(bp + k * NR + 8);
    if (prefetch) _mm_prefetch((const char *)(prefetch + k * NR), _MM_HINT_T1);
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
      __m256 x = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; r++) {
    float *cr = c + r * ldc;
    if (ncols == NR) {
      __m256 v0 = acc[r][0], v1 = acc[r][1];
      if (bias) { v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias)); v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias + 8)); }
      _mm256_storeu_ps(cr, v0);
      _mm256_storeu_ps(cr + 8, v1);
    } else {
      float tmp[NR];
      _mm256_storeu_ps(tmp, acc[r][0]);
      _mm256_storeu_ps(tmp + 8, acc[r][1]);
      for (int j = 0; j < ncols; j++) cr[j] = bias ? tmp[j] + bias[j] : tmp[j];
    }
  }
}

static void rows_times_panel(int mr, const float *a, int64_t lda, const float *bp, int64_t K, float *c,
                             int64_t ldc, int ncols, const float *bias, const float *prefetch) {
  switch (mr) {
    case 6: tile(6, a, lda, bp, K, c, ldc, ncols, bias, prefetch); break;
    case 5: tile(5, a, lda, bp, K, c, ldc, ncols, bias, prefetch); break;
    case 4: tile(4, a, lda, bp, K, c, ldc, ncols, bias, prefetch); break;
    case 3: tile(3, a, lda, bp, K, c, ldc, ncols, bias, prefetch); break;
    case 2: tile(2, a, lda, bp, K, c, ldc, ncols, bias, prefetch); break;
    default: tile(1, a, lda, bp, K, c, ldc, ncols, bias, prefetch); break;
  }
}

/* x [M, K] (row stride lda), packed from lms_sgemm_pack, bias [N] or NULL, out [M, N] (row stride ldo).
 * Returns 0, or -1 on bad sizes. */
int32_t lms_sgemm(const LmsGemmArgs *a) {
  const float *x = (const float *)a->x, *packed = (const float *)a->packed, *bias = (const float *)a->bias;
  float *out = (float *)a->out;
  const int64_t lda = a->lda, ldo = a->ldo, M = a->m, N = a->n, K = a->k;
  const int num_threads = a->num_threads;
  if (M < 0 || N < 1 || K < 1 || lda < K || ldo < N) return -1;
  int64_t np = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t p = 0; p < np; p++) {
    const float *bp = packed + p * K * NR;
    int ncols = (int)(N - p * NR < NR ? N - p * NR : NR);
    /* tiles of near-equal height (32 rows: 6,6,5,5,5,5, not 6,6,6,6,6,2); while the second tile
     * runs on the panel (now in cache), the next panel is prefetched from DRAM */
    int64_t ntiles = (M + MR - 1) / MR;
    int64_t m = 0;
    for (int64_t t = 0; t < ntiles; t++) {
      int mr = (int)((M - m + (ntiles - t) - 1) / (ntiles - t));
      const float *pf = (t == 1 && p + 1 < np) ? bp + K * NR : 0;
      rows_times_panel(mr, x + m * lda, lda, bp, K, out + m * ldo + p * NR, ldo, ncols, bias ? bias + p * NR : 0, pf);
      m += mr;
    }
  }
  return 0;
}
#else
int32_t lms_sgemm(const LmsGemmArgs *a) {
  (void)a;
  return LMS_ERR_ARGS;
}
#endif

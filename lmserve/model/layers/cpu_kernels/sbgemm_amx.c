/* The AMX kernel of sbgemm.c (linked with it; sbgemm.h declares what they share): lms_sbgemm's
 * contract on tile instructions
 * (TDPBF16PS) instead of VDPBF16PS, on CPUs with AMX-BF16 (Sapphire Rapids and later), for K % 32 == 0;
 * other K keep the AVX-512 micro-kernel and its layout.
 *
 * Why: on an AMX CPU oneDNN's bf16 matmul runs on AMX and the AVX-512 micro-kernel loses to it from
 * 8 rows up; a decode step's skinny matmuls are then bound by reading the weight from
 * DRAM while the tiles compute, so what counts is streaming each weight byte once, in address order,
 * with the next bytes already on their way.
 *
 * Layout (its own, lms_sbgemm_amx_pack): 32-column blocks; block b holds, per K-step s of 32, two
 * 1 KB weight tiles (columns 16 t .. 16 t + 15, t = 0, 1), each 16 K-pairs x 16 columns x 2:
 *   packed[(((b S + s) 2 + t) 16 + kp) 32 + 2 j + e] = W[32 b + 16 t + j, 32 s + 2 kp + e]  (S = K / 32,
 * zero past N). A tile load then reads 16 consecutive cache lines and a block is read front to back
 * (faster than 64-column panels in the AVX-512 pair order, whose tile loads read every fourth line:
 * benchmarks/README.md, "Kernel measurements").
 *
 * Tiles (per group of up to 32 rows: r0 = up to 16 rows, r1 = the rest): tmm0-1 / tmm2-3 the r0 / r1
 * rows x 32 fp32 outputs, tmm4 / tmm5 their 32 K-elements of x, tmm6-7 the two weight tiles, each
 * loaded once per K-step and used for both row tiles (2 x 2 blocking: one tile load per TDPBF16PS).
 * Invariants: each output element is the tiles' fixed-order fp32 sum over K, plus the bias, rounded
 * once to bf16, whatever the group's rows, M or the thread count (batch invariant, as the AVX-512
 * path; the two paths' sums differ in order, so they can differ in the last bf16 bit).
 * Linux grants a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM);
 * lms_sbgemm_amx_info() makes that request and returns 1 only when it is granted. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lms_abi.h"
#include "lms_dtypes.h"
#include "sbgemm.h"


/* w [N, K] bf16 -> the tile layout above where K % 32 == 0, else lms_sbgemm_pack's */
void lms_sbgemm_amx_pack(const LmsPackArgs *a) {
  const uint16_t *w = (const uint16_t *)a->weight;
  uint16_t *packed = (uint16_t *)a->packed;
  const int64_t N = a->n, K = a->k;
  const int num_threads = a->num_threads;
  if (K % AMX_KSTEP) {
    sb_pack(w, packed, N, K, num_threads);
    return;
  }
  const int64_t nb = (N + AMX_NB - 1) / AMX_NB, S = K / AMX_KSTEP;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t b = 0; b < nb; b++)
    for (int64_t s = 0; s < S; s++)
      for (int t = 0; t < 2; t++)
        for (int kp = 0; kp < AMX_KSTEP / 2; kp++) {
          uint16_t *dst = packed + (((b * S + s) * 2 + t) * (AMX_KSTEP / 2) + kp) * AMX_NB;
          for (int j = 0; j < 16; j++) {
            const int64_t n = b * AMX_NB + 16 * t + j, k = s * AMX_KSTEP + 2 * kp;
            dst[2 * j] = n < N ? w[n * K + k] : 0;
            dst[2 * j + 1] = n < N ? w[n * K + k + 1] : 0;
          }
        }
}

#if LMS_SBGEMM_AMX
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "lms_simd.h"

#define AMX_PF_AHEAD 4096  /* a one-group block prefetches this many bytes ahead of its reads */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} AmxTileConfig;

/* Tiles for r0 + r1 rows and kb K-elements a step (kb even, 2 .. AMX_KSTEP). */
static void amx_configure(int r0, int r1, int kb) {
  AmxTileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  const int rows[8] = {r0, r0, r1, r1, r0, r1, kb / 2, kb / 2};
  for (int t = 0; t < 8; t++) {
    cfg.rows[t] = (uint8_t)rows[t];
    /* every row 64 bytes but x's (kb bf16); r1 == 0 leaves tmm2, 3, 5 unconfigured */
    cfg.colsb[t] = rows[t] ? (t == 4 || t == 5 ? 2 * kb : 64) : 0;
  }
  _tile_loadconfig(&cfg);
}

/* The thread's tiles shaped for (r0, r1, kb), configured only when the shape changes. */
static void amx_shape(int *configured, int r0, int r1, int kb) {
  const int key = r0 * 64 + r1 + ((kb % AMX_KSTEP) << 12);
  if (*configured != key) {
    amx_configure(r0, r1, kb);
    *configured = key;
  }
}

int32_t lms_sbgemm_amx_info(void) {
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
}

/* acc [32 x 32] fp32 (row stride AMX_NB; rows r0 + r1 of it written) = r0 + r1 rows of x (r1 rows from
 * x + 16 lda) times block bp of K (K % AMX_KSTEP == 0). *configured is the thread's tile shape (r0 * 64
 * + r1; 0: none). pf_lines cache lines from pf are pulled toward L2, spread over the K-steps. */
void amx_block_acc(int *configured, int r0, int r1, const uint16_t *x, int64_t lda, const uint16_t *bp, int64_t K,
                   float *acc, const char *pf, int64_t pf_lines) {
  amx_shape(configured, r0, r1, AMX_KSTEP);
  const int64_t steps = K / AMX_KSTEP, pf_per_step = (pf_lines + steps - 1) / steps;
  const int64_t a_stride = lda * 2;
  const uint16_t *x1 = x + AMX_MR * lda;
  _tile_zero(0);
  _tile_zero(1);
  if (r1) {
    _tile_zero(2);
    _tile_zero(3);
  }
  int64_t q = 0;
  for (int64_t s = 0; s < steps; s++) {
    const uint16_t *b = bp + s * AMX_KSTEP * AMX_NB; /* two 1 KB tiles */
    for (const int64_t e = q + pf_per_step; q < e && q < pf_lines; q++) _mm_prefetch(pf + 64 * q, _MM_HINT_T1);
    _tile_loadd(4, x + s * AMX_KSTEP, a_stride);
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + 16 * AMX_NB, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (r1) {
      _tile_loadd(5, x1 + s * AMX_KSTEP, a_stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, acc, AMX_NB * 4);
  _tile_stored(1, acc + 16, AMX_NB * 4);
  if (r1) {
    _tile_stored(2, acc + AMX_MR * AMX_NB, AMX_NB * 4);
    _tile_stored(3, acc + AMX_MR * AMX_NB + 16, AMX_NB * 4);
  }
}

void amx_block_acc_short(int *configured, int r0, int r1, const uint16_t *x, int64_t lda, const uint16_t *bp, int kb,
                         float *acc) {
  amx_shape(configured, r0, r1, kb);
  _tile_zero(0);
  _tile_zero(1);
  _tile_loadd(4, x, lda * 2);
  _tile_loadd(6, bp, 64);
  _tile_loadd(7, bp + (kb / 2) * AMX_NB, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_stored(0, acc, AMX_NB * 4);
  _tile_stored(1, acc + 16, AMX_NB * 4);
  if (r1) {
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(5, x + AMX_MR * lda, lda * 2);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    _tile_stored(2, acc + AMX_MR * AMX_NB, AMX_NB * 4);
    _tile_stored(3, acc + AMX_MR * AMX_NB + 16, AMX_NB * 4);
  }
}

/* r0 + r1 rows of x (r1 rows from x + 16 lda) times block bp; ncols of its 32 columns stored to c. */
static void amx_block(int *configured, int r0, int r1, const uint16_t *x, int64_t lda, const uint16_t *bp, int64_t K,
                      void *c, int64_t ldc, int ncols, const void *bias, int out_dt, const char *pf, int64_t pf_lines) {
  float acc[AMX_GROUP * AMX_NB] __attribute__((aligned(64)));
  amx_block_acc(configured, r0, r1, x, lda, bp, K, acc, pf, pf_lines);
  __m512 bv[2];
  const int64_t esz = out_dt == DT_F32 ? 4 : 2; /* the bias has the output's dtype */
  for (int v = 0; v < 2; v++)
    bv[v] = bias ? ld16((const char *)bias + 16 * v * esz, mask16(ncols - 16 * v), out_dt) : _mm512_setzero_ps();
  for (int r = 0; r < r0 + r1; r++)
    for (int v = 0; v < 2; v++) {
      const __mmask16 m = mask16(ncols - 16 * v);
      if (m)
        st16((char *)c + (r * ldc + 16 * v) * esz, _mm512_add_ps(_mm512_load_ps(acc + r * AMX_NB + 16 * v), bv[v]), m,
             out_dt);
    }
}

/* Claims one block of a thread's range for call `gen`: the front one (its owner) or the back one (a
 * thief); -1 when none is left. The range's word packs (gen, front, back); a word of an older call
 * stands for the whole range [lo, hi), so whoever comes first in a call starts it afresh. */
static int64_t amx_claim(SbRange *r, uint64_t gen, int64_t lo, int64_t hi, int from_back) {
  const uint64_t mask = (1ull << SB_RANGE_BITS) - 1;
  uint64_t old = __atomic_load_n(&r->word, __ATOMIC_RELAXED);
  for (;;) {
    const int fresh = (old >> (2 * SB_RANGE_BITS)) != gen;
    const uint64_t f = fresh ? (uint64_t)lo : (old >> SB_RANGE_BITS) & mask, b = fresh ? (uint64_t)hi : old & mask;
    if (f >= b) return -1;
    const uint64_t nf = from_back ? f : f + 1, nb = from_back ? b - 1 : b;
    const uint64_t word = (gen << (2 * SB_RANGE_BITS)) | (nf << SB_RANGE_BITS) | nb;
    if (__atomic_compare_exchange_n(&r->word, &old, word, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return from_back ? (int64_t)b - 1 : (int64_t)f;
  }
}

/* All row groups of block b ([g0, g1) of them), each group prefetching its share of the pf_bytes
 * from pf (clipped at pf_end). */
static void amx_block_rows(int *configured, const uint16_t *x, int64_t lda, const uint16_t *packed, const void *bias,
                           void *out, int64_t ldo, int64_t M, int64_t N, int64_t K, int64_t b, int64_t g0, int64_t g1,
                           int out_dt, const char *pf, const char *pf_end) {
  const int64_t esz = out_dt == DT_F32 ? 4 : 2;
  const int64_t G = (M + AMX_GROUP - 1) / AMX_GROUP, block_elems = K * AMX_NB, block_lines = block_elems * 2 / 64;
  const uint16_t *bp = packed + b * block_elems;
  const int ncols = (int)(N - b * AMX_NB < AMX_NB ? N - b * AMX_NB : AMX_NB);
  for (int64_t g = g0; g < g1; g++) {
    const int64_t m = g * AMX_GROUP, rows = M - m < AMX_GROUP ? M - m : AMX_GROUP;
    const int r0 = (int)(rows < AMX_MR ? rows : AMX_MR), r1 = (int)(rows - r0);
    const char *p = pf ? pf + 64 * (g * block_lines / G) : 0;
    int64_t n_pf = (g + 1) * block_lines / G - g * block_lines / G;
    if (!p || p >= pf_end) n_pf = 0;
    else if (p + 64 * n_pf > pf_end) n_pf = (pf_end - p) / 64;
    amx_block(configured, r0, r1, x + m * lda, lda, bp, K, (char *)out + (m * ldo + b * AMX_NB) * esz, ldo, ncols,
              bias ? (const char *)bias + b * AMX_NB * esz : 0, out_dt, p, n_pf);
  }
}

/* Thread tid's share (of nth) of the call on the tile layout. With at least 2 blocks per thread,
 * thread t owns the blocks [nb t / nth, nb (t + 1) / nth) and takes them front to back, all row
 * groups of a block at once, so it reads one stream; a block prefetches the bytes ahead of it
 * (AMX_PF_AHEAD past its start with one row group, the next block with several, which then re-read
 * the block from L2), never past the range. A thread done with its range takes blocks from the back
 * of the others' (st->ranges, when given): a core slowed by a noisy neighbour or the hypervisor
 * would otherwise hold the other at the barrier after the call (benchmarks/README.md, "Kernel
 * measurements"). With fewer blocks, (block,
 * row-group range) items are split statically. Which thread computes a block never changes it. */
static void amx_share_dt(const uint16_t *x, int64_t lda, const uint16_t *packed, const void *bias, void *out,
                         int64_t ldo, int64_t M, int64_t N, int64_t K, int out_dt, int tid, int nth, SbThread *st) {
  const int64_t nb = (N + AMX_NB - 1) / AMX_NB, G = (M + AMX_GROUP - 1) / AMX_GROUP;
  const int64_t block_bytes = K * AMX_NB * 2, ahead = G == 1 ? AMX_PF_AHEAD : block_bytes;
  const uint64_t gen = ++st->calls & ((1ull << (64 - 2 * SB_RANGE_BITS)) - 1);
  if (nb < 2 * nth) {
    const int64_t split = (2 * nth + nb - 1) / nb < G ? (2 * nth + nb - 1) / nb : G;
    const int64_t items = nb * split;
    for (int64_t it = items * tid / nth; it < items * (tid + 1) / nth; it++) {
      const int64_t part = it % split;
      amx_block_rows(&st->amx_tiles, x, lda, packed, bias, out, ldo, M, N, K, it / split, part * G / split,
                     (part + 1) * G / split, out_dt, 0, 0);
    }
    return;
  }
  const int steal = st->ranges && nb < (1ll << SB_RANGE_BITS);
  const int64_t lo = nb * tid / nth, hi = nb * (tid + 1) / nth;
  const char *base = (const char *)packed, *end = base + hi * block_bytes;
  for (int64_t b = lo;; b++) {
    if (steal) b = amx_claim(&st->ranges[tid], gen, lo, hi, 0);
    if (b < 0 || b >= hi) break;
    amx_block_rows(&st->amx_tiles, x, lda, packed, bias, out, ldo, M, N, K, b, 0, G, out_dt, base + b * block_bytes + ahead,
                   end);
  }
  for (int d = 1; steal && d < nth; d++) {
    const int v = (tid + d) % nth;
    const int64_t vlo = nb * v / nth, vhi = nb * (v + 1) / nth;
    for (int64_t b; (b = amx_claim(&st->ranges[v], gen, vlo, vhi, 1)) >= 0;) /* prefetch the block it takes next */
      amx_block_rows(&st->amx_tiles, x, lda, packed, bias, out, ldo, M, N, K, b, 0, G, out_dt,
                     b > vlo ? base + (b - 1) * block_bytes : 0, base + b * block_bytes);
  }
}

void amx_share(const uint16_t *x, int64_t lda, const uint16_t *packed, const uint16_t *bias, uint16_t *out,
               int64_t ldo, int64_t M, int64_t N, int64_t K, int tid, int nth, SbThread *st) {
  amx_share_dt(x, lda, packed, bias, out, ldo, M, N, K, DT_BF16, tid, nth, st);
}

/* x [M, K] fp32 (row stride lda) -> a [M, 3K] bf16 (contiguous) = [hi | hi | lo], hi = bf16(x),
 * lo = bf16(x - hi): rows of bf16x3's left operand. */
static void split_rows(const float *x, int64_t lda, uint16_t *a, int64_t M, int64_t K, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t m = 0; m < M; m++) {
    const float *xr = x + m * lda;
    uint16_t *ar = a + m * 3 * K;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 msk = mask16((int)(K - k < 16 ? K - k : 16));
      const __m512 v = _mm512_maskz_loadu_ps(msk, xr + k);
      const __m256i hi = f32x16_to_bf16(v);
      const __m512 hv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      const __m256i lo = f32x16_to_bf16(_mm512_sub_ps(v, hv));
      _mm256_mask_storeu_epi16(ar + k, msk, hi);
      _mm256_mask_storeu_epi16(ar + K + k, msk, hi);
      _mm256_mask_storeu_epi16(ar + 2 * K + k, msk, lo);
    }
  }
}

/* fp32 out [M, N] (row stride ldo) = fp32 x [M, K] (row stride lda) @ W^T + fp32 bias [N] (or NULL),
 * as bf16x3: the sum of three bf16 products hi(x) hi(W) + hi(x) lo(W) + lo(x) hi(W) accumulated in
 * fp32 on AMX tiles, where packed is lms_sbgemm_amx_pack of the bf16 [N, 3K] = [hi(W) | lo(W) | hi(W)]
 * (lo(v) = bf16(v - hi(v))). The dropped term lo(x) lo(W) and the split leave a relative error of
 * about 2^-16 per product (fp32's own rounding is 2^-24), independent of the batch and the threads.
 * K % 32 == 0, else LMS_ERR_ARGS; LMS_ERR_NOMEM when the [M, 3K] bf16 operand cannot be allocated. */
int32_t lms_sbgemm_amx_x3(const LmsGemmArgs *a) {
  const int64_t M = a->m, N = a->n, K = a->k;
  if (M < 0 || N <= 0 || K <= 0 || K % AMX_KSTEP || a->lda < K || a->ldo < N || a->num_threads < 1) return LMS_ERR_ARGS;
  if (M == 0) return LMS_OK;
  uint16_t *x3 = aligned_alloc(64, ((M * 3 * K * 2 + 63) / 64) * 64);
  if (!x3) return LMS_ERR_NOMEM;
  split_rows((const float *)a->x, a->lda, x3, M, K, a->num_threads);
  SbRange *ranges = sb_ranges(a->num_threads);
#pragma omp parallel num_threads(a->num_threads)
  {
    SbThread st = {0, 0, ranges};
    amx_share_dt(x3, 3 * K, (const uint16_t *)a->packed, a->bias, a->out, a->ldo, M, N, 3 * K, DT_F32,
                 omp_get_thread_num(), omp_get_num_threads(), &st);
    if (st.amx_tiles) _tile_release();
  }
  free(ranges);
  free(x3);
  return LMS_OK;
}

/* lms_sbgemm's contract, on AMX tiles where K % 32 == 0 (else the AVX-512 micro-kernel). Call only
 * after lms_sbgemm_amx_info() returned 1 in this process. */
int32_t lms_sbgemm_amx(const LmsGemmArgs *a) {
  return sbgemm_run((const uint16_t *)a->x, a->lda, (const uint16_t *)a->packed, (const uint16_t *)a->bias,
                    (uint16_t *)a->out, a->ldo, a->m, a->n, a->k, a->num_threads, 1);
}
#else
int32_t lms_sbgemm_amx_info(void) { return 0; }
int32_t lms_sbgemm_amx_x3(const LmsGemmArgs *a) {
  (void)a;
  return LMS_ERR_ARGS;
}
int32_t lms_sbgemm_amx(const LmsGemmArgs *a) {
  (void)a;
  return LMS_ERR_ARGS;
}
#endif

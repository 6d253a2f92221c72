/* What sbgemm.c shares with sbgemm_amx.c and decode_step.c (linked into one library with them): which
 * kernels this build has, the packing constants, the per-thread state of a parallel region, and the
 * one function that decides the kernel and the split of a call (sbgemm_share), so that the decode step
 * runs the very work items of lms_sbgemm(_amx). The exported entry points are in lms_abi.h. */
#ifndef LMS_SBGEMM_H
#define LMS_SBGEMM_H
#include <stdint.h>

#define SB_NR 64     /* output columns per panel: 4 vectors of 16 fp32 accumulators */
#define SB_MR 6      /* rows per tile: 6 x 4 = 24 accumulators of the 32 zmm registers */
#define AMX_MR 16    /* rows per tile of the AMX micro-kernel (sbgemm_amx.c) */
#define AMX_KSTEP 32 /* its K-elements per tile step (64 bytes of bf16); other K run the AVX-512 kernel */
#define AMX_NB 32    /* its output columns per block: two 16-column tiles */
#define AMX_GROUP 32 /* its rows per group: two tiles of up to AMX_MR */

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LMS_SBGEMM 1 /* the AVX-512 BF16 micro-kernel is built */
#else
#define LMS_SBGEMM 0
#endif
#if LMS_SBGEMM && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define LMS_SBGEMM_AMX 1 /* the AMX micro-kernel (sbgemm_amx.c) is built too */
#else
#define LMS_SBGEMM_AMX 0
#endif

/* A thread's range of blocks in one call of the AMX kernel, shared by a parallel region's threads
 * (sbgemm_amx.c's amx_claim): the call's number, the next block from the front and the end, packed. */
#define SB_RANGE_BITS 20
typedef struct {
  _Alignas(64) uint64_t word; /* one cache line each */
} SbRange;

/* A thread's state across the sbgemm_share calls of one parallel region. */
typedef struct {
  int amx_tiles;   /* the AMX tile shape configured on this thread (0: none) */
  uint64_t calls;  /* sbgemm_share calls so far (every thread of the region makes the same calls) */
  SbRange *ranges; /* [threads], shared, zeroed before the region; NULL: blocks split statically */
} SbThread;

/* w [N, K] bf16 (K even) -> panels in the AVX-512 layout (sbgemm.c). */
void sb_pack(const uint16_t *w, uint16_t *packed, int64_t N, int64_t K, int num_threads);

/* Ranges for a parallel region of up to `threads` threads, zeroed; NULL on failure (sbgemm_share then
 * splits statically); free() them. */
SbRange *sb_ranges(int threads);

#if LMS_SBGEMM
/* mr (1..SB_MR) rows of x, row r at a[r], times one panel (lms_sbgemm_pack's layout, K2 = K / 2 pairs,
 * bp its first pair) into ncols (1..SB_NR) columns at c[r]: stored, or with add set, added in fp32 to
 * the bf16 values there and rounded once; + bias [ncols] when not NULL. prefetch / pf_lines: cache
 * lines to pull toward L2 meanwhile (NULL / 0: none). The micro-kernel of every bf16 GEMM here. */
void sb_panel_rows(int mr, const uint16_t *const *a, const uint16_t *bp, int64_t K2, uint16_t *const *c, int add,
                   int ncols, const uint16_t *bias, const char *prefetch, int64_t pf_lines);

/* Thread tid's share (of nth) of out [M, N] (row stride ldo) = x [M, K] (row stride lda) W^T + bias;
 * every thread of the region calls it with the same arguments. amx: the weight is
 * lms_sbgemm_amx_pack's (tile layout where K % AMX_KSTEP == 0). The split never changes a result. */
void sbgemm_share(const uint16_t *x, int64_t lda, const uint16_t *packed, const uint16_t *bias, uint16_t *out,
                  int64_t ldo, int64_t M, int64_t N, int64_t K, int amx, int tid, int nth, SbThread *st);

/* lms_sbgemm (amx 0) and lms_sbgemm_amx (amx 1): one parallel region, each thread its sbgemm_share;
 * LMS_ERR_ARGS on bad sizes (nothing written). */
int sbgemm_run(const uint16_t *x, int64_t lda, const uint16_t *packed, const uint16_t *bias, uint16_t *out,
               int64_t ldo, int64_t M, int64_t N, int64_t K, int num_threads, int amx);
#endif

#if LMS_SBGEMM_AMX
/* sbgemm_share's AMX path (K % AMX_KSTEP == 0, the tile layout). */
void amx_share(const uint16_t *x, int64_t lda, const uint16_t *packed, const uint16_t *bias, uint16_t *out,
               int64_t ldo, int64_t M, int64_t N, int64_t K, int tid, int nth, SbThread *st);

/* acc [AMX_GROUP x AMX_NB] fp32 (rows r0 + r1 written; r0 <= AMX_MR, r1 <= AMX_MR, r1 > 0 only with
 * r0 == AMX_MR) = those rows of x (row stride lda; rows r0.. from x + AMX_MR lda) times one 32-column
 * block bp of the tile layout over K (K % AMX_KSTEP == 0). *configured: the thread's tile shape, as
 * SbThread.amx_tiles (the caller releases the tiles at the end of its region). pf / pf_lines: cache
 * lines to pull toward L2 meanwhile (NULL / 0: none). */
void amx_block_acc(int *configured, int r0, int r1, const uint16_t *x, int64_t lda, const uint16_t *bp, int64_t K,
                   float *acc, const char *pf, int64_t pf_lines);

/* amx_block_acc for one K-step of kb (even, 2 .. AMX_KSTEP - 2) elements: bp is one 32-column block
 * of a [N, kb] weight as two tiles, bp[((t * kb / 2 + kp) * 16 + j) * 2 + e] = W[32 b + 16 t + j, 2 kp + e]
 * (the tile layout of K = kb). */
void amx_block_acc_short(int *configured, int r0, int r1, const uint16_t *x, int64_t lda, const uint16_t *bp, int kb,
                         float *acc);
#endif

#endif

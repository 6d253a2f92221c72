/* The AMX micro-kernel of sbgemm.c (included at its end): the same call, on the same packed weight,
 * with tile instructions (TDPBF16PS) instead of VDPBF16PS, on CPUs with AMX-BF16 (Sapphire Rapids and
 * later).
 *
 * Why: on an AMX CPU oneDNN's bf16 matmul runs on AMX and the AVX-512 micro-kernel is 2-4x slower
 * than it from 8 rows up; a decode step's skinny matmuls are then bound by reading the weight
 * from DRAM, not by the dot products (one TDPBF16PS does 16 x 16 x 32 products), so what counts is
 * streaming each panel once at the memory's speed while the tiles work on the previous one.
 *
 * Tiles (one configuration per thread and tile height mr <= 16, every row 64 bytes):
 * tmm0-3 = the mr x 64 fp32 output block (16 columns each), tmm4 = mr rows x 32 K-elements of x,
 * tmm5-7 = the weight: 16 K-pairs x 16 columns, read straight from the packed panel, whose pair rows
 * are 64 columns x 2 elements = 256 bytes apart (so the packing is sbgemm.c's, unchanged).
 * Invariants: K % 32 == 0 (lms_sbgemm_amx hands other K to the AVX-512 micro-kernel); each output
 * element is the tiles' fixed-order fp32 sum over K, plus the bias, rounded once to bf16, whatever
 * mr, M or the thread count (batch invariant, as the AVX-512 path; the two paths' sums differ in
 * order, so they can differ in the last bf16 bit).
 * Linux grants a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM);
 * lms_sbgemm_amx_info() makes that request and returns 1 only when it is granted. */

#if LMS_SBGEMM_AMX
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_PAIR_STRIDE 256 /* bytes between consecutive K-pairs of a packed panel */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} AmxTileConfig;

static void amx_configure(int mr) {
  AmxTileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = t < 5 ? (uint8_t)mr : AMX_MR; /* output and x tiles: mr rows; weight tiles: 16 pairs */
  }
  _tile_loadconfig(&cfg);
}

int lms_sbgemm_amx_info(void) {
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
}

/* mr rows of x times one packed panel; *configured is the thread's current tile height (0: none).
 * pf_lines cache lines from prefetch (this block's share of the next panel) are pulled toward L2,
 * spread over the K steps. */
static void amx_rows_times_panel(int *configured, int mr, const uint16_t *a, int64_t lda, const uint16_t *bp, int64_t K,
                                 uint16_t *c, int64_t ldc, int ncols, const uint16_t *bias, const char *prefetch,
                                 int64_t pf_lines) {
  if (*configured != mr) {
    amx_configure(mr);
    *configured = mr;
  }
  float acc[AMX_MR * SB_NR] __attribute__((aligned(64)));
  const int64_t steps = K / AMX_KSTEP, pf_per_step = (pf_lines + steps - 1) / steps;
  const int64_t a_stride = lda * 2;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  int64_t pf = 0;
  for (int64_t s = 0; s < steps; s++) {
    const uint16_t *b = bp + s * AMX_KSTEP * SB_NR; /* 16 pairs x 64 columns x 2 */
    _tile_loadd(4, a + s * AMX_KSTEP, a_stride);
    _tile_loadd(5, b, AMX_PAIR_STRIDE);
    _tile_loadd(6, b + 32, AMX_PAIR_STRIDE);
    _tile_loadd(7, b + 64, AMX_PAIR_STRIDE);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, b + 96, AMX_PAIR_STRIDE);
    _tile_dpbf16ps(3, 4, 5);
    for (int64_t e = pf + pf_per_step; pf < e && pf < pf_lines; pf++) _mm_prefetch(prefetch + 64 * pf, _MM_HINT_T1);
  }
  _tile_stored(0, acc, SB_NR * 4);
  _tile_stored(1, acc + 16, SB_NR * 4);
  _tile_stored(2, acc + 32, SB_NR * 4);
  _tile_stored(3, acc + 48, SB_NR * 4);
  __m512 bv[4];
  for (int v = 0; v < 4; v++) bv[v] = bias ? ld16(bias + 16 * v, mask16(ncols - 16 * v), DT_BF16) : _mm512_setzero_ps();
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < 4; v++) {
      const __mmask16 m = mask16(ncols - 16 * v);
      if (m)
        _mm256_mask_storeu_epi16(c + r * ldc + 16 * v, m,
                                 f32x16_to_bf16(_mm512_add_ps(_mm512_load_ps(acc + r * SB_NR + 16 * v), bv[v])));
    }
}

/* lms_sbgemm's contract, on AMX tiles where K % 32 == 0 (else the AVX-512 micro-kernel). Call only
 * after lms_sbgemm_amx_info() returned 1 in this process. */
int lms_sbgemm_amx(const uint16_t *x, int64_t lda, const uint16_t *packed, const uint16_t *bias, uint16_t *out,
                   int64_t ldo, int64_t M, int64_t N, int64_t K, int num_threads) {
  return sbgemm_run(x, lda, packed, bias, out, ldo, M, N, K, num_threads, 1);
}
#else
int lms_sbgemm_amx_info(void) { return 0; }
int lms_sbgemm_amx(const uint16_t *x, int64_t lda, const uint16_t *packed, const uint16_t *bias, uint16_t *out,
                   int64_t ldo, int64_t M, int64_t N, int64_t K, int num_threads) {
  (void)x, (void)lda, (void)packed, (void)bias, (void)out, (void)ldo, (void)M, (void)N, (void)K, (void)num_threads;
  return -1;
}
#endif

/* the same packing as lms_sbgemm's (the binding looks the pack function up by the kernel's prefix) */
void lms_sbgemm_amx_pack(const uint16_t *w, uint16_t *packed, int64_t N, int64_t K, int num_threads) {
  lms_sbgemm_pack(w, packed, N, K, num_threads);
}

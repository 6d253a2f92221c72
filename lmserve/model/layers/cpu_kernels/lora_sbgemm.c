/* The LoRA deltas of one projection, every adapter of a step in one call (lms_abi.h, LMS_LORA_ARGS):
 * y[t] += (x[t] @ A_s^T) @ B_s, each row's expand by its own adapter's B only.
 *
 * Why: a step's rows interleave adapters (one row per sequence in decode), and rank-r factors make
 * each product tiny; done as torch or panel-GEMM calls, the delta is either several calls per
 * adapter and module (each at its fixed cost of tens of us, far above its flops) or one masked
 * call over every adapter's factors (useful flops times the number of adapters and shards, and a
 * temporary as large as y added to it). Here one parallel region does it, adding straight into y.
 *
 * amx 0 (AVX512-BF16): two phases split by a barrier, each a list of (panel, tile of up to SB_MR
 * rows) items shared by the threads in near-equal ranges: the shrink h = bf16(x[rows of s] @ A_s^T)
 * into [R, c_max] (row i of h is rows[i]'s, rows read by pointer); then each expand block adds
 * h[:, h0 : h0 + kb] @ B^T into y's rows. Both run sbgemm.c's micro-kernel (sb_panel_rows).
 * amx 1 (AMX-BF16, where VDPBF16PS is several times slower than the tiles): the shrink of every row
 * of x against every slot's A at once (a_cat, one sbgemm_share: the tiles make the extra columns
 * cheaper than per-slot calls of a few rows); a barrier; each row's own columns gathered by slot
 * into [R, c_max]; a barrier; the expands on tiles (amx_block_acc: rows of one slot, 32 columns of a
 * block), each result added into y's rows.
 * Either way each output element is y plus one fixed-order fp32 sum, rounded once to nearest even
 * (the AMX mode flushes bf16 denormals to zero), whatever the thread count or the other rows (batch
 * invariant within a mode).
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lms_abi.h"
#include "sbgemm.h"

#if LMS_SBGEMM
#include <immintrin.h>

#include "lms_dtypes.h"
#include "lms_simd.h"

#define LORA_ITEMS_PER_THREAD 96

/* One item: up to `mr` rows of one slot (from index r0 of rows[]) against one panel / block. */
typedef struct {
  int32_t which; /* the shrink phase: the slot; the expand phase: the block */
  int32_t panel;
  int64_t r0;
  int32_t mr;
} LoraItem;

/* Items of n rows from r0 in near-equal tiles of at most `tile` rows, for np panels, a tile's panels
 * consecutive (its rows' output lines then stream in address order); returns the count (items NULL:
 * count only). */
static int64_t add_items(LoraItem *items, int64_t at, int32_t which, int64_t np, int64_t r0, int64_t n, int tile) {
  const int64_t ntiles = (n + tile - 1) / tile;
  int64_t count = 0, m = 0;
  for (int64_t t = 0; t < ntiles; t++) {
    const int64_t mr = (n - m + (ntiles - t) - 1) / (ntiles - t);
    for (int64_t p = 0; p < np; p++) {
      if (items) items[at + count] = (LoraItem){which, (int32_t)p, r0 + m, (int32_t)mr};
      count++;
    }
    m += mr;
  }
  return count;
}

/* Items [*i0, *i1) of [first, end) for thread tid of nth: ranges of near-equal cost, an item costing
 * `fixed` plus its rows (a step's rows are uneven over slots: a prompt chunk's slot has tens, the
 * others a row or two; a split by count would leave one thread most of the work). */
static void share_of(const LoraItem *items, int64_t first, int64_t end, int64_t fixed, int64_t tid, int64_t nth,
                     int64_t *i0, int64_t *i1) {
  int64_t total = 0;
  for (int64_t i = first; i < end; i++) total += fixed + items[i].mr;
  const int64_t lo = total * tid / nth, hi = total * (tid + 1) / nth;
  int64_t acc = 0, i = first;
  while (i < end && acc + (fixed + items[i].mr) / 2 < lo) acc += fixed + items[i++].mr;
  *i0 = i;
  while (i < end && acc + (fixed + items[i].mr) / 2 < hi) acc += fixed + items[i++].mr;
  *i1 = tid == nth - 1 ? end : i;
}

/* The item list: shrinks (amx 0 only) then expands; their counts. */
static void list_items(const LmsLoraArgs *a, LoraItem *items, int64_t *n_shrink, int64_t *n_expand) {
  int64_t at = 0;
  for (int32_t s = 0; !a->amx && s < a->num_slots; s++) {
    const int64_t c = a->shrink[2 * s + 1], r0 = a->slot_start[s], n = a->slot_start[s + 1] - r0;
    if (c && n > 0) at += add_items(items, at, s, (c + SB_NR - 1) / SB_NR, r0, n, SB_MR);
  }
  *n_shrink = at;
  const int64_t cols = a->amx ? AMX_NB : SB_NR;
  for (int32_t b = 0; b < a->num_blocks; b++) {
    const int64_t *blk = a->blocks + 6 * b;
    const int64_t s = blk[0], r0 = a->slot_start[s], n = a->slot_start[s + 1] - r0;
    if (n > 0) at += add_items(items, at, b, (blk[4] + cols - 1) / cols, r0, n, a->amx ? AMX_GROUP : SB_MR);
  }
  *n_expand = at - *n_shrink;
}

/* The columns of a slot's h: its c_s (amx 0), or c_s rounded up to the tile step with zeros (amx 1). */
static int64_t h_cols(const LmsLoraArgs *a, int64_t c) { return a->amx ? (c + AMX_KSTEP - 1) / AMX_KSTEP * AMX_KSTEP : c; }

static int bad_args(const LmsLoraArgs *a, int64_t *c_max) {
  if (!a->x || !a->y || !a->slot_start || !a->shrink || (a->num_blocks && !a->blocks)) return 1;
  if (a->k < 2 || a->k % 2 || a->ldx < a->k || a->n < 1 || a->ldy < a->n || a->num_slots < 0 || a->num_blocks < 0)
    return 1;
  if (a->amx && (!LMS_SBGEMM_AMX || !a->a_cat || a->c_total < 1)) return 1;
  if (a->slot_start[0] != 0) return 1;
  *c_max = 0;
  for (int32_t s = 0; s < a->num_slots; s++) {
    const int64_t where = a->shrink[2 * s], c = a->shrink[2 * s + 1];
    if (a->slot_start[s + 1] < a->slot_start[s] || c < 0 || (!a->amx && c % 2)) return 1;
    if (c && (a->amx ? where < 0 || where + c > a->c_total : !where)) return 1;
    if (h_cols(a, c) > *c_max) *c_max = h_cols(a, c);
  }
  const int64_t R = a->slot_start[a->num_slots];
  if (R != a->num_entries || (R > 0 && !a->rows)) return 1;
  for (int64_t i = 0; i < R; i++)
    if (a->rows[i] < 0 || a->rows[i] >= a->num_rows) return 1;
  for (int32_t b = 0; b < a->num_blocks; b++) {
    const int64_t *blk = a->blocks + 6 * b;
    const int64_t s = blk[0], h0 = blk[1], kb = blk[2], y0 = blk[3], nb = blk[4];
    if (s < 0 || s >= a->num_slots || !a->shrink[2 * s + 1] || !blk[5]) return 1;
    if (h0 < 0 || kb < 2 || kb % (a->amx && kb > AMX_KSTEP ? AMX_KSTEP : 2) || h0 + kb > h_cols(a, a->shrink[2 * s + 1]) ||
        y0 < 0 || nb < 1 ||
        y0 + nb > a->n)
      return 1;
  }
  return 0;
}

/* amx 0: items [i0, i1) of the list (the phase by the item's index against n_shrink). */
static void run_items(const LmsLoraArgs *a, const LoraItem *items, int64_t n_shrink, int64_t i0, int64_t i1,
                      uint16_t *h, int64_t c_max) {
  const uint16_t *x = (const uint16_t *)a->x;
  uint16_t *y = (uint16_t *)a->y;
  const uint16_t *ar[SB_MR];
  uint16_t *cr[SB_MR];
  for (int64_t i = i0; i < i1; i++) {
    const LoraItem it = items[i];
    if (i < n_shrink) { /* h[r0 + r, 64 p ..] = x[rows[r0 + r]] @ A_s^T */
      const int64_t c = a->shrink[2 * it.which + 1];
      const uint16_t *panels = (const uint16_t *)(intptr_t)a->shrink[2 * it.which];
      for (int r = 0; r < it.mr; r++) {
        ar[r] = x + (int64_t)a->rows[it.r0 + r] * a->ldx;
        cr[r] = h + (it.r0 + r) * c_max + (int64_t)it.panel * SB_NR;
      }
      const int64_t left = c - (int64_t)it.panel * SB_NR;
      sb_panel_rows(it.mr, ar, panels + (int64_t)it.panel * a->k * SB_NR, a->k / 2, cr, 0,
                    (int)(left < SB_NR ? left : SB_NR), 0, 0, 0);
    } else { /* y[rows[r0 + r], y0 + 64 p ..] += h[r0 + r, h0 : h0 + kb] @ B^T */
      const int64_t *blk = a->blocks + 6 * it.which;
      const int64_t h0 = blk[1], kb = blk[2], y0 = blk[3], nb = blk[4];
      const uint16_t *panels = (const uint16_t *)(intptr_t)blk[5];
      for (int r = 0; r < it.mr; r++) {
        ar[r] = h + (it.r0 + r) * c_max + h0;
        cr[r] = y + (int64_t)a->rows[it.r0 + r] * a->ldy + y0 + (int64_t)it.panel * SB_NR;
      }
      const int64_t left = nb - (int64_t)it.panel * SB_NR;
      sb_panel_rows(it.mr, ar, panels + (int64_t)it.panel * kb * SB_NR, kb / 2, cr, 1,
                    (int)(left < SB_NR ? left : SB_NR), 0, 0, 0);
    }
  }
}

#if LMS_SBGEMM_AMX
/* amx 1, phase 2: hs[i, 0:c_s] = h_all[rows[i], where_s : where_s + c_s] for i in [i0, i1), zeros
 * after it up to the tile step. */
static void gather_own_columns(const LmsLoraArgs *a, const uint16_t *h_all, uint16_t *hs, int64_t c_max, int64_t i0,
                               int64_t i1) {
  int32_t s = 0;
  for (int64_t i = i0; i < i1; i++) {
    while (a->slot_start[s + 1] <= i) s++;
    const int64_t c = a->shrink[2 * s + 1];
    memcpy(hs + i * c_max, h_all + (int64_t)a->rows[i] * a->c_total + a->shrink[2 * s], (size_t)c * 2);
    memset(hs + i * c_max + c, 0, (size_t)(h_cols(a, c) - c) * 2);
  }
}

/* amx 1, phase 3: expand items [i0, i1): acc = hs rows of the item @ block `panel` of B, added to y. */
static void run_amx_expands(const LmsLoraArgs *a, const LoraItem *items, int64_t i0, int64_t i1, const uint16_t *hs,
                            int64_t c_max, int *configured) {
  uint16_t *y = (uint16_t *)a->y;
  float acc[AMX_GROUP * AMX_NB] __attribute__((aligned(64)));
  for (int64_t i = i0; i < i1; i++) {
    const LoraItem it = items[i];
    const int64_t *blk = a->blocks + 6 * it.which;
    const int64_t h0 = blk[1], kb = blk[2], y0 = blk[3], nb = blk[4];
    const uint16_t *packed = (const uint16_t *)(intptr_t)blk[5];
    const int r0 = it.mr < AMX_MR ? it.mr : AMX_MR, r1 = it.mr - r0;
    if (kb % AMX_KSTEP)
      amx_block_acc_short(configured, r0, r1, hs + it.r0 * c_max + h0, c_max, packed + (int64_t)it.panel * kb * AMX_NB,
                          (int)kb, acc);
    else
      amx_block_acc(configured, r0, r1, hs + it.r0 * c_max + h0, c_max, packed + (int64_t)it.panel * kb * AMX_NB, kb,
                    acc, 0, 0);
    const int64_t left = nb - (int64_t)it.panel * AMX_NB;
    const int ncols = (int)(left < AMX_NB ? left : AMX_NB);
    for (int r = 0; r < it.mr; r++) {
      uint16_t *yr = y + (int64_t)a->rows[it.r0 + r] * a->ldy + y0 + (int64_t)it.panel * AMX_NB;
      for (int v = 0; v < 2; v++) { /* VCVTNEPS2BF16: round to nearest even, denormals flushed to zero */
        const __mmask16 m = mask16(ncols - 16 * v);
        const __m512 sum = _mm512_add_ps(ld16(yr + 16 * v, m, DT_BF16), _mm512_load_ps(acc + r * AMX_NB + 16 * v));
        if (m) _mm256_mask_storeu_epi16(yr + 16 * v, m, (__m256i)_mm512_cvtneps_pbh(sum));
      }
    }
  }
}
#endif

int32_t lms_lora_sbgemm(const LmsLoraArgs *a) {
  int64_t c_max = 0;
  if (!a || bad_args(a, &c_max)) return LMS_ERR_ARGS;
  const int64_t R = a->slot_start[a->num_slots];
  if (R == 0 || c_max == 0 || a->num_blocks == 0) return LMS_OK;
  int64_t n_shrink, n_expand;
  list_items(a, NULL, &n_shrink, &n_expand);
  /* AMX: a thread per LORA_ITEMS_PER_THREAD expand items at most; below that the barriers and the
   * wake-up of another thread cost more than the tiles' work they would split (these calls are tens
   * of us) */
  int threads = a->num_threads > 0 ? a->num_threads : 1;
  if (a->amx && n_expand / LORA_ITEMS_PER_THREAD < threads)
    threads = n_expand / LORA_ITEMS_PER_THREAD > 1 ? (int)(n_expand / LORA_ITEMS_PER_THREAD) : 1;
  const size_t h_bytes = (size_t)((R * c_max * 2 + 63) / 64 * 64);
  const size_t all_bytes = a->amx ? (size_t)((a->num_rows * a->c_total * 2 + 63) / 64 * 64) : 64;
  LoraItem *items = (LoraItem *)malloc(sizeof(LoraItem) * (size_t)(n_shrink + n_expand));
  uint16_t *h = (uint16_t *)aligned_alloc(64, h_bytes), *h_all = (uint16_t *)aligned_alloc(64, all_bytes);
  SbRange *ranges = a->amx ? sb_ranges(threads) : NULL;
  if (!items || !h || !h_all) {
    free(items), free(h), free(h_all), free(ranges);
    return LMS_ERR_NOMEM;
  }
  list_items(a, items, &n_shrink, &n_expand);
#pragma omp parallel num_threads(threads)
  {
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t i0, i1;
    if (!a->amx) {
      share_of(items, 0, n_shrink, 2, tid, nth, &i0, &i1);
      run_items(a, items, n_shrink, i0, i1, h, c_max);
#pragma omp barrier
      share_of(items, n_shrink, n_shrink + n_expand, 2, tid, nth, &i0, &i1);
      run_items(a, items, n_shrink, i0, i1, h, c_max);
    }
#if LMS_SBGEMM_AMX
    else {
      SbThread st = {0, 0, ranges};
      sbgemm_share((const uint16_t *)a->x, a->ldx, (const uint16_t *)a->a_cat, 0, h_all, a->c_total, a->num_rows,
                   a->c_total, a->k, 1, (int)tid, (int)nth, &st);
#pragma omp barrier
      gather_own_columns(a, h_all, h, c_max, R * tid / nth, R * (tid + 1) / nth);
#pragma omp barrier
      share_of(items, 0, n_expand, 8, tid, nth, &i0, &i1);
      run_amx_expands(a, items, i0, i1, h, c_max, &st.amx_tiles);
      if (st.amx_tiles) _tile_release();
    }
#endif
  }
  free(items), free(h), free(h_all), free(ranges);
  return LMS_OK;
}

#else
int32_t lms_lora_sbgemm(const LmsLoraArgs *a) {
  (void)a;
  return LMS_ERR_ARGS;
}
#endif

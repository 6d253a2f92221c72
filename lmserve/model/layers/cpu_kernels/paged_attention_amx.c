/* The AMX path of paged_attention.c (linked with it; paged_attention.h declares what they share):
 * bf16 attention on tile instructions
 * (TDPBF16PS) for CPUs with AMX-BF16 (Sapphire Rapids and later), head dim a multiple of 64,
 * block size a multiple of 16, no sliding window. It takes decodes (one query per sequence) and
 * prefill chunks (qlen queries ending a seq_len-token context: query r sees the first
 * seq_len - qlen + r + 1 tokens), read in place through the block table.
 *
 * Why: the AVX-512 path computes each query row's scores as dot products and reduces them with
 * shuffles; the tiles compute a 16 x 16 block of scores in one instruction pair per 32 dims (torch's
 * flash attention on a prefill chunk: benchmarks/README.md, "Kernel measurements").
 *
 * Rows: the G = Hq / Hkv query heads of a KV head and the qlen queries of a sequence make
 * qlen * G rows m = r * G + g; a tile holds 16 of them. Per (sequence, KV head, tile of rows):
 * 1. scores, transposed: S^T[j][m] = K[j] . Q[m] (A = a 16-key tile loaded straight from the
 *    cache with the cache's row stride, B = Q^T in pair layout), into st[j][16] fp32;
 * 2. an exact softmax in fp32 down each column (the 16 rows are the 16 lanes of one vector),
 *    masked per row (key j < the row's limit), probabilities rounded to bf16 (as the reference);
 * 3. out = P V: A = P [16 rows x 32 keys] (pairs of bf16 probabilities, a 16 x 16 dword transpose
 *    of the column pairs), B = V in pair layout (two value rows interleaved), built once per
 *    work item for all its tiles, zero past the context; 4 accumulator tiles (64 dims) per pass.
 * Each output row is a fixed-order sum whatever the other rows of its tile, the tiles of its item
 * or the thread count (batch invariant). Tiles: tmm0 A, tmm1 B, tmm2 scores, tmm4-7 outputs.
 * The tile state is requested from Linux (arch_prctl) once per process (attn_amx_ok). */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "lms_dtypes.h"
#include "paged_attention.h"

#if LMS_ATTN_AMX
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "lms_simd.h"

#define ATTN_ARCH_REQ_XCOMP_PERM 0x1023
#define ATTN_XFEATURE_XTILEDATA 18

/* 1 once Linux granted this process the AMX tile state, 0 if it refused (then never asked again). */
static int attn_amx_ok(void) {
  static int state = -1; /* process-wide, as the permission it caches; a race only asks twice */
  if (state < 0) state = syscall(SYS_arch_prctl, ATTN_ARCH_REQ_XCOMP_PERM, ATTN_XFEATURE_XTILEDATA) == 0;
  return state;
}

/* Whether a call with these parameters runs on this path. */
int attn_amx_takes(int dt, int head_dim, int block_size, int window) {
  return dt == DT_BF16 && head_dim % 64 == 0 && block_size % 16 == 0 && window <= 0 && attn_amx_ok();
}

static void attn_amx_configure(void) {
  struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

/* r[0..16) as a 16 x 16 matrix of dwords, transposed in place. */
LMS_INLINE void transpose16_epi32(__m512i* r) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  /* each 128-bit lane now holds a transposed 4 x 4 block; move the blocks */
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

/* Address of token p's row of kv head h in plane 0 (keys) or 1 (values) of sequence i. */
LMS_INLINE const char* attn_row(const Problem* P, const int32_t* bt, int h, int64_t p, int plane) {
  const int bs = P->block_size;
  return P->kv + plane * P->plane_bytes + (((int64_t)bt[p / bs] * bs + p % bs) * P->Hkv + h) * P->D * 2;
}

/* The value tiles of keys [0, nk32) (zero rows from L on): tile (kg, c) at vt + (kg * D / 16 + c) * 512,
 * row kp = the unpack of value rows 32 kg + 2 kp, + 1 over dims 32 (c / 2) .. + 32 (lo for even c,
 * hi for odd c: dims [0-3, 8-11, 16-19, 24-27] / [4-7, ...] of the 32). */
static void attn_amx_values(const Problem* P, const int32_t* bt, int h, int L, int nk32, uint16_t* vt) {
  const int D = P->D, nc = D / 16;
  for (int kg = 0; kg < nk32 / 32; kg++)
    for (int kp = 0; kp < 16; kp++) {
      const int64_t p0 = 32 * kg + 2 * kp;
      const char* r0 = p0 < L ? attn_row(P, bt, h, p0, 1) : NULL;
      const char* r1 = p0 + 1 < L ? attn_row(P, bt, h, p0 + 1, 1) : NULL;
      for (int c0 = 0; c0 < D; c0 += 32) {
        const __m512i a = r0 ? _mm512_loadu_si512(r0 + c0 * 2) : _mm512_setzero_si512();
        const __m512i b = r1 ? _mm512_loadu_si512(r1 + c0 * 2) : _mm512_setzero_si512();
        uint16_t* t = vt + ((int64_t)kg * nc + c0 / 16) * 512 + kp * 32;
        _mm512_store_si512(t, _mm512_unpacklo_epi16(a, b));
        _mm512_store_si512(t + 512, _mm512_unpackhi_epi16(a, b));
      }
    }
}

/* Rows [16 t, 16 t + 16) of sequence i, kv head h (vt: attn_amx_values of keys up to this tile's). */
static void attn_amx_tile(const Problem* P, int i, int h, int t, const int32_t* bt, const uint16_t* vt,
                          const Scratch* S) {
  const int G = P->G, D = P->D, nc = D / 16;
  const int L = P->seq_lens[i];
  const int q0 = P->qsl ? P->qsl[i] : i, qlen = P->qsl ? P->qsl[i + 1] - q0 : 1, ctx = L - qlen;
  const int m0 = t * ATTN_AMX_ROWS, mr = qlen * G - m0 < ATTN_AMX_ROWS ? qlen * G - m0 : ATTN_AMX_ROWS;
  const int nk = ctx + (m0 + mr - 1) / G + 1; /* keys the tile's last row sees */
  const int nk16 = (nk + 15) / 16 * 16, nk32 = (nk + 31) / 32 * 32;
  int32_t lim[16];
  for (int m = 0; m < 16; m++) lim[m] = m < mr ? ctx + (m0 + m) / G + 1 : 1;
  /* Q^T in pair layout: qt[c][kp][2 m + e] = Q[m][32 c + 2 kp + e] (zero rows past mr) */
  uint32_t* qt = (uint32_t*)S->qt;
  for (int m = 0; m < 16; m++) {
    const uint32_t* qr = m < mr ? (const uint32_t*)(P->q + ((int64_t)(q0 + (m0 + m) / G) * P->q_row_stride +
                                                            ((int64_t)h * G + (m0 + m) % G) * D) * 2)
                                : NULL;
    for (int d2 = 0; d2 < D / 2; d2++) qt[(d2 / 16) * 256 + (d2 % 16) * 16 + m] = qr ? qr[d2] : 0;
  }
  /* 1. scores S^T, 16 keys a tile, straight from the cache */
  const int64_t kstride = (int64_t)P->Hkv * D * 2;
  for (int j0 = 0; j0 < nk16; j0 += 16) {
    const char* k = attn_row(P, bt, h, j0, 0);
    _tile_zero(2);
    for (int c = 0; c < D / 32; c++) {
      _tile_loadd(0, k + c * 64, kstride);
      _tile_loadd(1, qt + c * 256, 64);
      _tile_dpbf16ps(2, 0, 1);
    }
    _tile_stored(2, S->st + (int64_t)j0 * 16, 64);
  }
  /* 2. softmax down the columns; probabilities to bf16 pairs, transposed into P tiles */
  const __m512i limv = _mm512_loadu_si512(lim);
  const __m512 scale = _mm512_set1_ps(P->scale);
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < nk; j++) {
    const __mmask16 valid = _mm512_cmplt_epi32_mask(_mm512_set1_epi32(j), limv);
    mx = _mm512_mask_max_ps(mx, valid, mx, _mm512_mul_ps(_mm512_load_ps(S->st + (int64_t)j * 16), scale));
  }
  __m512 sum = _mm512_setzero_ps();
  static const uint16_t PAIR[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i pair = _mm512_loadu_si512(PAIR);
  for (int kg = 0; kg < nk32 / 32; kg++) {
    __m512i y[16];
    for (int kp = 0; kp < 16; kp++) {
      __m512 e[2];
      for (int u = 0; u < 2; u++) {
        const int j = 32 * kg + 2 * kp + u;
        const __mmask16 valid = _mm512_cmplt_epi32_mask(_mm512_set1_epi32(j), limv);
        e[u] = j < nk ? _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(
                                                       _mm512_mul_ps(_mm512_load_ps(S->st + (int64_t)j * 16), scale), mx)))
                      : _mm512_setzero_ps();
        sum = _mm512_add_ps(sum, e[u]);
      }
      const __m512i bf = _mm512_inserti64x4(_mm512_castsi256_si512(f32x16_to_bf16(e[0])), f32x16_to_bf16(e[1]), 1);
      y[kp] = _mm512_permutexvar_epi16(pair, bf); /* dword m: (p[m][j], p[m][j + 1]) */
    }
    transpose16_epi32(y); /* y[m]: row m of the P tile */
    for (int m = 0; m < 16; m++) _mm512_store_si512(S->pt + (int64_t)kg * 512 + m * 32, y[m]);
  }
  /* 3. out = P V / sum, 64 dims a pass */
  for (int c0 = 0; c0 < nc; c0 += 4) {
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int kg = 0; kg < nk32 / 32; kg++) {
      const uint16_t* v = vt + ((int64_t)kg * nc + c0) * 512;
      _tile_loadd(0, S->pt + (int64_t)kg * 512, 64);
      _tile_loadd(1, v, 64);
      _tile_dpbf16ps(4, 0, 1);
      _tile_loadd(1, v + 512, 64);
      _tile_dpbf16ps(5, 0, 1);
      _tile_loadd(1, v + 1024, 64);
      _tile_dpbf16ps(6, 0, 1);
      _tile_loadd(1, v + 1536, 64);
      _tile_dpbf16ps(7, 0, 1);
    }
    _tile_stored(4, S->ot, 64);
    _tile_stored(5, S->ot + 256, 64);
    _tile_stored(6, S->ot + 512, 64);
    _tile_stored(7, S->ot + 768, 64);
    float inv[16];
    _mm512_storeu_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), sum));
    const __m512i ia = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i ib = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int m = 0; m < mr; m++) {
      char* orow = P->out + ((int64_t)(q0 + (m0 + m) / G) * P->out_row_stride + ((int64_t)h * G + (m0 + m) % G) * D) * 2;
      const __m512 s = _mm512_set1_ps(inv[m]);
      for (int u = 0; u < 2; u++) { /* tiles c0 + 2u (lo) and c0 + 2u + 1 (hi): dims 16 (c0 + 2u) .. + 32 */
        const __m512 lo = _mm512_load_ps(S->ot + (2 * u) * 256 + m * 16);
        const __m512 hi = _mm512_load_ps(S->ot + (2 * u + 1) * 256 + m * 16);
        char* op = orow + (int64_t)16 * (c0 + 2 * u) * 2;
        st16(op, _mm512_mul_ps(_mm512_permutex2var_ps(lo, ia, hi), s), 0xffff, DT_BF16);
        st16(op + 32, _mm512_mul_ps(_mm512_permutex2var_ps(lo, ib, hi), s), 0xffff, DT_BF16);
      }
    }
  }
}

/* Tiles [t0, t1) of sequence i's rows on kv head h: the value tiles once, then each row tile. */
void attn_amx_item(const Problem* P, int i, int h, int t0, int t1, const Scratch* S) {
  const int G = P->G, L = P->seq_lens[i];
  const int qlen = P->qsl ? P->qsl[i + 1] - P->qsl[i] : 1;
  const int mlast = (t1 * ATTN_AMX_ROWS < qlen * G ? t1 * ATTN_AMX_ROWS : qlen * G) - 1;
  const int nk = L - qlen + mlast / G + 1;
  const int32_t* bt = P->block_tables + (int64_t)i * P->bt_row_stride;
  attn_amx_configure();
  attn_amx_values(P, bt, h, L, (nk + 31) / 32 * 32, S->vt);
  for (int t = t0; t < t1; t++) attn_amx_tile(P, i, h, t, bt, S->vt, S);
}

/* A decode item (item_fn): all row tiles of sequence i on kv head h. */
void item_amx(const Problem* P, int i, int h, const Scratch* S) {
  const int qlen = P->qsl ? P->qsl[i + 1] - P->qsl[i] : 1;
  attn_amx_item(P, i, h, 0, (qlen * P->G + ATTN_AMX_ROWS - 1) / ATTN_AMX_ROWS, S);
}
#endif /* LMS_ATTN_AMX */

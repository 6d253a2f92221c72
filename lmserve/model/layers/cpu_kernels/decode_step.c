/* A whole decode step of a Llama-family decoder stack in one call, for CPU models whose every
 * linear layer runs on the VNNI GEMV (GGUF Q4_0/Q4_1/Q8_0 weights kept quantized, AVX-512 VNNI),
 * or whose every linear layer is a bf16 weight packed for sbgemm.c (AVX512-BF16, AMX where present).
 *
 * Why: at decode a small model's step is ~120 GEMVs of tens of microseconds and ~300 small ops;
 * run from Python, each costs 10-20 us of dispatch (module calls, argument checks, ctypes, tensor
 * allocation, an OpenMP fork), as much as the arithmetic. Here the step is one OpenMP parallel
 * region: the threads stay up for all layers and meet at barriers between the ops (what CUDA
 * graphs give a GPU, or llama.cpp's graph executor a CPU).
 *
 * The ops are the very kernels of the eager path, compiled from the same sources (this file
 * includes cpu_ops.c, paged_attention.c and sbgemm.c): the fused RMSNorm (+ residual add), neox
 * rotary, the KV-cache write, the paged decode attention, lms_qgemv's GEMV and lms_sbgemm(_amx)'s
 * panel GEMM (the same work items, split over the region's threads), so the fast path and the
 * eager path compute the same numbers (SiLU-and-mul too: lms_simd.h's silu_mul_span, which the
 * eager path runs as lms_silu_mul).
 *
 * Per layer, for R rows (one decode token of each of R sequences; row r is sequence r):
 *   normed, res = rmsnorm(h + res)      (the first layer: res = h, normed = rmsnorm(h))
 *   qkv = normed W_qkv^T (+ bias);  (Qwen3: q, k = rmsnorm per head);  q, k = rope(q, k);  cache[slot[r]] = k, v
 *   attn = paged_decode(q, cache, block_tables, seq_lens);  h = attn W_o^T (+ bias)
 *   normed, res = rmsnorm(h + res);  gu = normed W_gu^T;  h = (silu(gu[:I]) * gu[I:]) W_down^T
 * and at the end out = rmsnorm(h + res). Buffers are the caller's (LmsDecodeModel), contiguous.
 */
#include "cpu_ops.c"
/* paged_attention.c is built alone without -ffp-contract=off: the same here, so its code is the same */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#include "paged_attention.c"
#pragma GCC pop_options
#include "sbgemm.c"

#if LMS_QGEMV && LMS_AVX512
#define LMS_DECODE_STEP 1

typedef struct { /* a linear layer: quantized (qw, d, m) or bf16 panels (panels; qw NULL) */
  const uint8_t* qw;
  const uint16_t* d;
  const uint16_t* m;
  const void* bias; /* [n] in the model dtype, or NULL */
  int64_t n, k;
  int32_t nibbles;
  const uint16_t* panels; /* lms_sbgemm_pack's layout, or NULL */
  int32_t amx;            /* the panels are lms_sbgemm_amx's (AMX tiles where k % 32 == 0) */
} LmsQLinear;

typedef struct {
  const void* input_norm; /* [hidden] */
  const void* post_norm;  /* [hidden] */
  const void* q_norm;     /* [head_dim] (Qwen3: per-head RMSNorm of q and k before RoPE), or NULL */
  const void* k_norm;     /* [head_dim], or NULL */
  LmsQLinear qkv, o, gate_up, down;
  void* kv_cache; /* [2, num_blocks, block_size, Hkv, D] */
  int64_t num_blocks;
  int32_t sliding_window; /* 0: none */
} LmsLayer;

typedef struct {
  int32_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, dtype, block_size, max_rows;
  float eps, scale;
  const LmsLayer* layers;
  const void* final_norm;
  /* buffers, [max_rows, width] each: h (in: the embeddings; the layers' output), res, normed, qkv,
   * q and k (rotated), attn, gu (gate | up), act, out (the final norm's output) */
  void *h, *res, *normed, *qkv, *q, *k, *attn, *gu, *act, *out;
} LmsDecodeModel;

int lms_decode_step_available(void) { return 1; }

/* ---- the step ---------------------------------------------------------------------------------- */

typedef struct { /* the shared state of one step's parallel region */
  int8_t* xq;
  float *dx, *xsum;
  int rows, nth, dt;
} Step;

/* out [rows, W->n] = x [rows, W->k] W^T, all threads: quantized (x quantized once, by one of them),
 * or bf16 panels (sbgemm_share: the kernel and split of lms_sbgemm(_amx)). *sb is the thread's
 * sbgemm state in this step. */
static void linear(const Step* st, const LmsQLinear* W, const void* x, void* out, int tid, SbThread* sb) {
  if (W->panels) {
#if LMS_SBGEMM
    sbgemm_share((const uint16_t*)x, W->k, W->panels, (const uint16_t*)W->bias, (uint16_t*)out, W->n, st->rows, W->n,
                 W->k, W->amx, tid, st->nth, sb);
#else
    (void)sb;
#endif
  } else {
#pragma omp single
    quantize_rows(x, W->k, st->rows, st->dt, W->k, st->xq, st->dx, st->xsum);
    int64_t n0, n1;
    thread_share(W->n, tid, st->nth, &n0, &n1);
    qgemv_range(st->xq, st->dx, st->xsum, W->qw, W->d, W->m, W->nibbles, W->k, st->rows, W->bias, out, W->n, st->dt,
                n0, n1);
  }
#pragma omp barrier
}

/* 1: every linear layer is bf16 panels, 0: every one is quantized, -1: a mix, or panels this build lacks */
static int panel_model(const LmsDecodeModel* M) {
  int panels = 0, quantized = 0;
  for (int l = 0; l < M->num_layers; l++) {
    const LmsQLinear* ws[4] = {&M->layers[l].qkv, &M->layers[l].o, &M->layers[l].gate_up, &M->layers[l].down};
    for (int i = 0; i < 4; i++) {
      if (ws[i]->panels) panels++;
      else quantized++;
      if (ws[i]->panels && (!LMS_SBGEMM || (ws[i]->amx && !LMS_SBGEMM_AMX))) return -1;
    }
  }
  return panels && quantized ? -1 : panels ? 1 : 0;
}

static int check_step(const LmsDecodeModel* M, int rows, const int32_t* bt, int64_t bt_width, const int32_t* seq_lens,
                      const int64_t* slots, int* max_len) {
  const int panels = panel_model(M);
  if (panels < 0 || (panels && M->dtype != DT_BF16) || (!panels && rows > LMS_QGEMV_MAX_ROWS)) return LMS_ERR_ARGS;
  if (rows < 1 || rows > M->max_rows || !ok_dtype(M->dtype) ||
      M->hidden > LMS_MAX_ROW || M->head_dim > LMS_MAX_ROW || M->head_dim % 2 || M->num_heads % M->num_kv_heads)
    return LMS_ERR_ARGS;
  *max_len = 0;
  for (int r = 0; r < rows; r++) {
    const int L = seq_lens[r];
    if (L < 1 || (int64_t)L > bt_width * M->block_size) return LMS_ERR_SEQ_LEN;
    for (int l = 0; l < M->num_layers; l++) {
      const LmsLayer* ly = &M->layers[l];
      const int t0 = (ly->sliding_window > 0 && L > ly->sliding_window) ? L - ly->sliding_window : 0;
      for (int b = t0 / M->block_size; b <= (L - 1) / M->block_size; b++)
        if (bt[(int64_t)r * bt_width + b] < 0 || bt[(int64_t)r * bt_width + b] >= ly->num_blocks) return LMS_ERR_BLOCK_ID;
      if (slots[r] < 0 || slots[r] >= ly->num_blocks * M->block_size) return LMS_ERR_ARGS;
    }
    if (L > *max_len) *max_len = L;
  }
  return LMS_OK;
}

/* One decode step: M->h holds the rows' embeddings on entry; M->out their final hidden states on
 * return. cos_sin [rows, head_dim] (cat(cos, sin) at each row's position); block_tables [rows,
 * bt_width] int32 (dense); seq_lens [rows] int32 (the context after this token); slots [rows] int64
 * (where this token's K/V go). Returns 0, or a negative LMS_ERR_* code before anything is written. */
int lms_decode_step(const LmsDecodeModel* M, int rows, const void* cos_sin, const int32_t* block_tables,
                    int64_t bt_width, const int32_t* seq_lens, const int64_t* slots, int nthreads) {
  int max_len = 0;
  const int err = check_step(M, rows, block_tables, bt_width, seq_lens, slots, &max_len);
  if (err) return err;
  const int dt = M->dtype, H = M->hidden, D = M->head_dim, Hq = M->num_heads, Hkv = M->num_kv_heads;
  const int64_t qsz = (int64_t)Hq * D, kvsz = (int64_t)Hkv * D, qkv_w = qsz + 2 * kvsz, I = M->intermediate;
  int64_t kmax = H > I ? H : I;
  if (qsz > kmax) kmax = qsz;
  const int quantized = !M->layers[0].qkv.panels; /* check_step: all linears alike */
  if (quantized && kmax > LMS_QGEMV_MAX_K) return LMS_ERR_ARGS;
  const int64_t nb = quantized ? kmax / 32 : 1; /* the quantized activations' buffers */
  int8_t* xq = (int8_t*)aligned_alloc(64, (size_t)(rows * ((nb + 3) / 4) * XQ_GROUP_BYTES));
  float* dx = (float*)malloc(sizeof(float) * (size_t)(rows * nb + 4));
  float* xsum = (float*)malloc(sizeof(float) * (size_t)(rows * nb));
  if (!xq || !dx || !xsum) {
    free(xq), free(dx), free(xsum);
    return LMS_ERR_NOMEM;
  }
  SbRange* ranges = quantized ? NULL : sb_ranges(nthreads); /* NULL: the GEMMs split statically */
  const int G = Hq / Hkv, hpi = heads_per_item(rows, Hkv, nthreads), items = rows * Hkv / hpi;
  /* the AMX buffers where some layer (sliding windows aside, all pick alike) runs AMX items */
  const ScratchSizes sizes = scratch_sizes(max_len, G, D, uses_tiles(pick_item(dt, D, M->block_size, 0, G)));
  const int esz = dtype_size(dt);
  int nomem = 0;

#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    Step st = {xq, dx, xsum, rows, nth, dt};
    SbThread sb = {0, 0, ranges}; /* this thread's sbgemm state (tiles, calls) */
    int tiles_used = 0;           /* the AMX attention ran on this thread */
    Scratch S;
    char* buf = scratch_alloc(&sizes, &S);
    if (!buf) {
#pragma omp atomic write
      nomem = 1;
    }
#pragma omp barrier
    if (!nomem) {
      for (int l = 0; l < M->num_layers; l++) {
        const LmsLayer* ly = &M->layers[l];
#pragma omp single
        {
          if (l == 0) {
            memcpy(M->res, M->h, (size_t)rows * H * esz);
            lms_rms_norm(M->h, H, NULL, 0, ly->input_norm, M->normed, NULL, rows, H, M->eps, dt, 1);
          } else {
            lms_rms_norm(M->h, H, M->res, H, ly->input_norm, M->normed, M->res, rows, H, M->eps, dt, 1);
          }
        }
        linear(&st, &ly->qkv, M->normed, M->qkv, tid, &sb);
#pragma omp single
        {
          if (ly->q_norm) { /* normed heads into q, k; then rotated in place (rope reads a head before writing it) */
            for (int r = 0; r < rows; r++) {
              const char* row = (const char*)M->qkv + (int64_t)r * qkv_w * esz;
              lms_rms_norm(row, D, NULL, 0, ly->q_norm, (char*)M->q + r * qsz * esz, NULL, Hq, D, M->eps, dt, 1);
              lms_rms_norm(row + qsz * esz, D, NULL, 0, ly->k_norm, (char*)M->k + r * kvsz * esz, NULL, Hkv, D, M->eps,
                           dt, 1);
            }
            lms_rope_neox(M->q, qsz, Hq, M->k, kvsz, Hkv, cos_sin, D, M->q, M->k, rows, D, dt, 1);
          } else {
            lms_rope_neox(M->qkv, qkv_w, Hq, (const char*)M->qkv + qsz * esz, qkv_w, Hkv, cos_sin, D, M->q, M->k, rows,
                          D, dt, 1);
          }
          lms_write_kv(M->k, kvsz, (const char*)M->qkv + (qsz + kvsz) * esz, qkv_w, ly->kv_cache,
                       ly->num_blocks * M->block_size, slots, rows, kvsz, dt);
        }
        const Problem P = {(const char*)M->q, qsz, (const char*)ly->kv_cache,
                           ly->num_blocks * M->block_size * kvsz * esz, M->block_size, block_tables, bt_width,
                           seq_lens, (char*)M->attn, qsz, Hkv, D, G, dt, M->scale, ly->sliding_window, NULL};
        const item_fn attn_item = pick_item(dt, D, M->block_size, ly->sliding_window, G);
#pragma omp for schedule(dynamic, 1)
        for (int w = 0; w < items; w++) run_item(attn_item, &P, w, hpi, &S);
        if (uses_tiles(attn_item)) sb.amx_tiles = 0, tiles_used = 1; /* the sbgemm's tile shape is gone */
        linear(&st, &ly->o, M->attn, M->h, tid, &sb);
#pragma omp single
        lms_rms_norm(M->h, H, M->res, H, ly->post_norm, M->normed, M->res, rows, H, M->eps, dt, 1);
        linear(&st, &ly->gate_up, M->normed, M->gu, tid, &sb);
        {
          const int64_t per = (I + 16 * nth - 1) / (16 * nth) * 16;
          const int64_t i0 = tid * per < I ? tid * per : I, i1 = i0 + per < I ? i0 + per : I;
          silu_mul_span(M->gu, 2 * I, M->act, I, rows, I, i0, i1, dt);
        }
#pragma omp barrier
        linear(&st, &ly->down, M->act, M->h, tid, &sb);
      }
#pragma omp single
      lms_rms_norm(M->h, H, M->res, H, M->final_norm, M->out, M->res, rows, H, M->eps, dt, 1);
    }
#if LMS_SBGEMM_AMX
    if (sb.amx_tiles) _tile_release();
#endif
#if LMS_ATTN_AMX
    if (tiles_used) _tile_release();
#endif
    free(buf);
  }
  free(xq), free(dx), free(xsum), free(ranges);
  return nomem ? LMS_ERR_NOMEM : LMS_OK;
}
#else
#define LMS_DECODE_STEP 0
int lms_decode_step_available(void) { return 0; }
int lms_decode_step(const void* M, int rows, const void* cos_sin, const int32_t* block_tables, int64_t bt_width,
                    const int32_t* seq_lens, const int64_t* slots, int nthreads) {
  (void)M, (void)rows, (void)cos_sin, (void)block_tables, (void)bt_width, (void)seq_lens, (void)slots, (void)nthreads;
  return -1;
}
#endif

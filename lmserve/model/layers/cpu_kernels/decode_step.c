/* A whole decode step of a Llama-family decoder stack in one call, for CPU models whose every
 * linear layer runs on the VNNI GEMV (GGUF Q4_0/Q4_1/Q8_0 weights kept quantized, AVX-512 VNNI),
 * or whose every linear layer is a bf16 weight packed for sbgemm.c (AVX512-BF16, AMX where present).
 *
 * Why: at decode a small model's step is ~120 GEMVs and ~300 small ops; run from Python, each pays
 * a dispatch (module calls, argument checks, ctypes, tensor allocation, an OpenMP fork) that costs
 * as much as its arithmetic (benchmarks/README.md, "Kernel measurements"). Here the step is one
 * OpenMP parallel region: the threads stay up for all layers and meet at barriers between the ops
 * (what CUDA graphs give a GPU, or llama.cpp's graph executor a CPU).
 *
 * The ops are the very kernels of the eager path, the same objects linked into this library
 * (build.py compiles each source once with its own flags; cpu_ops.h, paged_attention.h and sbgemm.h
 * declare what they share with this file): the fused RMSNorm (+ residual add), neox rotary, the
 * KV-cache write, the paged decode attention, lms_qgemv's GEMV and lms_sbgemm(_amx)'s panel GEMM
 * (the same work items, split over the region's threads), so the fast path and the eager path
 * compute the same numbers (SiLU-and-mul too: lms_simd.h's silu_mul_span, which the eager path runs
 * as lms_silu_mul; this file, like cpu_ops.c, is compiled with -ffp-contract=off).
 *
 * Per layer, for R rows (one decode token of each of R sequences; row r is sequence r):
 *   normed, res = rmsnorm(h + res)      (the first layer: res = h, normed = rmsnorm(h))
 *   qkv = normed W_qkv^T (+ bias);  (Qwen3: q, k = rmsnorm per head);  q, k = rope(q, k);  cache[slot[r]] = k, v
 *   attn = paged_decode(q, cache, block_tables, seq_lens);  h = attn W_o^T (+ bias)
 *   normed, res = rmsnorm(h + res);  gu = normed W_gu^T;  h = (silu(gu[:I]) * gu[I:]) W_down^T
 * and at the end out = rmsnorm(h + res). Buffers are the caller's (LmsDecodeModel, lms_abi.h),
 * contiguous. Under tensor parallelism the weights are one rank's shards and h is summed over the
 * ranks after W_o and after W_down (the caller's all_reduce callback; row-parallel biases are on
 * one rank only).
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"
#include "lms_abi.h"
#include "lms_dtypes.h"
#include "paged_attention.h"
#include "sbgemm.h"

#if LMS_QGEMV && LMS_AVX512
#include <immintrin.h>

#include "lms_simd.h"
#define LMS_DECODE_STEP 1

int32_t lms_decode_step_available(void) { return 1; }

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

/* Tensor parallelism: h summed over the ranks by the caller's callback, on the calling (master)
 * thread while the others wait (lms_abi.h, LmsDecodeModel). */
static void all_reduce_h(const LmsDecodeModel* M, int rows) {
  if (!M->all_reduce) return;
#pragma omp master
  ((LmsAllReduceFn)M->all_reduce)(M->h, (int64_t)rows * M->hidden, M->all_reduce_ctx);
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

/* RMSNorm of `rows` rows of `width` (x and res rows `stride` apart; out, res_out contiguous) on the
 * calling thread: lms_rms_norm's contract (res NULL: no residual add). */
static void rms_norm1(const void* x, int64_t stride, const void* res, const void* w, void* out, void* res_out,
                      int64_t rows, int64_t width, float eps, int dt) {
  const LmsRmsNormArgs a = {.x = x, .x_stride = stride, .res = res, .res_stride = stride, .weight = w, .out = out,
                            .res_out = res_out, .rows = rows, .hidden = width, .eps = eps, .dtype = dt,
                            .num_threads = 1};
  lms_rms_norm(&a);
}

/* One decode step (lms_abi.h's LmsDecodeStepArgs). Returns 0, or a negative LMS_ERR_* code before
 * anything is written. */
int32_t lms_decode_step(const LmsDecodeStepArgs* a) {
  const LmsDecodeModel* M = a->model;
  const int rows = a->rows, nthreads = a->num_threads;
  const void* cos_sin = a->cos_sin;
  const int32_t *block_tables = a->block_tables, *seq_lens = a->seq_lens;
  const int64_t bt_width = a->bt_width;
  const int64_t* slots = a->slots;
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
            rms_norm1(M->h, H, NULL, ly->input_norm, M->normed, NULL, rows, H, M->eps, dt);
          } else {
            rms_norm1(M->h, H, M->res, ly->input_norm, M->normed, M->res, rows, H, M->eps, dt);
          }
        }
        linear(&st, &ly->qkv, M->normed, M->qkv, tid, &sb);
#pragma omp single
        {
          if (ly->q_norm) { /* normed heads into q, k; then rotated in place (rope reads a head before writing it) */
            for (int r = 0; r < rows; r++) {
              const char* row = (const char*)M->qkv + (int64_t)r * qkv_w * esz;
              rms_norm1(row, D, NULL, ly->q_norm, (char*)M->q + r * qsz * esz, NULL, Hq, D, M->eps, dt);
              rms_norm1(row + qsz * esz, D, NULL, ly->k_norm, (char*)M->k + r * kvsz * esz, NULL, Hkv, D, M->eps, dt);
            }
            const LmsRopeArgs rope = {.q = M->q, .q_stride = qsz, .k = M->k, .k_stride = kvsz, .cos_sin = cos_sin,
                                      .cs_stride = D, .q_out = M->q, .k_out = M->k, .rows = rows, .num_q_heads = Hq,
                                      .num_kv_heads = Hkv, .head_dim = D, .dtype = dt, .num_threads = 1};
            lms_rope_neox(&rope);
          } else {
            const LmsRopeArgs rope = {.q = M->qkv, .q_stride = qkv_w, .k = (const char*)M->qkv + qsz * esz,
                                      .k_stride = qkv_w, .cos_sin = cos_sin, .cs_stride = D, .q_out = M->q,
                                      .k_out = M->k, .rows = rows, .num_q_heads = Hq, .num_kv_heads = Hkv,
                                      .head_dim = D, .dtype = dt, .num_threads = 1};
            lms_rope_neox(&rope);
          }
          const LmsWriteKvArgs kv = {.k = M->k, .k_row_stride = kvsz, .v = (const char*)M->qkv + (qsz + kvsz) * esz,
                                     .v_row_stride = qkv_w, .kv_cache = ly->kv_cache,
                                     .num_slots = ly->num_blocks * M->block_size, .slots = slots,
                                     .num_tokens = rows, .row_elems = kvsz, .dtype = dt};
          lms_write_kv(&kv);
        }
        const Problem P = {(const char*)M->q, qsz, (const char*)ly->kv_cache,
                           ly->num_blocks * M->block_size * kvsz * esz, M->block_size, block_tables, bt_width,
                           seq_lens, (char*)M->attn, qsz, Hkv, D, G, dt, M->scale, ly->sliding_window, NULL};
        const item_fn attn_item = pick_item(dt, D, M->block_size, ly->sliding_window, G);
#pragma omp for schedule(dynamic, 1)
        for (int w = 0; w < items; w++) run_item(attn_item, &P, w, hpi, &S);
        if (uses_tiles(attn_item)) sb.amx_tiles = 0, tiles_used = 1; /* the sbgemm's tile shape is gone */
        linear(&st, &ly->o, M->attn, M->h, tid, &sb);
        all_reduce_h(M, rows);
#pragma omp single
        rms_norm1(M->h, H, M->res, ly->post_norm, M->normed, M->res, rows, H, M->eps, dt);
        linear(&st, &ly->gate_up, M->normed, M->gu, tid, &sb);
        {
          const int64_t per = (I + 16 * nth - 1) / (16 * nth) * 16;
          const int64_t i0 = tid * per < I ? tid * per : I, i1 = i0 + per < I ? i0 + per : I;
          silu_mul_span(M->gu, 2 * I, M->act, I, rows, I, i0, i1, dt);
        }
#pragma omp barrier
        linear(&st, &ly->down, M->act, M->h, tid, &sb);
        all_reduce_h(M, rows);
      }
#pragma omp single
      rms_norm1(M->h, H, M->res, M->final_norm, M->out, M->res, rows, H, M->eps, dt);
    }
#if LMS_SBGEMM_AMX
    if (sb.amx_tiles) _tile_release();
#endif
#if LMS_ATTN_AMX
    if (tiles_used) _tile_release();
#else
    (void)tiles_used;
#endif
    free(buf);
  }
  free(xq), free(dx), free(xsum), free(ranges);
  return nomem ? LMS_ERR_NOMEM : LMS_OK;
}
#else
#define LMS_DECODE_STEP 0
int32_t lms_decode_step_available(void) { return 0; }
int32_t lms_decode_step(const LmsDecodeStepArgs* a) {
  (void)a;
  return LMS_ERR_ARGS;
}
#endif

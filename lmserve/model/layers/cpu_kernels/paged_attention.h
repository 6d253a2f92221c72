/* What paged_attention.c shares with paged_attention_amx.c and decode_step.c (linked into one
 * library with them): which paths this build has, the problem and per-thread scratch types, and the
 * work-item dispatch, so that the decode step runs the very items of lms_paged_decode. The exported
 * entry points are in lms_abi.h. */
#ifndef LMS_PAGED_ATTENTION_H
#define LMS_PAGED_ATTENTION_H
#include <stddef.h>
#include <stdint.h>

#include "lms_dtypes.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LMS_AVX512 1
#else
#define LMS_AVX512 0
#endif
#if LMS_AVX512 && defined(__AVX512BF16__)
#define LMS_DPBF16 1
#else
#define LMS_DPBF16 0
#endif
#if LMS_DPBF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define LMS_ATTN_AMX 1 /* paged_attention_amx.c's path is built */
#else
#define LMS_ATTN_AMX 0
#endif

/* ---- the problem and per-thread scratch ------------------------------------------------------ */

typedef struct {
  const char* q;
  int64_t q_row_stride;
  const char* kv;
  int64_t plane_bytes; /* bytes of kv_cache[0] */
  int block_size;
  const int32_t* block_tables;
  int64_t bt_row_stride;
  const int32_t* seq_lens;
  char* out;
  int64_t out_row_stride;
  int Hkv, D, G, dt;
  float scale;
  int window;
  const int32_t* qsl; /* [num_seqs + 1] query start offsets (AMX path); NULL: one query per sequence */
} Problem;

/* ns = context length rounded up to 16 (+16 spare); Dp = head_dim rounded up to 32. */
typedef struct {
  const char** kp; /* [ns] key row pointers; past the context: `zeros` */
  const char** vp; /* [ns] value row pointers; past the context: `zeros` */
  float* s;        /* [G][ns] scores, then probabilities (0 past the context) */
  uint16_t* pb;    /* [G][ns] probabilities in bf16 (the DPBF16 value pass) */
  float* qf;       /* [G][Dp] the queries (fp32, or bf16 for DPBF16), zero-padded */
  float* tile;     /* [16][Dp] a converted key tile; the portable path's one row */
  float* acc;      /* [G][D] portable path accumulators */
  float* l;        /* [G] 1 / softmax denominators */
  float* zeros;    /* [max(Dp, ns)] zeros: padding rows and padding probabilities */
  /* the AMX path (paged_attention_amx.c), n32 = ns rounded up to 32 */
  float* st;       /* [n32][16] transposed scores of a row tile */
  uint16_t* vt;    /* [n32 / 32][D / 16] 1 KB value tiles */
  uint16_t* qt;    /* [D / 32] 1 KB tiles of the row tile's queries */
  uint16_t* pt;    /* [n32 / 32] 1 KB probability tiles */
  float* ot;       /* [4][16][16] output tiles */
} Scratch;

/* One work item of a call: the G query heads of KV head h of sequence i, in the thread's scratch. */
typedef void (*item_fn)(const Problem* P, int i, int h, const Scratch* S);

/* KV heads per work item of a decode call: all of a sequence's once there are at least 4 sequences
 * per thread, so that one item reads whole cache slots (a token's Hkv heads are one contiguous row
 * of the cache), whose other half a per-head item leaves to an item that may run on another core
 * (faster at batch 32: benchmarks/README.md, "Kernel measurements"); else 1, so that a few
 * sequences still spread over the threads. An item's heads are computed one after
 * another, as separate items would be: the split never changes a result. */
LMS_INLINE int heads_per_item(int num_seqs, int num_kv_heads, int nthreads) {
  return num_seqs >= 4 * nthreads ? num_kv_heads : 1;
}

/* Item w of a call with hpi heads per item: heads [h0, h0 + hpi) of one sequence. */
LMS_INLINE void run_item(item_fn fn, const Problem* P, int w, int hpi, const Scratch* S) {
  const int f = w * hpi, i = f / P->Hkv, h0 = f % P->Hkv;
  for (int h = h0; h < h0 + hpi; h++) fn(P, i, h, S);
}

/* Byte sizes of one thread's Scratch for contexts up to max_len tokens (each 64-aligned); the AMX
 * path's buffers only with `amx` (calls that run no AMX items do not allocate them). */
typedef struct {
  size_t kp, s, pb, qf, tile, acc, l, zeros, st, vt, qt, pt, ot, total;
} ScratchSizes;

/* The item function of a decode call with these parameters (G = query heads per KV head). */
item_fn pick_item(int dt, int head_dim, int block_size, int window, int G);

/* Whether fn is the AMX path's (which sets its own tile shape and must release it). */
int uses_tiles(item_fn fn);

/* Sizes of one thread's scratch for contexts up to max_len tokens; the AMX buffers only with `amx`. */
ScratchSizes scratch_sizes(int max_len, int G, int head_dim, int amx);

/* One thread's scratch: the buffer to free() (NULL when out of memory), S pointing into it. */
char* scratch_alloc(const ScratchSizes* z, Scratch* S);

#if LMS_ATTN_AMX
#define ATTN_AMX_ROWS 16 /* rows (query heads x queries) per tile */

/* Whether a call with these parameters runs on the AMX path (asks Linux for the tile state once). */
int attn_amx_takes(int dt, int head_dim, int block_size, int window);

/* Row tiles [t0, t1) of sequence i's rows on kv head h (P->qsl: the chunks' query offsets). */
void attn_amx_item(const Problem* P, int i, int h, int t0, int t1, const Scratch* S);

/* A decode item (item_fn): all row tiles of sequence i on kv head h. */
void item_amx(const Problem* P, int i, int h, const Scratch* S);
#endif

#endif

/* The C boundary of the CPU kernels: every exported entry point, the one argument struct each takes,
 * and the layout table that lets the Python side (abi.py) check its ctypes structs against this
 * build before the first call.
 *
 * Why argument structs (and not torch custom ops with schemas): the kernels stay plain C compiled at
 * first use in about a second, with no torch headers and no C++ extension build (minutes, and tied
 * to the installed torch's ABI); ctypes stays the only glue. A struct names every argument, so a
 * call cannot pass arguments in the wrong order, and one pointer crosses the boundary instead of up
 * to 20 converted scalars (no slower per call: benchmarks/README.md, "Kernel measurements"). What
 * the structs do not give by themselves -- that Python and C agree on them -- the layout table does:
 * each struct's fields are listed ONCE, in an X-macro below, which both declares the C struct and
 * fills the table (name, C type, offset, size of every field; the struct's size), so the table
 * cannot drift from the struct. abi.py compares LMS_ABI_VERSION and every field of every struct
 * with its ctypes classes when a library is loaded and refuses the library on any difference (the
 * kernels are then reported unavailable, as after a failed build).
 *
 * Rules: fixed-width types only (int32_t, int64_t, float, pointers); pointers are raw data pointers
 * of the caller's tensors, which must stay alive for the call; "stride" fields count ELEMENTS between
 * consecutive rows; dtype fields take lms_dtypes.h's codes (0 = float32, 1 = bfloat16, 2 = float16).
 * Changing a struct, an entry point's signature or a return code means bumping LMS_ABI_VERSION
 * here and in abi.py.
 *
 * Return codes of the int entry points: LMS_OK, or a negative LMS_ERR_*; an entry point that
 * returns an error has written nothing (the callers rely on it to fall back to torch).
 * Threads: num_threads is the OpenMP team size a call may use (the binding passes torch's); the
 * calls are reentrant (no state across calls but the process-wide AMX permission). */
#ifndef LMS_ABI_H
#define LMS_ABI_H
#include <stdint.h>

#define LMS_ABI_VERSION 3

#define LMS_EXPORT __attribute__((visibility("default")))

enum {
  LMS_OK = 0,
  LMS_ERR_ARGS = -1,     /* arguments the kernel does not take (dtype, sizes, a slot past the cache) */
  LMS_ERR_SEQ_LEN = -2,  /* a seq_len < 1 or past its block table's capacity */
  LMS_ERR_BLOCK_ID = -3, /* a block id used as context outside [0, num_blocks) */
  LMS_ERR_NOMEM = -4,
};

/* Field lists: F(C type, name) per field, in layout order. Comments state each field's contract. */

/* lms_rms_norm: out = RMSNorm(x (+ res)) per row (HF LlamaRMSNorm, cpu_ops.c states the rounding);
 * with res, res_out = x + res rounded to dtype. Rows dense; out and res_out contiguous [rows, hidden]. */
#define LMS_RMS_NORM_ARGS(F)                                                              \
  F(const void*, x)    /* [rows, hidden], x_stride elements between rows */             \
  F(int64_t, x_stride)                                                                    \
  F(const void*, res)  /* [rows, hidden] or NULL (then res_out unused) */                \
  F(int64_t, res_stride)                                                                  \
  F(const void*, weight) /* [hidden] */                                                   \
  F(void*, out)                                                                           \
  F(void*, res_out)                                                                       \
  F(int64_t, rows)                                                                        \
  F(int64_t, hidden)   /* 1 .. LMS_MAX_ROW */                                             \
  F(float, eps)                                                                           \
  F(int32_t, dtype)    /* float32 or bfloat16 */                                          \
  F(int32_t, num_threads)

/* lms_rope_neox: q [rows, num_q_heads, head_dim], k [rows, num_kv_heads, head_dim] (heads dense,
 * any row stride) rotated neox style by cos_sin [rows, head_dim] (cat(cos, sin)) into contiguous
 * q_out, k_out (which may alias q, k when those are contiguous: a head is read before written). */
#define LMS_ROPE_ARGS(F)                                                                  \
  F(const void*, q)                                                                       \
  F(int64_t, q_stride)                                                                    \
  F(const void*, k)                                                                       \
  F(int64_t, k_stride)                                                                    \
  F(const void*, cos_sin)                                                                 \
  F(int64_t, cs_stride)                                                                   \
  F(void*, q_out)                                                                         \
  F(void*, k_out)                                                                         \
  F(int64_t, rows)                                                                        \
  F(int64_t, num_q_heads)                                                                 \
  F(int64_t, num_kv_heads)                                                                \
  F(int64_t, head_dim) /* even, 2 .. LMS_MAX_ROW */                                       \
  F(int32_t, dtype)    /* float32 or bfloat16 */                                          \
  F(int32_t, num_threads)

/* lms_silu_mul: out [rows, inter] (contiguous) = silu(x[:, :inter]) * x[:, inter:] for x [rows,
 * 2 inter] (row stride x_stride); LMS_ERR_ARGS where the build has no AVX-512 (lms_silu_available). */
#define LMS_SILU_MUL_ARGS(F)                                                              \
  F(const void*, x)                                                                       \
  F(int64_t, x_stride)                                                                    \
  F(void*, out)                                                                           \
  F(int64_t, rows)                                                                        \
  F(int64_t, inter)                                                                       \
  F(int32_t, dtype)                                                                       \
  F(int32_t, num_threads)

/* lms_qgemv: out [rows, n] (row stride out_stride, in dtype) = x [rows, k] (row stride x_stride, in
 * dtype) times the block-quantized weight (qw, d, m: cpu_ops.c's layout) (+ bias [n] in dtype, added
 * after rounding to dtype). rows 1 .. 8; k a multiple of 64, at most 16384. LMS_ERR_ARGS where the
 * build has no AVX-512 VNNI (lms_qgemv_available). */
#define LMS_QGEMV_ARGS(F)                                                                 \
  F(const void*, x)                                                                       \
  F(int64_t, x_stride)                                                                    \
  F(const uint8_t*, qw) /* [n, k / 2] (nibbles) or [n, k] bytes */                        \
  F(const uint16_t*, d) /* [n, k / 32] float16 scales */                                  \
  F(const uint16_t*, m) /* [n, k / 32] float16 minimums */                                \
  F(const void*, bias)  /* [n] or NULL */                                                 \
  F(void*, out)                                                                           \
  F(int64_t, out_stride)                                                                  \
  F(int64_t, rows)                                                                        \
  F(int64_t, n)                                                                           \
  F(int64_t, k)                                                                           \
  F(int32_t, dtype)     /* float32 or bfloat16 */                                         \
  F(int32_t, nibbles)   /* 1: Q4_0 / Q4_1 nibbles, 0: Q8_0 bytes */                        \
  F(int32_t, num_threads)

/* lms_paged_decode: one-token queries q [num_seqs, num_heads, head_dim] into out (same shape, both
 * with dense rows and their row strides) over the paged cache [2, num_blocks, block_size,
 * num_kv_heads, head_dim] (contiguous): sequence i attends to its first seq_lens[i] tokens (the last
 * sliding_window of them when > 0) through block_tables[i] (int32 [num_seqs, >= bt_width], row stride
 * bt_row_stride, 0 repeats one row). q, out and the cache share dtype (kv_dtype must equal it).
 * Checks every seq_len and block id before writing (LMS_ERR_SEQ_LEN, LMS_ERR_BLOCK_ID). */
#define LMS_PAGED_DECODE_ARGS(F)                                                          \
  F(const void*, q)                                                                       \
  F(int64_t, q_row_stride)                                                                \
  F(const void*, kv_cache)                                                                \
  F(int64_t, num_blocks)                                                                  \
  F(const int32_t*, block_tables)                                                         \
  F(int64_t, bt_row_stride)                                                               \
  F(int64_t, bt_width)                                                                    \
  F(const int32_t*, seq_lens)                                                             \
  F(void*, out)                                                                           \
  F(int64_t, out_row_stride)                                                              \
  F(float, scale)                                                                         \
  F(int32_t, dtype)                                                                       \
  F(int32_t, kv_dtype)                                                                    \
  F(int32_t, block_size)                                                                  \
  F(int32_t, num_seqs)                                                                    \
  F(int32_t, num_heads)                                                                   \
  F(int32_t, num_kv_heads)                                                                \
  F(int32_t, head_dim)                                                                    \
  F(int32_t, sliding_window) /* 0: none */                                                \
  F(int32_t, num_threads)

/* lms_paged_attention: query chunks on the AMX path (bf16, head_dim % 64 == 0, block_size % 16 ==
 * 0): sequence i's queries are rows query_start_loc[i] .. query_start_loc[i + 1] of q / out, the last
 * of its seq_lens[i] tokens (query r of a chunk of qlen sees the first seq_lens[i] - qlen + r + 1);
 * layouts as lms_paged_decode's; LMS_ERR_ARGS (nothing written) where the AMX path does not take it. */
#define LMS_PAGED_CHUNKS_ARGS(F)                                                          \
  F(const void*, q)                                                                       \
  F(int64_t, q_row_stride)                                                                \
  F(const void*, kv_cache)                                                                \
  F(int64_t, num_blocks)                                                                  \
  F(const int32_t*, block_tables)                                                         \
  F(int64_t, bt_row_stride)                                                               \
  F(int64_t, bt_width)                                                                    \
  F(const int32_t*, query_start_loc) /* [num_seqs + 1], from 0 */                         \
  F(const int32_t*, seq_lens)                                                             \
  F(void*, out)                                                                           \
  F(int64_t, out_row_stride)                                                              \
  F(float, scale)                                                                         \
  F(int32_t, block_size)                                                                  \
  F(int32_t, num_seqs)                                                                    \
  F(int32_t, num_heads)                                                                   \
  F(int32_t, num_kv_heads)                                                                \
  F(int32_t, head_dim)                                                                    \
  F(int32_t, num_threads)

/* lms_write_kv: token t's rows k[t], v[t] ([row_elems] each, dense; k_row_stride / v_row_stride
 * elements between tokens) to slot slots[t] (int64) of kv_cache ([2, num_slots, row_elems] viewed
 * flat); slots < 0 skipped; LMS_ERR_ARGS (nothing written) when a slot is >= num_slots. */
#define LMS_WRITE_KV_ARGS(F)                                                              \
  F(const void*, k)                                                                       \
  F(int64_t, k_row_stride)                                                                \
  F(const void*, v)                                                                       \
  F(int64_t, v_row_stride)                                                                \
  F(void*, kv_cache)                                                                      \
  F(int64_t, num_slots)                                                                   \
  F(const int64_t*, slots)                                                                \
  F(int64_t, num_tokens)                                                                  \
  F(int64_t, row_elems)                                                                   \
  F(int32_t, dtype)

/* lms_sgemm (fp32), lms_sbgemm, lms_sbgemm_amx (bf16): out [m, n] (row stride ldo) = x [m, k] (row
 * stride lda) @ W^T (+ bias [n]), W packed by the matching *_pack; LMS_ERR_ARGS on bad sizes. */
#define LMS_GEMM_ARGS(F)                                                                  \
  F(const void*, x)                                                                       \
  F(int64_t, lda)                                                                         \
  F(const void*, packed)                                                                  \
  F(const void*, bias)  /* [n] or NULL */                                                 \
  F(void*, out)                                                                           \
  F(int64_t, ldo)                                                                         \
  F(int64_t, m)                                                                           \
  F(int64_t, n)                                                                           \
  F(int64_t, k)                                                                           \
  F(int32_t, num_threads)

/* lms_sgemm_pack, lms_sbgemm_pack, lms_sbgemm_amx_pack: weight [n, k] (contiguous) -> packed, in
 * the layout that sgemm.c / sbgemm.c / sbgemm_amx.c state (the binding sizes it). */
#define LMS_PACK_ARGS(F)                                                                  \
  F(const void*, weight)                                                                  \
  F(void*, packed)                                                                        \
  F(int64_t, n)                                                                           \
  F(int64_t, k)                                                                           \
  F(int32_t, num_threads)

/* lms_lora_sbgemm (bf16, lora_sbgemm.c): the LoRA deltas of one projection for the rows that have an
 * adapter, y[t] += (x[t] @ A_s^T) @ B_s with s the adapter slot of row t, each row's expand by its own
 * adapter's B only. rows[slot_start[s] .. slot_start[s + 1]) are the rows (of x and y) of slot s.
 * shrink [num_slots * 2] int64, per slot (where, c_s): c_s = the rows of A_s (0: no delta in this
 * module); where = A_s as lms_sbgemm_pack's panels of a [c_s, k] weight (amx 0), or A_s's first row
 * in a_cat (amx 1: a_cat is lms_sbgemm_amx_pack's packing of the slots' A_s stacked, [c_total, k]).
 * blocks [num_blocks * 6] int64, one expand each: (slot, h0, kb, y0, nb, B packed as the mode's
 * pack of an [nb, kb] weight): y[t, y0 : y0 + nb] += h_t[h0 : h0 + kb] @ B^T where h_t = bf16(x[t] @
 * A_s^T), extended with zeros to a multiple of 32 columns in amx 1; h0 + kb <= c_s (amx 0: kb even)
 * or c_s rounded up to 32 (amx 1: kb even and below 32, or a multiple of 32; B in the tile layout
 * of K = kb, sbgemm.h amx_block_acc_short for kb < 32). Blocks of one slot write disjoint columns.
 * Each output element is y + one fp32 sum, rounded once to bf16. */
#define LMS_LORA_ARGS(F)                                                                  \
  F(const void*, x)            /* [T, k] bf16, row stride ldx */                          \
  F(int64_t, ldx)                                                                         \
  F(void*, y)                  /* [T, n] bf16, row stride ldy, added to */                \
  F(int64_t, ldy)                                                                         \
  F(int64_t, k)                /* even */                                                 \
  F(int64_t, n)                /* y's columns: every block within them */                 \
  F(int64_t, num_rows)         /* T: every entry of rows below it */                      \
  F(const int32_t*, rows)      /* [num_entries] */                                         \
  F(int64_t, num_entries)                                                                 \
  F(const int64_t*, slot_start) /* [num_slots + 1], non-decreasing from 0 to num_entries */ \
  F(const int64_t*, shrink)                                                               \
  F(const int64_t*, blocks)                                                               \
  F(const void*, a_cat)        /* amx 1 only */                                           \
  F(int64_t, c_total)          /* amx 1: a_cat's rows */                                  \
  F(int32_t, num_slots)                                                                   \
  F(int32_t, num_blocks)                                                                  \
  F(int32_t, amx)              /* 1: AMX tiles (lms_sbgemm_amx_info() granted them) */    \
  F(int32_t, num_threads)

/* A linear layer of the decode step: quantized (qw, d, m as lms_qgemv's) or bf16 panels (qw NULL). */
#define LMS_QLINEAR_FIELDS(F)                                                             \
  F(const uint8_t*, qw)                                                                   \
  F(const uint16_t*, d)                                                                   \
  F(const uint16_t*, m)                                                                   \
  F(const void*, bias)      /* [n] in the model dtype, or NULL */                         \
  F(int64_t, n)                                                                           \
  F(int64_t, k)                                                                           \
  F(int32_t, nibbles)                                                                     \
  F(const uint16_t*, panels) /* lms_sbgemm_pack's or lms_sbgemm_amx_pack's layout, or NULL */ \
  F(int32_t, amx)           /* the panels are lms_sbgemm_amx_pack's */

#define LMS_LAYER_FIELDS(F)                                                               \
  F(const void*, input_norm) /* [hidden] */                                               \
  F(const void*, post_norm)  /* [hidden] */                                               \
  F(const void*, q_norm)     /* [head_dim] (Qwen3: per-head RMSNorm of q, k before RoPE), or NULL */ \
  F(const void*, k_norm)     /* [head_dim], or NULL */                                    \
  F(LmsQLinear, qkv)                                                                      \
  F(LmsQLinear, o)                                                                        \
  F(LmsQLinear, gate_up)                                                                  \
  F(LmsQLinear, down)                                                                     \
  F(void*, kv_cache)         /* [2, num_blocks, block_size, num_kv_heads, head_dim] */     \
  F(int64_t, num_blocks)                                                                  \
  F(int32_t, sliding_window) /* 0: none */

/* The model of the decode step; buffers [max_rows, width] each, contiguous, in dtype: h (in: the
 * embeddings; the layers' output), res, normed, qkv, q and k (rotated), attn, gu (gate | up), act,
 * out (the final norm's output). Weights and caches stay the caller's and must not move.
 * Tensor parallelism: the layers are one rank's shards (num_heads, num_kv_heads, intermediate this
 * rank's); all_reduce, when not NULL, is an LmsAllReduceFn the step calls on the calling thread
 * after o and after down with (h, rows * hidden, all_reduce_ctx): it must sum h over the ranks in
 * place (the other threads wait at a barrier). NULL: a single rank. */
typedef void (*LmsAllReduceFn)(void* buf, int64_t numel, void* ctx);
#define LMS_DECODE_MODEL_FIELDS(F)                                                        \
  F(int32_t, num_layers)                                                                  \
  F(int32_t, hidden)                                                                      \
  F(int32_t, num_heads)                                                                   \
  F(int32_t, num_kv_heads)                                                                \
  F(int32_t, head_dim)                                                                    \
  F(int32_t, intermediate)                                                                \
  F(int32_t, dtype)                                                                       \
  F(int32_t, block_size)                                                                  \
  F(int32_t, max_rows)                                                                    \
  F(float, eps)                                                                           \
  F(float, scale)                                                                         \
  F(const LmsLayer*, layers) /* [num_layers] */                                           \
  F(const void*, final_norm)                                                              \
  F(void*, h)                                                                             \
  F(void*, res)                                                                           \
  F(void*, normed)                                                                        \
  F(void*, qkv)                                                                           \
  F(void*, q)                                                                             \
  F(void*, k)                                                                             \
  F(void*, attn)                                                                          \
  F(void*, gu)                                                                            \
  F(void*, act)                                                                           \
  F(void*, out)                                                                           \
  F(void*, all_reduce)       /* an LmsAllReduceFn, or NULL */                             \
  F(void*, all_reduce_ctx)

/* lms_decode_step: one decode step of `rows` sequences (model->h holds their embeddings on entry,
 * model->out their final hidden states on return); cos_sin [rows, head_dim] (cat(cos, sin) at each
 * row's position); block_tables [rows, bt_width] int32 (dense); seq_lens [rows] int32 (the context
 * after this token); slots [rows] int64 (where this token's K/V go). Checks everything first. */
#define LMS_DECODE_STEP_ARGS(F)                                                           \
  F(const LmsDecodeModel*, model)                                                         \
  F(const void*, cos_sin)                                                                 \
  F(const int32_t*, block_tables)                                                         \
  F(int64_t, bt_width)                                                                    \
  F(const int32_t*, seq_lens)                                                             \
  F(const int64_t*, slots)                                                                \
  F(int32_t, rows)                                                                        \
  F(int32_t, num_threads)

/* ---- the structs ------------------------------------------------------------------------------ */

#define LMS_DECLARE_FIELD(type, name) type name;
#define LMS_DEFINE_STRUCT(T, FIELDS) typedef struct T { FIELDS(LMS_DECLARE_FIELD) } T;

LMS_DEFINE_STRUCT(LmsRmsNormArgs, LMS_RMS_NORM_ARGS)
LMS_DEFINE_STRUCT(LmsRopeArgs, LMS_ROPE_ARGS)
LMS_DEFINE_STRUCT(LmsSiluMulArgs, LMS_SILU_MUL_ARGS)
LMS_DEFINE_STRUCT(LmsQgemvArgs, LMS_QGEMV_ARGS)
LMS_DEFINE_STRUCT(LmsPagedDecodeArgs, LMS_PAGED_DECODE_ARGS)
LMS_DEFINE_STRUCT(LmsPagedChunksArgs, LMS_PAGED_CHUNKS_ARGS)
LMS_DEFINE_STRUCT(LmsWriteKvArgs, LMS_WRITE_KV_ARGS)
LMS_DEFINE_STRUCT(LmsGemmArgs, LMS_GEMM_ARGS)
LMS_DEFINE_STRUCT(LmsPackArgs, LMS_PACK_ARGS)
LMS_DEFINE_STRUCT(LmsLoraArgs, LMS_LORA_ARGS)
LMS_DEFINE_STRUCT(LmsQLinear, LMS_QLINEAR_FIELDS)
LMS_DEFINE_STRUCT(LmsLayer, LMS_LAYER_FIELDS)
LMS_DEFINE_STRUCT(LmsDecodeModel, LMS_DECODE_MODEL_FIELDS)
LMS_DEFINE_STRUCT(LmsDecodeStepArgs, LMS_DECODE_STEP_ARGS)

/* Every struct of the boundary, with its id in the layout table (X(T, FIELDS) per struct). */
#define LMS_ABI_STRUCTS(X)                    \
  X(LmsRmsNormArgs, LMS_RMS_NORM_ARGS)        \
  X(LmsRopeArgs, LMS_ROPE_ARGS)               \
  X(LmsSiluMulArgs, LMS_SILU_MUL_ARGS)        \
  X(LmsQgemvArgs, LMS_QGEMV_ARGS)             \
  X(LmsPagedDecodeArgs, LMS_PAGED_DECODE_ARGS) \
  X(LmsPagedChunksArgs, LMS_PAGED_CHUNKS_ARGS) \
  X(LmsWriteKvArgs, LMS_WRITE_KV_ARGS)        \
  X(LmsGemmArgs, LMS_GEMM_ARGS)               \
  X(LmsPackArgs, LMS_PACK_ARGS)               \
  X(LmsQLinear, LMS_QLINEAR_FIELDS)           \
  X(LmsLayer, LMS_LAYER_FIELDS)               \
  X(LmsDecodeModel, LMS_DECODE_MODEL_FIELDS)  \
  X(LmsDecodeStepArgs, LMS_DECODE_STEP_ARGS) \
  X(LmsLoraArgs, LMS_LORA_ARGS)

/* One field of the layout table. */
typedef struct {
  const char* name;
  const char* type; /* the C type as written in the field list, e.g. "const void*", "int64_t" */
  int64_t offset, size;
} LmsAbiField;

/* ---- the entry points (every library exports the lms_abi_* ones, and its own) ------------------ */

LMS_EXPORT int32_t lms_abi_version(void);        /* LMS_ABI_VERSION of this build */
LMS_EXPORT int32_t lms_abi_num_structs(void);    /* entries of LMS_ABI_STRUCTS */
LMS_EXPORT const char* lms_abi_struct_name(int32_t id); /* NULL past the last */
LMS_EXPORT int64_t lms_struct_size(int32_t id);  /* sizeof; -1 past the last */
LMS_EXPORT const LmsAbiField* lms_abi_field(int32_t id, int32_t i); /* NULL past the last field */

/* cpu_ops.c */
LMS_EXPORT int32_t lms_rms_norm(const LmsRmsNormArgs* a);
LMS_EXPORT int32_t lms_rope_neox(const LmsRopeArgs* a);
LMS_EXPORT int32_t lms_silu_mul(const LmsSiluMulArgs* a);
LMS_EXPORT int32_t lms_silu_available(void);  /* 1 where lms_silu_mul has its AVX-512 path */
LMS_EXPORT int32_t lms_qgemv(const LmsQgemvArgs* a);
LMS_EXPORT int32_t lms_qgemv_available(void); /* 1 where lms_qgemv has its AVX-512 VNNI path */

/* paged_attention.c */
LMS_EXPORT int32_t lms_paged_decode(const LmsPagedDecodeArgs* a);
LMS_EXPORT int32_t lms_paged_attention(const LmsPagedChunksArgs* a);
LMS_EXPORT int32_t lms_write_kv(const LmsWriteKvArgs* a);
LMS_EXPORT int32_t lms_kernel_info(void);         /* 0 portable C, 1 AVX-512, 2 AVX-512 + AVX512_BF16 */
LMS_EXPORT int32_t lms_attention_amx_info(void);  /* 1 where bf16 calls of the AMX shapes run on tiles */
LMS_EXPORT int32_t lms_supports_dtype(int32_t dtype);

/* sgemm.c, sbgemm.c, sbgemm_amx.c; *_info: 1 where the kernel applies on this CPU (sgemm: 2 = built,
 * but an AVX-512 CPU, where oneDNN is preferred) */
LMS_EXPORT int32_t lms_sgemm_info(void);
LMS_EXPORT void lms_sgemm_pack(const LmsPackArgs* a);
LMS_EXPORT int32_t lms_sgemm(const LmsGemmArgs* a);
LMS_EXPORT int32_t lms_sbgemm_info(void);
LMS_EXPORT void lms_sbgemm_pack(const LmsPackArgs* a);
LMS_EXPORT int32_t lms_sbgemm(const LmsGemmArgs* a);
LMS_EXPORT int32_t lms_sbgemm_amx_info(void); /* requests the AMX tile state from Linux */
LMS_EXPORT void lms_sbgemm_amx_pack(const LmsPackArgs* a);
LMS_EXPORT int32_t lms_sbgemm_amx(const LmsGemmArgs* a);
/* fp32 x, bias, out on the AMX layout of [hi(W) | lo(W) | hi(W)] (k = K of x): bf16x3, sbgemm_amx.c */
LMS_EXPORT int32_t lms_sbgemm_amx_x3(const LmsGemmArgs* a);

/* lora_sbgemm.c (in the sbgemm library): LMS_ERR_ARGS on bad arguments, LMS_ERR_NOMEM */
LMS_EXPORT int32_t lms_lora_sbgemm(const LmsLoraArgs* a);

/* decode_step.c */
LMS_EXPORT int32_t lms_decode_step_available(void);
LMS_EXPORT int32_t lms_decode_step(const LmsDecodeStepArgs* a);

#endif

/* What cpu_ops.c shares with decode_step.c (linked into one library with it): the limits, the
 * availability of the VNNI GEMV in this build, and the GEMV's two halves (quantize the rows once,
 * then any thread computes any range of output columns), so that the decode step runs the very code
 * of lms_qgemv. The exported entry points are in lms_abi.h. */
#ifndef LMS_CPU_OPS_H
#define LMS_CPU_OPS_H
#include <stdint.h>

#include "lms_abi.h"
#include "lms_dtypes.h"

/* the longest row the fused ops take (their fp32 row buffers, 192 KiB at most, are on the stack) */
#define LMS_MAX_ROW 16384
#define LMS_QGEMV_MAX_ROWS 8
#define LMS_QGEMV_MAX_K 16384

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define LMS_QGEMV 1 /* lms_qgemv and the functions below are built */
#else
#define LMS_QGEMV 0
#endif

/* The activations of one quantized row: per group g of 4 blocks (128 values), 256 bytes (cpu_ops.c). */
#define XQ_GROUP_BYTES 256

LMS_INLINE int ok_dtype(int dt) { return dt == DT_F32 || dt == DT_BF16; }

/* thread tid's share [*n0, *n1) of n items split in nth contiguous parts (OpenMP's static schedule) */
LMS_INLINE void thread_share(int64_t n, int tid, int nth, int64_t* n0, int64_t* n1) {
  const int64_t per = (n + nth - 1) / nth;
  *n0 = tid * per < n ? tid * per : n;
  *n1 = *n0 + per < n ? *n0 + per : n;
}

#if LMS_QGEMV
/* x [M, K] rows (row stride x_stride, dtype xdt; M <= 8, K % 64 == 0, K <= 16384) -> xq (M *
 * ceil(K / 128) * XQ_GROUP_BYTES bytes, 64-aligned), dx and xsum ([M, K / 32] floats, dx with 4
 * spare): the quantized rows that qgemv_range reads. */
void quantize_rows(const void* x, int64_t x_stride, int64_t M, int xdt, int64_t K, int8_t* xq, float* dx, float* xsum);

/* Output columns n0 <= n < n1 of the `rows` quantized rows times the weight (qw, d, m, nibbles: as
 * LmsQgemvArgs), + bias after rounding to xdt, into out (row stride out_stride, dtype xdt). */
void qgemv_range(const int8_t* xq, const float* dx, const float* xsum, const uint8_t* qw, const uint16_t* d,
                 const uint16_t* m, int nibbles, int64_t K, int rows, const void* bias, void* out, int64_t out_stride,
                 int xdt, int64_t n0, int64_t n1);
#endif

#endif

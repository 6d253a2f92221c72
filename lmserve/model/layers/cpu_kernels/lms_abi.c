/* The layout table of lms_abi.h's structs, generated from the same field lists that declare them,
 * and the ABI version: linked into every kernel library, read by abi.py when it loads one. */
#include "lms_abi.h"

#include <stddef.h>

#define LMS_ABI_FIELD(type, name) \
  {#name, #type, (int64_t)offsetof(LMS_ABI_T, name), (int64_t)sizeof(((LMS_ABI_T*)0)->name)},

/* one field array per struct: LMS_ABI_T names the struct while its field list expands */
#define LMS_ABI_FIELDS_OF(T, FIELDS) static const LmsAbiField fields_##T[] = {FIELDS(LMS_ABI_FIELD){0, 0, 0, 0}};
#define LMS_ABI_T LmsRmsNormArgs
LMS_ABI_FIELDS_OF(LmsRmsNormArgs, LMS_RMS_NORM_ARGS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsRopeArgs
LMS_ABI_FIELDS_OF(LmsRopeArgs, LMS_ROPE_ARGS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsSiluMulArgs
LMS_ABI_FIELDS_OF(LmsSiluMulArgs, LMS_SILU_MUL_ARGS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsQgemvArgs
LMS_ABI_FIELDS_OF(LmsQgemvArgs, LMS_QGEMV_ARGS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsPagedDecodeArgs
LMS_ABI_FIELDS_OF(LmsPagedDecodeArgs, LMS_PAGED_DECODE_ARGS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsPagedChunksArgs
LMS_ABI_FIELDS_OF(LmsPagedChunksArgs, LMS_PAGED_CHUNKS_ARGS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsWriteKvArgs
LMS_ABI_FIELDS_OF(LmsWriteKvArgs, LMS_WRITE_KV_ARGS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsGemmArgs
LMS_ABI_FIELDS_OF(LmsGemmArgs, LMS_GEMM_ARGS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsPackArgs
LMS_ABI_FIELDS_OF(LmsPackArgs, LMS_PACK_ARGS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsQLinear
LMS_ABI_FIELDS_OF(LmsQLinear, LMS_QLINEAR_FIELDS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsLayer
LMS_ABI_FIELDS_OF(LmsLayer, LMS_LAYER_FIELDS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsDecodeModel
LMS_ABI_FIELDS_OF(LmsDecodeModel, LMS_DECODE_MODEL_FIELDS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsDecodeStepArgs
LMS_ABI_FIELDS_OF(LmsDecodeStepArgs, LMS_DECODE_STEP_ARGS)
#undef LMS_ABI_T
#define LMS_ABI_T LmsLoraArgs
LMS_ABI_FIELDS_OF(LmsLoraArgs, LMS_LORA_ARGS)
#undef LMS_ABI_T

typedef struct {
  const char* name;
  int64_t size;
  const LmsAbiField* fields;
} StructInfo;

#define LMS_ABI_STRUCT_INFO(T, FIELDS) {#T, (int64_t)sizeof(T), fields_##T},
static const StructInfo STRUCTS[] = {LMS_ABI_STRUCTS(LMS_ABI_STRUCT_INFO)};
#define NUM_STRUCTS ((int32_t)(sizeof STRUCTS / sizeof STRUCTS[0]))

int32_t lms_abi_version(void) { return LMS_ABI_VERSION; }

int32_t lms_abi_num_structs(void) { return NUM_STRUCTS; }

const char* lms_abi_struct_name(int32_t id) { return id >= 0 && id < NUM_STRUCTS ? STRUCTS[id].name : 0; }

int64_t lms_struct_size(int32_t id) { return id >= 0 && id < NUM_STRUCTS ? STRUCTS[id].size : -1; }

const LmsAbiField* lms_abi_field(int32_t id, int32_t i) {
  if (id < 0 || id >= NUM_STRUCTS || i < 0) return 0;
  const LmsAbiField* f = STRUCTS[id].fields;
  for (int32_t j = 0; j < i; j++)
    if (!f[j].name) return 0;
  return f[i].name ? &f[i] : 0;
}

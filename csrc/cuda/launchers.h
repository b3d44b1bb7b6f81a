/* C launcher API of the sf_sdk CUDA kernels.
 *
 * Framework-free on both sides: the .cu files that implement it include only the CUDA runtime and
 * cuda_fp16.h / cuda_bf16.h; callers (csrc/cuda/binding.cpp binds it to torch) need no CUDA header
 * at all. Tensors are raw device pointers plus sizes and element strides. Every launcher checks its
 * arguments on the host before launching anything and returns:
 *   SF_CUDA_OK (0)                  the work was enqueued on `stream`;
 *   SF_CUDA_INVALID_ARGUMENT (-1)   nothing was launched; sf_sdk_cuda_last_error() says why;
 *   a positive cudaError_t          the CUDA runtime failed (sf_sdk_cuda_last_error() names it).
 * Nothing synchronizes with the host: a device-side kv_len is read by the kernels.
 */
#ifndef SF_SDK_CUDA_LAUNCHERS_H_
#define SF_SDK_CUDA_LAUNCHERS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The CUDA runtime's own definition (driver_types.h); repeating an identical typedef is legal. */
typedef struct CUstream_st* cudaStream_t;

enum {
  SF_CUDA_OK = 0,
  SF_CUDA_INVALID_ARGUMENT = -1,
};

/* Element types. */
enum {
  SF_DTYPE_FLOAT32 = 0,
  SF_DTYPE_FLOAT16 = 1,
  SF_DTYPE_BFLOAT16 = 2,
  SF_DTYPE_FLOAT64 = 3, /* rotary tables and cache_write only */
};

/* Strides of a [B, L, H, D] tensor in elements; the D stride must be 1. */
typedef struct {
  int64_t batch;
  int64_t token;
  int64_t head;
} SfStrides;

/* out[b, i, h, :] = softmax_j(q[b, i, h, :] . k[b, j, h, :] / sqrt(D)) v[b, j, h, :], j < kv_len. */
typedef struct {
  const void* q;   /* [batch, q_len, heads, head_dim] */
  const void* k;   /* [batch, capacity, heads, head_dim] */
  const void* v;   /* [batch, capacity, heads, head_dim] */
  void* out;       /* [batch, q_len, heads, head_dim] */
  SfStrides q_strides;
  SfStrides k_strides;
  SfStrides v_strides;
  SfStrides out_strides;
  int64_t batch;
  int64_t q_len;
  int64_t heads;
  int64_t head_dim; /* 1..SF_CUDA_MAX_HEAD_DIM */
  int64_t capacity;
  int dtype;        /* SF_DTYPE_FLOAT32 / FLOAT16 / BFLOAT16, the same for q, k, v, out */
  /* Valid slots: kv_len_device ? *kv_len_device (read on the device, clamped to [0, capacity])
   * : kv_len_host (checked on the host). */
  int64_t kv_len_host;
  const int64_t* kv_len_device;
} SfAttentionArgs;

#define SF_CUDA_MAX_HEAD_DIM 256

/* How a call is split over keys, and the float32 workspace it needs (0 when not split). */
typedef struct {
  int splits;
  int64_t workspace_floats;
} SfAttentionPlan;

/* Plans a call on `device` (the split count depends on its multiprocessor count). */
int sf_sdk_cuda_cache_attention_plan(const SfAttentionArgs* args, int device, SfAttentionPlan* plan);

/* Enqueues the attention. `workspace` holds plan->workspace_floats floats (may be NULL if 0). */
int sf_sdk_cuda_cache_attention(const SfAttentionArgs* args, const SfAttentionPlan* plan, float* workspace,
                                cudaStream_t stream);

/* k_cache[b, slots[i], h, :] = rotary(k[b, i, h, :]) (or k itself when cos == NULL), and
 * v_cache[b, slots[i], h, :] = v[b, i, h, :]. Slots are a device int64 array of `tokens` entries;
 * an out-of-range slot stops the kernel with a device-side trap. */
typedef struct {
  void* k_cache;          /* [batch, capacity, heads, head_dim] */
  void* v_cache;
  const void* k;          /* [batch, tokens, heads, head_dim] */
  const void* v;
  const int64_t* slots;   /* [tokens], device */
  const void* cos;        /* [tokens, head_dim / 2] contiguous, or NULL for a plain write */
  const void* sin;
  SfStrides k_cache_strides;
  SfStrides v_cache_strides;
  SfStrides k_strides;
  SfStrides v_strides;
  int64_t batch;
  int64_t tokens;
  int64_t heads;
  int64_t head_dim;
  int64_t capacity;
  int dtype;              /* of the caches and k / v: any SF_DTYPE_* */
  int table_dtype;        /* SF_DTYPE_FLOAT32 or SF_DTYPE_FLOAT64 when cos != NULL */
} SfWriteArgs;

int sf_sdk_cuda_cache_write(const SfWriteArgs* args, cudaStream_t stream);

/* A description of the last failure on this host thread. */
const char* sf_sdk_cuda_last_error(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SF_SDK_CUDA_LAUNCHERS_H_ */

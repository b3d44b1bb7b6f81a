// Host-side argument checks shared by the CPU kernels and the CUDA binding.
//
// Every check raises ValueError in Python (TORCH_CHECK_VALUE) with what is wrong and what to do.
// The Python fake implementations in sf_sdk/ops.py apply the same rules, so a bad call fails the
// same way in eager mode, under torch.compile and under torch.export.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>

namespace sf_sdk {

// Geometry of a validated cache_attention call: q [B, Lq, H, D], caches [B, capacity, H, D].
struct AttentionShape {
  int64_t batch;
  int64_t q_len;
  int64_t heads;
  int64_t head_dim;
  int64_t capacity;
};

// Geometry of a validated cache_write call: k/v [B, n, H, D] into caches [B, capacity, H, D].
struct WriteShape {
  int64_t batch;
  int64_t tokens;
  int64_t heads;
  int64_t head_dim;
  int64_t capacity;
};

inline void check_dtype_supported(const at::Tensor& t, const char* name,
                                  std::initializer_list<at::ScalarType> supported) {
  for (const auto dtype : supported) {
    if (t.scalar_type() == dtype) {
      return;
    }
  }
  TORCH_CHECK_VALUE(false, name, " has dtype ", t.scalar_type(),
                    ", which the sf_sdk kernels do not support; use float32, bfloat16 or float16, "
                    "or the reference path (sf_sdk.attention.set_backend('reference'))");
}

inline void check_layout(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be a 4-D tensor ", layout, ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(3) <= 1 || t.stride(3) == 1, name,
                    " must be contiguous in its last (head_dim) dimension, got strides ", t.strides(),
                    "; call .contiguous() on it first");
}

inline void check_same_dtype_and_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                                        const char* b_name) {
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), a_name, " (", a.scalar_type(), ") and ", b_name,
                    " (", b.scalar_type(), ") must have the same dtype; cast one of them");
  TORCH_CHECK_VALUE(a.device() == b.device(), a_name, " (", a.device(), ") and ", b_name, " (",
                    b.device(), ") must be on the same device");
}

inline AttentionShape check_cache_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache, const at::Tensor& kv_len,
                                                 std::initializer_list<at::ScalarType> supported) {
  check_layout(q, "q", "[B, Lq, H, D]");
  check_layout(k_cache, "k_cache", "[B, capacity, H, D]");
  check_layout(v_cache, "v_cache", "[B, capacity, H, D]");
  check_same_dtype_and_device(q, "q", k_cache, "k_cache");
  check_same_dtype_and_device(q, "q", v_cache, "v_cache");
  check_dtype_supported(q, "q", supported);
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ",
                    v_cache.sizes(), " must have the same shape");
  TORCH_CHECK_VALUE(q.size(0) == k_cache.size(0) && q.size(2) == k_cache.size(2) &&
                        q.size(3) == k_cache.size(3),
                    "q [B, Lq, H, D] = ", q.sizes(), " does not match the cache [B, capacity, H, D] = ",
                    k_cache.sizes(), " in batch, heads or head_dim");
  TORCH_CHECK_VALUE(q.size(3) > 0, "head_dim must be positive, got shape ", q.sizes());
  TORCH_CHECK_VALUE(kv_len.dim() == 0, "kv_len must be a 0-dim integer tensor, got shape ", kv_len.sizes());
  TORCH_CHECK_VALUE(kv_len.scalar_type() == at::kLong || kv_len.scalar_type() == at::kInt,
                    "kv_len must be an int64 (or int32) tensor, got ", kv_len.scalar_type());
  return {q.size(0), q.size(1), q.size(2), q.size(3), k_cache.size(1)};
}

// Reads a host (CPU) kv_len scalar and checks it lies in [0, capacity].
inline int64_t host_kv_len(const at::Tensor& kv_len, int64_t capacity) {
  TORCH_CHECK_VALUE(kv_len.device().is_cpu(), "kv_len must be a CPU tensor here, got ", kv_len.device());
  const int64_t n = kv_len.scalar_type() == at::kLong ? kv_len.item<int64_t>()
                                                      : static_cast<int64_t>(kv_len.item<int32_t>());
  TORCH_CHECK_VALUE(n >= 0 && n <= capacity, "kv_len must lie in [0, capacity = ", capacity, "], got ", n,
                    "; the cache holds only ", capacity, " slots");
  return n;
}

inline WriteShape check_cache_write_args(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots) {
  check_layout(k_cache, "k_cache", "[B, capacity, H, D]");
  check_layout(v_cache, "v_cache", "[B, capacity, H, D]");
  check_layout(k, "k", "[B, n, H, D]");
  check_layout(v, "v", "[B, n, H, D]");
  check_same_dtype_and_device(k_cache, "k_cache", v_cache, "v_cache");
  check_same_dtype_and_device(k_cache, "k_cache", k, "k");
  check_same_dtype_and_device(k_cache, "k_cache", v, "v");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ",
                    v_cache.sizes(), " must have the same shape");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k ", k.sizes(), " and v ", v.sizes(), " must have the same shape");
  TORCH_CHECK_VALUE(k.size(0) == k_cache.size(0) && k.size(2) == k_cache.size(2) &&
                        k.size(3) == k_cache.size(3),
                    "k [B, n, H, D] = ", k.sizes(), " does not match the cache [B, capacity, H, D] = ",
                    k_cache.sizes(), " in batch, heads or head_dim");
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.size(0) == k.size(1), "slots must be a 1-D tensor with one "
                    "cache slot per token (", k.size(1), "), got shape ", slots.sizes());
  TORCH_CHECK_VALUE(slots.scalar_type() == at::kLong, "slots must be an int64 tensor, got ", slots.scalar_type());
  TORCH_CHECK_VALUE(slots.device() == k.device(), "slots (", slots.device(), ") must be on the device of k (",
                    k.device(), ")");
  return {k.size(0), k.size(1), k.size(2), k.size(3), k_cache.size(1)};
}

// cos/sin tables of a fused rotary write: [n, D/2], float32 or float64, on the device of k.
inline void check_rope_tables(const at::Tensor& cos, const at::Tensor& sin, const WriteShape& shape,
                              const at::Tensor& k) {
  TORCH_CHECK_VALUE(shape.head_dim % 2 == 0, "rotary needs an even head_dim, got ", shape.head_dim);
  for (const at::Tensor* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == shape.tokens && t->size(1) == shape.head_dim / 2, name,
                      " must have shape [n, D/2] = [", shape.tokens, ", ", shape.head_dim / 2, "], got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, name,
                      " must be float32 or float64, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == k.device(), name, " (", t->device(), ") must be on the device of k (",
                      k.device(), ")");
  }
  TORCH_CHECK_VALUE(cos.scalar_type() == sin.scalar_type(), "cos (", cos.scalar_type(), ") and sin (",
                    sin.scalar_type(), ") must have the same dtype");
}

}  // namespace sf_sdk

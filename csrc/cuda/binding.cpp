// Binds the framework-free CUDA launchers (launchers.h) to the sf_sdk ops for CUDA tensors.
//
// This file includes no CUDA header: the current stream is c10's generic Stream::native_handle()
// (torch >= 2.11) and device selection uses c10::DeviceGuard, so it compiles against any torch
// (csrc/check_cuda.sh syntax-checks it against the CPU wheel). It is built, with the .cu files,
// only when torch has CUDA. Every argument is checked here (ValueError) and again by the launchers.
#include "../checks.h"
#include "launchers.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdint>

namespace sf_sdk::cuda {
namespace {

int dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return SF_DTYPE_FLOAT32;
    case at::kHalf:
      return SF_DTYPE_FLOAT16;
    case at::kBFloat16:
      return SF_DTYPE_BFLOAT16;
    case at::kDouble:
      return SF_DTYPE_FLOAT64;
    default:
      return -1;
  }
}

SfStrides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

cudaStream_t current_stream(const c10::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

void check_status(int status, const char* op) {
  TORCH_CHECK_VALUE(status != SF_CUDA_INVALID_ARGUMENT, "sf_sdk ", op, ": ", sf_sdk_cuda_last_error());
  TORCH_CHECK(status == SF_CUDA_OK, "sf_sdk ", op, " CUDA failure: ", sf_sdk_cuda_last_error());
}

void check_on_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor here, got ", t.device());
}

at::Tensor cache_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& kv_len) {
  const AttentionShape shape =
      check_cache_attention_args(q, k_cache, v_cache, kv_len, {at::kFloat, at::kBFloat16, at::kHalf});
  check_on_cuda(q, "q");
  const c10::DeviceGuard guard(q.device());

  SfAttentionArgs args{};
  at::Tensor kv_len_device;  // keeps a converted device scalar alive until the launch is enqueued
  if (kv_len.device().is_cpu()) {
    args.kv_len_host = host_kv_len(kv_len, shape.capacity);
  } else {
    TORCH_CHECK_VALUE(kv_len.device() == q.device(), "kv_len (", kv_len.device(),
                      ") must be on the CPU or on the device of q (", q.device(), ")");
    kv_len_device = kv_len.to(at::kLong);  // no-op for int64; a device-side cast otherwise (no sync)
    args.kv_len_device = kv_len_device.const_data_ptr<int64_t>();
  }
  at::Tensor out = at::empty({shape.batch, shape.q_len, shape.heads, shape.head_dim}, q.options());
  if (out.numel() == 0) {
    return out;
  }
  args.q = q.const_data_ptr();
  args.k = k_cache.const_data_ptr();
  args.v = v_cache.const_data_ptr();
  args.out = out.mutable_data_ptr();
  args.q_strides = strides_of(q);
  args.k_strides = strides_of(k_cache);
  args.v_strides = strides_of(v_cache);
  args.out_strides = strides_of(out);
  args.batch = shape.batch;
  args.q_len = shape.q_len;
  args.heads = shape.heads;
  args.head_dim = shape.head_dim;
  args.capacity = shape.capacity;
  args.dtype = dtype_code(q.scalar_type());

  SfAttentionPlan plan{};
  check_status(sf_sdk_cuda_cache_attention_plan(&args, q.device().index(), &plan), "cache_attention");
  at::Tensor workspace;
  if (plan.workspace_floats > 0) {
    workspace = at::empty({plan.workspace_floats}, q.options().dtype(at::kFloat));
  }
  check_status(sf_sdk_cuda_cache_attention(&args, &plan, workspace.defined() ? workspace.mutable_data_ptr<float>() : nullptr,
                                           current_stream(q.device())),
               "cache_attention");
  return out;
}

SfWriteArgs write_args(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& slots, const WriteShape& shape) {
  SfWriteArgs args{};
  args.k_cache = k_cache.mutable_data_ptr();
  args.v_cache = v_cache.mutable_data_ptr();
  args.k = k.const_data_ptr();
  args.v = v.const_data_ptr();
  args.slots = slots.const_data_ptr<int64_t>();
  args.k_cache_strides = strides_of(k_cache);
  args.v_cache_strides = strides_of(v_cache);
  args.k_strides = strides_of(k);
  args.v_strides = strides_of(v);
  args.batch = shape.batch;
  args.tokens = shape.tokens;
  args.heads = shape.heads;
  args.head_dim = shape.head_dim;
  args.capacity = shape.capacity;
  args.dtype = dtype_code(k.scalar_type());
  return args;
}

void cache_write_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& slots) {
  const WriteShape shape = check_cache_write_args(k_cache, v_cache, k, v, slots);
  check_on_cuda(k, "k");
  check_dtype_supported(k, "k", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  const c10::DeviceGuard guard(k.device());
  const at::Tensor slots_c = slots.contiguous();
  SfWriteArgs args = write_args(k_cache, v_cache, k, v, slots_c, shape);
  check_status(sf_sdk_cuda_cache_write(&args, current_stream(k.device())), "cache_write");
}

void cache_write_rope_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& slots, const at::Tensor& cos, const at::Tensor& sin) {
  const WriteShape shape = check_cache_write_args(k_cache, v_cache, k, v, slots);
  check_rope_tables(cos, sin, shape, k);
  check_on_cuda(k, "k");
  check_dtype_supported(k, "k", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  const c10::DeviceGuard guard(k.device());
  const at::Tensor slots_c = slots.contiguous();
  const at::Tensor cos_c = cos.contiguous();  // [n, D/2]
  const at::Tensor sin_c = sin.contiguous();  // [n, D/2]
  SfWriteArgs args = write_args(k_cache, v_cache, k, v, slots_c, shape);
  args.cos = cos_c.const_data_ptr();
  args.sin = sin_c.const_data_ptr();
  args.table_dtype = dtype_code(cos.scalar_type());
  check_status(sf_sdk_cuda_cache_write(&args, current_stream(k.device())), "cache_write_rope");
}

}  // namespace

TORCH_LIBRARY_IMPL(sf_sdk, CUDA, m) {
  m.impl("cache_attention", &cache_attention_cuda);
  m.impl("cache_write", &cache_write_cuda);
  m.impl("cache_write_rope", &cache_write_rope_cuda);
}

}  // namespace sf_sdk::cuda

// sf_sdk::cache_write and sf_sdk::cache_write_rope on the CPU: scatter a chunk's keys/values into
// token slots of the KV cache, in place.
//
//   k_cache[b, slots[i], h, :] = k[b, i, h, :]        (cache_write_rope: rotary(k[b, i, h, :], i))
//   v_cache[b, slots[i], h, :] = v[b, i, h, :]
//
// Slots are arbitrary, so one call writes a chunk whose frames wrap around the end of the ring.
// Rotary is Wan's complex-pair rotation: channels (2p, 2p + 1) of token i are rotated by the angle
// whose cosine / sine are cos[i, p] / sin[i, p]; it is computed in float32 (float64 when k or the
// tables are float64) and rounded once to the cache dtype.
#include "../checks.h"
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sf_sdk::cpu {
namespace {

// Token rows copied per parallel task at least (small writes stay on the calling thread).
constexpr int64_t kMinBytesPerTask = 1 << 20;  // below ~1 MiB a second thread costs more than it saves

// Checks every slot index on the host; returns the slots as a pointer into `slots`.
const int64_t* checked_slots(const at::Tensor& slots_in, at::Tensor& holder, int64_t capacity) {
  holder = slots_in.contiguous();
  const int64_t* slots = holder.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < holder.numel(); ++i) {
    TORCH_CHECK_VALUE(slots[i] >= 0 && slots[i] < capacity, "slots[", i, "] = ", slots[i],
                      " is outside the cache [0, capacity = ", capacity, ")");
  }
  return slots;
}

// Calls row(b, i) for every (batch, token) pair, in parallel when the write is large.
template <typename F>
void for_each_token(const WriteShape& shape, int64_t bytes_per_token, const F& row) {
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / std::max<int64_t>(1, bytes_per_token));
  at::parallel_for(0, shape.batch * shape.tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      row(t / shape.tokens, t % shape.tokens);
    }
  });
}

// Byte copy of one token's heads: any dtype.
void copy_token(const at::Tensor& cache, const at::Tensor& src, int64_t b, int64_t i, int64_t slot,
                const WriteShape& shape) {
  const int64_t elem = src.element_size();
  const auto* from = static_cast<const char*>(src.const_data_ptr()) + (b * src.stride(0) + i * src.stride(1)) * elem;
  auto* to = static_cast<char*>(cache.mutable_data_ptr()) + (b * cache.stride(0) + slot * cache.stride(1)) * elem;
  const size_t head_bytes = static_cast<size_t>(shape.head_dim * elem);
  if (src.stride(2) == shape.head_dim && cache.stride(2) == shape.head_dim) {
    std::memcpy(to, from, head_bytes * static_cast<size_t>(shape.heads));  // [H, D] contiguous in both
    return;
  }
  for (int64_t h = 0; h < shape.heads; ++h) {
    std::memcpy(to + h * cache.stride(2) * elem, from + h * src.stride(2) * elem, head_bytes);
  }
}

void cache_write_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& slots) {
  const WriteShape shape = check_cache_write_args(k_cache, v_cache, k, v, slots);
  at::Tensor slots_holder;
  const int64_t* slot = checked_slots(slots, slots_holder, shape.capacity);
  for_each_token(shape, 2 * shape.heads * shape.head_dim * k.element_size(), [&](int64_t b, int64_t i) {
    copy_token(k_cache, k, b, i, slot[i], shape);
    copy_token(v_cache, v, b, i, slot[i], shape);
  });
}

// Rotates the pairs of one head row: dst[2p], dst[2p + 1] = (x0 c - x1 s, x0 s + x1 c).
template <typename scalar_t, typename acc_t>
inline void rotate_row(const scalar_t* x, const acc_t* cos, const acc_t* sin, int64_t pairs, scalar_t* dst) {
  for (int64_t p = 0; p < pairs; ++p) {
    const acc_t x0 = static_cast<acc_t>(x[2 * p]);
    const acc_t x1 = static_cast<acc_t>(x[2 * p + 1]);
    dst[2 * p] = static_cast<scalar_t>(x0 * cos[p] - x1 * sin[p]);
    dst[2 * p + 1] = static_cast<scalar_t>(x0 * sin[p] + x1 * cos[p]);
  }
}

template <typename scalar_t, typename acc_t>
void write_rope(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                const int64_t* slot, const at::Tensor& cos, const at::Tensor& sin, const WriteShape& shape) {
  const at::Tensor c = cos.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // [n, D/2]
  const at::Tensor s = sin.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // [n, D/2]
  const acc_t* c_ptr = c.const_data_ptr<acc_t>();
  const acc_t* s_ptr = s.const_data_ptr<acc_t>();
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
  scalar_t* kc_ptr = k_cache.mutable_data_ptr<scalar_t>();
  const int64_t pairs = shape.head_dim / 2;
  for_each_token(shape, 2 * shape.heads * shape.head_dim * k.element_size(), [&](int64_t b, int64_t i) {
    for (int64_t h = 0; h < shape.heads; ++h) {
      rotate_row(k_ptr + b * k.stride(0) + i * k.stride(1) + h * k.stride(2), c_ptr + i * pairs, s_ptr + i * pairs,
                 pairs, kc_ptr + b * k_cache.stride(0) + slot[i] * k_cache.stride(1) + h * k_cache.stride(2));
    }
    copy_token(v_cache, v, b, i, slot[i], shape);
  });
}

}  // namespace

void cache_write_rope_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& slots, const at::Tensor& cos, const at::Tensor& sin) {
  const WriteShape shape = check_cache_write_args(k_cache, v_cache, k, v, slots);
  check_rope_tables(cos, sin, shape, k);
  check_dtype_supported(k, "k", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  at::Tensor slots_holder;
  const int64_t* slot = checked_slots(slots, slots_holder, shape.capacity);
  const bool wide = k.scalar_type() == at::kDouble || cos.scalar_type() == at::kDouble;
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (wide) {
      write_rope<scalar_t, double>(k_cache, v_cache, k, v, slot, cos, sin, shape);
    } else {
      write_rope<scalar_t, float>(k_cache, v_cache, k, v, slot, cos, sin, shape);
    }
  };
  switch (k.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kDouble:
      run(double{});
      break;
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    case at::kHalf:
      run(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "unreachable: dtype checked above");
  }
}

TORCH_LIBRARY_IMPL(sf_sdk, CPU, m) {
  m.impl("cache_write", &cache_write_cpu);
  m.impl("cache_write_rope", &cache_write_rope_cpu);
}

}  // namespace sf_sdk::cpu

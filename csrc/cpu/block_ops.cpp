// The DiT block's elementwise chains on the CPU, float32, each in one pass over its rows (the
// PyTorch forms take 2-6 ops and as many passes over the activations):
//
//   modulated_layer_norm(x, shift, scale1, eps)   x [B, N, D], shift / scale1 [B, F, 1, D], F | N:
//       out[b, n] = layer_norm(x[b, n]) * scale1[b, n / T] + shift[b, n / T]      (T = N / F)
//       (adaLN: the frame's 1 + scale and shift; a layer norm without affine weights)
//   grouped_rms_norm(x, weight, eps)              x [B, L, G, D], weight [G, D]:
//       out[b, l, g] = x[b, l, g] / rms(x[b, l, g]) * weight[g]
//       (the q and k norms of one fused projection: G = 2; a single norm: G = 1)
//   gelu_tanh_(y)                                 in place, y contiguous:
//       y = 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))) = y sigmoid(2 sqrt(2/pi) (y + 0.044715 y^3))
//
// Inputs may be strided except in their last dimension; outputs are contiguous. Statistics
// accumulate in float32 with two passes per row (mean, then squared deviations). The Python
// references (sf_sdk/ops.py) are the same functions in PyTorch ops.
#include "../checks.h"
#include "kernels.h"
#include "vec_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace sf_sdk::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Elements below which a call stays on the calling thread: waking the thread team costs more than
// a pass over a small chunk's activations (48 tokens x 1024 channels for the tiny DiT's FFN).
constexpr int64_t kMinParallelElements = 1 << 18;

// Horizontal sum of a vector.
inline float reduce_sum(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) {
    s += lanes[i];
  }
  return s;
}

inline float row_sum(const float* x, int64_t n) {
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    acc = acc + Vec::loadu(x + i);
  }
  float s = reduce_sum(acc);
  for (; i < n; ++i) {
    s += x[i];
  }
  return s;
}

// sum((x - c)^2) over a row.
inline float row_sum_sq(const float* x, int64_t n, float c) {
  const Vec cv(c);
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vec d = Vec::loadu(x + i) - cv;
    acc = at::vec::fmadd(d, d, acc);
  }
  float s = reduce_sum(acc);
  for (; i < n; ++i) {
    const float d = x[i] - c;
    s += d * d;
  }
  return s;
}

// Runs row(r) for r in [0, rows), in parallel when the call is large.
template <typename F>
void for_each_row(int64_t rows, int64_t row_elements, const F& row) {
  const auto loop = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      row(r);
    }
  };
  if (rows * row_elements < kMinParallelElements) {
    loop(0, rows);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / 4 / std::max<int64_t>(1, row_elements));
  at::parallel_for(0, rows, grain, loop);
}

void check_float32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, " must be float32 for the CPU kernel, got ",
                    t.scalar_type(), "; other dtypes run the reference (sf_sdk.ops)");
  TORCH_CHECK_VALUE(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    " must be contiguous in its last dimension, got strides ", t.strides(),
                    "; call .contiguous() on it first");
}

}  // namespace

at::Tensor modulated_layer_norm_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale1,
                                    double eps) {
  check_float32_cpu(x, "x");
  check_float32_cpu(shift, "shift");
  check_float32_cpu(scale1, "scale1");
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be [B, N, D], got shape ", x.sizes());
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2);
  TORCH_CHECK_VALUE(shift.dim() == 4 && shift.sizes() == scale1.sizes() && shift.size(0) == batch &&
                        shift.size(2) == 1 && shift.size(3) == dim,
                    "shift and scale1 must both be [B, F, 1, D] = [", batch, ", F, 1, ", dim, "], got ",
                    shift.sizes(), " and ", scale1.sizes());
  const int64_t frames = shift.size(1);
  TORCH_CHECK_VALUE(frames > 0 && tokens % frames == 0, "x's ", tokens, " tokens are not whole frames of the ",
                    frames, " frames of shift / scale1");
  const int64_t per_frame = tokens / frames;
  at::Tensor out = at::empty({batch, tokens, dim}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* sp = shift.const_data_ptr<float>();
  const float* cp = scale1.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const float epsf = static_cast<float>(eps);
  for_each_row(batch * tokens, dim, [&](int64_t r) {
    const int64_t b = r / tokens, n = r % tokens, f = n / per_frame;
    const float* row = xp + b * x.stride(0) + n * x.stride(1);
    const float* sh = sp + b * shift.stride(0) + f * shift.stride(1);
    const float* sc = cp + b * scale1.stride(0) + f * scale1.stride(1);
    float* o = op + r * dim;
    const float mean = row_sum(row, dim) * inv_dim;
    const float rstd = 1.0f / std::sqrt(row_sum_sq(row, dim, mean) * inv_dim + epsf);
    const Vec mv(mean), rv(rstd);
    int64_t i = 0;
    for (; i + kLanes <= dim; i += kLanes) {
      const Vec normed = (Vec::loadu(row + i) - mv) * rv;
      at::vec::fmadd(normed, Vec::loadu(sc + i), Vec::loadu(sh + i)).store(o + i);
    }
    for (; i < dim; ++i) {
      o[i] = (row[i] - mean) * rstd * sc[i] + sh[i];
    }
  });
  return out;
}

at::Tensor grouped_rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight_in, double eps) {
  check_float32_cpu(x, "x");
  check_float32_cpu(weight_in, "weight");
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be [B, L, G, D], got shape ", x.sizes());
  const int64_t batch = x.size(0), len = x.size(1), groups = x.size(2), dim = x.size(3);
  TORCH_CHECK_VALUE(weight_in.dim() == 2 && weight_in.size(0) == groups && weight_in.size(1) == dim,
                    "weight must be [G, D] = [", groups, ", ", dim, "], got ", weight_in.sizes());
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty({batch, len, groups, dim}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const float epsf = static_cast<float>(eps);
  for_each_row(batch * len * groups, dim, [&](int64_t r) {
    const int64_t g = r % groups, l = (r / groups) % len, b = r / (groups * len);
    const float* row = xp + b * x.stride(0) + l * x.stride(1) + g * x.stride(2);
    const float* w = wp + g * dim;
    float* o = op + r * dim;
    const float rstd = 1.0f / std::sqrt(row_sum_sq(row, dim, 0.0f) * inv_dim + epsf);
    const Vec rv(rstd);
    int64_t i = 0;
    for (; i + kLanes <= dim; i += kLanes) {
      (Vec::loadu(row + i) * rv * Vec::loadu(w + i)).store(o + i);
    }
    for (; i < dim; ++i) {
      o[i] = row[i] * rstd * w[i];
    }
  });
  return out;
}

void gelu_tanh_inplace_cpu(const at::Tensor& y) {
  check_float32_cpu(y, "y");
  TORCH_CHECK_VALUE(y.is_contiguous(), "y must be contiguous, got strides ", y.strides(),
                    "; call .contiguous() on it first");
  constexpr float kTwoSqrt2OverPi = 1.5957691216057308f;  // 2 sqrt(2 / pi)
  constexpr float kCubic = 0.044715f;
  float* p = y.mutable_data_ptr<float>();
  const int64_t n = y.numel();
  const int64_t blocks = (n + 1023) / 1024;
  for_each_row(blocks, 1024, [&](int64_t blk) {
    const int64_t begin = blk * 1024, end = std::min<int64_t>(n, begin + 1024);
    int64_t i = begin;
    const Vec c(kTwoSqrt2OverPi), c3(kCubic * kTwoSqrt2OverPi);
    for (; i + kLanes <= end; i += kLanes) {
      const Vec v = Vec::loadu(p + i);
      const Vec u = v * at::vec::fmadd(c3, v * v, c);  // 2 sqrt(2/pi) (v + 0.044715 v^3)
      (v * sigmoid(u)).store(p + i);
    }
    for (; i < end; ++i) {
      const float v = p[i];
      const float u = v * (kTwoSqrt2OverPi + kCubic * kTwoSqrt2OverPi * v * v);
      p[i] = v / (1.0f + std::exp(-u));
    }
  });
}

TORCH_LIBRARY_IMPL(sf_sdk, CPU, m) {
  m.impl("modulated_layer_norm", &modulated_layer_norm_cpu);
  m.impl("grouped_rms_norm", &grouped_rms_norm_cpu);
  m.impl("gelu_tanh_", &gelu_tanh_inplace_cpu);
}

}  // namespace sf_sdk::cpu

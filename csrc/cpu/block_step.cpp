// sf_sdk::dit_block_step and sf_sdk::dit_block_write_kv on the CPU: one DiT block's call on a
// streaming chunk, or its cache pass, as one op.
//
// The eager block (sf_sdk/models/dit.py: Block.forward / Block.write_kv with a StepAttention) is
// some 60 PyTorch ops per call; at the small sizes of a streaming chunk most of its time is Python
// and dispatch, not arithmetic. These ops run the same ops in the same order from C++: the same
// ATen kernels (linear, SDPA, addcmul, layer_norm, the complex rotary product) and the same
// sf_sdk CPU kernels (kernels.h), so their outputs equal the Python path's bit for bit.
//
//   dit_block_step(x [B, N, dim], e0 [B, F, 6, dim], modulation [1, 6, dim], weights, ...)
//     shift1, scale1, gate1, shift2, scale2, gate2 = modulation + e0      (per frame, 1 + scale)
//     q, k, v = split(linear(adaLN(x; shift1, scale1), qkv)); q, k = rms_norm(q, k)
//     write k (rotated by cos / sin) and v into the cache slots `slots` of layer `layer`
//     y = o(SDPA(rotary(q; freqs), k_cache[:kv_len], v_cache[:kv_len]))
//     x = x + gate1 * y
//     x = x + co(SDPA(rms_norm(cq(norm3(x))), cross_k, cross_v))
//     x = x + gate2 * ffn2(gelu_tanh(ffn1(adaLN(x; shift2, scale2))))
//   dit_block_write_kv: only the cache write of the first part (the last layer of a cache pass).
//
// weights (all float32, any layout torch.linear takes): qkv_w [3 dim, dim], qkv_b, o_w, o_b, cq_w,
// cq_b, co_w, co_b, ffn1_w, ffn1_b, ffn2_w, ffn2_b. The optional norms: qk_norm [2, dim] (the q
// and k RMS-norm weights), norm3 weight / bias [dim] (the cross-attention's affine layer norm;
// absent: identity), cross_q_norm [dim]. The caches are the whole [L, rows+, capacity, H, D]
// buffers; rows `rows` of layer `layer` are written. freqs: the chunk's complex rotary table
// [N, 1, D/2] (cos + i sin, complex64).
#include "../checks.h"
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/view_as_complex.h>
#include <ATen/ops/view_as_real.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace sf_sdk::cpu {
namespace {

enum Weight : int64_t { kQkvW, kQkvB, kOW, kOB, kCqW, kCqB, kCoW, kCoB, kFfn1W, kFfn1B, kFfn2W, kFfn2B, kNumWeights };

struct Geometry {
  int64_t batch, tokens, dim, frames, heads, head_dim;
};

Geometry check_block_args(const at::Tensor& x, const at::Tensor& e0, const at::Tensor& modulation,
                          int64_t num_heads) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.is_contiguous(),
                    "x must be a contiguous float32 CPU tensor [B, N, dim], got ", x.scalar_type(), " ",
                    x.sizes(), " on ", x.device());
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2);
  TORCH_CHECK_VALUE(e0.dim() == 4 && e0.size(0) == batch && e0.size(2) == 6 && e0.size(3) == dim &&
                        e0.scalar_type() == at::kFloat,
                    "e0 must be float32 [B, F, 6, dim] = [", batch, ", F, 6, ", dim, "], got ", e0.scalar_type(),
                    " ", e0.sizes());
  const int64_t frames = e0.size(1);
  TORCH_CHECK_VALUE(frames > 0 && tokens % frames == 0, "x's ", tokens, " tokens are not whole frames of e0's ",
                    frames, " frames");
  TORCH_CHECK_VALUE(modulation.dim() == 3 && modulation.size(0) == 1 && modulation.size(1) == 6 &&
                        modulation.size(2) == dim,
                    "modulation must be [1, 6, dim] = [1, 6, ", dim, "], got ", modulation.sizes());
  TORCH_CHECK_VALUE(num_heads > 0 && dim % num_heads == 0 && (dim / num_heads) % 2 == 0,
                    "num_heads = ", num_heads, " must divide dim = ", dim, " into an even head dim");
  return {batch, tokens, dim, frames, num_heads, dim / num_heads};
}

// The layer's first `rows` rows of a whole cache buffer [L, B, capacity, H, D].
at::Tensor layer_rows(const at::Tensor& cache, int64_t layer, int64_t rows, const char* name) {
  TORCH_CHECK_VALUE(cache.dim() == 5, name, " must be the whole cache [L, B, capacity, H, D], got ", cache.sizes());
  TORCH_CHECK_VALUE(layer >= 0 && layer < cache.size(0), "layer ", layer, " is outside ", name, "'s ",
                    cache.size(0), " layers");
  TORCH_CHECK_VALUE(rows > 0 && rows <= cache.size(1), "rows = ", rows, " must be in [1, ", cache.size(1), "]");
  return cache.select(0, layer).slice(0, 0, rows);
}

// adaLN vectors of the block: (shift1, 1 + scale1, gate1, shift2, 1 + scale2, gate2), each [B, F, 1, dim]
// (with self_attention_only, the FFN's 1 + scale2 is left as scale2: nothing reads it).
std::vector<at::Tensor> modulation_of(const at::Tensor& modulation, const at::Tensor& e0,
                                      bool self_attention_only = false) {
  std::vector<at::Tensor> parts = at::add(modulation.unsqueeze(1), e0).unsqueeze(3).unbind(2);
  parts[1] = at::add(parts[1], 1);
  if (!self_attention_only) {
    parts[4] = at::add(parts[4], 1);
  }
  return parts;
}

// q (normed), k (normed), v [B, N, H, D] of the adaLN-modulated x.
std::vector<at::Tensor> project_qkv(const at::Tensor& h, const at::Tensor& qkv_w, const at::Tensor& qkv_b,
                                    const std::optional<at::Tensor>& qk_norm, const Geometry& g, double eps) {
  const at::Tensor qkv = at::linear(h, qkv_w, qkv_b).view({g.batch, g.tokens, 3, g.dim});
  at::Tensor qk = qkv.slice(2, 0, 2);
  if (qk_norm.has_value()) {
    qk = grouped_rms_norm_cpu(qk, *qk_norm, eps);
  }
  const std::vector<int64_t> heads = {g.batch, g.tokens, g.heads, g.head_dim};
  return {qk.select(2, 0).view(heads), qk.select(2, 1).view(heads), qkv.select(2, 2).view(heads)};
}

// x + y * gate per frame: x, y [B, N, dim], gate [B, F, 1, dim].
at::Tensor gated_add(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const Geometry& g) {
  const std::vector<int64_t> per_frame = {g.batch, g.frames, g.tokens / g.frames, g.dim};
  return at::addcmul(x.view(per_frame), y.view(per_frame), gate).view({g.batch, g.tokens, g.dim});
}

// Softmax attention in the [B, L, H, D] layout.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2);
}

at::Tensor dit_block_step_cpu(const at::Tensor& x_in, const at::Tensor& e0, const at::Tensor& modulation,
                              at::TensorList weights, const std::optional<at::Tensor>& qk_norm,
                              const std::optional<at::Tensor>& norm3_weight,
                              const std::optional<at::Tensor>& norm3_bias,
                              const std::optional<at::Tensor>& cross_q_norm, const at::Tensor& cross_k,
                              const at::Tensor& cross_v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              int64_t layer, int64_t rows, const at::Tensor& slots, const at::Tensor& cos,
                              const at::Tensor& sin, const at::Tensor& freqs, int64_t kv_len, int64_t num_heads,
                              double eps) {
  const Geometry g = check_block_args(x_in, e0, modulation, num_heads);
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == kNumWeights, "weights must be the block's ",
                    kNumWeights, " projection tensors (qkv, o, cross q, cross o, ffn1, ffn2: weight, bias), got ",
                    weights.size());
  TORCH_CHECK_VALUE(rows == g.batch, "rows = ", rows, " must equal x's batch ", g.batch);
  TORCH_CHECK_VALUE(freqs.scalar_type() == at::kComplexFloat && freqs.dim() == 3 && freqs.size(0) == g.tokens &&
                        freqs.size(1) == 1 && freqs.size(2) == g.head_dim / 2,
                    "freqs must be complex64 [N, 1, D/2] = [", g.tokens, ", 1, ", g.head_dim / 2, "], got ",
                    freqs.scalar_type(), " ", freqs.sizes());
  const at::Tensor kc = layer_rows(k_cache, layer, rows, "k_cache");
  const at::Tensor vc = layer_rows(v_cache, layer, rows, "v_cache");
  TORCH_CHECK_VALUE(kv_len > 0 && kv_len <= kc.size(1), "kv_len = ", kv_len, " must be in [1, capacity = ",
                    kc.size(1), "]");
  const std::vector<at::Tensor> mod = modulation_of(modulation, e0);

  // Self-attention over the cache.
  const std::vector<at::Tensor> qkv =
      project_qkv(modulated_layer_norm_cpu(x_in, mod[0], mod[1], eps), weights[kQkvW], weights[kQkvB], qk_norm, g, eps);
  const at::Tensor q = at::view_as_real(at::mul(at::view_as_complex(qkv[0].unflatten(-1, {-1, 2})), freqs)).flatten(-2);
  cache_write_rope_cpu(kc, vc, qkv[1], qkv[2], slots, cos, sin);
  const at::Tensor self_out = attend(q, kc.slice(1, 0, kv_len), vc.slice(1, 0, kv_len));
  at::Tensor x = gated_add(x_in, at::linear(self_out.flatten(2), weights[kOW], weights[kOB]), mod[2], g);

  // Cross-attention to the prompt.
  const at::Tensor xn = norm3_weight.has_value() ? at::layer_norm(x, {g.dim}, norm3_weight, norm3_bias, eps) : x;
  at::Tensor cq = at::linear(xn, weights[kCqW], weights[kCqB]);
  if (cross_q_norm.has_value()) {
    cq = grouped_rms_norm_cpu(cq.unsqueeze(2), cross_q_norm->unsqueeze(0), eps).squeeze(2);
  }
  const at::Tensor cross_out = attend(cq.view({g.batch, g.tokens, g.heads, g.head_dim}), cross_k, cross_v);
  x = at::add(x, at::linear(cross_out.flatten(2), weights[kCoW], weights[kCoB]));

  // FFN.
  const at::Tensor y = at::linear(modulated_layer_norm_cpu(x, mod[3], mod[4], eps), weights[kFfn1W], weights[kFfn1B]);
  gelu_tanh_inplace_cpu(y);
  return gated_add(x, at::linear(y, weights[kFfn2W], weights[kFfn2B]), mod[5], g);
}

void dit_block_write_kv_cpu(const at::Tensor& x, const at::Tensor& e0, const at::Tensor& modulation,
                            const at::Tensor& qkv_w, const at::Tensor& qkv_b, const std::optional<at::Tensor>& qk_norm,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t layer, int64_t rows,
                            const at::Tensor& slots, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                            double eps) {
  const Geometry g = check_block_args(x, e0, modulation, num_heads);
  TORCH_CHECK_VALUE(rows == g.batch, "rows = ", rows, " must equal x's batch ", g.batch);
  const at::Tensor kc = layer_rows(k_cache, layer, rows, "k_cache");
  const at::Tensor vc = layer_rows(v_cache, layer, rows, "v_cache");
  const std::vector<at::Tensor> mod = modulation_of(modulation, e0, /*self_attention_only=*/true);
  const std::vector<at::Tensor> qkv =
      project_qkv(modulated_layer_norm_cpu(x, mod[0], mod[1], eps), qkv_w, qkv_b, qk_norm, g, eps);
  cache_write_rope_cpu(kc, vc, qkv[1], qkv[2], slots, cos, sin);
}

}  // namespace

TORCH_LIBRARY_IMPL(sf_sdk, CPU, m) {
  m.impl("dit_block_step", &dit_block_step_cpu);
  m.impl("dit_block_write_kv", &dit_block_write_kv_cpu);
}

}  // namespace sf_sdk::cpu

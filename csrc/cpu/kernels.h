// The CPU kernels that other CPU kernels call directly (no dispatcher round trip): the block's
// elementwise chains (block_ops.cpp) and the rotary cache write (cache_write.cpp), as registered
// for their sf_sdk:: ops. block_step.cpp composes them into whole DiT block calls.
#pragma once

#include <ATen/core/Tensor.h>

namespace sf_sdk::cpu {

at::Tensor modulated_layer_norm_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale1,
                                    double eps);
at::Tensor grouped_rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
void gelu_tanh_inplace_cpu(const at::Tensor& y);
void cache_write_rope_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& slots, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace sf_sdk::cpu

// Vector math shared by the CPU kernels, on at::vec::Vectorized<float> (AVX2 in our builds). Written
// out here rather than taken from Vectorized's exp / tanh, which call SLEEF: an extension built
// outside PyTorch's tree cannot rely on linking it.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace sf_sdk::cpu {

// ------------------------------------------------------------------------------------------
// exp2 on a vector, for x <= 0 (e.g. scores minus their running max).
// 2^x = 2^n * 2^f with n = round(x), f in [-0.5, 0.5]; 2^f is a degree-5 polynomial fitted to
// minimise the relative error on [-0.5, 0.5] (2.3e-7 with float32 Horner evaluation); 2^n is
// built in the exponent bits. Inputs below -127 (including -inf) return exactly 0.
// ------------------------------------------------------------------------------------------
inline at::vec::Vectorized<float> exp2_nonpositive(at::vec::Vectorized<float> x) {
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec c0(1.0000001192092896f), c1(0.6931469440460205f), c2(0.24022121727466583f),
      c3(0.05550742521882057f), c4(0.009675459936261177f), c5(0.0013266970636323094f);
  x = at::vec::clamp_min(x, Vec(-127.0f));
  const Vec n = x.round();
  const Vec f = x - n;
  Vec p = at::vec::fmadd(c5, f, c4);
  p = at::vec::fmadd(p, f, c3);
  p = at::vec::fmadd(p, f, c2);
  p = at::vec::fmadd(p, f, c1);
  p = at::vec::fmadd(p, f, c0);
  // n = -127 gives exponent bits 0, i.e. exactly 0.
  const IVec bits = (at::vec::convert_to_int_of_same_size(n) + IVec(127)) << IVec(23);
  return p * at::vec::cast<float>(bits);
}

// The logistic sigmoid 1 / (1 + e^-u), for any u: with e = e^-|u| <= 1 (never overflows), it is
// 1 / (1 + e) for u >= 0 and e / (1 + e) for u < 0. Relative error ~3e-7.
inline at::vec::Vectorized<float> sigmoid(at::vec::Vectorized<float> u) {
  using Vec = at::vec::Vectorized<float>;
  constexpr float kLog2e = 1.4426950408889634f;
  const Vec e = exp2_nonpositive(Vec(-kLog2e) * u.abs());
  const Vec one(1.0f);
  const Vec r = one / (one + e);
  return Vec::blendv(r, e * r, u < Vec(0.0f));
}

}  // namespace sf_sdk::cpu

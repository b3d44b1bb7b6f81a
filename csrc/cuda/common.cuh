// Shared helpers of the sf_sdk CUDA kernels: error reporting and element conversions.
// CUDA runtime and cuda_fp16.h / cuda_bf16.h only; the code uses explicit conversion intrinsics so
// it compiles with torch's -D__CUDA_NO_HALF_OPERATORS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__ style
// flags as well as without them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace sf_sdk_cuda {

// Records "what is wrong" for sf_sdk_cuda_last_error(); returns SF_CUDA_INVALID_ARGUMENT.
int invalid_argument(const char* format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;

// SF_CUDA_OK for cudaSuccess; otherwise records the runtime error and returns its (positive) code.
int runtime_status(cudaError_t error, const char* what);

#define SF_CHECK_ARG(cond, ...)                               \
  do {                                                        \
    if (!(cond)) {                                            \
      return ::sf_sdk_cuda::invalid_argument(__VA_ARGS__);    \
    }                                                         \
  } while (0)

#define SF_CHECK_CUDA(expr, what)                                            \
  do {                                                                       \
    const int sf_status_ = ::sf_sdk_cuda::runtime_status((expr), (what));    \
    if (sf_status_ != SF_CUDA_OK) {                                          \
      return sf_status_;                                                     \
    }                                                                        \
  } while (0)

inline bool valid_strides(const SfStrides& s) {
  return s.batch >= 0 && s.token >= 0 && s.head >= 0;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) {
  return ceil_div(a, b) * b;
}

// Conversions between storage types and the float (or double) arithmetic type.
template <typename T>
struct Num;

template <>
struct Num<float> {
  __device__ static float to_float(float x) { return x; }
  __device__ static float from_float(float x) { return x; }
  __device__ static double to_double(float x) { return static_cast<double>(x); }
  __device__ static float from_double(double x) { return static_cast<float>(x); }
};

template <>
struct Num<double> {
  __device__ static float to_float(double x) { return static_cast<float>(x); }
  __device__ static double from_float(float x) { return static_cast<double>(x); }
  __device__ static double to_double(double x) { return x; }
  __device__ static double from_double(double x) { return x; }
};

template <>
struct Num<__half> {
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ static double to_double(__half x) { return static_cast<double>(__half2float(x)); }
  __device__ static __half from_double(double x) { return __double2half(x); }
};

template <>
struct Num<__nv_bfloat16> {
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ static double to_double(__nv_bfloat16 x) { return static_cast<double>(__bfloat162float(x)); }
  __device__ static __nv_bfloat16 from_double(double x) { return __double2bfloat16(x); }
};

}  // namespace sf_sdk_cuda

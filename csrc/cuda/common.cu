// Error state of the C launcher API (one message per host thread).
#include "common.cuh"

#include <cstdarg>
#include <cstdio>

namespace sf_sdk_cuda {
namespace {
constexpr int kMessageBytes = 512;
thread_local char last_error[kMessageBytes] = "";
}  // namespace

int invalid_argument(const char* format, ...) {
  va_list args;
  va_start(args, format);
  std::vsnprintf(last_error, kMessageBytes, format, args);
  va_end(args);
  return SF_CUDA_INVALID_ARGUMENT;
}

int runtime_status(cudaError_t error, const char* what) {
  if (error == cudaSuccess) {
    return SF_CUDA_OK;
  }
  std::snprintf(last_error, kMessageBytes, "%s: %s (%s)", what, cudaGetErrorString(error), cudaGetErrorName(error));
  return static_cast<int>(error);
}

}  // namespace sf_sdk_cuda

extern "C" const char* sf_sdk_cuda_last_error(void) {
  return sf_sdk_cuda::last_error;
}

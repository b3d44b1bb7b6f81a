// sf_sdk cache writes on CUDA: scatter a chunk's keys/values into token slots of the KV cache, in
// place, optionally rotating the keys with Wan's complex-pair rotary on the way:
//   k_cache[b, slots[i], h, 2p : 2p + 2] = (k0 c - k1 s, k0 s + k1 c),  c, s = cos[i, p], sin[i, p]
//   v_cache[b, slots[i], h, :]           = v[b, i, h, :]
// One block per (batch, token, head) row, threads along the head dim. Slots are read on the device.
#include <cstdint>
#include <cstdio>

#include "common.cuh"

namespace sf_sdk_cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = 65535 * 16;  // grid-stride loop beyond this many rows

struct WriteKernelArgs {
  void* k_cache;
  void* v_cache;
  const void* k;
  const void* v;
  const int64_t* slots;
  const void* cos;
  const void* sin;
  SfStrides kcs, vcs, ks, vs;
  int64_t tokens, heads, head_dim, capacity, rows;
};

__device__ __forceinline__ int64_t checked_slot(const WriteKernelArgs& a, int64_t i) {
  const int64_t slot = a.slots[i];
  if (slot < 0 || slot >= a.capacity) {
    if (threadIdx.x == 0) {
      printf("sf_sdk cache_write: slots[%lld] = %lld is outside [0, %lld)\n", static_cast<long long>(i),
             static_cast<long long>(slot), static_cast<long long>(a.capacity));
    }
    __trap();
  }
  return slot;
}

// Plain copy; T is any type of the element's size.
template <typename T>
__global__ void __launch_bounds__(kThreads) write_kernel(const WriteKernelArgs a) {
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t h = row % a.heads;
    const int64_t i = (row / a.heads) % a.tokens;
    const int64_t b = row / (a.heads * a.tokens);
    const int64_t slot = checked_slot(a, i);
    const T* k = static_cast<const T*>(a.k) + b * a.ks.batch + i * a.ks.token + h * a.ks.head;
    const T* v = static_cast<const T*>(a.v) + b * a.vs.batch + i * a.vs.token + h * a.vs.head;
    T* kc = static_cast<T*>(a.k_cache) + b * a.kcs.batch + slot * a.kcs.token + h * a.kcs.head;
    T* vc = static_cast<T*>(a.v_cache) + b * a.vcs.batch + slot * a.vcs.token + h * a.vcs.head;
    for (int64_t d = threadIdx.x; d < a.head_dim; d += blockDim.x) {
      kc[d] = k[d];
      vc[d] = v[d];
    }
  }
}

// Rotary write: T the element type, Tab the table type, Acc the arithmetic type.
template <typename T, typename Tab, typename Acc>
__global__ void __launch_bounds__(kThreads) write_rope_kernel(const WriteKernelArgs a) {
  const int64_t pairs = a.head_dim / 2;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t h = row % a.heads;
    const int64_t i = (row / a.heads) % a.tokens;
    const int64_t b = row / (a.heads * a.tokens);
    const int64_t slot = checked_slot(a, i);
    const T* k = static_cast<const T*>(a.k) + b * a.ks.batch + i * a.ks.token + h * a.ks.head;
    const T* v = static_cast<const T*>(a.v) + b * a.vs.batch + i * a.vs.token + h * a.vs.head;
    T* kc = static_cast<T*>(a.k_cache) + b * a.kcs.batch + slot * a.kcs.token + h * a.kcs.head;
    T* vc = static_cast<T*>(a.v_cache) + b * a.vcs.batch + slot * a.vcs.token + h * a.vcs.head;
    const Tab* cos = static_cast<const Tab*>(a.cos) + i * pairs;
    const Tab* sin = static_cast<const Tab*>(a.sin) + i * pairs;
    for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
      const Acc c = static_cast<Acc>(cos[p]);
      const Acc s = static_cast<Acc>(sin[p]);
      Acc x0, x1;
      if constexpr (sizeof(Acc) == sizeof(double)) {
        x0 = Num<T>::to_double(k[2 * p]);
        x1 = Num<T>::to_double(k[2 * p + 1]);
        kc[2 * p] = Num<T>::from_double(x0 * c - x1 * s);
        kc[2 * p + 1] = Num<T>::from_double(x0 * s + x1 * c);
      } else {
        x0 = Num<T>::to_float(k[2 * p]);
        x1 = Num<T>::to_float(k[2 * p + 1]);
        kc[2 * p] = Num<T>::from_float(x0 * c - x1 * s);
        kc[2 * p + 1] = Num<T>::from_float(x0 * s + x1 * c);
      }
    }
    for (int64_t d = threadIdx.x; d < a.head_dim; d += blockDim.x) {
      vc[d] = v[d];
    }
  }
}

int element_size(int dtype) {
  switch (dtype) {
    case SF_DTYPE_FLOAT32:
      return 4;
    case SF_DTYPE_FLOAT16:
    case SF_DTYPE_BFLOAT16:
      return 2;
    case SF_DTYPE_FLOAT64:
      return 8;
    default:
      return 0;
  }
}

template <typename Kernel>
int launch_rows(Kernel kernel, const WriteKernelArgs& a, cudaStream_t stream) {
  const int64_t blocks = a.rows < kMaxBlocks ? a.rows : kMaxBlocks;
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  return runtime_status(cudaGetLastError(), "cache_write kernel launch");
}

template <typename T>
int launch_rope(const SfWriteArgs* args, const WriteKernelArgs& a, cudaStream_t stream) {
  if (args->table_dtype == SF_DTYPE_FLOAT64) {
    return launch_rows(write_rope_kernel<T, double, double>, a, stream);
  }
  if (args->dtype == SF_DTYPE_FLOAT64) {
    return launch_rows(write_rope_kernel<T, float, double>, a, stream);
  }
  return launch_rows(write_rope_kernel<T, float, float>, a, stream);
}

}  // namespace
}  // namespace sf_sdk_cuda

extern "C" int sf_sdk_cuda_cache_write(const SfWriteArgs* args, cudaStream_t stream) {
  using namespace sf_sdk_cuda;
  SF_CHECK_ARG(args != nullptr, "cache_write: null argument struct");
  SF_CHECK_ARG(element_size(args->dtype) != 0, "cache_write: unsupported dtype %d", args->dtype);
  SF_CHECK_ARG(args->batch >= 0 && args->tokens >= 0 && args->heads >= 0 && args->head_dim >= 0 &&
                   args->capacity >= 0,
               "cache_write: negative size");
  SF_CHECK_ARG(valid_strides(args->k_cache_strides) && valid_strides(args->v_cache_strides) &&
                   valid_strides(args->k_strides) && valid_strides(args->v_strides),
               "cache_write: strides must be non-negative");
  const int64_t rows = args->batch * args->tokens * args->heads;
  if (rows == 0 || args->head_dim == 0) {
    return SF_CUDA_OK;
  }
  SF_CHECK_ARG(args->k_cache != nullptr && args->v_cache != nullptr && args->k != nullptr && args->v != nullptr &&
                   args->slots != nullptr,
               "cache_write: null tensor pointer");
  SF_CHECK_ARG(args->capacity > 0, "cache_write: the cache has no slots");
  const bool rope = args->cos != nullptr || args->sin != nullptr;
  if (rope) {
    SF_CHECK_ARG(args->cos != nullptr && args->sin != nullptr, "cache_write: rotary needs both cos and sin");
    SF_CHECK_ARG(args->head_dim % 2 == 0, "cache_write: rotary needs an even head_dim, got %lld",
                 static_cast<long long>(args->head_dim));
    SF_CHECK_ARG(args->table_dtype == SF_DTYPE_FLOAT32 || args->table_dtype == SF_DTYPE_FLOAT64,
                 "cache_write: rotary tables must be float32 or float64");
  }

  WriteKernelArgs a{};
  a.k_cache = args->k_cache;
  a.v_cache = args->v_cache;
  a.k = args->k;
  a.v = args->v;
  a.slots = args->slots;
  a.cos = args->cos;
  a.sin = args->sin;
  a.kcs = args->k_cache_strides;
  a.vcs = args->v_cache_strides;
  a.ks = args->k_strides;
  a.vs = args->v_strides;
  a.tokens = args->tokens;
  a.heads = args->heads;
  a.head_dim = args->head_dim;
  a.capacity = args->capacity;
  a.rows = rows;

  if (!rope) {
    switch (element_size(args->dtype)) {
      case 2:
        return launch_rows(write_kernel<uint16_t>, a, stream);
      case 4:
        return launch_rows(write_kernel<uint32_t>, a, stream);
      default:
        return launch_rows(write_kernel<uint64_t>, a, stream);
    }
  }
  switch (args->dtype) {
    case SF_DTYPE_FLOAT32:
      return launch_rope<float>(args, a, stream);
    case SF_DTYPE_FLOAT16:
      return launch_rope<__half>(args, a, stream);
    case SF_DTYPE_BFLOAT16:
      return launch_rope<__nv_bfloat16>(args, a, stream);
    default:
      return launch_rope<double>(args, a, stream);
  }
}

// sf_sdk cache attention on CUDA: a chunk's queries over the valid prefix [0, kv_len) of a KV cache,
// read in place in its [B, capacity, H, D] layout.
//
// Flash-attention style tiling with a split over keys (flash-decoding) for long caches:
//   grid (query tiles, batch * heads, splits); a block of kWarps warps owns kQueryTile queries of one
//   (batch, head), kRowsPerWarp rows per warp, and walks the keys of its split in tiles of key_tile:
//     S = Q K^T                 bf16/fp16: tensor cores (WMMA 16x16x16, float accumulators);
//                               float32: CUDA cores, exact float32
//     online softmax per row    running max m and sum l in registers, base-2 exponentials
//     O = O * alpha + P V       O kept in shared memory in float32
//   With one split the block writes out = O / l. With several, each split writes its normalized
//   partial output and (m, l) to a float32 workspace and a combine kernel merges the splits:
//     out = sum_s w_s o_s,  w_s = l_s 2^(m_s - M) / sum_s' l_s' 2^(m_s' - M),  M = max_s m_s.
// kv_len can live on the device: every block reads it and derives its own key range, so the host
// never synchronizes and the split count is planned from the capacity.
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace sf_sdk_cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kRowsPerWarp = 16;                      // one WMMA tile of rows per warp
constexpr int kQueryTile = kWarps * kRowsPerWarp;     // queries per block
constexpr int kFrag = 16;                             // WMMA m = n = k
constexpr int kMaxKeyTile = 64;                       // keys per step when shared memory allows
constexpr int kMinKeyTile = 16;
constexpr int kMinKeysPerSplit = 256;                 // do not split below this many keys per split
constexpr int kMaxSplits = 64;
constexpr int kBlocksPerSm = 2;                       // aim for this many blocks per multiprocessor
constexpr int kSmemAlign = 128;                       // byte alignment of every shared-memory region
constexpr float kLog2e = 1.4426950408889634f;

// Shared-memory geometry of one launch (host computed, passed by value).
struct Geometry {
  int head_dim;    // D
  int padded_dim;  // D rounded up to kFrag; padding columns are zero
  int key_tile;    // keys per step, a multiple of kFrag
  int ld_tile;     // row stride (elements) of the Q, K and V tiles
  int ld_s;        // row stride (floats) of the scores tile
  int ld_p;        // row stride (elements) of the probabilities tile
  int ld_o;        // row stride (floats) of the output accumulator
  // Byte offsets of the regions and the total size.
  int64_t off_q, off_k, off_v, off_s, off_p, off_o, bytes;
};

template <typename T>
Geometry make_geometry(int head_dim, int key_tile) {
  // 16-bit tiles: a multiple-of-8 stride (WMMA), offset by 8 to spread banks.
  // float tiles (CUDA-core path): an odd stride, so lanes reading different rows hit different banks.
  constexpr bool kHalfType = sizeof(T) == 2;
  Geometry g{};
  g.head_dim = head_dim;
  g.padded_dim = static_cast<int>(round_up(head_dim, kFrag));
  g.key_tile = key_tile;
  g.ld_tile = kHalfType ? g.padded_dim + 8 : g.padded_dim + 1;
  g.ld_s = key_tile + 4;
  g.ld_p = kHalfType ? key_tile + 8 : key_tile + 1;
  g.ld_o = g.padded_dim + 4;
  int64_t offset = 0;
  const auto region = [&](int64_t bytes) {
    const int64_t start = offset;
    offset += round_up(bytes, kSmemAlign);
    return start;
  };
  g.off_q = region(int64_t{kQueryTile} * g.ld_tile * sizeof(T));
  g.off_k = region(int64_t{key_tile} * g.ld_tile * sizeof(T));
  g.off_v = region(int64_t{key_tile} * g.ld_tile * sizeof(T));
  g.off_s = region(int64_t{kQueryTile} * g.ld_s * sizeof(float));
  g.off_p = region(int64_t{kQueryTile} * g.ld_p * sizeof(T));
  g.off_o = region(int64_t{kQueryTile} * g.ld_o * sizeof(float));
  g.bytes = offset;
  return g;
}

struct KernelArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  SfStrides qs, ks, vs, os;
  int64_t q_len, heads, capacity;
  int64_t kv_len_host;
  const int64_t* kv_len_device;
  int splits;
  bool vector_loads;  // 16-byte global loads (aligned pointers and strides, D a multiple of the width)
  float scale_log2;   // log2(e) / sqrt(D)
  float* part_o;      // [splits, B*H, q_len, D]  (splits > 1)
  float* part_ml;     // [splits, B*H, q_len, 2]  (m, l)
  Geometry geo;
};

__device__ __forceinline__ int64_t valid_keys(const KernelArgs& a) {
  if (a.kv_len_device == nullptr) {
    return a.kv_len_host;
  }
  const int64_t n = *a.kv_len_device;
  return n < 0 ? 0 : (n > a.capacity ? a.capacity : n);
}

// dst[r, c] = src[r * row_stride + c] for r < rows_valid and c < D, zero elsewhere (rows x padded_dim).
template <typename T>
__device__ void load_tile(T* dst, int ld, const T* src, int64_t row_stride, int rows, int rows_valid,
                          const Geometry& g, bool vector_loads) {
  const T zero = Num<T>::from_float(0.0f);
  if (vector_loads) {
    constexpr int kWidth = 16 / sizeof(T);
    const int chunks = g.padded_dim / kWidth;
    for (int idx = threadIdx.x; idx < rows * chunks; idx += kThreads) {
      const int r = idx / chunks;
      const int c = (idx % chunks) * kWidth;
      uint4 value = make_uint4(0, 0, 0, 0);
      if (r < rows_valid && c < g.head_dim) {
        value = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
      }
      *reinterpret_cast<uint4*>(dst + r * ld + c) = value;
    }
    return;
  }
  for (int idx = threadIdx.x; idx < rows * g.padded_dim; idx += kThreads) {
    const int r = idx / g.padded_dim;
    const int c = idx % g.padded_dim;
    dst[r * ld + c] = (r < rows_valid && c < g.head_dim) ? src[r * row_stride + c] : zero;
  }
}

// Per-warp tile products. s (16 x key_tile) = q (16 x D) k^T;  o (16 x D) += p (16 x key_tile) v.
template <typename T>
struct TileMath {
  // Tensor cores (16-bit inputs, float accumulators).
  __device__ static void scores(const T* q, const T* k, float* s, const Geometry& g) {
    using namespace nvcuda;
    for (int n = 0; n < g.key_tile; n += kFrag) {
      wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kk = 0; kk < g.padded_dim; kk += kFrag) {
        wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> b;  // K^T
        wmma::load_matrix_sync(a, q + kk, g.ld_tile);
        wmma::load_matrix_sync(b, k + n * g.ld_tile + kk, g.ld_tile);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(s + n, acc, g.ld_s, wmma::mem_row_major);
    }
  }

  __device__ static void accumulate(const T* p, const T* v, float* o, const Geometry& g) {
    using namespace nvcuda;
    for (int n = 0; n < g.padded_dim; n += kFrag) {
      wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc;
      wmma::load_matrix_sync(acc, o + n, g.ld_o, wmma::mem_row_major);
      for (int kk = 0; kk < g.key_tile; kk += kFrag) {
        wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, p + kk, g.ld_p);
        wmma::load_matrix_sync(b, v + kk * g.ld_tile + n, g.ld_tile);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(o + n, acc, g.ld_o, wmma::mem_row_major);
    }
  }
};

// CUDA cores, exact float32.
template <>
struct TileMath<float> {
  __device__ static void scores(const float* q, const float* k, float* s, const Geometry& g) {
    const int lane = threadIdx.x % kWarpSize;
    for (int c = lane; c < g.key_tile; c += kWarpSize) {
      float acc[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        acc[r] = 0.0f;
      }
      for (int d = 0; d < g.head_dim; ++d) {
        const float kv = k[c * g.ld_tile + d];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          acc[r] = fmaf(q[r * g.ld_tile + d], kv, acc[r]);  // q: one address per warp (broadcast)
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        s[r * g.ld_s + c] = acc[r];
      }
    }
  }

  __device__ static void accumulate(const float* p, const float* v, float* o, const Geometry& g) {
    const int lane = threadIdx.x % kWarpSize;
    for (int d = lane; d < g.head_dim; d += kWarpSize) {
      float acc[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        acc[r] = o[r * g.ld_o + d];
      }
      for (int j = 0; j < g.key_tile; ++j) {
        const float vj = v[j * g.ld_tile + d];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          acc[r] = fmaf(p[r * g.ld_p + j], vj, acc[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        o[r * g.ld_o + d] = acc[r];
      }
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_kernel(const KernelArgs a) {
  extern __shared__ __align__(kSmemAlign) unsigned char smem[];
  const Geometry& g = a.geo;
  T* s_q = reinterpret_cast<T*>(smem + g.off_q);
  T* s_k = reinterpret_cast<T*>(smem + g.off_k);
  T* s_v = reinterpret_cast<T*>(smem + g.off_v);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  float* s_s = reinterpret_cast<float*>(smem + g.off_s) + warp * kRowsPerWarp * g.ld_s;
  T* s_p = reinterpret_cast<T*>(smem + g.off_p) + warp * kRowsPerWarp * g.ld_p;
  float* s_o = reinterpret_cast<float*>(smem + g.off_o) + warp * kRowsPerWarp * g.ld_o;
  const T* s_qw = s_q + warp * kRowsPerWarp * g.ld_tile;

  const int64_t bh = blockIdx.y;
  const int64_t b = bh / a.heads;
  const int64_t h = bh % a.heads;
  const int64_t q0 = int64_t{blockIdx.x} * kQueryTile;
  const int split = blockIdx.z;

  // This split's keys: [key_begin, key_end) of the valid prefix, in whole key tiles.
  const int64_t kv_len = valid_keys(a);
  const int64_t per_split = round_up(ceil_div(kv_len, a.splits), g.key_tile);
  const int64_t key_begin = split * per_split;
  const int64_t key_end = key_begin + per_split < kv_len ? key_begin + per_split : kv_len;

  const T* q = static_cast<const T*>(a.q) + b * a.qs.batch + q0 * a.qs.token + h * a.qs.head;
  const T* k = static_cast<const T*>(a.k) + b * a.ks.batch + h * a.ks.head;
  const T* v = static_cast<const T*>(a.v) + b * a.vs.batch + h * a.vs.head;
  const int q_rows = static_cast<int>(a.q_len - q0 < kQueryTile ? a.q_len - q0 : kQueryTile);
  load_tile(s_q, g.ld_tile, q, a.qs.token, kQueryTile, q_rows, g, a.vector_loads);
  for (int idx = lane; idx < kRowsPerWarp * g.ld_o; idx += kWarpSize) {
    s_o[idx] = 0.0f;
  }

  // Softmax layout: lanes (2r, 2r + 1) own row r, each half of the key tile and of the head dim.
  const int row = lane / 2;
  const int half = lane % 2;
  const int key_half = g.key_tile / 2;
  const int dim_half = g.padded_dim / 2;
  float m = -INFINITY;  // running max of the row's scores (base-2 units)
  float l = 0.0f;       // running sum of 2^(score - m)

  for (int64_t j0 = key_begin; j0 < key_end; j0 += g.key_tile) {
    const int keys = static_cast<int>(key_end - j0 < g.key_tile ? key_end - j0 : g.key_tile);
    __syncthreads();  // the previous step's K / V tiles are no longer read
    load_tile(s_k, g.ld_tile, k + j0 * a.ks.token, a.ks.token, g.key_tile, keys, g, a.vector_loads);
    load_tile(s_v, g.ld_tile, v + j0 * a.vs.token, a.vs.token, g.key_tile, keys, g, a.vector_loads);
    __syncthreads();

    TileMath<T>::scores(s_qw, s_k, s_s, g);
    __syncwarp();

    const float* s_row = s_s + row * g.ld_s + half * key_half;
    float block_max = -INFINITY;
    for (int c = 0; c < key_half; ++c) {
      if (half * key_half + c < keys) {
        block_max = fmaxf(block_max, s_row[c] * a.scale_log2);
      }
    }
    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
    const float m_new = fmaxf(m, block_max);
    const float m_ref = m_new == -INFINITY ? 0.0f : m_new;  // no valid key yet: avoid inf - inf
    float sum = 0.0f;
    T* p_row = s_p + row * g.ld_p + half * key_half;
    for (int c = 0; c < key_half; ++c) {
      const bool valid = half * key_half + c < keys;
      const float p = valid ? exp2f(s_row[c] * a.scale_log2 - m_ref) : 0.0f;
      sum += p;
      p_row[c] = Num<T>::from_float(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const float alpha = exp2f(m - m_ref);  // 0 on the first step (m = -inf)
    l = l * alpha + sum;
    m = m_new;
    float* o_row = s_o + row * g.ld_o + half * dim_half;
    for (int d = 0; d < dim_half; ++d) {
      o_row[d] *= alpha;
    }
    __syncwarp();

    TileMath<T>::accumulate(s_p, s_v, s_o, g);
    __syncwarp();
  }

  // Epilogue: the warp writes its rows, one row at a time, lanes along the head dim.
  __syncwarp();  // s_o was last written by other lanes (the zero fill, when the split had no keys)
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const float l_r = __shfl_sync(0xffffffffu, l, 2 * r);
    const float m_r = __shfl_sync(0xffffffffu, m, 2 * r);
    const int64_t qi = q0 + warp * kRowsPerWarp + r;
    if (qi >= a.q_len) {
      break;
    }
    const float inv = l_r > 0.0f ? 1.0f / l_r : 0.0f;  // no valid key: zeros
    const float* o_r = s_o + r * g.ld_o;
    if (a.splits == 1) {
      T* out = static_cast<T*>(a.out) + b * a.os.batch + qi * a.os.token + h * a.os.head;
      for (int d = lane; d < g.head_dim; d += kWarpSize) {
        out[d] = Num<T>::from_float(o_r[d] * inv);
      }
    } else {
      const int64_t part = (int64_t{split} * gridDim.y + bh) * a.q_len + qi;
      float* out = a.part_o + part * g.head_dim;
      for (int d = lane; d < g.head_dim; d += kWarpSize) {
        out[d] = o_r[d] * inv;
      }
      if (lane == 0) {
        a.part_ml[2 * part] = m_r;
        a.part_ml[2 * part + 1] = l_r;
      }
    }
  }
}

// Merges the splits' partial outputs: one block per (batch * head, query).
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const KernelArgs a) {
  const int64_t bh = blockIdx.y;
  const int64_t qi = blockIdx.x;
  const int64_t b = bh / a.heads;
  const int64_t h = bh % a.heads;
  const int64_t rows = gridDim.y * a.q_len;  // partial rows per split
  const int64_t first = bh * a.q_len + qi;

  float m_max = -INFINITY;
  for (int s = 0; s < a.splits; ++s) {
    m_max = fmaxf(m_max, a.part_ml[2 * (s * rows + first)]);
  }
  const float m_ref = m_max == -INFINITY ? 0.0f : m_max;
  float total = 0.0f;
  for (int s = 0; s < a.splits; ++s) {
    const int64_t part = s * rows + first;
    total += a.part_ml[2 * part + 1] * exp2f(a.part_ml[2 * part] - m_ref);
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  T* out = static_cast<T*>(a.out) + b * a.os.batch + qi * a.os.token + h * a.os.head;
  for (int d = threadIdx.x; d < a.geo.head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < a.splits; ++s) {
      const int64_t part = s * rows + first;
      const float w = a.part_ml[2 * part + 1] * exp2f(a.part_ml[2 * part] - m_ref) * inv;
      acc = fmaf(w, a.part_o[part * a.geo.head_dim + d], acc);
    }
    out[d] = Num<T>::from_float(acc);
  }
}

// ------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------

int element_size(int dtype) {
  switch (dtype) {
    case SF_DTYPE_FLOAT32:
      return 4;
    case SF_DTYPE_FLOAT16:
    case SF_DTYPE_BFLOAT16:
      return 2;
    default:
      return 0;
  }
}

int check_args(const SfAttentionArgs* a) {
  SF_CHECK_ARG(a != nullptr, "cache_attention: null argument struct");
  SF_CHECK_ARG(element_size(a->dtype) != 0, "cache_attention: dtype %d is not float32, float16 or bfloat16",
               a->dtype);
  SF_CHECK_ARG(a->batch >= 0 && a->q_len >= 0 && a->heads >= 0 && a->capacity >= 0,
               "cache_attention: negative size (batch %lld, q_len %lld, heads %lld, capacity %lld)",
               static_cast<long long>(a->batch), static_cast<long long>(a->q_len),
               static_cast<long long>(a->heads), static_cast<long long>(a->capacity));
  SF_CHECK_ARG(a->head_dim >= 1 && a->head_dim <= SF_CUDA_MAX_HEAD_DIM,
               "cache_attention: head_dim must lie in [1, %d], got %lld", SF_CUDA_MAX_HEAD_DIM,
               static_cast<long long>(a->head_dim));
  SF_CHECK_ARG(valid_strides(a->q_strides) && valid_strides(a->k_strides) && valid_strides(a->v_strides) &&
                   valid_strides(a->out_strides),
               "cache_attention: strides must be non-negative");
  if (a->kv_len_device == nullptr) {
    SF_CHECK_ARG(a->kv_len_host >= 0 && a->kv_len_host <= a->capacity,
                 "cache_attention: kv_len %lld is outside [0, capacity = %lld]",
                 static_cast<long long>(a->kv_len_host), static_cast<long long>(a->capacity));
  }
  const bool empty = a->batch * a->q_len * a->heads == 0;
  SF_CHECK_ARG(empty || (a->q != nullptr && a->out != nullptr), "cache_attention: null q or out pointer");
  SF_CHECK_ARG(empty || a->capacity == 0 || (a->k != nullptr && a->v != nullptr),
               "cache_attention: null k or v pointer");
  SF_CHECK_ARG(a->batch * a->heads <= 65535, "cache_attention: batch * heads = %lld exceeds 65535",
               static_cast<long long>(a->batch * a->heads));
  SF_CHECK_ARG(ceil_div(a->q_len, kQueryTile) <= 0x7fffffff, "cache_attention: q_len %lld is too large",
               static_cast<long long>(a->q_len));
  return SF_CUDA_OK;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

bool can_vector_load(const SfAttentionArgs* a) {
  const int64_t width = 16 / element_size(a->dtype);
  const auto strides_ok = [&](const SfStrides& s) {
    return s.batch % width == 0 && s.token % width == 0 && s.head % width == 0;
  };
  return element_size(a->dtype) == 2 && a->head_dim % width == 0 && aligned16(a->q) && aligned16(a->k) &&
         aligned16(a->v) && strides_ok(a->q_strides) && strides_ok(a->k_strides) && strides_ok(a->v_strides);
}

template <typename T>
int pick_geometry(const SfAttentionArgs* a, int device, Geometry* geo) {
  int max_smem = 0;
  SF_CHECK_CUDA(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  for (int key_tile = kMaxKeyTile; key_tile >= kMinKeyTile; key_tile /= 2) {
    *geo = make_geometry<T>(static_cast<int>(a->head_dim), key_tile);
    if (geo->bytes <= max_smem) {
      return SF_CUDA_OK;
    }
  }
  return invalid_argument("cache_attention: head_dim %lld needs %lld bytes of shared memory, the device allows %d",
                          static_cast<long long>(a->head_dim), static_cast<long long>(geo->bytes), max_smem);
}

int plan_splits(const SfAttentionArgs* a, int device, SfAttentionPlan* plan) {
  int sms = 0;
  SF_CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                "cudaDeviceGetAttribute(MultiProcessorCount)");
  const int64_t blocks = ceil_div(a->q_len, kQueryTile) * a->batch * a->heads;
  const int64_t keys = a->kv_len_device != nullptr ? a->capacity : a->kv_len_host;
  int64_t splits = 1;
  if (blocks > 0 && blocks < int64_t{kBlocksPerSm} * sms && keys > kMinKeysPerSplit) {
    splits = ceil_div(int64_t{kBlocksPerSm} * sms, blocks);
    splits = splits < ceil_div(keys, kMinKeysPerSplit) ? splits : ceil_div(keys, kMinKeysPerSplit);
    splits = splits < kMaxSplits ? splits : kMaxSplits;
  }
  plan->splits = static_cast<int>(splits);
  plan->workspace_floats = splits > 1 ? splits * a->batch * a->heads * a->q_len * (a->head_dim + 2) : 0;
  return SF_CUDA_OK;
}

template <typename T>
int launch(const SfAttentionArgs* a, const SfAttentionPlan* plan, float* workspace, cudaStream_t stream) {
  int device = 0;
  SF_CHECK_CUDA(cudaGetDevice(&device), "cudaGetDevice");
  KernelArgs k{};
  const int status = pick_geometry<T>(a, device, &k.geo);
  if (status != SF_CUDA_OK) {
    return status;
  }
  k.q = a->q;
  k.k = a->k;
  k.v = a->v;
  k.out = a->out;
  k.qs = a->q_strides;
  k.ks = a->k_strides;
  k.vs = a->v_strides;
  k.os = a->out_strides;
  k.q_len = a->q_len;
  k.heads = a->heads;
  k.capacity = a->capacity;
  k.kv_len_host = a->kv_len_host;
  k.kv_len_device = a->kv_len_device;
  k.splits = plan->splits;
  k.vector_loads = can_vector_load(a);
  k.scale_log2 = kLog2e / std::sqrt(static_cast<float>(a->head_dim));
  const int64_t part_rows = int64_t{plan->splits} * a->batch * a->heads * a->q_len;
  k.part_o = workspace;
  k.part_ml = plan->splits > 1 ? workspace + part_rows * a->head_dim : nullptr;

  SF_CHECK_CUDA(cudaFuncSetAttribute(attention_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(k.geo.bytes)),
                "cudaFuncSetAttribute(attention_kernel)");
  const dim3 grid(static_cast<unsigned>(ceil_div(a->q_len, kQueryTile)), static_cast<unsigned>(a->batch * a->heads),
                  static_cast<unsigned>(plan->splits));
  attention_kernel<T><<<grid, kThreads, static_cast<size_t>(k.geo.bytes), stream>>>(k);
  SF_CHECK_CUDA(cudaGetLastError(), "attention_kernel launch");
  if (plan->splits > 1) {
    const dim3 combine_grid(static_cast<unsigned>(a->q_len), static_cast<unsigned>(a->batch * a->heads));
    combine_kernel<T><<<combine_grid, kThreads, 0, stream>>>(k);
    SF_CHECK_CUDA(cudaGetLastError(), "combine_kernel launch");
  }
  return SF_CUDA_OK;
}

}  // namespace
}  // namespace sf_sdk_cuda

extern "C" int sf_sdk_cuda_cache_attention_plan(const SfAttentionArgs* args, int device, SfAttentionPlan* plan) {
  using namespace sf_sdk_cuda;
  SF_CHECK_ARG(plan != nullptr, "cache_attention: null plan pointer");
  const int status = check_args(args);
  if (status != SF_CUDA_OK) {
    return status;
  }
  return plan_splits(args, device, plan);
}

extern "C" int sf_sdk_cuda_cache_attention(const SfAttentionArgs* args, const SfAttentionPlan* plan, float* workspace,
                                           cudaStream_t stream) {
  using namespace sf_sdk_cuda;
  const int status = check_args(args);
  if (status != SF_CUDA_OK) {
    return status;
  }
  SF_CHECK_ARG(plan != nullptr && plan->splits >= 1 && plan->splits <= kMaxSplits,
               "cache_attention: plan must come from sf_sdk_cuda_cache_attention_plan");
  const int64_t part_rows = int64_t{plan->splits} * args->batch * args->heads * args->q_len;
  SF_CHECK_ARG(plan->splits == 1 || (workspace != nullptr && plan->workspace_floats >= part_rows * (args->head_dim + 2)),
               "cache_attention: a split call needs a workspace of %lld floats",
               static_cast<long long>(part_rows * (args->head_dim + 2)));
  if (args->batch * args->heads * args->q_len == 0) {
    return SF_CUDA_OK;
  }
  switch (args->dtype) {
    case SF_DTYPE_FLOAT32:
      return launch<float>(args, plan, workspace, stream);
    case SF_DTYPE_FLOAT16:
      return launch<__half>(args, plan, workspace, stream);
    case SF_DTYPE_BFLOAT16:
      return launch<__nv_bfloat16>(args, plan, workspace, stream);
    default:
      return invalid_argument("cache_attention: unsupported dtype %d", args->dtype);
  }
}

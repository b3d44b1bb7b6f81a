// sf_sdk::cache_attention on the CPU: a chunk's queries over the valid prefix of a KV cache.
//
//   out[b, i, h, :] = softmax_j(q[b, i, h, :] . k_cache[b, j, h, :] / sqrt(D)) v_cache[b, j, h, :],
//   j over the cache slots [0, kv_len).
//
// q, k_cache and v_cache are read in place in their [B, L, H, D] layout (row stride H*D); nothing
// is concatenated or shifted. The work is split into tasks of (batch, head, block of queries) run
// by at::parallel_for. Each task keeps its queries transposed ("query-major" vectors: one SIMD
// vector holds one head-dim channel of 8 consecutive queries), which makes every step vectorize
// along queries:
//   scores  S^T[j, i]  = sum_d K[j, d] * Qt[d, i]           (broadcast K, FMA over query vectors)
//   softmax per query i = per SIMD lane: column max / exp2 / sum with no horizontal reductions
//   output  Ot[d, i]  += sum_j V[j, d] * P^T[j, i]          (broadcast V, FMA over query vectors)
// The keys are visited in blocks of kKeyBlock with the online-softmax recurrence (running max m,
// running sum l, accumulator rescaled by exp2(m_old - m_new)); each key block is first copied
// (bfloat16 / float16: converted) into a contiguous float32 scratch block, shared by all the
// task's queries. Everything accumulates in float32.
#include "../checks.h"
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
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

namespace sf_sdk::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int64_t kLanes = Vec::size();

// Budget for a task's transposed queries and output accumulator (2 x q_block x D floats), reused
// for every key block: a larger query block re-reads K and V from memory less often, a smaller one
// stays closer to the core (measured on a 512 KiB-L2 core: 128 KiB is ~10% slower than 512 KiB;
// 256 KiB to 2 MiB are within noise).
constexpr int64_t kTaskBytes = 512 * 1024;
// Tasks per thread to aim for when there are few (batch, head) pairs.
constexpr int64_t kTasksPerThread = 2;
// Work (FLOP) below which a call stays on the calling thread: waking the thread team costs more
// than it saves on small calls, and far more when the cores are shared.
constexpr double kMinParallelFlop = 2e7;
// Keys per online-softmax step: the S^T panel (kKeyBlock x panel width) stays in L1.
constexpr int64_t kKeyBlock = 128;
// Panel width for calls with more than one vector of queries, in vectors.
constexpr int kWideVecs = 2;
// Scratch buffers are 64-byte aligned (one cache line, one AVX-512 vector).
constexpr size_t kAlign = 64;

// Micro-kernel rows per panel width: 12 (or 8) accumulator registers, plus the panel's query
// vectors and one broadcast, within the 16 AVX2 registers.
//   wide panels (2 vectors of queries) x 6 rows: chunks of many queries;
//   narrow panels (1 vector of queries) x 8 rows: a handful of queries (decode-like calls).
template <int kPanelVecs>
struct Tile;
template <>
struct Tile<2> {
  static constexpr int kRows = 6;
};
template <>
struct Tile<1> {
  static constexpr int kRows = 8;
};

// max without NaN propagation (one instruction on x86).
inline Vec fast_max(const Vec& a, const Vec& b) {
  return at::vec::clamp_min(a, b);
}

// ------------------------------------------------------------------------------------------
// Micro-kernels. "Panels" are kPanelVecs * kLanes consecutive queries.
// ------------------------------------------------------------------------------------------

// s[r][:] = sum_d k[r][d] * qt[d][:] for kRows keys r. qt: [D][ldq], k: [rows][ldk], s: [rows][lds].
template <int kRows, int kPanelVecs>
inline void scores_tile(const float* qt, int64_t ldq, const float* k, int64_t ldk, int64_t head_dim,
                        float* s, int64_t lds) {
  Vec acc[kRows][kPanelVecs];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < kPanelVecs; ++c) {
      acc[r][c] = Vec(0.0f);
    }
  }
  for (int64_t d = 0; d < head_dim; ++d) {
    Vec qv[kPanelVecs];
#pragma GCC unroll 4
    for (int c = 0; c < kPanelVecs; ++c) {
      qv[c] = Vec::loadu(qt + d * ldq + c * kLanes);
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const Vec kb(k[r * ldk + d]);
#pragma GCC unroll 4
      for (int c = 0; c < kPanelVecs; ++c) {
        acc[r][c] = at::vec::fmadd(kb, qv[c], acc[r][c]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < kPanelVecs; ++c) {
      acc[r][c].store(s + r * lds + c * kLanes);
    }
  }
}

// ot[r][:] = ot[r][:] * alpha[:] + sum_j v[j][r] * p[j][:] for kRows head-dim channels r.
// p: [keys][ldp], v: [keys][ldv] (already offset to the first channel), ot: [rows][ldo].
template <int kRows, int kPanelVecs>
inline void values_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t keys,
                        const Vec* alpha, float* ot, int64_t ldo) {
  Vec acc[kRows][kPanelVecs];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < kPanelVecs; ++c) {
      acc[r][c] = Vec::loadu(ot + r * ldo + c * kLanes) * alpha[c];
    }
  }
  for (int64_t j = 0; j < keys; ++j) {
    Vec pv[kPanelVecs];
#pragma GCC unroll 4
    for (int c = 0; c < kPanelVecs; ++c) {
      pv[c] = Vec::loadu(p + j * ldp + c * kLanes);
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const Vec vb(v[j * ldv + r]);
#pragma GCC unroll 4
      for (int c = 0; c < kPanelVecs; ++c) {
        acc[r][c] = at::vec::fmadd(vb, pv[c], acc[r][c]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < kPanelVecs; ++c) {
      acc[r][c].store(ot + r * ldo + c * kLanes);
    }
  }
}

// Calls tile(std::integral_constant<int, R>{}, first_row) for the remainder tile of R = rest rows.
template <int R, typename F>
inline void remainder_tile(int64_t rest, int64_t first_row, const F& tile) {
  if constexpr (R > 0) {
    if (rest == R) {
      tile(std::integral_constant<int, R>{}, first_row);
      return;
    }
    remainder_tile<R - 1>(rest, first_row, tile);
  }
}

// Runs a tile kernel over `rows` rows in steps of kRows, then one remainder tile of 1..kRows-1 rows
// (kv_len % kRows, head_dim % kRows).
template <int kRows, typename F>
inline void for_each_row_tile(int64_t rows, const F& tile) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    tile(std::integral_constant<int, kRows>{}, r);
  }
  remainder_tile<kRows - 1>(rows - r, r, tile);
}

// ------------------------------------------------------------------------------------------
// Conversions into float32 scratch.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
inline void load_row_as_float(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  } else {
    int64_t d = 0;
    for (; d + kLanes <= n; d += kLanes) {
      Vec x;
      at::vec::load_to_float(src + d, x);
      x.store(dst + d);
    }
    for (; d < n; ++d) {
      dst[d] = static_cast<float>(src[d]);
    }
  }
}

struct FreeAligned {
  void operator()(float* p) const { std::free(p); }
};
using ScratchPtr = std::unique_ptr<float[], FreeAligned>;

inline ScratchPtr alloc_scratch(int64_t floats) {
  const size_t bytes = (static_cast<size_t>(floats) * sizeof(float) + kAlign - 1) / kAlign * kAlign;
  auto* p = static_cast<float*>(std::aligned_alloc(kAlign, std::max(bytes, kAlign)));
  TORCH_CHECK(p != nullptr, "sf_sdk cache_attention: out of memory allocating ", bytes, " bytes of scratch");
  return ScratchPtr(p);
}

// ------------------------------------------------------------------------------------------
// The attention of one task: queries [q0, q0 + nq) of one (batch, head).
// ------------------------------------------------------------------------------------------
struct Strides {
  int64_t batch;
  int64_t token;
  int64_t head;
};

template <typename scalar_t, int kPanelVecs>
struct TaskRunner {
  static constexpr int64_t kPanel = kPanelVecs * kLanes;
  static constexpr int kRows = Tile<kPanelVecs>::kRows;

  int64_t head_dim;
  int64_t kv_len;
  int64_t q_block;  // queries per task, a multiple of kPanel
  float scale_log2;  // log2(e) / sqrt(D): scores come out in base-2 units

  // Per-thread scratch.
  ScratchPtr qt;      // [D][q_block]  queries, transposed and scaled
  ScratchPtr ot;      // [D][q_block]  output accumulator, transposed
  ScratchPtr kblock;  // [kKeyBlock][D]    keys of the current block, float32
  ScratchPtr vblock;  // [kKeyBlock][D]    values of the current block, float32
  ScratchPtr s;       // [kKeyBlock][kPanel] scores / probabilities of one panel
  ScratchPtr row_max;  // [q_block] running max of the scores (base-2 units)
  ScratchPtr row_sum;  // [q_block] running sum of exp2(score - max)

  TaskRunner(int64_t head_dim_, int64_t kv_len_, int64_t q_block_)
      : head_dim(head_dim_),
        kv_len(kv_len_),
        q_block(q_block_),
        scale_log2(static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim_)))),
        qt(alloc_scratch(head_dim_ * q_block_)),
        ot(alloc_scratch(head_dim_ * q_block_)),
        kblock(alloc_scratch(kKeyBlock * head_dim_)),
        vblock(alloc_scratch(kKeyBlock * head_dim_)),
        s(alloc_scratch(kKeyBlock * kPanel)),
        row_max(alloc_scratch(q_block_)),
        row_sum(alloc_scratch(q_block_)) {}

  void run(const scalar_t* q, int64_t q_stride, int64_t nq, const scalar_t* k, int64_t k_stride,
           const scalar_t* v, int64_t v_stride, scalar_t* out, int64_t out_stride) {
    const int64_t panels = (nq + kPanel - 1) / kPanel;
    const int64_t width = panels * kPanel;  // padded query count (padding queries are zeros)
    float* qt_ = qt.get();
    float* ot_ = ot.get();

    for (int64_t d = 0; d < head_dim; ++d) {
      for (int64_t i = 0; i < width; ++i) {
        qt_[d * q_block + i] = i < nq ? static_cast<float>(q[i * q_stride + d]) * scale_log2 : 0.0f;
      }
    }
    std::fill(ot_, ot_ + head_dim * q_block, 0.0f);
    std::fill(row_max.get(), row_max.get() + q_block, -std::numeric_limits<float>::infinity());
    std::fill(row_sum.get(), row_sum.get() + q_block, 0.0f);

    for (int64_t j0 = 0; j0 < kv_len; j0 += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, kv_len - j0);
      // Copy (and convert) the block once: contiguous rows keep the micro-kernels' broadcasts
      // within a few pages, where the cache rows are H * D apart.
      for (int64_t j = 0; j < nk; ++j) {
        load_row_as_float(k + (j0 + j) * k_stride, kblock.get() + j * head_dim, head_dim);
        load_row_as_float(v + (j0 + j) * v_stride, vblock.get() + j * head_dim, head_dim);
      }
      for (int64_t p = 0; p < panels; ++p) {
        panel_step(p * kPanel, nk);
      }
    }

    for (int64_t i = 0; i < nq; ++i) {
      const float l = row_sum[i];
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // kv_len == 0 gives zeros
      for (int64_t d = 0; d < head_dim; ++d) {
        out[i * out_stride + d] = static_cast<scalar_t>(ot_[d * q_block + i] * inv);
      }
    }
  }

  // One key block for the queries [i0, i0 + kPanel): scores, online softmax, value accumulation.
  void panel_step(int64_t i0, int64_t nk) {
    float* s_ = s.get();
    const float* kb = kblock.get();
    const float* vb = vblock.get();

    for_each_row_tile<kRows>(nk, [&](auto rows, int64_t j) {
      scores_tile<decltype(rows)::value, kPanelVecs>(qt.get() + i0, q_block, kb + j * head_dim, head_dim,
                                                     head_dim, s_ + j * kPanel, kPanel);
    });

    Vec alpha[kPanelVecs];
#pragma GCC unroll 4
    for (int c = 0; c < kPanelVecs; ++c) {
      float* m_ptr = row_max.get() + i0 + c * kLanes;
      float* l_ptr = row_sum.get() + i0 + c * kLanes;
      const Vec m_old = Vec::loadu(m_ptr);
      Vec m_new = m_old;
      for (int64_t j = 0; j < nk; ++j) {
        m_new = fast_max(m_new, Vec::loadu(s_ + j * kPanel + c * kLanes));
      }
      Vec sum(0.0f);
      for (int64_t j = 0; j < nk; ++j) {
        float* sj = s_ + j * kPanel + c * kLanes;
        const Vec pj = exp2_nonpositive(Vec::loadu(sj) - m_new);
        pj.store(sj);
        sum = sum + pj;
      }
      alpha[c] = exp2_nonpositive(m_old - m_new);
      (Vec::loadu(l_ptr) * alpha[c] + sum).store(l_ptr);
      m_new.store(m_ptr);
    }

    for_each_row_tile<kRows>(head_dim, [&](auto rows, int64_t d) {
      values_tile<decltype(rows)::value, kPanelVecs>(s_, kPanel, vb + d, head_dim, nk, alpha,
                                                     ot.get() + d * q_block + i0, q_block);
    });
  }
};

template <typename scalar_t, int kPanelVecs>
void run_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& out, const AttentionShape& shape, int64_t kv_len) {
  constexpr int64_t kPanel = kPanelVecs * kLanes;
  // The fewest query blocks within the task budget, more if that would leave threads idle.
  const int64_t max_block = std::max<int64_t>(kPanel, kTaskBytes / (2 * shape.head_dim * sizeof(float)));
  const int64_t heads = shape.batch * shape.heads;
  const int64_t wanted = (kTasksPerThread * at::get_num_threads() + heads - 1) / heads;
  const int64_t q_blocks = std::min(std::max((shape.q_len + max_block - 1) / max_block, wanted),
                                    (shape.q_len + kPanel - 1) / kPanel);
  const int64_t q_block = ((shape.q_len + q_blocks - 1) / q_blocks + kPanel - 1) / kPanel * kPanel;
  const int64_t tasks = heads * q_blocks;
  const Strides qs{q.stride(0), q.stride(1), q.stride(2)};
  const Strides ks{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const Strides vs{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const Strides os{out.stride(0), out.stride(1), out.stride(2)};
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.const_data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();

  const double task_flop = 4.0 * static_cast<double>(q_block) * static_cast<double>(std::max<int64_t>(kv_len, 1)) *
                           static_cast<double>(shape.head_dim);
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(kMinParallelFlop / task_flop));

  // Consecutive tasks share (batch, head), so a thread's K/V blocks stay warm in its caches.
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    TaskRunner<scalar_t, kPanelVecs> runner(shape.head_dim, kv_len, q_block);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = t % q_blocks;
      const int64_t h = (t / q_blocks) % shape.heads;
      const int64_t b = t / (q_blocks * shape.heads);
      const int64_t q0 = qb * q_block;
      const int64_t nq = std::min(q_block, shape.q_len - q0);
      if (nq <= 0) {
        continue;
      }
      runner.run(q_ptr + b * qs.batch + q0 * qs.token + h * qs.head, qs.token, nq,
                 k_ptr + b * ks.batch + h * ks.head, ks.token, v_ptr + b * vs.batch + h * vs.head, vs.token,
                 out_ptr + b * os.batch + q0 * os.token + h * os.head, os.token);
    }
  });
}

at::Tensor cache_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& kv_len) {
  const AttentionShape shape =
      check_cache_attention_args(q, k_cache, v_cache, kv_len, {at::kFloat, at::kBFloat16, at::kHalf});
  const int64_t n = host_kv_len(kv_len, shape.capacity);
  at::Tensor out = at::empty({shape.batch, shape.q_len, shape.heads, shape.head_dim}, q.options());
  if (out.numel() == 0) {
    return out;
  }
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (shape.q_len <= kLanes) {
      run_attention<scalar_t, 1>(q, k_cache, v_cache, out, shape, n);
    } else {
      run_attention<scalar_t, kWideVecs>(q, k_cache, v_cache, out, shape, n);
    }
  };
  switch (q.scalar_type()) {
    case at::kFloat:
      run(float{});
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
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sf_sdk, CPU, m) {
  m.impl("cache_attention", &cache_attention_cpu);
}

}  // namespace sf_sdk::cpu

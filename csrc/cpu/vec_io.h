// Vector IO and small helpers of the CPU kernels: the accumulation type, the work grains and column
// blocks, loads and stores in the accumulation type (streamed past the caches where it pays), lane
// reductions, a fixed-order dot product, and the stepping and prefetch of the column passes.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace attnfused {
namespace cpu {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float for float/half/bfloat16, double for double

// Elements per parallel chunk of the elementwise passes (big enough to amortise the thread hand-off).
constexpr int64_t kGrainElems = 32768;
// Most columns per task of the column passes: each row is read as one contiguous run this long
// (long runs keep the hardware prefetcher streaming), and the accumulators stay in L1.
constexpr int64_t kColBlock = 1024;

inline int64_t grain_rows(int64_t row_len) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, row_len));
}

// The column blocks of a column pass over `len` columns: `count` equal blocks of `size` columns
// (a whole number of vectors, at most kColBlock; no block for len 0, an empty batch's H*W or C).
// Depends on the shape alone, and every column is summed over the rows in order whatever the
// split, so results never depend on it.
struct ColBlocks {
  int64_t count, size;
  ColBlocks(int64_t len, int64_t vec) {
    const int64_t want = std::max<int64_t>(1, (len + kColBlock - 1) / kColBlock);
    size = std::max(vec, ((len + want - 1) / want + vec - 1) / vec * vec);
    count = (len + size - 1) / size;
  }
  int64_t begin(int64_t b) const { return b * size; }
  int64_t length(int64_t b, int64_t len) const { return std::min(size, len - b * size); }
};

// ---------------------------------------------------------------------------- vector IO

template <typename scalar_t>
struct VecIO {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kSize = Vec::size();

  static Vec load(const scalar_t* p, int64_t n = kSize) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return n == kSize ? Vec::loadu(p) : Vec::loadu(p, n);
    } else {
      auto r = at::vec::Vectorized<scalar_t>::loadu(p, n);
      return std::get<0>(at::vec::convert_to_float<scalar_t>(r));
    }
  }
  static void store(scalar_t* p, const Vec& v, int64_t n = kSize) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p, n);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
    }
  }
  // Whether store_stream can write a whole vector at p: float or double on AVX2, p aligned to it.
  static bool can_stream(const scalar_t* p) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>)
      return reinterpret_cast<uintptr_t>(p) % sizeof(Vec) == 0;
#endif
    return false;
  }
  // A whole vector written past the caches (a non-temporal store; p as can_stream requires).
  // Saves the read of the line before the write, and keeps the output from evicting inputs still
  // to be read. The writer fences (stream_fence) before others read the data.
  static void store_stream(scalar_t* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, v);
      return;
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      _mm256_stream_pd(p, v);
      return;
    }
#endif
    store(p, v);
  }
};

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  _mm_sfence();
#endif
}

// Outputs at least this large are written with non-temporal stores: they cannot stay in cache for
// their reader anyway, and the stores then skip reading each line first.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// The lanes of v summed in a fixed tree (shuffles on AVX2/AVX-512).
template <typename acc_t>
inline acc_t lanes_sum(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, v);
}

// The lanes' max, in a tree of shuffles (a serial chain over the lanes cost rows of 49 nearly half
// their pooling time). Order does not change a max of non-NaN values; callers handle NaN apart.
template <typename acc_t>
inline acc_t lanes_max(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t lanes_min(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return at::vec::minimum(a, b); }, v);
}

// Max with NaN propagation (the first NaN wins), as torch.max.
template <typename T>
inline bool max_takes(T v, T m) {
  return v > m || (std::isnan(v) && !std::isnan(m));
}

// ---------------------------------------------------------------------------- small vector helpers

// Long sums: a running float32 sum of n terms drifts by up to n ulps of the sum (the channels_last
// pooling over 4096 x 4096 pixels came out 1e-1 off). Every accumulator (a vector lane, a column)
// therefore sums at most kSumBlock terms in acc_t before its block's sum goes into a double, which
// keeps each sum within ~1e-7 of the sum of |terms| at any size, in a fixed order. Sums that fit
// one block are computed exactly as without blocks.
constexpr int64_t kSumBlock = 256;

// Where a vectorized sum spills its blocks: the double total and whether any block went there.
struct WideSum {
  double total = 0;
  bool used = false;
  template <typename acc_t>
  void add(acc_t block) {
    total += static_cast<double>(block);
    used = true;
  }
  // The whole sum, `rest` being what is still in acc_t.
  template <typename acc_t>
  acc_t finish(acc_t rest) const {
    return used ? static_cast<acc_t>(total + static_cast<double>(rest)) : rest;
  }
};

// Fixed-order vectorized dot product and axpy on acc_t arrays (the spatial conv).
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec acc0(acc_t(0)), acc1(acc_t(0)), acc2(acc_t(0)), acc3(acc_t(0));  // 4 chains hide the FMA latency
  WideSum wide;
  int64_t i = 0;
  while (i + 4 * V <= n) {
    for (const int64_t end = std::min(n, i + kSumBlock * 4 * V); i + 4 * V <= end; i += 4 * V) {
      acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
      acc1 = at::vec::fmadd(Vec::loadu(a + i + V), Vec::loadu(b + i + V), acc1);
      acc2 = at::vec::fmadd(Vec::loadu(a + i + 2 * V), Vec::loadu(b + i + 2 * V), acc2);
      acc3 = at::vec::fmadd(Vec::loadu(a + i + 3 * V), Vec::loadu(b + i + 3 * V), acc3);
    }
    if (i + 4 * V <= n) {  // another block follows
      wide.add(lanes_sum((acc0 + acc1) + (acc2 + acc3)));
      acc0 = acc1 = acc2 = acc3 = Vec(acc_t(0));
    }
  }
  for (; i + V <= n; i += V) acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
  acc_t s = lanes_sum((acc0 + acc1) + (acc2 + acc3));
  for (; i < n; ++i) s += a[i] * b[i];
  return wide.finish(s);
}

// The columns' sums of a column pass in double: rows go into acc_t sums kSumRows at a time (a
// multiple of kRowStep), each block then added here (`widen`); `finish` puts the totals back.
// Passes over at most kSumRows rows never come here (their sums are the acc_t ones).
constexpr int64_t kSumRows = kSumBlock;

template <typename acc_t>
struct WideColumns {
  double total[kColBlock];
  // Adds the block sums sum[0, L) of the block that starts at row rb.
  void widen(const acc_t* sum, int64_t L, int64_t rb) {
    for (int64_t j = 0; j < L; ++j) total[j] = (rb == 0 ? 0.0 : total[j]) + static_cast<double>(sum[j]);
  }
  void finish(acc_t* sum, int64_t L) const {
    for (int64_t j = 0; j < L; ++j) sum[j] = static_cast<acc_t>(total[j]);
  }
};

// Rows per step of the column passes: a step reads kRowStep rows side by side with its
// accumulators in registers, and spills them to L1 between steps. Over row segments shorter than
// kPrefetchBelowBytes the hardware prefetchers do not follow that walk (a line from each row in
// turn): each row then fetches its lines kPrefetchRows rows ahead itself, into L2 only. Fetched
// into L1, 8 rows ahead, they held L1's miss buffers and the loads stalled (measured at batch 8:
// channels_last CBAM forward 1.37x faster at 56x56 and 1.24x at 28x28 with the L2 hint).
constexpr int64_t kRowStep = 8;
static_assert(kSumRows % kRowStep == 0, "a block of rows is a whole number of steps");
constexpr int64_t kPrefetchBelowBytes = 4096;
constexpr int64_t kPrefetchRows = 16;

// step(j, full) over the column chunks [j, j + W) of [0, L): full (std::true_type) for the whole
// chunks, so that their loops compile without the tail's lane counts; the tail's chunk last.
template <int64_t W, typename F>
inline void step_columns(int64_t L, const F& step) {
  int64_t j = 0;
  for (; j + W <= L; j += W) step(j, std::true_type{});
  if (j < L) step(j, std::false_type{});
}

// Prefetches the cache lines of p[0, n) into L2 (prefetcht2).
template <typename T>
inline void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * int64_t(sizeof(T)); b += 64) __builtin_prefetch(c + b, 0, 1);
}

}  // namespace cpu
}  // namespace attnfused

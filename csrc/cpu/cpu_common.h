// Building blocks of the CPU kernels: vector IO in the accumulation type, the passes over the big
// tensor (pooling over space or over channels, dot products, the fused elementwise apply), and the
// batch drivers of the small math (csrc/small_math.h; the MLP uses vectorized fixed-order dots).
//
// Layouts: x is (N, C, H, W) stored NCHW (rows = channels, each a contiguous run of HW) or
// channels_last (rows = pixels, each a contiguous run of C). Every pass is either a "row" pass
// (along the contiguous run) or a "column" pass (across rows). Each output element is reduced by one
// thread in a fixed order, and the work split depends only on the shape, so results are bit-identical
// whatever the thread count.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <vector>

#include "common.h"
#include "small_math.h"

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
// (a whole number of vectors, at most kColBlock). Depends on the shape alone, and every column is
// summed over the rows in order whatever the split, so results never depend on it.
struct ColBlocks {
  int64_t count, size;
  ColBlocks(int64_t len, int64_t vec) {
    const int64_t want = std::max<int64_t>(1, (len + kColBlock - 1) / kColBlock);
    size = ((len + want - 1) / want + vec - 1) / vec * vec;
    count = std::max<int64_t>(1, (len + size - 1) / size);
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

// Fixed-order vectorized dot product and axpy on acc_t arrays (the spatial conv).
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec acc0(acc_t(0)), acc1(acc_t(0)), acc2(acc_t(0)), acc3(acc_t(0));  // 4 chains hide the FMA latency
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + V), Vec::loadu(b + i + V), acc1);
    acc2 = at::vec::fmadd(Vec::loadu(a + i + 2 * V), Vec::loadu(b + i + 2 * V), acc2);
    acc3 = at::vec::fmadd(Vec::loadu(a + i + 3 * V), Vec::loadu(b + i + 3 * V), acc3);
  }
  for (; i + V <= n; i += V) acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
  acc_t s = lanes_sum((acc0 + acc1) + (acc2 + acc3));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---------------------------------------------------------------------------- the channel 1D conv

// The channel 1D conv on one row of C values, out[c] (+)= small::conv1d_at (sign 1: sum_j w[j]
// src[c + j - p]) or small::conv1d_dinput_at (sign -1: the input's gradient, src[c - j + p]): the
// taps in order, with the scalar code's rounding, and the channels whose taps all lie inside the
// row taken a vector at a time. In scalar code, which wraps the index of every tap, ECA's conv
// cost a sixth of its forward at 32 x 2048 x 7 x 7.
template <typename acc_t>
void conv1d_row(const acc_t* src, const acc_t* w, int64_t k, int64_t C, Padding padding, int sign, acc_t* out,
                bool accumulate) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t p = (k - 1) / 2;
  const int64_t below = sign > 0 ? p : k - 1 - p;  // the farthest tap below c; k - 1 - below above it
  const int64_t lo = std::min(below, C), hi = std::max(lo, C - (k - 1 - below));
  auto one = [&](int64_t c) {
    const acc_t o = sign > 0 ? small::conv1d_at(src, w, k, C, padding, c)
                             : small::conv1d_dinput_at(src, w, k, C, padding, c);
    out[c] = accumulate ? out[c] + o : o;
  };
  int64_t c = 0;
  for (; c < lo; ++c) one(c);
  for (; c + V <= hi; c += V) {
    Vec acc(acc_t(0));
    for (int64_t j = 0; j < k; ++j) acc = acc + Vec(w[j]) * Vec::loadu(src + c + sign * (j - p));
    if (accumulate) acc = Vec::loadu(out + c) + acc;
    acc.store(out + c);
  }
  for (; c < C; ++c) one(c);
}

// The weight gradient of the channel 1D conv, dw[j] = sum over rows r and channels c of
// dz[r / P, c] * V[r, c + j - p] (the index wrapped if circular, absent if outside for zeros), in
// a fixed order of its own: one vector of lanes summed over the rows in order and over each row's
// runs of contiguous indices, then across its lanes. The scalar order was one chain of rows * C
// dependent adds per tap.
template <typename acc_t>
acc_t conv1d_dweight(const acc_t* Vm, const acc_t* dz, int64_t rows, int64_t P, int64_t k, int64_t C,
                     Padding padding, int64_t j) {
  if (k > C && padding != Padding::ZEROS) return small::conv1d_dweight_at(Vm, dz, rows, P, k, C, padding, j);
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t s = j - (k - 1) / 2;  // dz[c] meets V[c + s]
  const int64_t c0 = std::clamp<int64_t>(-s, 0, C), c1 = std::clamp<int64_t>(C - s, 0, C);
  const bool wrap = padding != Padding::ZEROS;
  Vec acc(acc_t(0));
  auto run = [&](const acc_t* d, const acc_t* v, int64_t n) {  // acc += d[0, n) * v[0, n)
    int64_t i = 0;
    for (; i + V <= n; i += V) acc = at::vec::fmadd(Vec::loadu(d + i), Vec::loadu(v + i), acc);
    if (i < n) acc = at::vec::fmadd(Vec::loadu(d + i, n - i), Vec::loadu(v + i, n - i), acc);
  };
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* v = Vm + r * C;
    const acc_t* d = dz + (r / P) * C;
    if (wrap && c0 > 0) run(d, v + C + s, c0);  // c in [0, -s): V[c + s + C]
    run(d + c0, v + c0 + s, c1 - c0);
    if (wrap && c1 < C) run(d + c1, v + c1 + s - C, C - c1);  // c in [C - s, C): V[c + s - C]
  }
  return lanes_sum(acc);
}

// ---------------------------------------------------------------------------- gates, vectorized

// f(i, n) for the vectors [i, i + n) (n <= V) covering [0, count), in parallel.
template <typename acc_t, typename F>
void parallel_vectors(int64_t count, const F& f) {
  constexpr int64_t V = at::vec::Vectorized<acc_t>::size();
  at::parallel_for(0, (count + V - 1) / V, kGrainElems / V, [&](int64_t b, int64_t e) {
    for (int64_t i = b * V; i < std::min(count, e * V); i += V) f(i, std::min(V, count - i));
  });
}

// sigmoid through at::vec's exp (SLEEF's, 1 ulp); lanes are independent, so an element's value
// does not depend on where it falls in a vector
template <typename Vec>
inline Vec vec_sigmoid(const Vec& v) {
  return Vec(1) / (Vec(1) + v.neg().exp());
}

// s[i] = gate(z[i]).
template <typename acc_t>
void gate_forward(const acc_t* z, Gate g, int64_t count, acc_t* s) {
  using Vec = at::vec::Vectorized<acc_t>;
  parallel_vectors<acc_t>(count, [&](int64_t i, int64_t n) {
    const Vec v = Vec::loadu(z + i, n), one(1), zero(0);
    Vec r = g == Gate::SIGMOID ? vec_sigmoid(v) : (v + Vec(3)) / Vec(6);
    if (g == Gate::HARDSIGMOID) {  // clamped to [0, 1], NaN kept
      r = Vec::blendv(r, zero, r < zero);
      r = Vec::blendv(r, one, r > one);
    }
    r.store(s + i, n);
  });
}

// d[i] *= gate'(z[i]), with torch's conventions at the kinks (hardsigmoid: 1/6 on (-3, 3)).
template <typename acc_t>
void gate_backward(const acc_t* z, Gate g, int64_t count, acc_t* d) {
  using Vec = at::vec::Vectorized<acc_t>;
  parallel_vectors<acc_t>(count, [&](int64_t i, int64_t n) {
    const Vec v = Vec::loadu(z + i, n);
    Vec grad;
    if (g == Gate::SIGMOID) {
      const Vec sg = vec_sigmoid(v);
      grad = sg * (Vec(1) - sg);
    } else {
      grad = Vec::blendv(Vec(0), Vec(acc_t(1) / acc_t(6)), (v > Vec(-3)) & (v < Vec(3)));
    }
    (Vec::loadu(d + i, n) * grad).store(d + i, n);
  });
}

// ---------------------------------------------------------------------------- small GEMMs (the MLP)
// Every output element is one chain of FMAs over k in order (the dot form then sums the chain's
// lanes in a fixed tree), whichever tile or thread computes it: results never depend on the split.
// Tiles of TI rows share each load of the other operand (the weights are read I / TI times, not
// I times); rows past the end of a tile repeat the last row and are not stored.

// Work (multiply-adds) per thread below which a parallel job is not split further.
constexpr int64_t kJobGrain = 1 << 16;

// A parallel job: `count` tasks of about `work` multiply-adds each; run(b, e) runs tasks [b, e),
// each writing outputs of its own.
struct Job {
  int64_t count, work;
  std::function<void(int64_t, int64_t)> run;
};

// Runs the jobs in one parallel region: one thread hand-off for all of them (65-85 us each under
// OMP_WAIT_POLICY=PASSIVE, measured; the weight gradients of a CBAM backward took 3 regions). The
// tasks, job after job, are cut into runs of about equal work, one per thread (fewer under
// kJobGrain of work each); a task's results do not depend on the run that takes it.
inline void run_jobs(const std::vector<Job>& jobs) {
  int64_t total = 0;
  for (const Job& j : jobs) total += j.count * std::max<int64_t>(1, j.work);
  const int64_t parts = std::clamp<int64_t>(total / kJobGrain, 1, at::get_num_threads());
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    // the tasks whose work starts in [lo, hi)
    const int64_t lo = pb * total / parts, hi = pe * total / parts;
    int64_t start = 0;
    for (const Job& j : jobs) {
      const int64_t w = std::max<int64_t>(1, j.work);
      auto first_at = [&](int64_t at) { return std::clamp<int64_t>((at - start + w - 1) / w, 0, j.count); };
      const int64_t b = first_at(lo), e = first_at(hi);
      if (b < e) j.run(b, e);
      start += j.count * w;
    }
  });
}

// Keeps v in a register for the code after: the compiler otherwise folds its load into every FMA
// that reads it, and a GEMM tile of 4 x 2 issued 10 vector loads per 8 FMAs (2 loads a cycle).
// Measured on a standalone copy of the tile (the MLP's first layer at 32 x 2048, 4 samples): 24 ->
// 36 FMAs per ns, 87% of the FMA peak here.
template <typename Vec>
inline void in_register(Vec& v) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__GNUC__)
  if constexpr (std::is_same_v<Vec, at::vec::Vectorized<float>>) {
    __m256 r = v;
    asm("" : "+x"(r));
    v = r;
  } else if constexpr (std::is_same_v<Vec, at::vec::Vectorized<double>>) {
    __m256d r = v;
    asm("" : "+x"(r));
    v = r;
  }
#endif
}

// out[v] = lanes_sum(a[v]) for the 8 vectors a[0..8): on AVX2 float as one transposing tree of
// horizontal adds (each sum's tree involves its own lanes only), elsewhere one by one.
template <typename acc_t>
inline void lanes_sums8(const at::vec::Vectorized<acc_t>* a, acc_t* out) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
    return;
  }
#endif
  for (int v = 0; v < 8; ++v) out[v] = lanes_sum(a[v]);
}

// out[i * M + m] = (bias ? bias[m] : 0) + sum_k A[i * K + k] * B[m * K + k]: the dot form, both
// operands contiguous along k (the MLP forward: x W^T). Tiles of TI x TM = 8: the 8 chains of a
// tile are summed across their lanes together (each in the same tree).
template <typename acc_t, int TI, int TM>
Job gemm_nt_tiles(const acc_t* A, const acc_t* B, const acc_t* bias, int64_t I, int64_t M, int64_t K, acc_t* out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  static_assert(TI * TM == 8, "a tile's chains are summed 8 at a time");
  const int64_t ti = (I + TI - 1) / TI, tiles = (M + TM - 1) / TM * ti;
  return {tiles, TI * TM * K, [=](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {  // row tiles innermost: B's rows are reused from L1
      const int64_t i0 = t % ti * TI, m0 = t / ti * TM;
      const acc_t* a[TI];
      const acc_t* w[TM];
      for (int u = 0; u < TI; ++u) a[u] = A + std::min(i0 + u, I - 1) * K;
      for (int v = 0; v < TM; ++v) w[v] = B + std::min(m0 + v, M - 1) * K;
      Vec acc[TI * TM];
      for (int q = 0; q < TI * TM; ++q) acc[q] = Vec(acc_t(0));
      auto step = [&](int64_t k, auto load) {
        Vec bv[TM];
        for (int v = 0; v < TM; ++v) bv[v] = load(w[v] + k);
        for (int u = 0; u < TI; ++u) {
          Vec av = load(a[u] + k);
          in_register(av);
          for (int v = 0; v < TM; ++v) acc[u * TM + v] = at::vec::fmadd(av, bv[v], acc[u * TM + v]);
        }
      };
      int64_t k = 0;
      for (; k + V <= K; k += V) step(k, [](const acc_t* p) { return Vec::loadu(p); });
      if (k < K)  // a short last vector: zero-filled lanes add 0 * 0
        step(k, [n = K - k](const acc_t* p) { return Vec::loadu(p, n); });
      acc_t sums[TI * TM];
      lanes_sums8(acc, sums);
      for (int u = 0; u < TI && i0 + u < I; ++u)
        for (int v = 0; v < TM && m0 + v < M; ++v)
          out[(i0 + u) * M + m0 + v] = (bias ? bias[m0 + v] : acc_t(0)) + sums[u * TM + v];
    }
  }};
}

// Tiles as tall as I allows (one row: one sample's MLP): no repeated rows.
template <typename acc_t>
Job gemm_nt_job(const acc_t* A, const acc_t* B, const acc_t* bias, int64_t I, int64_t M, int64_t K, acc_t* out) {
  if (I == 1) return gemm_nt_tiles<acc_t, 1, 8>(A, B, bias, I, M, K, out);
  if (I <= 3) return gemm_nt_tiles<acc_t, 2, 4>(A, B, bias, I, M, K, out);
  return gemm_nt_tiles<acc_t, 4, 2>(A, B, bias, I, M, K, out);
}

template <typename acc_t>
void gemm_nt(const acc_t* A, const acc_t* B, const acc_t* bias, int64_t I, int64_t M, int64_t K, acc_t* out) {
  run_jobs({gemm_nt_job(A, B, bias, I, M, K, out)});
}

// out[i * M + m] = sum_k A[i * sai + k * sak] * B[k * M + m]: the axpy form, B's rows contiguous
// along m (the MLP backward: dy W, and the weight gradients dy^T x with A read transposed).
// Where many row tiles reuse a column block of B (kPackRowTiles or more), each thread first copies
// the block into a contiguous buffer: B's rows are C or Cr floats apart, a power of two, so a
// block's rows fall into a few L1 sets and evicted each other (the MLP's dW1 = DHP^T V at 32 x 2048,
// 32 row tiles: 23 -> 36 FMAs per ns on one core here). The same FMAs in the same order.
constexpr int64_t kPackRowTiles = 4;

template <typename acc_t, int TI, int TV = 3>
Job gemm_nn_tiles(const acc_t* A, int64_t sai, int64_t sak, const acc_t* B, int64_t I, int64_t M, int64_t K,
                  acc_t* out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size(), TW = TV * V;
  const int64_t ti = (I + TI - 1) / TI, tiles = (M + TW - 1) / TW * ti;
  const bool pack = ti >= kPackRowTiles;
  return {tiles, TI * TW * K, [=](int64_t b, int64_t e) {
    std::vector<acc_t> packed(pack ? K * TW : 0);  // [K, TW]: B's column block, zero past M
    int64_t packed_m0 = -1;
    for (int64_t t = b; t < e; ++t) {  // row tiles innermost: B's column block is reused from cache
      const int64_t i0 = t % ti * TI, m0 = t / ti * TW;
      const acc_t* a[TI];
      int64_t n[TV];
      for (int u = 0; u < TI; ++u) a[u] = A + std::min(i0 + u, I - 1) * sai;
      for (int v = 0; v < TV; ++v) n[v] = std::clamp<int64_t>(M - m0 - v * V, 0, V);
      if (pack && m0 != packed_m0) {
        const int64_t w = std::min(TW, M - m0);
        for (int64_t k = 0; k < K; ++k) {
          std::copy_n(B + k * M + m0, w, packed.data() + k * TW);
          std::fill(packed.data() + k * TW + w, packed.data() + (k + 1) * TW, acc_t(0));
        }
        packed_m0 = m0;
      }
      Vec acc[TI][TV];
      for (int u = 0; u < TI; ++u)
        for (int v = 0; v < TV; ++v) acc[u][v] = Vec(acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        Vec bv[TV];
        if (pack) {
          for (int v = 0; v < TV; ++v) bv[v] = Vec::loadu(packed.data() + k * TW + v * V);
        } else {
          const acc_t* bk = B + k * M + m0;
          for (int v = 0; v < TV; ++v)
            bv[v] = n[v] == V ? Vec::loadu(bk + v * V) : (n[v] ? Vec::loadu(bk + v * V, n[v]) : Vec(acc_t(0)));
        }
        for (int u = 0; u < TI; ++u) {
          const Vec av(a[u][k * sak]);
          for (int v = 0; v < TV; ++v) acc[u][v] = at::vec::fmadd(av, bv[v], acc[u][v]);
        }
      }
      for (int u = 0; u < TI && i0 + u < I; ++u)
        for (int v = 0; v < TV; ++v)
          if (n[v]) acc[u][v].store(out + (i0 + u) * M + m0 + v * V, n[v]);
    }
  }};
}

template <typename acc_t>
Job gemm_nn_job(const acc_t* A, int64_t sai, int64_t sak, const acc_t* B, int64_t I, int64_t M, int64_t K,
                acc_t* out) {
  if (I == 1) return gemm_nn_tiles<acc_t, 1, 4>(A, sai, sak, B, I, M, K, out);
  if (I == 2) return gemm_nn_tiles<acc_t, 2, 4>(A, sai, sak, B, I, M, K, out);
  return gemm_nn_tiles<acc_t, 4>(A, sai, sak, B, I, M, K, out);
}

template <typename acc_t>
void gemm_nn(const acc_t* A, int64_t sai, int64_t sak, const acc_t* B, int64_t I, int64_t M, int64_t K, acc_t* out) {
  run_jobs({gemm_nn_job(A, sai, sak, B, I, M, K, out)});
}

// ---------------------------------------------------------------------------- pooling passes

// Sum of the row p[0..L) (times S[0..L) elementwise with kS), and with kMax its max and first
// argmax (NaN wins, as torch.max). Two independent chains of each accumulator, kept in registers,
// hide the latency; each max lane keeps the start of the block where it last rose, so the argmax
// needs no second look at the row. The max runs on plain compares: a row that meets a NaN (its sum
// is NaN then) is scanned again for its first NaN.
template <typename scalar_t, bool kMax = true, bool kS = false>
inline void row_pool(const scalar_t* p, int64_t L, acc_type<scalar_t>& sum, acc_type<scalar_t>& mx, int64_t& arg,
                     const acc_type<scalar_t>* S = nullptr) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  auto vec_at = [&](int64_t i) {
    Vec v = IO::load(p + i);
    if constexpr (kS) v = v * Vec::loadu(S + i);
    return v;
  };
  auto val_at = [&](int64_t i) { return kS ? static_cast<acc_t>(p[i]) * S[i] : static_cast<acc_t>(p[i]); };
  // block starts are exact in acc_t below 2^digits; longer rows (never met in practice) scan again
  const bool exact = L < (int64_t(1) << std::numeric_limits<acc_t>::digits);
  Vec s0(acc_t(0)), s1(acc_t(0));
  Vec m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0;
  Vec b0(acc_t(0)), b1(acc_t(0));  // block start of each lane's max (chain 1: plus V)
  int64_t i = 0;
  for (; i + 2 * V <= L; i += 2 * V) {
    const Vec v0 = vec_at(i), v1 = vec_at(i + V);
    s0 += v0;
    s1 += v1;
    if constexpr (kMax) {
      const Vec t0 = v0 > m0, t1 = v1 > m1, vi(static_cast<acc_t>(i));
      m0 = Vec::blendv(m0, v0, t0);
      m1 = Vec::blendv(m1, v1, t1);
      b0 = Vec::blendv(b0, vi, t0);
      b1 = Vec::blendv(b1, vi, t1);
    }
  }
  if (i + V <= L) {
    const Vec v0 = vec_at(i);
    s0 += v0;
    if constexpr (kMax) {
      const Vec t0 = v0 > m0;
      m0 = Vec::blendv(m0, v0, t0);
      b0 = Vec::blendv(b0, Vec(static_cast<acc_t>(i)), t0);
    }
    i += V;
  }
  acc_t s = lanes_sum(s0 + s1), m = -std::numeric_limits<acc_t>::infinity();
  int64_t a = 0;
  if constexpr (kMax) {
    m = lanes_max(at::vec::maximum(m0, m1));
    // the first position among the lanes that hold the max (all -inf: position 0, which is -inf too)
    const Vec vm(m), iota = Vec::arange(acc_t(0), acc_t(1)), past(static_cast<acc_t>(L));
    const Vec a0 = Vec::blendv(past, b0 + iota, m0 == vm), a1 = Vec::blendv(past, b1 + iota + Vec(acc_t(V)), m1 == vm);
    a = static_cast<int64_t>(lanes_min(at::vec::minimum(a0, a1)));
    if (a >= L) a = 0;
  }
  for (int64_t j = i; j < L; ++j) {
    const acc_t v = val_at(j);
    s += v;
    if constexpr (kMax)
      if (v > m) m = v, a = j;
  }
  sum = s;
  if constexpr (kMax) {
    if (std::isnan(s) || !exact) {
      // a NaN (or infinities of both signs) met this row, or block starts may be inexact: the first
      // NaN, else the first element equal to the max (the row is in L1 now)
      a = -1;
      for (int64_t j = 0; j < L && a < 0; ++j)
        if (std::isnan(val_at(j))) a = j, m = val_at(j);
      for (int64_t j = 0; j < L && a < 0; ++j)
        if (val_at(j) == m) a = j;
    }
    mx = m;
    arg = std::max<int64_t>(a, 0);
  }
}

// cols_pool for more rows than acc_t counts exactly: the argmax is kept in int64 memory.
// Column pass: for columns [j0, j0 + L) of R rows (row r at base + r * stride), sum, max and first
// argmax over the rows, each row scaled by rscale[r] if given.
template <typename scalar_t>
inline void cols_pool_wide(const scalar_t* base, int64_t R, int64_t stride, int64_t j0, int64_t L,
                      const acc_type<scalar_t>* rscale, acc_type<scalar_t>* sum, acc_type<scalar_t>* mx,
                      int64_t* arg) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  for (int64_t r = 0; r < R; ++r) {
    const scalar_t* p = base + r * stride + j0;
    const acc_t sc = rscale ? rscale[r] : acc_t(1);
    const Vec vs(sc);
    int64_t j = 0;
    for (; j < L; j += IO::kSize) {
      const int64_t n = std::min<int64_t>(IO::kSize, L - j);
      Vec v = IO::load(p + j, n);
      if (rscale) v = v * vs;
      if (r == 0) {
        v.store(sum + j, n);
        v.store(mx + j, n);
        for (int64_t l = 0; l < n; ++l) arg[j + l] = 0;
        continue;
      }
      (Vec::loadu(sum + j, n) + v).store(sum + j, n);
      Vec m = Vec::loadu(mx + j, n);
      Vec take = (v > m) | (v.isnan() & (m == m));
      if (take.zero_mask() != (1 << Vec::size()) - 1) {  // rare after the first rows: update the lanes
        Vec::blendv(m, v, take).store(mx + j, n);
        alignas(64) acc_t t[IO::kSize];
        take.store(t);
        for (int64_t l = 0; l < n; ++l)
          if (t[l] != acc_t(0) || std::isnan(t[l])) arg[j + l] = r;
      }
    }
  }
}

// Rows per step of the column passes: a step reads kRowStep rows side by side with its
// accumulators in registers, and spills them to L1 between steps. Over row segments shorter than
// kPrefetchBelowBytes the hardware prefetchers do not follow that walk (a line from each row in
// turn): each row then fetches its lines kPrefetchRows rows ahead itself, into L2 only. Fetched
// into L1, 8 rows ahead, they held L1's miss buffers and the loads stalled (measured at batch 8:
// channels_last CBAM forward 1.37x faster at 56x56 and 1.24x at 28x28 with the L2 hint).
constexpr int64_t kRowStep = 8;
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

// Column pass: for columns [j0, j0 + L) (L <= kColBlock) of R rows (row r at base + r * stride),
// sum, max and first argmax over the rows, each row scaled by rscale[r] if given. Every column is
// reduced over the rows in order; the argmax is kept as acc_t lanes (exact below 2^digits rows).
// The max runs on plain compares; a column that meets a NaN (its sum is NaN then) is redone with
// torch's NaN rule.
template <typename scalar_t>
inline void cols_pool(const scalar_t* base, int64_t R, int64_t stride, int64_t j0, int64_t L,
                      const acc_type<scalar_t>* rscale, acc_type<scalar_t>* sum, acc_type<scalar_t>* mx,
                      int64_t* arg) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize, U = 2;
  if (R >= (int64_t(1) << std::numeric_limits<acc_t>::digits) || L > kColBlock) {
    cols_pool_wide(base, R, stride, j0, L, rscale, sum, mx, arg);
    return;
  }
  alignas(64) acc_t idx[kColBlock];
  const bool ahead = L * int64_t(sizeof(scalar_t)) < kPrefetchBelowBytes;
  for (int64_t r0 = 0; r0 < R; r0 += kRowStep) {
    const int64_t r1 = std::min(R, r0 + kRowStep);
    auto step = [&](int64_t j, auto full) {  // columns [j, j + U * V), all of them if full
      constexpr bool kFull = decltype(full)::value;
      int64_t n[U];
      Vec vs[U], vm[U], vi[U];
      for (int64_t u = 0; u < U; ++u) {
        n[u] = kFull ? V : std::clamp<int64_t>(L - j - u * V, 0, V);
        if (n[u] == 0) continue;
        if (r0 == 0) {
          vs[u] = Vec(acc_t(0));
          vm[u] = Vec(-std::numeric_limits<acc_t>::infinity());
          vi[u] = Vec(acc_t(0));
        } else {
          vs[u] = Vec::loadu(sum + j + u * V, n[u]);
          vm[u] = Vec::loadu(mx + j + u * V, n[u]);
          vi[u] = Vec::loadu(idx + j + u * V, n[u]);
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* p = base + r * stride + j0 + j;
        if (ahead && r + kPrefetchRows < R) prefetch(p + kPrefetchRows * stride, U * V);
        const Vec sc(rscale ? rscale[r] : acc_t(1)), vr(static_cast<acc_t>(r));
        for (int64_t u = 0; u < U; ++u) {
          if (n[u] == 0) continue;
          Vec v = n[u] == V ? IO::load(p + u * V) : IO::load(p + u * V, n[u]);
          if (rscale) v = v * sc;
          vs[u] = vs[u] + v;
          const Vec take = r == 0 ? Vec(acc_t(0)) == Vec(acc_t(0)) : v > vm[u];
          vm[u] = Vec::blendv(vm[u], v, take);
          vi[u] = Vec::blendv(vi[u], vr, take);
        }
      }
      for (int64_t u = 0; u < U; ++u) {
        if (n[u] == 0) continue;
        vs[u].store(sum + j + u * V, n[u]);
        vm[u].store(mx + j + u * V, n[u]);
        vi[u].store(idx + j + u * V, n[u]);
      }
    };
    step_columns<U * V>(L, step);
  }
  for (int64_t j = 0; j < L; ++j) {
    arg[j] = static_cast<int64_t>(idx[j]);
    if (!std::isnan(sum[j])) continue;
    // a NaN, or infinities of both signs, met this column: redo its max with torch's rule
    auto val = [&](int64_t r) {
      const acc_t v = static_cast<acc_t>(base[r * stride + j0 + j]);
      return rscale ? v * rscale[r] : v;
    };
    acc_t m = val(0);
    int64_t a = 0;
    for (int64_t r = 1; r < R && !std::isnan(m); ++r) {
      const acc_t v = val(r);
      if (max_takes(v, m)) m = v, a = r;
    }
    mx[j] = m;
    arg[j] = a;
  }
}

// ---------------------------------------------------------------------------- dot passes

// sum_i A_i * X_i over a contiguous row, A_i = a[i] (* T[i]) (+ B[i]), X_i = x[i] (* S[i]).
template <typename scalar_t, bool kT, bool kB, bool kS>
inline acc_type<scalar_t> row_dot(const scalar_t* a, const scalar_t* x, int64_t L, const acc_type<scalar_t>* T,
                                  const acc_type<scalar_t>* B, const acc_type<scalar_t>* S) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  auto A_at = [&](int64_t i) {
    Vec va = IO::load(a + i);
    if constexpr (kT) va = va * Vec::loadu(T + i);
    if constexpr (kB) va = va + Vec::loadu(B + i);
    return va;
  };
  auto X_at = [&](int64_t i) {
    Vec vx = IO::load(x + i);
    if constexpr (kS) vx = vx * Vec::loadu(S + i);
    return vx;
  };
  Vec acc0(acc_t(0)), acc1(acc_t(0));  // 2 chains in registers hide the FMA latency
  int64_t i = 0;
  for (; i + 2 * V <= L; i += 2 * V) {
    acc0 = at::vec::fmadd(A_at(i), X_at(i), acc0);
    acc1 = at::vec::fmadd(A_at(i + V), X_at(i + V), acc1);
  }
  if (i + V <= L) {
    acc0 = at::vec::fmadd(A_at(i), X_at(i), acc0);
    i += V;
  }
  acc_t s = lanes_sum(acc0 + acc1);
  for (; i < L; ++i) {
    acc_t va = static_cast<acc_t>(a[i]), vx = static_cast<acc_t>(x[i]);
    if constexpr (kT) va = va * T[i];
    if constexpr (kB) va = va + B[i];
    if constexpr (kS) vx = vx * S[i];
    s += va * vx;
  }
  return s;
}

// Column form: out[j] = sum_r A_rj * X_rj for columns [j0, j0 + L), with per-row T[r], B[r], S[r]
// (kX false: X = 1, a plain column sum of A); each column summed over the rows in order, kRowStep
// rows per step with the sums in registers.
template <typename scalar_t, bool kT, bool kB, bool kS, bool kX = true>
inline void cols_dot(const scalar_t* a, const scalar_t* x, int64_t R, int64_t stride, int64_t j0, int64_t L,
                     const acc_type<scalar_t>* T, const acc_type<scalar_t>* B, const acc_type<scalar_t>* S,
                     acc_type<scalar_t>* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize, U = 4;
  const bool ahead = L * int64_t(sizeof(scalar_t)) < kPrefetchBelowBytes;
  for (int64_t r0 = 0; r0 < R; r0 += kRowStep) {
    const int64_t r1 = std::min(R, r0 + kRowStep);
    auto step = [&](int64_t j, auto full) {  // columns [j, j + U * V), all of them if full
      constexpr bool kFull = decltype(full)::value;
      int64_t n[U];
      Vec acc[U];
      for (int64_t u = 0; u < U; ++u) {
        n[u] = kFull ? V : std::clamp<int64_t>(L - j - u * V, 0, V);
        acc[u] = r0 == 0 || n[u] == 0 ? Vec(acc_t(0)) : Vec::loadu(out + j + u * V, n[u]);
      }
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* pa = a + r * stride + j0 + j;
        const scalar_t* px = kX ? x + r * stride + j0 + j : nullptr;
        if (ahead && r + kPrefetchRows < R) {
          prefetch(pa + kPrefetchRows * stride, U * V);
          if constexpr (kX) prefetch(px + kPrefetchRows * stride, U * V);
        }
        const Vec vt(kT ? T[r] : acc_t(1)), vb(kB ? B[r] : acc_t(0)), vs(kS ? S[r] : acc_t(1));
        for (int64_t u = 0; u < U; ++u) {
          if (n[u] == 0) continue;
          Vec va = n[u] == V ? IO::load(pa + u * V) : IO::load(pa + u * V, n[u]);
          if constexpr (kT) va = va * vt;
          if constexpr (kB) va = va + vb;
          if constexpr (kX) {
            Vec vx = n[u] == V ? IO::load(px + u * V) : IO::load(px + u * V, n[u]);
            if constexpr (kS) vx = vx * vs;
            acc[u] = at::vec::fmadd(va, vx, acc[u]);
          } else {
            acc[u] = acc[u] + va;
          }
        }
      }
      for (int64_t u = 0; u < U; ++u)
        if (n[u]) acc[u].store(out + j + u * V, n[u]);
    };
    step_columns<U * V>(L, step);
  }
}

// ---------------------------------------------------------------------------- the passes on (N, C, HW)

// Shape of the big tensor and its layout.
struct Dims {
  int64_t N, C, H, W, HW;
  bool cl;  // channels_last
  int64_t rows() const { return cl ? HW : C; }     // rows per sample
  int64_t row_len() const { return cl ? C : HW; }  // contiguous run
  int64_t sample() const { return C * HW; }
  int64_t at(int64_t n, int64_t c, int64_t hw) const {
    return n * C * HW + (cl ? hw * C + c : c * HW + hw);
  }
  Dims first(int64_t n) const { return Dims{n, C, H, W, HW, cl}; }  // shaped like n of the samples
  int64_t numel() const { return N * C * HW; }
};

// Whether a pass's output (a tensor shaped like x, of the batch d) is big enough to be written past
// the caches; apply then streams it where it can.
template <typename scalar_t>
bool stream_output(const Dims& d) {
  return d.numel() * int64_t(sizeof(scalar_t)) >= kStreamBytes;
}

// Samples are taken in groups of up to this many bytes of x: the channel MLP then reads its
// weights once per group rather than once per sample (at 2048 x 7 x 7 the weights are 5x a
// sample's bytes), while a group's x still stays in cache between the passes.
constexpr int64_t kGroupBytes = int64_t(2) << 20;

// How a sequence of passes runs (for_samples): 0 pass by pass over the whole batch, a region per
// pass; else sample by sample in one parallel region over groups of this many samples. Each region
// costs a thread hand-off (65-85 us measured here under OMP_WAIT_POLICY=PASSIVE, a few us when
// threads spin), and a sample read by consecutive passes stays in cache: measured equal or faster
// at every ResNet-50 stage shape at batch 8 (CBAM backward 15-30%). Needs enough samples to keep
// every thread busy; the groups are then the fewest, a multiple of the thread count, that fit
// kGroupBytes (at least one sample). $ATTNFUSED_CPU_PER_SAMPLE=0 / =1 forces batch passes / one
// sample per group (the tests run both and the default).
inline int64_t samples_per_group(const Dims& d, int64_t sample_bytes) {
  const char* env = std::getenv("ATTNFUSED_CPU_PER_SAMPLE");
  if (env && (env[0] == '0' || env[0] == '1')) return env[0] == '1' ? 1 : 0;
  const int64_t threads = at::get_num_threads();
  if (d.N < threads || (d.N % threads != 0 && d.N < 4 * threads)) return 0;
  for (int64_t groups = threads;; groups += threads) {
    const int64_t g = (d.N + groups - 1) / groups;
    if (g == 1 || g * sample_bytes <= kGroupBytes) return g;
  }
}

// The samples [n0, n0 + count) that the calling thread takes next in for_samples (count 0: none),
// for a pass that fetches them ahead.
struct NextSamples {
  int64_t n0 = 0, count = 0;
};
inline thread_local NextSamples next_samples;

// Runs f(n0, d1) over the samples [n0, n0 + d1.N): group by group in one parallel region, or
// f(0, d) once (its passes parallel), as samples_per_group says. Results do not depend on the split.
template <typename scalar_t, typename F>
void for_samples(const Dims& d, const F& f) {
  const int64_t g = samples_per_group(d, d.sample() * int64_t(sizeof(scalar_t)));
  if (g == 0) return f(int64_t(0), d);
  at::parallel_for(0, (d.N + g - 1) / g, 1, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      next_samples = q + 1 < e ? NextSamples{(q + 1) * g, std::min(g, d.N - (q + 1) * g)} : NextSamples{};
      f(q * g, d.first(std::min(g, d.N - q * g)));
    }
    next_samples = NextSamples{};
  });
}

inline Dims dims_of(const at::Tensor& x) {
  Dims d{x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) * x.size(3), is_channels_last(x)};
  return d;
}

// Runs f(n, j0, L) over the column blocks [j0, j0 + L) of every sample of a column pass over `len`
// columns, in parallel.
template <typename scalar_t, typename F>
void parallel_col_blocks(const Dims& d, int64_t len, const F& f) {
  const ColBlocks cb(len, VecIO<scalar_t>::kSize);
  at::parallel_for(0, d.N * cb.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) f(t / cb.count, cb.begin(t % cb.count), cb.length(t % cb.count, len));
  });
}

// Over space per (n, c): pooled [N, 2, C] = (mean, max) and argmax [N, C] of x. Without `with_max`
// (pool "avg": nothing reads them) the max half and argmax are zeros, as the ops' contract says.
template <typename scalar_t>
void pool_space(const scalar_t* x, const Dims& d, acc_type<scalar_t>* pooled, int64_t* argmax, bool with_max) {
  using acc_t = acc_type<scalar_t>;
  const acc_t inv = acc_t(1) / acc_t(d.HW);
  if (!with_max) {
    std::fill(argmax, argmax + d.N * d.C, int64_t(0));
    for (int64_t n = 0; n < d.N; ++n) std::fill(pooled + (2 * n + 1) * d.C, pooled + (2 * n + 2) * d.C, acc_t(0));
  }
  if (!d.cl) {
    at::parallel_for(0, d.N * d.C, grain_rows(d.HW), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / d.C, c = i % d.C;
        acc_t s, m;
        if (with_max) {
          row_pool<scalar_t>(x + i * d.HW, d.HW, s, m, argmax[i]);
          pooled[n * 2 * d.C + d.C + c] = m;
        } else {
          int64_t unused;
          row_pool<scalar_t, false>(x + i * d.HW, d.HW, s, m, unused);
        }
        pooled[n * 2 * d.C + c] = s * inv;
      }
    });
    return;
  }
  parallel_col_blocks<scalar_t>(d, d.C, [&](int64_t n, int64_t j0, int64_t L) {
    acc_t* avg = pooled + n * 2 * d.C;
    const scalar_t* xn = x + n * d.sample();
    if (with_max)
      cols_pool<scalar_t>(xn, d.HW, d.C, j0, L, nullptr, avg + j0, avg + d.C + j0, argmax + n * d.C + j0);
    else
      cols_dot<scalar_t, false, false, false, false>(xn, nullptr, d.HW, d.C, j0, L, nullptr, nullptr, nullptr,
                                                     avg + j0);
    for (int64_t j = j0; j < j0 + L; ++j) avg[j] *= inv;
  });
}

// One channels_last pixel p[0, C) (times s[c] if given): max, mean and first argmax over channels.
template <typename scalar_t>
inline void pool_pixel(const scalar_t* p, int64_t C, const acc_type<scalar_t>* s, acc_type<scalar_t>& mx,
                       acc_type<scalar_t>& mean, int64_t& arg) {
  using acc_t = acc_type<scalar_t>;
  acc_t sum;
  if (s)
    row_pool<scalar_t, true, true>(p, C, sum, mx, arg, s);
  else
    row_pool<scalar_t>(p, C, sum, mx, arg);
  mean = sum * (acc_t(1) / acc_t(C));
}

// Over channels per (n, hw): smaps [N, 2, HW] = (max, mean) and sargmax [N, HW] of x * s[n, c]
// (s may be null: plain x).
template <typename scalar_t>
void pool_channels(const scalar_t* x, const Dims& d, const acc_type<scalar_t>* s, acc_type<scalar_t>* smaps,
                   int64_t* sargmax) {
  using acc_t = acc_type<scalar_t>;
  const acc_t inv = acc_t(1) / acc_t(d.C);
  if (d.cl) {
    // rows are pixels: a row pass, s varying along the row
    at::parallel_for(0, d.N * d.HW, grain_rows(d.C), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / d.HW, hw = i % d.HW;
        acc_t* mx = smaps + n * 2 * d.HW;
        pool_pixel(x + i * d.C, d.C, s ? s + n * d.C : nullptr, mx[hw], mx[d.HW + hw], sargmax[i]);
      }
    });
    return;
  }
  parallel_col_blocks<scalar_t>(d, d.HW, [&](int64_t n, int64_t j0, int64_t L) {
    acc_t* mx = smaps + n * 2 * d.HW;
    acc_t* mean = mx + d.HW;
    cols_pool<scalar_t>(x + n * d.sample(), d.C, d.HW, j0, L, s ? s + n * d.C : nullptr, mean + j0, mx + j0,
                        sargmax + n * d.HW + j0);
    for (int64_t j = j0; j < j0 + L; ++j) mean[j] *= inv;
  });
}

// Per (n, c): out[n, c] = sum over space of (a * T[n, hw] + B[n, hw]) * x   (T, B optional).
template <typename scalar_t, bool kT, bool kB>
void dot_space(const scalar_t* a, const scalar_t* x, const Dims& d, const acc_type<scalar_t>* T,
               const acc_type<scalar_t>* B, acc_type<scalar_t>* out) {
  if (!d.cl) {
    at::parallel_for(0, d.N * d.C, grain_rows(d.HW), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / d.C;
        out[i] = row_dot<scalar_t, kT, kB, false>(a + i * d.HW, x + i * d.HW, d.HW, kT ? T + n * d.HW : nullptr,
                                                  kB ? B + n * d.HW : nullptr, nullptr);
      }
    });
    return;
  }
  parallel_col_blocks<scalar_t>(d, d.C, [&](int64_t n, int64_t j0, int64_t L) {
    cols_dot<scalar_t, kT, kB, false>(a + n * d.sample(), x + n * d.sample(), d.HW, d.C, j0, L,
                                      kT ? T + n * d.HW : nullptr, kB ? B + n * d.HW : nullptr, nullptr,
                                      out + n * d.C + j0);
  });
}

// Per (n, hw): out[n, hw] = sum over channels of a * (x * S[n, c])   (S optional).
template <typename scalar_t, bool kS>
void dot_channels(const scalar_t* a, const scalar_t* x, const Dims& d, const acc_type<scalar_t>* S,
                  acc_type<scalar_t>* out) {
  if (d.cl) {
    at::parallel_for(0, d.N * d.HW, grain_rows(d.C), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / d.HW;
        out[i] = row_dot<scalar_t, false, false, kS>(a + i * d.C, x + i * d.C, d.C, nullptr, nullptr,
                                                     kS ? S + n * d.C : nullptr);
      }
    });
    return;
  }
  parallel_col_blocks<scalar_t>(d, d.HW, [&](int64_t n, int64_t j0, int64_t L) {
    cols_dot<scalar_t, false, false, kS>(a + n * d.sample(), x + n * d.sample(), d.C, d.HW, j0, L, nullptr,
                                         nullptr, kS ? S + n * d.C : nullptr, out + n * d.HW + j0);
  });
}

// The elements whose gradient takes a max's one-hot term, listed per row of the elementwise pass
// (rows as in Dims): argmax [N, C] marks (n, c, argmax[n, c]) and sargmax [N, HW] marks
// (n, sargmax[n, hw], hw). The one that lies along the rows (argmax for NCHW, sargmax for
// channels_last) marks one position per row and is read directly; the other is bucketed by row per
// sample (a counting sort, positions in increasing order). Indices are range-checked here.
class HotIndex {
 public:
  HotIndex(const Dims& d, const int64_t* argmax, const int64_t* sargmax)
      : rows_(d.rows()), along_(d.cl ? sargmax : argmax) {
    check(argmax, d.N, d.C, d.HW, "argmax", "H*W");
    check(sargmax, d.N, d.HW, d.C, "sargmax", "C");
    const int64_t* across = d.cl ? argmax : sargmax;  // [N, cols]: the row it marks
    if (!across) return;
    const int64_t cols = d.row_len();
    start_.assign(d.N * (rows_ + 1), 0);
    pos_.resize(d.N * cols);
    for (int64_t n = 0; n < d.N; ++n) {
      int64_t* st = start_.data() + n * (rows_ + 1);
      const int64_t* an = across + n * cols;
      for (int64_t j = 0; j < cols; ++j) ++st[an[j] + 1];
      for (int64_t r = 0; r < rows_; ++r) st[r + 1] += st[r];
      std::vector<int64_t> fill(st, st + rows_);
      for (int64_t j = 0; j < cols; ++j) pos_[n * cols + fill[an[j]]++] = j;
      for (int64_t r = 0; r <= rows_; ++r) st[r] += n * cols;
    }
  }

  // Calls f(j) for each marked position j along row r of sample n (a position may come twice).
  template <typename F>
  void for_row(int64_t n, int64_t r, const F& f) const {
    if (along_) f(along_[n * rows_ + r]);
    if (!start_.empty()) {
      const int64_t* st = start_.data() + n * (rows_ + 1) + r;
      for (int64_t k = st[0]; k < st[1]; ++k) f(pos_[k]);
    }
  }

 private:
  static void check(const int64_t* idx, int64_t N, int64_t len, int64_t bound, const char* name,
                    const char* what) {
    if (!idx) return;
    for (int64_t i = 0; i < N * len; ++i)
      TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < bound, name, "[", i / len, ", ", i % len, "] = ", idx[i],
                        " is outside [0, ", what, " = ", bound, ")");
  }
  int64_t rows_;
  const int64_t* along_;
  std::vector<int64_t> start_, pos_;
};

struct NoHot {  // the `value` of an apply without marked elements (never called)
  double operator()(int64_t, int64_t, int64_t) const { return 0.0; }
};

// apply's pass on the NCHW rows [b, e) of length L (at least a vector) as one run: out[f] = in[f]
// * S[i] + A[i] (each optional) for f in row i, the same operations per element as row by row.
// Each vector takes its factors from its first row, blended with the next row's in the lanes past
// that row's end. `stream`: the run is stored with non-temporal stores from its first aligned
// vector on (the elements before it and after its last whole vector plainly).
template <typename scalar_t, bool kS, bool kA>
void apply_run(scalar_t* out, const scalar_t* in, int64_t L, const acc_type<scalar_t>* S,
               const acc_type<scalar_t>* A, int64_t b, int64_t e, bool stream) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  int64_t f = b * L, i = b, next = (b + 1) * L;  // element f lies in row i, which ends before next
  const int64_t end = e * L;
  auto one = [&] {  // element f, then on to f + 1
    acc_t v = static_cast<acc_t>(in[f]);
    if constexpr (kS) v = v * S[i];
    if constexpr (kA) v = v + A[i];
    out[f] = static_cast<scalar_t>(v);
    if (++f == next) ++i, next += L;
  };
  stream = stream && IO::can_stream(out);  // out aligned: a vector at f is aligned when f is
  if (stream)
    while (f < end && f % V != 0) one();
  const Vec lane = Vec::arange(acc_t(0), acc_t(1));
  for (; f + V <= end; f += V) {
    const int64_t k = next - f;  // lanes [0, k) lie in row i, the rest (if any) in row i + 1 (L >= V)
    Vec v = IO::load(in + f);
    if (k >= V) {
      if constexpr (kS) v = v * Vec(S[i]);
      if constexpr (kA) v = v + Vec(A[i]);
    } else {
      const Vec later = lane >= Vec(static_cast<acc_t>(k));
      if constexpr (kS) v = v * Vec::blendv(Vec(S[i]), Vec(S[i + 1]), later);
      if constexpr (kA) v = v + Vec::blendv(Vec(A[i]), Vec(A[i + 1]), later);
    }
    stream ? IO::store_stream(out + f, v) : IO::store(out + f, v);
    if (k <= V) ++i, next += L;
  }
  while (f < end) one();
  if (stream) stream_fence();
}

// One row of apply's pass: po[j] = (pin[j] * T + B) * S + A for j in [0, L), each factor optional
// (kIn false: pin = 0). Along an NCHW row T and B vary (T[j], B[j]) and S and A are fixed (S[0],
// A[0]); along a channels_last row (`cl`) the reverse. nt: stored past the caches (po aligned, the
// caller fences).
template <typename scalar_t, bool kIn, bool kT, bool kB, bool kS, bool kA>
inline void apply_row(scalar_t* po, const scalar_t* pin, int64_t L, bool cl, const acc_type<scalar_t>* T,
                      const acc_type<scalar_t>* B, const acc_type<scalar_t>* S, const acc_type<scalar_t>* A,
                      bool nt) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  auto put = [&](int64_t j, const Vec& v) { nt ? IO::store_stream(po + j, v) : IO::store(po + j, v); };
  auto elem = [&](acc_t v, int64_t j) {
    const int64_t t = cl ? 0 : j, s = cl ? j : 0;
    if constexpr (kT) v = v * T[t];
    if constexpr (kB) v = v + B[t];
    if constexpr (kS) v = v * S[s];
    if constexpr (kA) v = v + A[s];
    return v;
  };
  int64_t j = 0;
  if (!cl) {
    const Vec vs(kS ? S[0] : acc_t(1)), va(kA ? A[0] : acc_t(0));
    for (; j + IO::kSize <= L; j += IO::kSize) {
      Vec v = kIn ? IO::load(pin + j) : Vec(acc_t(0));
      if constexpr (kT) v = v * Vec::loadu(T + j);
      if constexpr (kB) v = v + Vec::loadu(B + j);
      if constexpr (kS) v = v * vs;
      if constexpr (kA) v = v + va;
      put(j, v);
    }
  } else {
    const Vec vt(kT ? T[0] : acc_t(1)), vb(kB ? B[0] : acc_t(0));
    for (; j + IO::kSize <= L; j += IO::kSize) {
      Vec v = kIn ? IO::load(pin + j) : Vec(acc_t(0));
      if constexpr (kT) v = v * vt;
      if constexpr (kB) v = v + vb;
      if constexpr (kS) v = v * Vec::loadu(S + j);
      if constexpr (kA) v = v + Vec::loadu(A + j);
      put(j, v);
    }
  }
  for (; j < L; ++j) po[j] = static_cast<scalar_t>(elem(kIn ? static_cast<acc_t>(pin[j]) : acc_t(0), j));
}

// The elementwise pass: out = (in * T[n, hw] + B[n, hw]) * S[n, c] + A[n, c], each factor optional
// (kIn false: in = 0). One read of `in`, one write of `out`. With `hot`, the marked elements of each
// row are then rewritten, while the row is in L1, by `value(n, c, hw)`, which recomputes the whole
// gradient there (so the rounding matches the plain pass plus the one-hot term). `stream` (big
// outputs, stream_output): write `out` with non-temporal stores where every stored line is
// streamed whole. Not with `hot`, whose plain stores into lines just streamed measured 1.5x slower
// in all; not on rows that end inside a line and go row by row, which leave lines part streamed,
// part stored (NCHW 14x14 and 7x7 at batch 32 wrote 3x slower than with plain stores).
template <typename scalar_t, bool kIn, bool kT, bool kB, bool kS, bool kA, typename F = NoHot>
void apply(scalar_t* out, const scalar_t* in, const Dims& d, const acc_type<scalar_t>* T,
           const acc_type<scalar_t>* B, const acc_type<scalar_t>* S, const acc_type<scalar_t>* A,
           const HotIndex* hot = nullptr, const F& value = F(), bool stream = false) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  const int64_t R = d.rows(), L = d.row_len();
  const bool whole_lines = L * int64_t(sizeof(scalar_t)) % 64 == 0;
  // NCHW rows, each with fixed factors (S, A), that are not whole lines: the rows of a chunk are
  // one contiguous run, taken a vector at a time across the row ends, so that it streams whole
  // (ECA's forward at batch 32 measured 1.2x faster at 14 x 14 and 7 x 7).
  const bool flat = kIn && !kT && !kB && !d.cl && !hot && !whole_lines && L >= V;
  stream = stream && !hot && (whole_lines || flat);
  at::parallel_for(0, d.N * R, grain_rows(L), [&](int64_t b, int64_t e) {
    if (flat) {
      apply_run<scalar_t, kS, kA>(out, in, L, S, A, b, e, stream);
      return;
    }
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = i / R, r = i % R;
      const scalar_t* pin = in + i * L;
      scalar_t* po = out + i * L;
      const bool nt = stream && IO::can_stream(po);
      const acc_t* Tn = kT ? T + n * d.HW : nullptr;
      const acc_t* Bn = kB ? B + n * d.HW : nullptr;
      const acc_t* Sn = kS ? S + n * d.C : nullptr;
      const acc_t* An = kA ? A + n * d.C : nullptr;
      // along the row: NCHW runs over hw (T, B vary, S, A fixed); channels_last over c (the reverse)
      auto fixed = [&](const acc_t* p) { return p ? p + r : nullptr; };
      if (d.cl)
        apply_row<scalar_t, kIn, kT, kB, kS, kA>(po, pin, L, true, fixed(Tn), fixed(Bn), Sn, An, nt);
      else
        apply_row<scalar_t, kIn, kT, kB, kS, kA>(po, pin, L, false, Tn, Bn, fixed(Sn), fixed(An), nt);
      if (hot)
        hot->for_row(n, r, [&](int64_t p) {
          po[p] = static_cast<scalar_t>(d.cl ? value(n, p, r) : value(n, r, p));
        });
    }
    if (stream) stream_fence();  // before another thread reads the streamed rows
  });
}

// ---------------------------------------------------------------------------- small math, batch level

// Weights of channel attention in the accumulation type (contiguous); absent ones are undefined.
struct ChannelWeights {
  at::Tensor w1, b1, w2, b2;
  int64_t C = 0, Cr = 0, k = 0;  // Cr for kind mlp, k for kind conv
};

// Small tensors (weights, t, grad_smaps) in the accumulation dtype, contiguous; undefined if absent.
inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}
inline at::Tensor to_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() && t->defined() ? to_acc(*t, acc) : at::Tensor();
}

inline ChannelWeights channel_weights(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                      const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                                      const ChannelOptions& o) {
  const int64_t size = check_channel_weights(x, w1, b1, w2, b2, o.kind);
  const auto acc = acc_dtype(x);
  ChannelWeights w{to_acc(w1, acc), to_acc(b1, acc), to_acc(w2, acc), to_acc(b2, acc), x.size(1), 0, 0};
  (o.kind == Kind::MLP ? w.Cr : w.k) = size;
  return w;
}

// Weight gradient in the weight's dtype, or an empty tensor where the weight is absent (the ops' contract).
inline at::Tensor grad_out(const at::Tensor& g, const std::optional<at::Tensor>& w, const at::Tensor& like) {
  if (!(w.has_value() && w->defined())) return at::empty({0}, like.options());
  return g.to(w->scalar_type());
}

template <typename acc_t>
inline const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

// The inputs of f: V [N*P, C], row n * P + p = input p of sample n (pool_input of avg and max).
template <typename acc_t>
void fill_pool_inputs(const acc_t* pooled, Pool pool, int64_t N, int64_t C, acc_t* V) {
  const int64_t P = small::pool_inputs(pool);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t c = 0; c < C; ++c)
        V[(n * P + p) * C + c] = small::pool_input(pooled[n * 2 * C + c], pooled[n * 2 * C + C + c], pool, int(p));
}

// Width of a sample's row of the forward's `hidden` output, where it saves the MLP's pre-activations
// HP (P rows of Cr) for the backward: P * Cr; 0 for the conv, whose backward recomputes its few
// operations. (Not the logits too: C more per sample took the bytes saved for backward past 1.1x
// x's at 2048 x 7 x 7.)
inline int64_t hidden_width(const ChannelWeights& w, const ChannelOptions& o) {
  return o.kind == Kind::MLP ? small::pool_inputs(o.pool) * w.Cr : 0;
}

// The forward's `hidden` output: [N, hidden_width] in the accumulation dtype, or empty for the conv.
inline at::Tensor hidden_output(const at::Tensor& x, const ChannelWeights& w, const ChannelOptions& o) {
  const int64_t width = hidden_width(w, o);
  const auto opts = x.options().dtype(acc_dtype(x));
  return width ? at::empty({x.size(0), width}, opts) : at::empty({0}, opts);
}

// The backward's view of `hidden`: null where it is empty (saved by no forward: recompute), else
// checked against the shape hidden_output gives, contiguous.
inline at::Tensor saved_hidden(const at::Tensor& hidden, const at::Tensor& x, const ChannelWeights& w,
                               const ChannelOptions& o) {
  if (hidden.numel() == 0) return at::Tensor();
  check_saved(hidden, x, "hidden", {x.size(0), hidden_width(w, o)}, acc_dtype(x));
  return hidden.contiguous();
}

// The channel function f of a batch (the MLP or the 1D conv on the pooled vectors) and its
// backward, for any range of samples at a time: group by group inside a per-sample region
// (for_samples), or the whole batch at once (its GEMMs parallel). Each element is one fixed-order
// chain either way, so the bits do not depend on the split. The weight gradients then sum over the
// whole batch. Group by group, the MLP reads its weights once per group rather than once per tile
// of 4; sample by sample it still measured faster at every ResNet-50 stage (1.2-1.45x at 14x14 and
// 7x7, batch 8; 1.06-1.1x at 7x7, batch 32): the whole op then runs in one parallel region.
template <typename acc_t>
class ChannelSmall {
 public:
  ChannelSmall(const ChannelWeights& w, const ChannelOptions& o, int64_t N)
      : w_(w), o_(o), N(N), C(w.C), P(small::pool_inputs(o.pool)), Cr(w.Cr), V(N * P * C), HP(N * P * Cr),
        H(N * P * Cr), G(P > 1 ? N * Cr : 0), Z(N * C), S(N * C), DHP(N * P * Cr) {
    if (o.kind == Kind::MLP && w.b2.defined()) {  // z = (sum over p of H_p) W2^T + P b2
      const acc_t* b2 = w.b2.data_ptr<acc_t>();
      bias2_.resize(C);
      for (int64_t c = 0; c < C; ++c) bias2_[c] = acc_t(P) * b2[c];
    }
  }

  // Z and S of samples [n0, n0 + n) from pooled [N, 2, C] (mean, max); with `save` (the MLP's
  // [N, P * Cr]), their pre-activations HP are also written there for the backward (restore).
  void forward(const acc_t* pooled, int64_t n0, int64_t n, acc_t* save = nullptr) {
    compute(pooled, n0, n, save, nullptr);
  }

  // What forward computes for samples [n0, n0 + n), the same values, with the first layer's
  // pre-activations taken from the rows it saved: the larger of the MLP's two GEMMs is not run
  // again (the recompute of both took a sixth of the CBAM backward at 32 x 2048 x 7 x 7). Without
  // `saved` (the conv; a forward on another backend) all of it is computed again.
  void restore(const acc_t* pooled, const acc_t* saved, int64_t n0, int64_t n) {
    compute(pooled, n0, n, nullptr, saved);
  }

  // Back through f for samples [n0, n0 + n): dz [N, C] (the gates' gradient, turned into the
  // logits' in place) to dpooled [N, 2, C] and A [N, C] = dpooled's mean half / HW (what each
  // element of x gets through the mean).
  void backward_inputs(acc_t* dz, int64_t n0, int64_t n, int64_t HW, acc_t* dpooled, acc_t* A) {
    const int64_t r0 = n0 * P, rows = n * P;
    gate_backward(Z.data() + n0 * C, o_.gate, n * C, dz + n0 * C);
    std::vector<acc_t> DV(rows * C);  // the inputs' gradient
    if (o_.kind == Kind::MLP) {
      // dz is the logits' gradient of each of a sample's P inputs, and the second layer saw their
      // sum G: DH = dz W2 (one row per sample), DHP = act'(HP) * DH, DV = DHP W1
      std::vector<acc_t> DH(n * Cr);
      gemm_nn<acc_t>(dz + n0 * C, C, 1, w_.w2.data_ptr<acc_t>(), n, Cr, C, DH.data());
      for (int64_t i = 0; i < rows * Cr; ++i)
        DHP[r0 * Cr + i] = DH[i / (P * Cr) * Cr + i % Cr] * act_grad(HP[r0 * Cr + i], o_.act);
      gemm_nn<acc_t>(DHP.data() + r0 * Cr, Cr, 1, w_.w1.data_ptr<acc_t>(), rows, C, Cr, DV.data());
    } else {
      at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          conv1d_row(dz + (n0 + r / P) * C, w_.w1.data_ptr<acc_t>(), w_.k, C, o_.padding, -1, DV.data() + r * C,
                     false);
      });
    }
    for (int64_t s = 0; s < n; ++s) {  // back through pool_input, p in order
      acc_t* davg = dpooled + (n0 + s) * 2 * C;
      acc_t* dmax = davg + C;
      std::fill(davg, davg + 2 * C, acc_t(0));
      for (int64_t p = 0; p < P; ++p)
        for (int64_t c = 0; c < C; ++c)
          small::pool_input_backward(DV[(s * P + p) * C + c], o_.pool, int(p), davg[c], dmax[c]);
      for (int64_t c = 0; c < C; ++c) A[(n0 + s) * C + c] = davg[c] / acc_t(HW);
    }
  }

  // The weight gradients over the whole batch (after backward_inputs covered every sample), in
  // the accumulation dtype and shaped like the weights; undefined where the weight is absent. The
  // bias gradients are summed here; the jobs returned (run_jobs) fill the weights' gradients.
  std::vector<Job> backward_weights(const acc_t* dz, at::Tensor& dw1, at::Tensor& db1, at::Tensor& dw2,
                                    at::Tensor& db2) const {
    const int64_t rows = N * P;
    auto opts = w_.w1.options();
    if (o_.kind == Kind::MLP) {  // dW1 = DHP^T V, dW2 = dz^T G; each element summed in order (gemm_nn)
      dw1 = at::empty({Cr, C}, opts);
      dw2 = at::empty({C, Cr}, opts);
      if (w_.b1.defined()) {
        db1 = at::empty({Cr}, opts);
        for (int64_t j = 0; j < Cr; ++j)
          db1.data_ptr<acc_t>()[j] = small::batch_outer_at<acc_t>(DHP.data(), Cr, 1, nullptr, 0, rows, j, 0);
      }
      if (w_.b2.defined()) {
        db2 = at::empty({C}, opts);
        for (int64_t c = 0; c < C; ++c)
          db2.data_ptr<acc_t>()[c] = small::batch_outer_at<acc_t>(dz, C, P, nullptr, 0, rows, c, 0);
      }
      return {gemm_nn_job<acc_t>(DHP.data(), 1, Cr, V.data(), Cr, C, rows, dw1.data_ptr<acc_t>()),
              gemm_nn_job<acc_t>(dz, 1, C, hidden_sum(), C, Cr, N, dw2.data_ptr<acc_t>())};
    }
    dw1 = at::empty({1, 1, w_.k}, opts);
    acc_t* gw = dw1.data_ptr<acc_t>();
    const acc_t* v = V.data();
    const int64_t k = w_.k, p = P, c = C;
    const Padding padding = o_.padding;
    return {{k, rows * c, [gw, v, dz, rows, p, k, c, padding](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) gw[j] = conv1d_dweight(v, dz, rows, p, k, c, padding, j);
    }}};
  }

 private:
  const ChannelWeights& w_;
  ChannelOptions o_;
  std::vector<acc_t> bias2_;

 public:
  const int64_t N, C, P, Cr;
  std::vector<acc_t> V;    // [N*P, C] the inputs of f
  std::vector<acc_t> HP;   // [N*P, Cr] MLP pre-activations
  std::vector<acc_t> H;    // [N*P, Cr] MLP hidden activations, act(HP)
  std::vector<acc_t> G;    // [N, Cr] the second layer's input: sum over p of H (empty for P = 1: H)
  std::vector<acc_t> Z;    // [N, C] logits
  std::vector<acc_t> S;    // [N, C] gate
  std::vector<acc_t> DHP;  // [N*P, Cr] the pre-activations' gradient (backward of the MLP)

  const acc_t* hidden_sum() const { return P > 1 ? G.data() : H.data(); }

 private:
  // forward and restore: the MLP's pre-activations HP computed (and copied to `save`), or read
  // from `saved`; then the second layer (or the conv) and the gates.
  void compute(const acc_t* pooled, int64_t n0, int64_t n, acc_t* save, const acc_t* saved) {
    const int64_t r0 = n0 * P, rows = n * P;
    fill_pool_inputs(pooled + n0 * 2 * C, o_.pool, n, C, V.data() + r0 * C);
    const acc_t* w1 = w_.w1.data_ptr<acc_t>();
    if (o_.kind == Kind::MLP) {
      if (saved) {
        std::copy_n(saved + r0 * Cr, rows * Cr, HP.data() + r0 * Cr);
      } else {  // HP = V W1^T + b1
        gemm_nt<acc_t>(V.data() + r0 * C, w1, ptr_or_null<acc_t>(w_.b1), rows, Cr, C, HP.data() + r0 * Cr);
        if (save) std::copy_n(HP.data() + r0 * Cr, rows * Cr, save + r0 * Cr);
      }
      second_layer(n0, n);
    } else {
      at::parallel_for(n0, n0 + n, 1, [&](int64_t b, int64_t e) {
        for (int64_t s = b; s < e; ++s)
          for (int64_t p = 0; p < P; ++p)
            conv1d_row(V.data() + (s * P + p) * C, w1, w_.k, C, o_.padding, 1, Z.data() + s * C, p > 0);
      });
    }
    gate_forward(Z.data() + n0 * C, o_.gate, n * C, S.data() + n0 * C);
  }

  // H = act(HP), G and Z of samples [n0, n0 + n). The second layer is linear, so z = sum over p of
  // (H_p W2^T + b2) = (sum over p of H_p) W2^T + P b2: one row per sample.
  void second_layer(int64_t n0, int64_t n) {
    for (int64_t i = n0 * P * Cr; i < (n0 + n) * P * Cr; ++i) H[i] = act_fwd(HP[i], o_.act);
    for (int64_t s = n0; P > 1 && s < n0 + n; ++s)
      for (int64_t j = 0; j < Cr; ++j) {
        acc_t g = H[s * P * Cr + j];
        for (int64_t p = 1; p < P; ++p) g = g + H[(s * P + p) * Cr + j];
        G[s * Cr + j] = g;
      }
    gemm_nt<acc_t>(hidden_sum() + n0 * Cr, w_.w2.data_ptr<acc_t>(), bias2_.empty() ? nullptr : bias2_.data(), n, C,
                   Cr, Z.data() + n0 * C);
  }
};

// Spatial small math. The k x k conv runs as vectorized row axpys over zero-padded maps
// ([M, H + 2p, W + 2p] per sample); the map modes and their gradients come from small_math.h.
struct PadDims {
  int64_t H, W, k, p, Hp, Wp, M;
  PadDims(int64_t H_, int64_t W_, int64_t k_, Maps maps)
      : H(H_), W(W_), k(k_), p((k_ - 1) / 2), Hp(H_ + k_ - 1), Wp(W_ + k_ - 1), M(small::spatial_in_channels(maps)) {}
  int64_t plane() const { return Hp * Wp; }
};

// The conv input of sample n, padded: out [M, Hp, Wp].
template <typename acc_t>
void pad_maps(const acc_t* smaps, Maps maps, const PadDims& g, int64_t n, acc_t* out) {
  const int64_t HW = g.H * g.W;
  const acc_t* mx = smaps + n * 2 * HW;
  const acc_t* mean = mx + HW;
  std::fill(out, out + g.M * g.plane(), acc_t(0));
  for (int64_t m = 0; m < g.M; ++m)
    for (int64_t h = 0; h < g.H; ++h)
      for (int64_t w = 0; w < g.W; ++w)
        out[m * g.plane() + (h + g.p) * g.Wp + w + g.p] =
            small::spatial_map_in(mx[h * g.W + w], mean[h * g.W + w], maps, int(m));
}

// out[h, w] += sum over m < planes, a, b of ker[m, a, b] in[m, h + a, w + b] (in: planes of [Hp, Wp],
// padded; out [H, W]), each output's terms added in that order: U vectors of columns at a time, their
// sums in registers across every tap (a row-long axpy per tap stored and reloaded each output row
// 2 k^2 times: spatial attention at 32x2x56x56, where the conv dominates, took 0.92 ms forward and
// 2.9 ms backward, now 0.62 and 2.2); the columns past the last whole vector in scalar code (as an
// axpy's tail: the product rounded, then the sum).
// Output rows [h0, h1) only where given (h1 < 0: to the last), out then holding row h at (h - h0) * W.
template <typename acc_t>
void corr2d_acc(const acc_t* in, int64_t planes, const acc_t* ker, const PadDims& g, acc_t* out, int64_t h0 = 0,
                int64_t h1 = -1) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size(), U = 4;
  const int64_t k = g.k, kk = k * k, Wv = g.W / V * V;
  auto vectors = [&](const acc_t* top, acc_t* o, auto nv) {  // columns [0, nv * V) from top, out o
    constexpr int64_t NV = decltype(nv)::value;
    Vec acc[NV];
    for (int64_t u = 0; u < NV; ++u) acc[u] = Vec::loadu(o + u * V);
    for (int64_t m = 0; m < planes; ++m)
      for (int64_t a = 0; a < k; ++a) {
        const acc_t* row = top + m * g.plane() + a * g.Wp;
        for (int64_t b = 0; b < k; ++b) {
          const Vec w(ker[m * kk + a * k + b]);
          for (int64_t u = 0; u < NV; ++u) acc[u] = at::vec::fmadd(w, Vec::loadu(row + b + u * V), acc[u]);
        }
      }
    for (int64_t u = 0; u < NV; ++u) acc[u].store(o + u * V);
  };
  for (int64_t h = h0; h < (h1 < 0 ? g.H : h1); ++h) {
    const acc_t* top = in + h * g.Wp;
    acc_t* o = out + (h - h0) * g.W;
    int64_t j = 0;
    for (; j + U * V <= Wv; j += U * V) vectors(top + j, o + j, std::integral_constant<int64_t, U>{});
    for (; j < Wv; j += V) vectors(top + j, o + j, std::integral_constant<int64_t, 1>{});
    for (; j < g.W; ++j) {
      acc_t acc = o[j];
      for (int64_t m = 0; m < planes; ++m)
        for (int64_t a = 0; a < k; ++a)
          for (int64_t b = 0; b < k; ++b) acc += ker[m * kk + a * k + b] * top[m * g.plane() + a * g.Wp + j + b];
      o[j] = acc;
    }
  }
}

// z [N, HW] and t = gate(z) from the saved (max, mean) maps.
template <typename acc_t>
void spatial_small_forward(const acc_t* smaps, const acc_t* weight, const acc_t* bias, Maps maps, Gate gate,
                           int64_t N, int64_t H, int64_t W, int64_t k, acc_t* z, acc_t* t) {
  const PadDims g(H, W, k, maps);
  const int64_t HW = H * W;
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> pad(g.M * g.plane());
    for (int64_t n = b; n < e; ++n) {
      pad_maps(smaps, maps, g, n, pad.data());
      acc_t* zn = z + n * HW;
      std::fill(zn, zn + HW, bias ? bias[0] : acc_t(0));
      corr2d_acc(pad.data(), g.M, weight, g, zn);
    }
  });
  gate_forward(z, gate, N * HW, t);
}

// Spatial attention's forward on one channels_last sample xn (x1 = xn * S[c], S optional) in one
// sweep down its image rows: row h is pooled over channels (smaps, sargmax, the padded conv input)
// while row h - p - 1, whose conv inputs are all in by then (p = (k - 1) / 2), takes its conv, gate
// and out = x1 * t, pixel by pixel in turn with the pooling, so that the pooling's arithmetic runs
// while the output's stores drain (as separate passes, the pooling ran with the memory idle). Each
// row of x is read again p + 1 rows after its first read, from L2 (an image row of a ResNet-50
// stage is 56 KB). Every output as the passes make it: the same functions per pixel, conv output
// row and element. Meanwhile [ahead_x, + ahead_bytes), x that comes next, is fetched into cache.
template <typename scalar_t>
void spatial_forward_sweep(const scalar_t* xn, const Dims& d, const acc_type<scalar_t>* S,
                           const acc_type<scalar_t>* weight, const acc_type<scalar_t>* bias, Maps maps, Gate gate,
                           int64_t k, acc_type<scalar_t>* smn, int64_t* san, scalar_t* on, bool stream,
                           const scalar_t* ahead_x, int64_t ahead_bytes) {
  using acc_t = acc_type<scalar_t>;
  const PadDims g(d.H, d.W, k, maps);
  std::vector<acc_t> pad(g.M * g.plane(), acc_t(0)), z(d.W), t(d.W);
  stream = stream && d.C * int64_t(sizeof(scalar_t)) % 64 == 0;  // whole lines only, as apply
  const char* ahead = reinterpret_cast<const char*>(ahead_x);
  const int64_t per_pixel = d.HW ? (ahead_bytes / d.HW + 63) / 64 * 64 : 0;  // in whole lines
  int64_t ahead_done = 0;
  for (int64_t h = 0; h < d.H + g.p + 1; ++h) {
    const int64_t r = h - g.p - 1;  // the row to scale
    if (r >= 0) {
      std::fill(z.begin(), z.end(), bias ? bias[0] : acc_t(0));
      corr2d_acc(pad.data(), g.M, weight, g, z.data(), r, r + 1);
      gate_forward(z.data(), gate, d.W, t.data());
    }
    for (int64_t w = 0; w < d.W; ++w) {
      if (r >= 0) {
        const int64_t i = (r * d.W + w) * d.C;
        const bool nt = stream && VecIO<scalar_t>::can_stream(on + i);
        if (S)
          apply_row<scalar_t, true, true, false, true, false>(on + i, xn + i, d.C, true, &t[w], nullptr, S, nullptr,
                                                              nt);
        else
          apply_row<scalar_t, true, true, false, false, false>(on + i, xn + i, d.C, true, &t[w], nullptr, nullptr,
                                                               nullptr, nt);
      }
      for (const int64_t end = std::min(ahead_bytes, ahead_done + per_pixel); ahead_done < end; ahead_done += 64)
        __builtin_prefetch(ahead + ahead_done, 0, 3);
      if (h < d.H) {
        const int64_t hw = h * d.W + w;
        pool_pixel(xn + hw * d.C, d.C, S, smn[hw], smn[d.HW + hw], san[hw]);
        for (int64_t m = 0; m < g.M; ++m)
          pad[m * g.plane() + (h + g.p) * g.Wp + w + g.p] =
              small::spatial_map_in(smn[hw], smn[d.HW + hw], maps, int(m));
      }
    }
  }
  if (stream) stream_fence();
}

// Spatial attention's passes on x1 = x * S[n, c] (S optional: plain x) for samples
// [n0, n0 + d1.N): smaps [N, 2, HW] and sargmax [N, HW] of x1, the conv and gate t, and out = x1 * t.
// Pointers are the whole batch's.
template <typename scalar_t>
void spatial_forward_samples(const scalar_t* x, const Dims& d, const acc_type<scalar_t>* S,
                             const acc_type<scalar_t>* weight, const acc_type<scalar_t>* bias, Maps maps, Gate gate,
                             int64_t k, acc_type<scalar_t>* smaps, int64_t* sargmax, scalar_t* out, int64_t n0,
                             const Dims& d1) {
  using acc_t = acc_type<scalar_t>;
  const bool stream = stream_output<scalar_t>(d);
  if (d.cl && at::in_parallel_region()) {  // each sample by one thread (for_samples): in one sweep
    // Samples past kGroupBytes (each its own group) fetch the thread's next sample during their
    // sweep, for the next pass over space to find in cache: the 56x56 forward at batch 32 measured
    // 6-11% faster; smaller samples gained nothing (28x28, 1.6 MB) or lost 10-13% (14x14, groups
    // of two).
    const NextSamples next = next_samples;
    const bool fetch = d.sample() * int64_t(sizeof(scalar_t)) > kGroupBytes;
    const int64_t share = fetch ? next.count * d.sample() / d1.N : 0;
    for (int64_t n = n0; n < n0 + d1.N; ++n)
      spatial_forward_sweep(x + n * d.sample(), d, S ? S + n * d.C : nullptr, weight, bias, maps, gate, k,
                            smaps + n * 2 * d.HW, sargmax + n * d.HW, out + n * d.sample(), stream,
                            x + next.n0 * d.sample() + (n - n0) * share, share * int64_t(sizeof(scalar_t)));
    return;
  }
  std::vector<acc_t> z(d1.N * d.HW), t(d1.N * d.HW);
  const scalar_t* xn = x + n0 * d.sample();
  const acc_t* Sn = S ? S + n0 * d.C : nullptr;
  acc_t* smn = smaps + n0 * 2 * d.HW;
  pool_channels<scalar_t>(xn, d1, Sn, smn, sargmax + n0 * d.HW);
  spatial_small_forward<acc_t>(smn, weight, bias, maps, gate, d1.N, d.H, d.W, k, z.data(), t.data());
  if (S)
    apply<scalar_t, true, true, false, true, false>(out + n0 * d.sample(), xn, d1, t.data(), nullptr, Sn, nullptr,
                                                    nullptr, NoHot(), stream);
  else
    apply<scalar_t, true, true, false, false, false>(out + n0 * d.sample(), xn, d1, t.data(), nullptr, nullptr,
                                                     nullptr, nullptr, NoHot(), stream);
}

// Back through the spatial conv, input side: from dz [N, HW] to dmax, dmean [N, HW], and the
// padded conv inputs `pads` [N, M, Hp, Wp] that the weight gradient reads (spatial_weight_backward).
template <typename acc_t>
void spatial_input_backward(const acc_t* smaps, const acc_t* dz, const acc_t* weight, Maps maps, int64_t N,
                            int64_t H, int64_t W, int64_t k, acc_t* dmax, acc_t* dmean, acc_t* pads) {
  const PadDims g(H, W, k, maps);
  const int64_t HW = H * W, kk = k * k;
  std::vector<acc_t> flip(g.M * kk);  // the input gradient is a correlation with the flipped kernel
  for (int64_t m = 0; m < g.M; ++m)
    for (int64_t i = 0; i < kk; ++i) flip[m * kk + i] = weight[m * kk + kk - 1 - i];
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> dzp(g.plane()), dm(g.M * HW);
    for (int64_t n = b; n < e; ++n) {
      pad_maps(smaps, maps, g, n, pads + n * g.M * g.plane());
      std::fill(dzp.begin(), dzp.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h)
        std::copy(dz + n * HW + h * W, dz + n * HW + (h + 1) * W, dzp.data() + (h + g.p) * g.Wp + g.p);
      std::fill(dm.begin(), dm.end(), acc_t(0));
      for (int64_t m = 0; m < g.M; ++m) corr2d_acc(dzp.data(), 1, flip.data() + m * kk, g, dm.data() + m * HW);
      for (int64_t i = 0; i < HW; ++i) {
        acc_t dmx = acc_t(0), dmn = acc_t(0);
        for (int m = 0; m < g.M; ++m) small::spatial_map_backward(dm[m * HW + i], maps, m, dmx, dmn);
        dmax[n * HW + i] = dmx;
        dmean[n * HW + i] = dmn;
      }
    }
  });
}

// Back through the spatial conv, weight side: dbias [1] (or null) from dz [N, HW], and the job
// (run_jobs) that fills dweight [M, k, k] from dz and the padded inputs of spatial_input_backward,
// each element summed over (n, h, w) in order.
template <typename acc_t>
Job spatial_weight_backward(const acc_t* dz, const acc_t* pads, Maps maps, int64_t N, int64_t H, int64_t W,
                            int64_t k, acc_t* dweight, acc_t* dbias) {
  const PadDims g(H, W, k, maps);
  const int64_t HW = H * W, kk = k * k;
  if (dbias) {  // one sum of N*H*W terms that often nearly cancel: accumulated in double
    double acc = 0.0;
    for (int64_t i = 0; i < N * HW; ++i) acc += static_cast<double>(dz[i]);
    *dbias = static_cast<acc_t>(acc);
  }
  return {g.M * kk, N * HW, [=](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t m = i / kk, a = (i / k) % k, c = i % k;
      acc_t acc = acc_t(0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = 0; h < H; ++h)
          acc += dot(dz + n * HW + h * W, pads + (n * g.M + m) * g.plane() + (h + a) * g.Wp + c, W);
      dweight[i] = acc;
    }
  }};
}

// Spatial attention's backward on x1 = x * S[n, c] (S optional: plain x), shared by the spatial
// attention and CBAM ops. `samples` covers samples [n0, n0 + d1.N) (run it through for_samples):
// the gate t from the saved maps, dz = gate'(z) sum_c dy * x1, back through the conv's input to
// dmax and B = dmean / C. `weights` then sums the conv's bias gradient over the batch and gives
// the job (run_jobs) of its weight gradient.
template <typename acc_t>
struct SpatialBackward {
  Dims d;
  const acc_t *smaps, *weight, *bias;
  Maps maps;
  Gate gate;
  int64_t k, pad_len;
  std::vector<acc_t> z, t, dz, dmax, B, pads;  // [N, HW] each; pads: the conv's padded inputs

  SpatialBackward(const Dims& d_, const acc_t* smaps_, const acc_t* weight_, const acc_t* bias_, Maps maps_,
                  Gate gate_, int64_t k_)
      : d(d_), smaps(smaps_), weight(weight_), bias(bias_), maps(maps_), gate(gate_), k(k_),
        pad_len(padded_size(d_, k_, maps_)), z(d_.N * d_.HW), t(d_.N * d_.HW), dz(d_.N * d_.HW),
        dmax(d_.N * d_.HW), B(d_.N * d_.HW), pads(d_.N * pad_len) {}

  static int64_t padded_size(const Dims& d, int64_t k, Maps maps) {
    const PadDims g(d.H, d.W, k, maps);
    return g.M * g.plane();
  }

  template <typename scalar_t>
  void samples(const scalar_t* dy, const scalar_t* x, const acc_t* S, int64_t n0, const Dims& d1) {
    const int64_t i0 = n0 * d.HW, len = d1.N * d.HW;
    const scalar_t* xn = x + n0 * d.sample();
    const scalar_t* dyn = dy + n0 * d.sample();
    spatial_small_forward<acc_t>(smaps + 2 * i0, weight, bias, maps, gate, d1.N, d.H, d.W, k, z.data() + i0,
                                 t.data() + i0);
    if (S)
      dot_channels<scalar_t, true>(dyn, xn, d1, S + n0 * d.C, dz.data() + i0);
    else
      dot_channels<scalar_t, false>(dyn, xn, d1, nullptr, dz.data() + i0);
    gate_backward(z.data() + i0, gate, len, dz.data() + i0);
    spatial_input_backward<acc_t>(smaps + 2 * i0, dz.data() + i0, weight, maps, d1.N, d.H, d.W, k, dmax.data() + i0,
                                  B.data() + i0, pads.data() + n0 * pad_len);
    for (int64_t i = i0; i < i0 + len; ++i) B[i] /= acc_t(d.C);
  }

  Job weights(acc_t* dweight, acc_t* dbias) const {
    return spatial_weight_backward<acc_t>(dz.data(), pads.data(), maps, d.N, d.H, d.W, k, dweight, dbias);
  }
};

}  // namespace cpu
}  // namespace attnfused

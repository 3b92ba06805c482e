// Parallel jobs and the small GEMMs of the channel MLP, in a fixed order per output element.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "cpu/vec_io.h"

namespace attnfused {
namespace cpu {

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
      // the FMAs of k in [k0, k1) for the tile, its sums then handed to put(acc)
      auto block = [&](int64_t k0, int64_t k1, const auto& put) {
        Vec acc[TI][TV];
        for (int u = 0; u < TI; ++u)
          for (int v = 0; v < TV; ++v) acc[u][v] = Vec(acc_t(0));
        for (int64_t k = k0; k < k1; ++k) {
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
        put(acc);
      };
      if (K <= kSumBlock) {
        block(0, K, [&](auto& acc) {
          for (int u = 0; u < TI && i0 + u < I; ++u)
            for (int v = 0; v < TV; ++v)
              if (n[v]) acc[u][v].store(out + (i0 + u) * M + m0 + v * V, n[v]);
        });
        continue;
      }
      // chains longer than kSumBlock (the weight gradients' sums over the batch): into double a
      // block of kSumBlock at a time
      alignas(64) double wide[TI * TW] = {};
      for (int64_t k0 = 0; k0 < K; k0 += kSumBlock)
        block(k0, std::min(K, k0 + kSumBlock), [&](auto& acc) {
          for (int u = 0; u < TI; ++u)
            for (int v = 0; v < TV; ++v) {
              alignas(64) acc_t lanes[V];
              acc[u][v].store(lanes);
              for (int64_t l = 0; l < V; ++l) wide[u * TW + v * V + l] += static_cast<double>(lanes[l]);
            }
        });
      for (int u = 0; u < TI && i0 + u < I; ++u)
        for (int v = 0; v < TV; ++v)
          for (int64_t l = 0; l < n[v]; ++l)
            out[(i0 + u) * M + m0 + v * V + l] = static_cast<acc_t>(wide[u * TW + v * V + l]);
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

}  // namespace cpu
}  // namespace attnfused

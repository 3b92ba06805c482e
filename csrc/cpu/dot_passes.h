// The dot-product passes over one sample's rows (row_dot) or columns (cols_dot).
#pragma once

#include <algorithm>

#include "cpu/vec_io.h"

namespace attnfused {
namespace cpu {

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
  WideSum wide;
  while (i + 2 * V <= L) {
    for (const int64_t end = std::min(L, i + kSumBlock * 2 * V); i + 2 * V <= end; i += 2 * V) {
      acc0 = at::vec::fmadd(A_at(i), X_at(i), acc0);
      acc1 = at::vec::fmadd(A_at(i + V), X_at(i + V), acc1);
    }
    if (i + 2 * V <= L) {  // another block follows
      wide.add(lanes_sum(acc0 + acc1));
      acc0 = acc1 = Vec(acc_t(0));
    }
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
  return wide.finish(s);
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
  if (L > kColBlock) {  // the column blocks of parallel_col_blocks never are; others go a block at a time
    for (int64_t j = 0; j < L; j += kColBlock)
      cols_dot<scalar_t, kT, kB, kS, kX>(a, x, R, stride, j0 + j, std::min(kColBlock, L - j), T, B, S, out + j);
    return;
  }
  WideColumns<acc_t> wide;
  const bool ahead = L * int64_t(sizeof(scalar_t)) < kPrefetchBelowBytes;
  for (int64_t r0 = 0; r0 < R; r0 += kRowStep) {
    const int64_t r1 = std::min(R, r0 + kRowStep);
    auto step = [&](int64_t j, auto full) {  // columns [j, j + U * V), all of them if full
      constexpr bool kFull = decltype(full)::value;
      int64_t n[U];
      Vec acc[U];
      for (int64_t u = 0; u < U; ++u) {
        n[u] = kFull ? V : std::clamp<int64_t>(L - j - u * V, 0, V);
        acc[u] = r0 % kSumRows == 0 || n[u] == 0 ? Vec(acc_t(0)) : Vec::loadu(out + j + u * V, n[u]);
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
    if (R > kSumRows && (r1 % kSumRows == 0 || r1 == R)) wide.widen(out, L, r1 - 1 - (r1 - 1) % kSumRows);
  }
  if (R > kSumRows) wide.finish(out, L);
}

}  // namespace cpu
}  // namespace attnfused

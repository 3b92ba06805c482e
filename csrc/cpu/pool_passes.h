// The pooling passes over one sample's rows or columns: sum, max and first argmax along a
// contiguous row (row_pool) or down columns across rows (cols_pool).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/vec_io.h"

namespace attnfused {
namespace cpu {

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
  WideSum wide;
  int64_t i = 0;
  while (i + 2 * V <= L) {
    for (const int64_t end = std::min(L, i + kSumBlock * 2 * V); i + 2 * V <= end; i += 2 * V) {
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
    if (i + 2 * V <= L) {  // another block follows
      wide.add(lanes_sum(s0 + s1));
      s0 = s1 = Vec(acc_t(0));
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
  s = wide.finish(s);
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
  std::vector<double> total(R > kSumRows ? L : 0);  // the sums' blocks of kSumRows rows
  for (int64_t r = 0; r < R; ++r) {
    const scalar_t* p = base + r * stride + j0;
    const acc_t sc = rscale ? rscale[r] : acc_t(1);
    const Vec vs(sc);
    if (r > 0 && r % kSumRows == 0)
      for (int64_t j = 0; j < L; ++j) total[j] += static_cast<double>(std::exchange(sum[j], acc_t(0)));
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
  for (int64_t j = 0; j < L && R > kSumRows; ++j) sum[j] = static_cast<acc_t>(total[j] + static_cast<double>(sum[j]));
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
  WideColumns<acc_t> wide;
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
          vs[u] = r0 % kSumRows == 0 ? Vec(acc_t(0)) : Vec::loadu(sum + j + u * V, n[u]);  // a new block
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
    if (R > kSumRows && (r1 % kSumRows == 0 || r1 == R)) wide.widen(sum, L, r1 - 1 - (r1 - 1) % kSumRows);
  }
  if (R > kSumRows) wide.finish(sum, L);
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

}  // namespace cpu
}  // namespace attnfused

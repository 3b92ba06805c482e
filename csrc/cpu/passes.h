// The passes over (N, C, HW): pooling over space or over channels, and dot products over either.
//
// Layouts: x is (N, C, H, W) stored NCHW (rows = channels, each a contiguous run of HW) or
// channels_last (rows = pixels, each a contiguous run of C). Every pass is either a "row" pass
// (along the contiguous run) or a "column" pass (across rows). Each output element is reduced by one
// thread in a fixed order, and the work split depends only on the shape, so results are bit-identical
// whatever the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/batch.h"
#include "cpu/dot_passes.h"
#include "cpu/pool_passes.h"

namespace attnfused {
namespace cpu {

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

}  // namespace cpu
}  // namespace attnfused

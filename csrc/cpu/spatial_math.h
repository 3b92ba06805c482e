// Spatial attention's small math: the padded maps, the k x k conv and its input and weight
// gradients.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "small_math.h"
#include "cpu/gates.h"
#include "cpu/gemm.h"
#include "cpu/vec_io.h"

namespace attnfused {
namespace cpu {

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
      double acc = 0.0;  // a sum over N * H rows: in double
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = 0; h < H; ++h)
          acc += static_cast<double>(dot(dz + n * HW + h * W, pads + (n * g.M + m) * g.plane() + (h + a) * g.Wp + c, W));
      dweight[i] = static_cast<acc_t>(acc);
    }
  }};
}

}  // namespace cpu
}  // namespace attnfused

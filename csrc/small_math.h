// The small per-sample math of the attention blocks, shared by the CPU and CUDA kernels:
// the channel MLP and the channel 1D conv on the pooled (C) vectors, the k x k spatial conv on
// the (M, H, W) maps, their backward passes and the weight gradients summed over the batch.
//
// Plain C++ on raw pointers and sizes (no ATen), AF_HOST_DEVICE so device code can call it.
// T is the accumulation type (float, or double for float64 input); weights arrive converted to T
// and contiguous. Each `*_at` function computes ONE output element with a fixed summation order,
// so callers may spread elements over threads freely and still get bit-identical results; the
// loop forms (`mlp_forward`, ...) are the serial per-sample versions built from them.
//
// Layout conventions (all row-major, contiguous):
//   MLP:    w1 [Cr, C], b1 [Cr]?, w2 [C, Cr], b2 [C]?   (b1/b2 may be nullptr)
//   conv1d: w [k] (the (1, 1, k) weight), padding (k-1)/2 on both sides, zeros or circular
//   conv2d: weight [M, k, k] (M = 2, or 1 for Maps::MIX), bias [1]?; maps of one sample are the
//           saved smaps rows: mx [H, W] (max over C) and mean [H, W] (mean over C)
//   pooled inputs: P = pool_inputs(pool) vectors per sample, row r = n * P + p of V [N*P, C].
#pragma once

#include "common.h"

#include <cstdint>

namespace attnfused {
namespace small {

// ---------------------------------------------------------------------------- pooled inputs

// How many vectors the channel function f sees per sample: 2 for avg+max (f(avg) + f(max)), else 1.
AF_HOST_DEVICE int pool_inputs(Pool pool) {
  return pool == Pool::AVG_MAX ? 2 : 1;
}

// Element c of the p-th input vector of f, from the pooled avg and max.
template <typename T>
AF_HOST_DEVICE T pool_input(T avg, T mx, Pool pool, int p) {
  switch (pool) {
    case Pool::AVG: return avg;
    case Pool::MAX: return mx;
    case Pool::AVG_MAX: return p == 0 ? avg : mx;
    default: return T(0.5) * avg + T(0.5) * mx;  // MIX
  }
}

// Adds the gradient dv of input p's element into (davg, dmax).
template <typename T>
AF_HOST_DEVICE void pool_input_backward(T dv, Pool pool, int p, T& davg, T& dmax) {
  switch (pool) {
    case Pool::AVG: davg += dv; break;
    case Pool::MAX: dmax += dv; break;
    case Pool::AVG_MAX: (p == 0 ? davg : dmax) += dv; break;
    default: davg += T(0.5) * dv; dmax += T(0.5) * dv;  // MIX
  }
}

// ---------------------------------------------------------------------------- channel MLP

// hp[j] = b1[j] + sum_c w1[j, c] v[c]   (pre-activation of the hidden layer)
template <typename T>
AF_HOST_DEVICE T mlp_hidden_at(const T* v, const T* w1, const T* b1, int64_t C, int64_t j) {
  T acc = b1 ? b1[j] : T(0);
  const T* w = w1 + j * C;
  for (int64_t c = 0; c < C; ++c) acc += w[c] * v[c];
  return acc;
}

// out[c] = b2[c] + sum_j w2[c, j] h[j]   (h = act(hp), already applied)
template <typename T>
AF_HOST_DEVICE T mlp_out_at(const T* h, const T* w2, const T* b2, int64_t Cr, int64_t c) {
  T acc = b2 ? b2[c] : T(0);
  const T* w = w2 + c * Cr;
  for (int64_t j = 0; j < Cr; ++j) acc += w[j] * h[j];
  return acc;
}

// dhp[j] = act'(hp[j]) * sum_c dout[c] w2[c, j]
template <typename T>
AF_HOST_DEVICE T mlp_dhidden_at(const T* dout, const T* hp, const T* w2, Act act, int64_t C, int64_t Cr,
                                int64_t j) {
  T acc = T(0);
  for (int64_t c = 0; c < C; ++c) acc += dout[c] * w2[c * Cr + j];
  return acc * act_grad(hp[j], act);
}

// dv[c] = sum_j dhp[j] w1[j, c]
template <typename T>
AF_HOST_DEVICE T mlp_dinput_at(const T* dhp, const T* w1, int64_t C, int64_t Cr, int64_t c) {
  T acc = T(0);
  for (int64_t j = 0; j < Cr; ++j) acc += dhp[j] * w1[j * C + c];
  return acc;
}

// One sample: out (+)= MLP(v); hp [Cr] keeps the pre-activation, h [Cr] is scratch.
template <typename T>
AF_HOST_DEVICE void mlp_forward(const T* v, const T* w1, const T* b1, const T* w2, const T* b2, Act act,
                                int64_t C, int64_t Cr, T* hp, T* h, T* out, bool accumulate) {
  for (int64_t j = 0; j < Cr; ++j) {
    hp[j] = mlp_hidden_at(v, w1, b1, C, j);
    h[j] = act_fwd(hp[j], act);
  }
  for (int64_t c = 0; c < C; ++c) {
    T o = mlp_out_at(h, w2, b2, Cr, c);
    out[c] = accumulate ? out[c] + o : o;
  }
}

// One sample: dhp [Cr] and dv [C] (+)= from dout [C] and the saved pre-activation hp.
template <typename T>
AF_HOST_DEVICE void mlp_backward(const T* dout, const T* hp, const T* w1, const T* w2, Act act, int64_t C,
                                 int64_t Cr, T* dhp, T* dv, bool accumulate) {
  for (int64_t j = 0; j < Cr; ++j) dhp[j] = mlp_dhidden_at(dout, hp, w2, act, C, Cr, j);
  for (int64_t c = 0; c < C; ++c) {
    T d = mlp_dinput_at(dhp, w1, C, Cr, c);
    dv[c] = accumulate ? dv[c] + d : d;
  }
}

// Batch reduction behind every MLP weight gradient, summed over rows r = 0..rows-1 in order:
//   sum_r a[(r / a_div) * lda + i] * (b ? b[r * ldb + k] : 1)
// dw1[j, c] = batch_outer_at(dhp, Cr, 1, V, C, N*P, j, c)      db1[j] = batch_outer_at(dhp, Cr, 1, nullptr, ..)
// dw2[c, j] = batch_outer_at(dz, C, P, H, Cr, N*P, c, j)         db2[c] = batch_outer_at(dz, C, P, nullptr, ..)
// (dz [N, C] = gradient of the logits, shared by the P inputs of a sample; H [N*P, Cr] = act(hp)).
template <typename T>
AF_HOST_DEVICE T batch_outer_at(const T* a, int64_t lda, int64_t a_div, const T* b, int64_t ldb, int64_t rows,
                                int64_t i, int64_t k) {
  T acc = T(0);
  for (int64_t r = 0; r < rows; ++r) acc += a[(r / a_div) * lda + i] * (b ? b[r * ldb + k] : T(1));
  return acc;
}

// ---------------------------------------------------------------------------- channel 1D conv

// Index of element i of the padded vector (i may be outside [0, C)); -1 where zero padding reads.
AF_HOST_DEVICE int64_t conv1d_index(int64_t i, int64_t C, Padding padding) {
  if (i >= 0 && i < C) return i;
  if (padding == Padding::ZEROS) return -1;
  int64_t r = i % C;  // circular, for any k (also k > C)
  return r < 0 ? r + C : r;
}

// out[c] = sum_j w[j] v[c + j - p]
template <typename T>
AF_HOST_DEVICE T conv1d_at(const T* v, const T* w, int64_t k, int64_t C, Padding padding, int64_t c) {
  const int64_t p = (k - 1) / 2;
  T acc = T(0);
  for (int64_t j = 0; j < k; ++j) {
    int64_t i = conv1d_index(c + j - p, C, padding);
    if (i >= 0) acc += w[j] * v[i];
  }
  return acc;
}

// dv[i] = sum_j w[j] dout[c] over the c that read v[i] through tap j (c = i - j + p, wrapped if circular)
template <typename T>
AF_HOST_DEVICE T conv1d_dinput_at(const T* dout, const T* w, int64_t k, int64_t C, Padding padding, int64_t i) {
  const int64_t p = (k - 1) / 2;
  T acc = T(0);
  for (int64_t j = 0; j < k; ++j) {
    int64_t c = conv1d_index(i - j + p, C, padding);
    if (c >= 0) acc += w[j] * dout[c];
  }
  return acc;
}

// dw[j] = sum over rows r (in order) and c of dz[r / P, c] * V[r, c + j - p]   (V [rows, C], dz [rows/P, C])
template <typename T>
AF_HOST_DEVICE T conv1d_dweight_at(const T* V, const T* dz, int64_t rows, int64_t P, int64_t k, int64_t C,
                                   Padding padding, int64_t j) {
  const int64_t p = (k - 1) / 2;
  T acc = T(0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* v = V + r * C;
    const T* d = dz + (r / P) * C;
    for (int64_t c = 0; c < C; ++c) {
      int64_t i = conv1d_index(c + j - p, C, padding);
      if (i >= 0) acc += d[c] * v[i];
    }
  }
  return acc;
}

// ---------------------------------------------------------------------------- spatial k x k conv

// Number of conv input channels for a map mode.
AF_HOST_DEVICE int spatial_in_channels(Maps maps) {
  return maps == Maps::MIX ? 1 : 2;
}

// Conv input channel m at one pixel, from the max and mean maps.
template <typename T>
AF_HOST_DEVICE T spatial_map_in(T mx, T mean, Maps maps, int m) {
  switch (maps) {
    case Maps::MAX_MEAN: return m == 0 ? mx : mean;
    case Maps::MEAN_MAX: return m == 0 ? mean : mx;
    default: return T(0.5) * mean + T(0.5) * mx;  // MIX
  }
}

// Adds the gradient d of conv input channel m at one pixel into (dmax, dmean).
template <typename T>
AF_HOST_DEVICE void spatial_map_backward(T d, Maps maps, int m, T& dmax, T& dmean) {
  switch (maps) {
    case Maps::MAX_MEAN: (m == 0 ? dmax : dmean) += d; break;
    case Maps::MEAN_MAX: (m == 0 ? dmean : dmax) += d; break;
    default: dmax += T(0.5) * d; dmean += T(0.5) * d;  // MIX
  }
}

// z[h, w] = bias + sum_{m, dy, dx} weight[m, dy, dx] in[m, h + dy - p, w + dx - p]   (zero padding)
template <typename T>
AF_HOST_DEVICE T spatial_conv_at(const T* mx, const T* mean, Maps maps, const T* weight, const T* bias,
                                 int64_t H, int64_t W, int64_t k, int64_t h, int64_t w) {
  const int64_t p = (k - 1) / 2;
  const int M = spatial_in_channels(maps);
  T acc = bias ? bias[0] : T(0);
  for (int m = 0; m < M; ++m) {
    const T* wm = weight + m * k * k;
    for (int64_t dy = 0; dy < k; ++dy) {
      const int64_t hh = h + dy - p;
      if (hh < 0 || hh >= H) continue;
      for (int64_t dx = 0; dx < k; ++dx) {
        const int64_t ww = w + dx - p;
        if (ww < 0 || ww >= W) continue;
        const int64_t i = hh * W + ww;
        acc += wm[dy * k + dx] * spatial_map_in(mx[i], mean[i], maps, m);
      }
    }
  }
  return acc;
}

// Gradient of the max and mean maps at pixel (h, w) from dz [H, W] (gradient of the conv output).
template <typename T>
AF_HOST_DEVICE void spatial_dmaps_at(const T* dz, const T* weight, Maps maps, int64_t H, int64_t W, int64_t k,
                                     int64_t h, int64_t w, T& dmax, T& dmean) {
  const int64_t p = (k - 1) / 2;
  const int M = spatial_in_channels(maps);
  T d[2] = {T(0), T(0)};
  for (int m = 0; m < M; ++m) {
    const T* wm = weight + m * k * k;
    for (int64_t dy = 0; dy < k; ++dy) {
      const int64_t hh = h - dy + p;
      if (hh < 0 || hh >= H) continue;
      for (int64_t dx = 0; dx < k; ++dx) {
        const int64_t ww = w - dx + p;
        if (ww < 0 || ww >= W) continue;
        d[m] += wm[dy * k + dx] * dz[hh * W + ww];
      }
    }
  }
  dmax = dmean = T(0);
  for (int m = 0; m < M; ++m) spatial_map_backward(d[m], maps, m, dmax, dmean);
}

// dweight[m, dy, dx] = sum over n, h, w (in order) of dz[n, h, w] in[n, m, h + dy - p, w + dx - p];
// smaps [N, 2, H, W] = (max, mean) per sample, dz [N, H, W].
template <typename T>
AF_HOST_DEVICE T spatial_dweight_at(const T* smaps, const T* dz, Maps maps, int64_t N, int64_t H, int64_t W,
                                    int64_t k, int m, int64_t dy, int64_t dx) {
  const int64_t p = (k - 1) / 2;
  const int64_t HW = H * W;
  T acc = T(0);
  for (int64_t n = 0; n < N; ++n) {
    const T* mx = smaps + n * 2 * HW;
    const T* mean = mx + HW;
    const T* d = dz + n * HW;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hh = h + dy - p;
      if (hh < 0 || hh >= H) continue;
      for (int64_t w = 0; w < W; ++w) {
        const int64_t ww = w + dx - p;
        if (ww < 0 || ww >= W) continue;
        const int64_t i = hh * W + ww;
        acc += d[h * W + w] * spatial_map_in(mx[i], mean[i], maps, m);
      }
    }
  }
  return acc;
}

// dbias = sum of dz [count] in order.
template <typename T>
AF_HOST_DEVICE T sum_at(const T* dz, int64_t count) {
  T acc = T(0);
  for (int64_t i = 0; i < count; ++i) acc += dz[i];
  return acc;
}

// ---------------------------------------------------------------------------- gate

// dz[i] = dgate[i] * gate'(z[i])   (dgate: gradient of the gate's output)
template <typename T>
AF_HOST_DEVICE T gate_backward_at(T dgate, T z, Gate g) {
  return dgate * gate_grad(z, g);
}

}  // namespace small
}  // namespace attnfused

// Channel attention's small math, batch level: the channel 1D conv, the inputs of f, and the
// channel function f (the MLP or the conv) with its backward (ChannelSmall).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "small_math.h"
#include "cpu/args.h"
#include "cpu/gates.h"
#include "cpu/gemm.h"
#include "cpu/vec_io.h"

namespace attnfused {
namespace cpu {

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
  WideSum wide;  // the sum over rows goes into double every kSumBlock vectors per lane
  if (k > C && padding != Padding::ZEROS) {
    for (int64_t r = 0; r < rows; ++r)
      wide.add(small::conv1d_dweight_at(Vm + r * C, dz + (r / P) * C, 1, 1, k, C, padding, j));
    return wide.finish(acc_t(0));
  }
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t s = j - (k - 1) / 2;  // dz[c] meets V[c + s]
  const int64_t c0 = std::clamp<int64_t>(-s, 0, C), c1 = std::clamp<int64_t>(C - s, 0, C);
  const bool wrap = padding != Padding::ZEROS;
  Vec acc(acc_t(0));
  int64_t steps = 0;  // vectors added into acc since it last went into `wide`
  auto run = [&](const acc_t* d, const acc_t* v, int64_t n) {  // acc += d[0, n) * v[0, n)
    int64_t i = 0;
    for (; i + V <= n; i += V) acc = at::vec::fmadd(Vec::loadu(d + i), Vec::loadu(v + i), acc);
    if (i < n) acc = at::vec::fmadd(Vec::loadu(d + i, n - i), Vec::loadu(v + i, n - i), acc);
    steps += (n + V - 1) / V;
  };
  for (int64_t r = 0; r < rows; ++r) {
    if (steps >= kSumBlock) {
      wide.add(lanes_sum(acc));
      acc = Vec(acc_t(0));
      steps = 0;
    }
    const acc_t* v = Vm + r * C;
    const acc_t* d = dz + (r / P) * C;
    if (wrap && c0 > 0) run(d, v + C + s, c0);  // c in [0, -s): V[c + s + C]
    run(d + c0, v + c0 + s, c1 - c0);
    if (wrap && c1 < C) run(d + c1, v + c1 + s - C, C - c1);  // c in [C - s, C): V[c + s - C]
  }
  return wide.finish(lanes_sum(acc));
}

// Sum over rows r of a[(r / a_div) * lda + i] (a bias gradient: one sum over the batch), in double.
template <typename acc_t>
acc_t batch_sum_at(const acc_t* a, int64_t lda, int64_t a_div, int64_t rows, int64_t i) {
  double acc = 0.0;
  for (int64_t r = 0; r < rows; ++r) acc += static_cast<double>(a[(r / a_div) * lda + i]);
  return static_cast<acc_t>(acc);
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
          db1.data_ptr<acc_t>()[j] = batch_sum_at<acc_t>(DHP.data(), Cr, 1, rows, j);
      }
      if (w_.b2.defined()) {
        db2 = at::empty({C}, opts);
        for (int64_t c = 0; c < C; ++c)
          db2.data_ptr<acc_t>()[c] = batch_sum_at<acc_t>(dz, C, P, rows, c);
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

}  // namespace cpu
}  // namespace attnfused

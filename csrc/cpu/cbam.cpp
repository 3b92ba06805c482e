// CBAM on CPU as one op: channel attention, then spatial attention on x1 = x * s, with x1 never
// stored (recomputed from x and the small s wherever it is read).
// Forward 3R+1W: pool over space (R), pool x*s over channels (R), y = x * s * t (R+W, and the tail,
// activation(y + residual): +R where a residual is given); channels_last
// takes the last two in one sweep per sample (spatial_forward_sweep), its second read from L2.
// Backward: sum_c dy*x1 (2R), sum_hw dx1*x (2R), dx (R+W); saved: x and the small vectors and maps
// (the MLP's hidden state among them).
// Where the batch allows, all of it, the channel MLP included, runs sample by sample (in groups)
// in one parallel region (for_samples), each sample's x (and dy) read again while in cache. The
// weight gradients (MLP, spatial conv) sum over the batch at the end.
#include "cpu/args.h"
#include "cpu/batch.h"
#include "cpu/channel_math.h"
#include "cpu/gemm.h"
#include "cpu/passes.h"
#include "cpu/spatial_passes.h"
#include "cpu/sweep.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace attnfused {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cbam_kernel(
    const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
    const Tensor& sweight, const OptTensor& sbias, c10::string_view kind, c10::string_view pool,
    c10::string_view act, c10::string_view gate, c10::string_view padding, c10::string_view maps,
    c10::string_view sgate, c10::string_view tie, const OptTensor& residual, c10::string_view activation,
    const OptTensor& in_scale, const OptTensor& in_shift) {
  check_input(x);
  const auto o = parse_channel_options(kind, pool, act, gate, padding);
  (void)parse_tie(tie);  // the forward is the same under both rules
  const Maps mp = parse_maps(maps);
  const Gate sg = parse_gate(sgate, "sgate");
  const ChannelWeights w(x, w1, b1, w2, b2, o.kind);
  const Tail tail(x, residual, activation);
  const Prologue pro(x, in_scale, in_shift);
  const SpatialConvWeights sw(x, sweight, sbias, mp, "sweight", "sbias");
  const int64_t k = sw.k;
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x);
  const Tensor &swa = sw.w, &sba = sw.b;
  Tensor y = at::empty_like(x);
  Tensor pooled = at::empty({d.N, 2, d.C}, x.options().dtype(acc));
  Tensor argmax = at::empty({d.N, d.C}, x.options().dtype(at::kLong));
  Tensor smaps = at::empty({d.N, 2, d.H, d.W}, x.options().dtype(acc));
  Tensor sargmax = at::empty({d.N, d.H, d.W}, x.options().dtype(at::kLong));
  Tensor hidden = hidden_output(x, w, o);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    acc_t* pp = pooled.data_ptr<acc_t>();
    acc_t* ph = hidden.numel() ? hidden.data_ptr<acc_t>() : nullptr;
    ChannelSmall<acc_t> f(w, o, d.N);
    for_samples<scalar_t>(d, [&](int64_t n0, const Dims& d1) {
      const GroupInput<scalar_t> xg(pro, x, d, n0, d1.N);  // x, or its prologue's x'
      pool_space(xg.get(), d1, pp + n0 * 2 * d.C, argmax.data_ptr<int64_t>() + n0 * d.C, o.pool != Pool::AVG);
      f.forward(pp, n0, d1.N, ph);
      spatial_forward_samples<scalar_t>(x.const_data_ptr<scalar_t>(), xg.get(), d, f.S.data(),
                                        swa.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(sba), mp,
                                        sg, k, smaps.data_ptr<acc_t>(), sargmax.data_ptr<int64_t>(),
                                        y.data_ptr<scalar_t>(), n0, d1, OutTail<scalar_t>(tail));
    });
  });
  return {y, pooled, argmax, smaps, sargmax, hidden};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cbam_backward_kernel(
    const Tensor& grad_y, const Tensor& x, const Tensor& pooled, const Tensor& argmax, const Tensor& smaps,
    const Tensor& sargmax, const Tensor& hidden, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
    const OptTensor& b2, const Tensor& sweight, const OptTensor& sbias, c10::string_view kind,
    c10::string_view pool, c10::string_view act, c10::string_view gate, c10::string_view padding,
    c10::string_view maps, c10::string_view sgate, c10::string_view tie) {
  check_input(x);
  check_same_layout(grad_y, x);
  const auto o = parse_channel_options(kind, pool, act, gate, padding);
  const bool split = parse_tie(tie) == Tie::SPLIT;
  const Maps mp = parse_maps(maps);
  const Gate sg = parse_gate(sgate, "sgate");
  const ChannelWeights w(x, w1, b1, w2, b2, o.kind);
  const SpatialConvWeights sw(x, sweight, sbias, mp, "sweight", "sbias");
  const int64_t k = sw.k;
  const Dims d = dims_of(x);
  check_saved_pooling(pooled, argmax, x);
  check_saved_maps(smaps, sargmax, x);
  const Tensor pooled_c = pooled.contiguous(), argmax_c = argmax.contiguous();
  const Tensor smaps_c = smaps.contiguous(), sargmax_c = sargmax.contiguous();
  const Tensor hidden_c = saved_hidden(hidden, x, w, o);
  const Tensor &swa = sw.w, &sba = sw.b;
  Tensor dx = at::empty_like(x);
  Tensor dsw = at::empty(swa.sizes(), swa.options()), dsb = at::empty({1}, swa.options());
  Tensor dw1, db1, dw2, db2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = grad_y.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    const acc_t* pp = pooled_c.const_data_ptr<acc_t>();
    const int64_t* am = argmax_c.const_data_ptr<int64_t>();
    const int64_t* sam = sargmax_c.const_data_ptr<int64_t>();
    const acc_t* ph = ptr_or_null<acc_t>(hidden_c);
    ChannelSmall<acc_t> f(w, o, d.N);
    SpatialBackward<acc_t> sp(d, smaps_c.const_data_ptr<acc_t>(), swa.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(sba),
                              mp, sg, k);
    const std::vector<acc_t>& t = sp.t;  // the gate, B and dmax of the spatial backward
    std::vector<acc_t>& B = sp.B;
    const std::vector<acc_t>& dmax_s = sp.dmax;
    std::vector<acc_t> dz(d.N * d.C), dpooled(d.N * 2 * d.C), A(d.N * d.C);
    // The rest of a group's backward under the split rule: as below, each max's one-hot term
    // replaced by its share dmax / count at every element equal to the max (x1 == smaps' max per
    // pixel, x == pooled's max per (n, c)); a NaN max puts NaN into B (the pixel) or A (the channel).
    auto split_rest = [&](int64_t n0, const Dims& d1, int64_t i0, int64_t off) {
      const TieIndex<scalar_t> ties(d1, px + off, o.pool == Pool::AVG ? nullptr : am + n0 * d.C, sam + i0,
                                    f.S.data() + n0 * d.C);
      constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      const std::vector<acc_t> B0(B.begin() + i0, B.begin() + i0 + d1.N * d.HW);  // unpoisoned
      for (int64_t i = 0; i < d1.N * d.HW; ++i)
        if (ties.spoison(i / d.HW, i % d.HW, dmax_s[i0 + i])) B[i0 + i] = nan;
      dot_space<scalar_t, true, true>(pdy + off, px + off, d1, t.data() + i0, B.data() + i0, dz.data() + n0 * d.C);
      at::parallel_for(0, d1.N, 1, [&](int64_t b, int64_t e) {
        std::vector<double> hot(d.C);  // per channel, over the pixels in increasing order
        for (int64_t n1 = b; n1 < e; ++n1) {
          const int64_t n = n0 + n1;
          std::fill(hot.begin(), hot.end(), 0.0);
          for (int64_t r = 0; r < d.rows(); ++r)
            ties.for_row(n1, r, [&](int64_t j) {
              const int64_t c = d.cl ? j : r, hw = d.cl ? r : j;
              if (ties.stie(n1, c, hw))
                hot[c] += static_cast<double>(ties.sshare(n1, hw, dmax_s[n * d.HW + hw]) *
                                              static_cast<acc_t>(px[d.at(n, c, hw)]));
            });
          for (int64_t c = 0; c < d.C; ++c)
            dz[n * d.C + c] = static_cast<acc_t>(static_cast<double>(dz[n * d.C + c]) + hot[c]);
        }
      });
      f.backward_inputs(dz.data(), n0, d1.N, d.HW, dpooled.data(), A.data());
      const std::vector<acc_t> A0(A.begin() + n0 * d.C, A.begin() + (n0 + d1.N) * d.C);  // unpoisoned
      for (int64_t n1 = 0; n1 < d1.N; ++n1)
        for (int64_t c = 0; c < d.C; ++c)
          if (ties.cpoison(n1, c, dpooled[(n0 + n1) * 2 * d.C + d.C + c])) A[(n0 + n1) * d.C + c] = nan;
      apply<scalar_t, true, true, true, true, true>(pdx + off, pdy + off, d1, t.data() + i0, B.data() + i0,
                                                    f.S.data() + n0 * d.C, A.data() + n0 * d.C, &ties,
                                                    [&](int64_t n1, int64_t c, int64_t hw) {
        const int64_t n = n0 + n1, i = n * d.HW + hw, nc = n * d.C + c;
        const bool st = ties.stie(n1, c, hw), ct = ties.ctie(n1, c, hw);  // a tied element: the unpoisoned term
        const acc_t dx1 = static_cast<acc_t>(pdy[d.at(n, c, hw)]) * t[i] + (st ? B0[i - i0] : B[i]) +
                          (st ? ties.sshare(n1, hw, dmax_s[i]) : acc_t(0));
        return dx1 * f.S[nc] + (ct ? A0[n1 * d.C + c] : A[nc]) +
               (ct ? ties.cshare(n1, c, dpooled[n * 2 * d.C + d.C + c]) : acc_t(0));
      });
    };
    for_samples<scalar_t>(d, [&](int64_t n0, const Dims& d1) {
      const int64_t i0 = n0 * d.HW, off = n0 * d.sample();
      f.restore(pp, ph, n0, d1.N);  // the gates
      // the spatial backward on x1 = x * s, then the channel backward's dz[n, c] = sum_hw dx1 * x
      // with dx1 = dy * t + B + one-hot(sargmax) dmax_s (never stored), the one-hot part added per
      // pixel in a fixed order
      sp.samples(pdy, px, f.S.data(), n0, d1);
      if (split) {
        split_rest(n0, d1, i0, off);
        return;
      }
      dot_space<scalar_t, true, true>(pdy + off, px + off, d1, t.data() + i0, B.data() + i0, dz.data() + n0 * d.C);
      at::parallel_for(n0, n0 + d1.N, 1, [&](int64_t b, int64_t e) {  // inline within a per-sample region
        std::vector<double> hot(d.C);  // a channel may be the max at every pixel: summed in double
        for (int64_t n = b; n < e; ++n) {
          std::fill(hot.begin(), hot.end(), 0.0);
          for (int64_t hw = 0; hw < d.HW; ++hw) {
            const int64_t c = sam[n * d.HW + hw];
            TORCH_CHECK_INDEX(c >= 0 && c < d.C, "sargmax[", n, ", ", hw, "] = ", c, " is outside [0, C = ", d.C,
                              ")");
            hot[c] += static_cast<double>(dmax_s[n * d.HW + hw] * static_cast<acc_t>(px[d.at(n, c, hw)]));
          }
          for (int64_t c = 0; c < d.C; ++c)
            dz[n * d.C + c] = static_cast<acc_t>(static_cast<double>(dz[n * d.C + c]) + hot[c]);
        }
      });
      f.backward_inputs(dz.data(), n0, d1.N, d.HW, dpooled.data(), A.data());
      // dx = dx1 * s + A + one-hot(argmax) dmax_c
      const HotIndex hot(d1, o.pool == Pool::AVG ? nullptr : am + n0 * d.C, sam + i0);  // "avg": no max
      apply<scalar_t, true, true, true, true, true>(pdx + off, pdy + off, d1, t.data() + i0, B.data() + i0,
                                                    f.S.data() + n0 * d.C, A.data() + n0 * d.C, &hot,
                                                    [&](int64_t n1, int64_t c, int64_t hw) {
        const int64_t n = n0 + n1, i = n * d.HW + hw, nc = n * d.C + c;
        const acc_t dx1 = static_cast<acc_t>(pdy[d.at(n, c, hw)]) * t[i] + B[i] + (sam[i] == c ? dmax_s[i] : acc_t(0));
        return dx1 * f.S[nc] + A[nc] + (am[nc] == hw ? dpooled[n * 2 * d.C + d.C + c] : acc_t(0));
      });
    });
    // every weight gradient in one parallel region
    std::vector<Job> jobs = f.backward_weights(dz.data(), dw1, db1, dw2, db2);
    jobs.push_back(sp.weights(dsw.data_ptr<acc_t>(), dsb.data_ptr<acc_t>()));
    run_jobs(jobs);
  });
  return {dx, grad_out(dw1, w1, w1), grad_out(db1, b1, w1), grad_out(dw2, w2, w1), grad_out(db2, b2, w1),
          grad_out(dsw, sweight, sweight), grad_out(dsb, sbias, sweight)};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfused_C, CPU, m) {
  m.impl("cbam", &cbam_kernel);
  m.impl("cbam_backward", &cbam_backward_kernel);
}

}  // namespace cpu
}  // namespace attnfused

// Spatial attention on CPU: y = x * gate(conv2d(maps(x)))[n, h, w], maps = max and mean over C (and
// the tail, activation(y + residual), in the pass that writes y).
// Forward 2R+1W; backward 2R(dy, x) + 1R(dy) + 1W, saved: x, smaps, sargmax. Both run their passes
// sample by sample (in groups) in one parallel region where the batch allows (for_samples), the
// conv's weight gradient summed over the batch at the end.
#include "cpu/args.h"
#include "cpu/batch.h"
#include "cpu/gemm.h"
#include "cpu/spatial_passes.h"
#include "cpu/sweep.h"

#include <torch/library.h>

#include <limits>

namespace attnfused {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor> spatial_attention_kernel(const Tensor& x, const Tensor& weight,
                                                            const OptTensor& bias, c10::string_view maps,
                                                            c10::string_view gate, c10::string_view tie,
                                                            const OptTensor& residual, c10::string_view activation,
                                                            const OptTensor& in_scale, const OptTensor& in_shift) {
  check_input(x);
  (void)parse_tie(tie);  // the forward is the same under both rules
  const Maps mp = parse_maps(maps);
  const Gate g = parse_gate(gate);
  const SpatialConvWeights sw(x, weight, bias, mp);
  const Tail tail(x, residual, activation);
  const Prologue pro(x, in_scale, in_shift);
  const int64_t k = sw.k;
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x);
  const Tensor &wa = sw.w, &ba = sw.b;
  Tensor y = at::empty_like(x);
  Tensor smaps = at::empty({d.N, 2, d.H, d.W}, x.options().dtype(acc));
  Tensor sargmax = at::empty({d.N, d.H, d.W}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_attention_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    for_samples<scalar_t>(d, [&](int64_t n0, const Dims& d1) {
      const GroupInput<scalar_t> xg(pro, x, d, n0, d1.N);  // x, or its prologue's x'
      spatial_forward_samples<scalar_t>(x.const_data_ptr<scalar_t>(), xg.get(), d, nullptr,
                                        wa.const_data_ptr<acc_t>(),
                                        ptr_or_null<acc_t>(ba), mp, g, k, smaps.data_ptr<acc_t>(),
                                        sargmax.data_ptr<int64_t>(), y.data_ptr<scalar_t>(), n0, d1,
                                        OutTail<scalar_t>(tail));
    });
  });
  return {y, smaps, sargmax};
}

std::tuple<Tensor, Tensor, Tensor> spatial_attention_backward_kernel(const Tensor& grad_y, const Tensor& x,
                                                                     const Tensor& smaps, const Tensor& sargmax,
                                                                     const Tensor& weight, const OptTensor& bias,
                                                                     c10::string_view maps, c10::string_view gate,
                                                                     c10::string_view tie) {
  check_input(x);
  check_same_layout(grad_y, x);
  const bool split = parse_tie(tie) == Tie::SPLIT;
  const Maps mp = parse_maps(maps);
  const Gate g = parse_gate(gate);
  const SpatialConvWeights sw(x, weight, bias, mp);
  const int64_t k = sw.k;
  const Dims d = dims_of(x);
  check_saved_maps(smaps, sargmax, x);
  const Tensor smaps_c = smaps.contiguous(), sargmax_c = sargmax.contiguous();
  const Tensor &wa = sw.w, &ba = sw.b;
  Tensor dx = at::empty_like(x);
  Tensor dw = at::empty(wa.sizes(), wa.options());
  Tensor db = at::empty({1}, wa.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_attention_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = grad_y.const_data_ptr<scalar_t>();
    const acc_t* sm = smaps_c.const_data_ptr<acc_t>();
    SpatialBackward<acc_t> sp(d, sm, wa.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(ba), mp, g, k);
    const std::vector<acc_t>& t = sp.t;  // the gate, B and dmax of the spatial backward
    std::vector<acc_t>& B = sp.B;
    const std::vector<acc_t>& dmax = sp.dmax;
    const int64_t* sam = sargmax_c.const_data_ptr<int64_t>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    for_samples<scalar_t>(d, [&](int64_t n0, const Dims& d1) {
      sp.samples(pdy, px, nullptr, n0, d1);
      const int64_t off = n0 * d.sample(), i0 = n0 * d.HW;
      if (split) {
        // dx = dy * t + B + [x == max] dmax / count
        const TieIndex<scalar_t> ties(d1, px + off, nullptr, sam + i0);
        const std::vector<acc_t> B0(B.begin() + i0, B.begin() + i0 + d1.N * d.HW);  // unpoisoned
        for (int64_t i = 0; i < d1.N * d.HW; ++i)
          if (ties.spoison(i / d.HW, i % d.HW, dmax[i0 + i])) B[i0 + i] = std::numeric_limits<acc_t>::quiet_NaN();
        apply<scalar_t, true, true, true, false, false>(pdx + off, pdy + off, d1, t.data() + i0, B.data() + i0,
                                                        nullptr, nullptr, &ties,
                                                        [&](int64_t n1, int64_t c, int64_t hw) {
          const int64_t n = n0 + n1, i = n * d.HW + hw;
          return static_cast<acc_t>(pdy[d.at(n, c, hw)]) * t[i] + B0[i - i0] + ties.sshare(n1, hw, dmax[i]);
        });
        return;
      }
      // dx = dy * t + B + one-hot(sargmax) dmax
      const HotIndex hot(d1, nullptr, sam + i0);
      apply<scalar_t, true, true, true, false, false>(pdx + off, pdy + off, d1, t.data() + i0, B.data() + i0, nullptr,
                                                      nullptr, &hot, [&](int64_t n1, int64_t c, int64_t hw) {
        const int64_t n = n0 + n1, i = n * d.HW + hw;
        return static_cast<acc_t>(pdy[d.at(n, c, hw)]) * t[i] + B[i] + dmax[i];
      });
    });
    run_jobs({sp.weights(dw.data_ptr<acc_t>(), db.data_ptr<acc_t>())});
  });
  return {dx, grad_out(dw, weight, weight), grad_out(db, bias, weight)};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfused_C, CPU, m) {
  m.impl("spatial_attention", &spatial_attention_kernel);
  m.impl("spatial_attention_backward", &spatial_attention_backward_kernel);
}

}  // namespace cpu
}  // namespace attnfused

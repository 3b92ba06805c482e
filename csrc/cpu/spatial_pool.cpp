// The two halves of spatial attention, for when ordinary ops run between them (BatchNorm in
// training): spatial_pool (max and mean over C, 1R) and spatial_scale (x * t, 1R+1W), with backward.
#include "cpu/args.h"
#include "cpu/batch.h"
#include "cpu/passes.h"
#include "cpu/sweep.h"

#include <torch/library.h>

#include <limits>

namespace attnfused {
namespace cpu {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> spatial_pool_kernel(const Tensor& x, c10::string_view tie) {
  check_input(x);
  (void)parse_tie(tie);  // the forward is the same under both rules
  const Dims d = dims_of(x);
  Tensor smaps = at::empty({d.N, 2, d.H, d.W}, x.options().dtype(acc_dtype(x)));
  Tensor sargmax = at::empty({d.N, d.H, d.W}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_pool_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    pool_channels<scalar_t>(x.const_data_ptr<scalar_t>(), d, nullptr, smaps.data_ptr<acc_t>(),
                            sargmax.data_ptr<int64_t>());
  });
  return {smaps, sargmax};
}

Tensor spatial_pool_backward_kernel(const Tensor& grad_smaps, const Tensor& x, const Tensor& sargmax,
                                    c10::string_view tie) {
  check_input(x);
  const bool split = parse_tie(tie) == Tie::SPLIT;
  const Dims d = dims_of(x);
  check_spatial_pool_grad(grad_smaps, sargmax, x);
  const Tensor g = to_acc(grad_smaps, acc_dtype(x)), sargmax_c = sargmax.contiguous();
  Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_pool_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* pg = g.const_data_ptr<acc_t>();
    std::vector<acc_t> B(d.N * d.HW);
    for (int64_t n = 0; n < d.N; ++n)
      for (int64_t hw = 0; hw < d.HW; ++hw) B[n * d.HW + hw] = pg[(n * 2 + 1) * d.HW + hw] / acc_t(d.C);
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    if (split) {
      // dx = B + [x == max] g_max / count (the max read at sargmax)
      const TieIndex<scalar_t> ties(d, x.const_data_ptr<scalar_t>(), nullptr, sargmax_c.const_data_ptr<int64_t>());
      const std::vector<acc_t> B0(B);  // unpoisoned
      for (int64_t i = 0; i < d.N * d.HW; ++i)
        if (ties.spoison(i / d.HW, i % d.HW, pg[(i / d.HW) * 2 * d.HW + i % d.HW]))
          B[i] = std::numeric_limits<acc_t>::quiet_NaN();
      apply<scalar_t, false, false, true, false, false>(pdx, nullptr, d, nullptr, B.data(), nullptr, nullptr, &ties,
                                                        [&](int64_t n, int64_t c, int64_t hw) {
        return B0[n * d.HW + hw] + ties.sshare(n, hw, pg[n * 2 * d.HW + hw]);
      });
      return;
    }
    const HotIndex hot(d, nullptr, sargmax_c.const_data_ptr<int64_t>());
    apply<scalar_t, false, false, true, false, false>(pdx, nullptr, d, nullptr, B.data(), nullptr, nullptr, &hot,
                                                      [&](int64_t n, int64_t c, int64_t hw) {
      return B[n * d.HW + hw] + pg[n * 2 * d.HW + hw];
    });
  });
  return dx;
}

void check_t(const Tensor& t, const Tensor& x, const Dims& d) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "t must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef({d.N, d.H, d.W}), "t must have shape ",
                    at::IntArrayRef({d.N, d.H, d.W}), ", got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "t must have a floating dtype, got ", t.scalar_type());
}

Tensor spatial_scale_kernel(const Tensor& x, const Tensor& t, const std::optional<Tensor>& residual,
                            c10::string_view activation) {
  check_input(x);
  const Dims d = dims_of(x);
  check_t(t, x, d);
  const Tail tail(x, residual, activation);
  const Tensor ta = to_acc(t, acc_dtype(x));
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_scale_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    apply<scalar_t, true, true, false, false, false>(y.data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), d,
                                                     ta.const_data_ptr<acc_t>(), nullptr, nullptr, nullptr, nullptr,
                                                     NoHot(), stream_output<scalar_t>(d), OutTail<scalar_t>(tail));
  });
  return y;
}

std::tuple<Tensor, Tensor> spatial_scale_backward_kernel(const Tensor& grad_y, const Tensor& x, const Tensor& t) {
  check_input(x);
  check_same_layout(grad_y, x);
  const Dims d = dims_of(x);
  check_t(t, x, d);
  const Tensor ta = to_acc(t, acc_dtype(x));
  Tensor dx = at::empty_like(x);
  Tensor dt = at::empty({d.N, d.H, d.W}, ta.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_scale_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* pdy = grad_y.const_data_ptr<scalar_t>();
    apply<scalar_t, true, true, false, false, false>(dx.data_ptr<scalar_t>(), pdy, d, ta.const_data_ptr<acc_t>(),
                                                     nullptr, nullptr, nullptr, nullptr, NoHot(),
                                                     stream_output<scalar_t>(d));
    dot_channels<scalar_t, false>(pdy, x.const_data_ptr<scalar_t>(), d, nullptr, dt.data_ptr<acc_t>());
  });
  return {dx, dt.to(t.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfused_C, CPU, m) {
  m.impl("spatial_pool", &spatial_pool_kernel);
  m.impl("spatial_pool_backward", &spatial_pool_backward_kernel);
  m.impl("spatial_scale", &spatial_scale_kernel);
  m.impl("spatial_scale_backward", &spatial_scale_backward_kernel);
}

}  // namespace cpu
}  // namespace attnfused

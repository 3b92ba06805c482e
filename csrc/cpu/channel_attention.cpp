// Channel attention on CPU: y = x * gate(f(pool(x)))[n, c], f the MLP or the channel 1D conv.
// Forward 2R+1W (pool, then scale; with the 1D conv sample by sample in one parallel region, where
// the batch allows); backward 2R(dy, x) + 1R(dy) + 1W, saved: x, pooled, argmax.
#include "cpu/cpu_common.h"

#include <torch/library.h>

namespace attnfused {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor> channel_attention_kernel(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                                            const OptTensor& w2, const OptTensor& b2,
                                                            c10::string_view kind, c10::string_view pool,
                                                            c10::string_view act, c10::string_view gate,
                                                            c10::string_view padding) {
  check_input(x);
  const auto o = parse_channel_options(kind, pool, act, gate, padding);
  const ChannelWeights w = channel_weights(x, w1, b1, w2, b2, o);
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x);
  Tensor y = at::empty_like(x);
  Tensor pooled = at::empty({d.N, 2, d.C}, x.options().dtype(acc));
  Tensor argmax = at::empty({d.N, d.C}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_attention_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    // samples [n0, n0 + d1.N): pool, f, scale
    auto forward = [&](int64_t n0, const Dims& d1) {
      const scalar_t* xn = px + n0 * d.sample();
      acc_t* pn = pooled.data_ptr<acc_t>() + n0 * 2 * d.C;
      pool_space(xn, d1, pn, argmax.data_ptr<int64_t>() + n0 * d.C, o.pool != Pool::AVG);
      const auto f = channel_small_forward<acc_t>(pn, w, o, d1.N);
      apply<scalar_t, true, false, false, true, false>(y.data_ptr<scalar_t>() + n0 * d.sample(), xn, d1, nullptr,
                                                       nullptr, f.S.data(), nullptr);
    };
    // the 1D conv is cheap per sample: all of a sample in one region, its x read again from cache;
    // the MLP reads its weights once per tile of samples, so it stays batch-wide
    for_samples(d, o.kind == Kind::CONV, forward);
  });
  return {y, pooled, argmax};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> channel_attention_backward_kernel(
    const Tensor& grad_y, const Tensor& x, const Tensor& pooled, const Tensor& argmax, const Tensor& w1,
    const OptTensor& b1, const OptTensor& w2, const OptTensor& b2, c10::string_view kind, c10::string_view pool,
    c10::string_view act, c10::string_view gate, c10::string_view padding) {
  check_input(x);
  check_same_layout(grad_y, x);
  const auto o = parse_channel_options(kind, pool, act, gate, padding);
  const ChannelWeights w = channel_weights(x, w1, b1, w2, b2, o);
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x);
  check_saved(pooled, x, "pooled", {d.N, 2, d.C}, acc);
  check_saved(argmax, x, "argmax", {d.N, d.C}, at::kLong);
  const Tensor pooled_c = pooled.contiguous(), argmax_c = argmax.contiguous();
  Tensor dx = at::empty_like(x);
  Tensor dw1, db1, dw2, db2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_attention_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = grad_y.const_data_ptr<scalar_t>();
    const auto f = channel_small_forward<acc_t>(pooled_c.const_data_ptr<acc_t>(), w, o, d.N);
    std::vector<acc_t> dz(d.N * d.C), dpooled(d.N * 2 * d.C), A(d.N * d.C);
    dot_space<scalar_t, false, false>(pdy, px, d, nullptr, nullptr, dz.data());
    gate_backward(f.Z.data(), o.gate, d.N * d.C, dz.data());
    channel_small_backward<acc_t>(f, dz.data(), w, o, dpooled.data(), dw1, db1, dw2, db2);
    for (int64_t n = 0; n < d.N; ++n)
      for (int64_t c = 0; c < d.C; ++c) A[n * d.C + c] = dpooled[n * 2 * d.C + c] / acc_t(d.HW);
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    const HotIndex hot(d, o.pool == Pool::AVG ? nullptr : argmax_c.const_data_ptr<int64_t>(), nullptr);
    apply<scalar_t, true, false, false, true, true>(pdx, pdy, d, nullptr, nullptr, f.S.data(), A.data(), &hot,
                                                    [&](int64_t n, int64_t c, int64_t hw) {
      const int64_t nc = n * d.C + c;
      return static_cast<acc_t>(pdy[d.at(n, c, hw)]) * f.S[nc] + A[nc] + dpooled[n * 2 * d.C + d.C + c];
    });
  });
  return {dx, grad_out(dw1, w1, w1), grad_out(db1, b1, w1), grad_out(dw2, w2, w1), grad_out(db2, b2, w1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfused_C, CPU, m) {
  m.impl("channel_attention", &channel_attention_kernel);
  m.impl("channel_attention_backward", &channel_attention_backward_kernel);
}

}  // namespace cpu
}  // namespace attnfused

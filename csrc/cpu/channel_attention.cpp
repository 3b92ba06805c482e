// Channel attention on CPU: y = x * gate(f(pool(x)))[n, c], f the MLP or the channel 1D conv (and the
// tail, activation(y + residual), in the pass that writes y).
// Forward 2R+1W (pool, then scale); backward 2R(dy, x) + 1R(dy) + 1W, saved: x, pooled, argmax and
// (the MLP) hidden.
// Both run sample by sample (in groups), f included, in one parallel region where the batch allows
// (for_samples): each sample's x (and dy) read again while in cache.
#include "cpu/args.h"
#include "cpu/channel_math.h"
#include "cpu/gemm.h"
#include "cpu/passes.h"
#include "cpu/sweep.h"

#include <torch/library.h>

#include <limits>

namespace attnfused {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor, Tensor> channel_attention_kernel(
    const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
    c10::string_view kind, c10::string_view pool, c10::string_view act, c10::string_view gate,
    c10::string_view padding, c10::string_view tie, const OptTensor& residual, c10::string_view activation,
    const OptTensor& in_scale, const OptTensor& in_shift) {
  check_input(x);
  const auto o = parse_channel_options(kind, pool, act, gate, padding);
  (void)parse_tie(tie);  // the forward is the same under both rules
  const ChannelWeights w(x, w1, b1, w2, b2, o.kind);
  const Tail tail(x, residual, activation);
  const Prologue pro(x, in_scale, in_shift);
  const Dims d = dims_of(x);
  const auto acc = acc_dtype(x);
  Tensor y = at::empty_like(x);
  Tensor pooled = at::empty({d.N, 2, d.C}, x.options().dtype(acc));
  Tensor argmax = at::empty({d.N, d.C}, x.options().dtype(at::kLong));
  Tensor hidden = hidden_output(x, w, o);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_attention_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    acc_t* pp = pooled.data_ptr<acc_t>();
    acc_t* ph = hidden.numel() ? hidden.data_ptr<acc_t>() : nullptr;
    ChannelSmall<acc_t> f(w, o, d.N);
    for_samples<scalar_t>(d, [&](int64_t n0, const Dims& d1) {
      const int64_t off = n0 * d.sample();
      const GroupInput<scalar_t> xg(pro, x, d, n0, d1.N);  // x, or its prologue's x'
      pool_space(xg.get(), d1, pp + n0 * 2 * d.C, argmax.data_ptr<int64_t>() + n0 * d.C, o.pool != Pool::AVG);
      f.forward(pp, n0, d1.N, ph);
      apply<scalar_t, true, false, false, true, false>(y.data_ptr<scalar_t>() + off, xg.get(), d1, nullptr, nullptr,
                                                       f.S.data() + n0 * d.C, nullptr, nullptr, NoHot(),
                                                       stream_output<scalar_t>(d), OutTail<scalar_t>(tail).at(off));
    });
  });
  return {y, pooled, argmax, hidden};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> channel_attention_backward_kernel(
    const Tensor& grad_y, const Tensor& x, const Tensor& pooled, const Tensor& argmax, const Tensor& hidden,
    const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2, c10::string_view kind,
    c10::string_view pool, c10::string_view act, c10::string_view gate, c10::string_view padding,
    c10::string_view tie) {
  check_input(x);
  check_same_layout(grad_y, x);
  const auto o = parse_channel_options(kind, pool, act, gate, padding);
  const bool split = parse_tie(tie) == Tie::SPLIT && o.pool != Pool::AVG;  // "avg": no max
  const ChannelWeights w(x, w1, b1, w2, b2, o.kind);
  const Dims d = dims_of(x);
  check_saved_pooling(pooled, argmax, x);
  const Tensor pooled_c = pooled.contiguous(), argmax_c = argmax.contiguous();
  const Tensor hidden_c = saved_hidden(hidden, x, w, o);
  Tensor dx = at::empty_like(x);
  Tensor dw1, db1, dw2, db2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_attention_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = grad_y.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    const acc_t* pp = pooled_c.const_data_ptr<acc_t>();
    const int64_t* am = argmax_c.const_data_ptr<int64_t>();
    const acc_t* ph = ptr_or_null<acc_t>(hidden_c);
    ChannelSmall<acc_t> f(w, o, d.N);
    std::vector<acc_t> dz(d.N * d.C), dpooled(d.N * 2 * d.C), A(d.N * d.C);
    for_samples<scalar_t>(d, [&](int64_t n0, const Dims& d1) {
      const int64_t off = n0 * d.sample();
      f.restore(pp, ph, n0, d1.N);  // the gates
      dot_space<scalar_t, false, false>(pdy + off, px + off, d1, nullptr, nullptr, dz.data() + n0 * d.C);
      f.backward_inputs(dz.data(), n0, d1.N, d.HW, dpooled.data(), A.data());
      if (split) {
        // dx = dy * s + A + [x == max] dmax / count
        const TieIndex<scalar_t> ties(d1, px + off, am + n0 * d.C, nullptr);
        const std::vector<acc_t> A0(A.begin() + n0 * d.C, A.begin() + (n0 + d1.N) * d.C);  // unpoisoned
        for (int64_t n1 = 0; n1 < d1.N; ++n1)
          for (int64_t c = 0; c < d.C; ++c)
            if (ties.cpoison(n1, c, dpooled[(n0 + n1) * 2 * d.C + d.C + c]))
              A[(n0 + n1) * d.C + c] = std::numeric_limits<acc_t>::quiet_NaN();
        apply<scalar_t, true, false, false, true, true>(pdx + off, pdy + off, d1, nullptr, nullptr,
                                                        f.S.data() + n0 * d.C, A.data() + n0 * d.C, &ties,
                                                        [&](int64_t n1, int64_t c, int64_t hw) {
          const int64_t n = n0 + n1, nc = n * d.C + c;
          return static_cast<acc_t>(pdy[d.at(n, c, hw)]) * f.S[nc] + A0[n1 * d.C + c] +
                 ties.cshare(n1, c, dpooled[n * 2 * d.C + d.C + c]);
        });
        return;
      }
      // dx = dy * s + A + one-hot(argmax) dmax
      const HotIndex hot(d1, o.pool == Pool::AVG ? nullptr : am + n0 * d.C, nullptr);
      apply<scalar_t, true, false, false, true, true>(pdx + off, pdy + off, d1, nullptr, nullptr,
                                                      f.S.data() + n0 * d.C, A.data() + n0 * d.C, &hot,
                                                      [&](int64_t n1, int64_t c, int64_t hw) {
        const int64_t n = n0 + n1, nc = n * d.C + c;
        return static_cast<acc_t>(pdy[d.at(n, c, hw)]) * f.S[nc] + A[nc] + dpooled[n * 2 * d.C + d.C + c];
      });
    });
    run_jobs(f.backward_weights(dz.data(), dw1, db1, dw2, db2));
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

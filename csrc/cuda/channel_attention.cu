// Channel attention (SE, ECA, CBAM's channel half), forward and backward.
//   forward : pass 1 reads x: avg / max / argmax over space; the last block of each sample runs
//             the MLP or 1D conv and the gate -> s[n, c]. Pass 2 reads x, writes y = x * s. (2R + 1W)
//   backward: pass 1 reads dy, x: sum_hw dy * x; the last block runs the gate's and f's backward.
//             Pass 2 reads dy, writes dx = dy * s + davg / HW + [hw == argmax] dmax.      (3R + 1W)
//   new path (next.cuh, $ATTNFUSED_CUDA_KERNELS=next): the same passes, the small math over the
//             whole batch in kernels of its own; the validated kernels where it does not cover x.
//   forward, on chip (onchip.cuh, when a sample fits one block's shared memory and the batch fills
//             the GPU): one block per sample loads it once, pools, runs f and the gate, writes y. (1R + 1W)
// Weight gradients: per-sample pieces, summed over samples in order by small kernels.
#include "args.cuh"
#include "next.cuh"
#include "onchip.cuh"

namespace attnfused {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_cuda(
    const at::Tensor& x_in, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
    const c10::optional<at::Tensor>& w2, const c10::optional<at::Tensor>& b2, c10::string_view kind,
    c10::string_view pool, c10::string_view act, c10::string_view gate, c10::string_view padding,
    c10::string_view tie, const c10::optional<at::Tensor>& residual, c10::string_view activation,
    const c10::optional<at::Tensor>& in_scale, const c10::optional<at::Tensor>& in_shift) {
  check_cuda_input(x_in);
  (void)parse_tie(tie);  // the forward is the same under both rules
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = Prologue(x_in, in_scale, in_shift).applied(x_in);  // (not fused: one pass)
  const ChannelWeights cw(x, w1, b1, w2, b2, kind, pool, act, gate, padding);
  const Tail tail(x, residual, activation);
  auto y = at::empty_like(x);
  auto pooled = new_pooled(x);
  auto argmax = new_argmax(x);
  auto hidden = new_hidden(x, cw);
  if (x.size(0) == 0) return {y, pooled, argmax, hidden};
  if (next::enabled() && next::channel_forward(x, cw, tail, y, pooled, argmax, hidden))
    return {y, pooled, argmax, hidden};
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "channel_attention_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Scratch s(x);
    const auto g = cw.args<acc_t>(s, pooled, argmax, /*backward=*/false, hidden);
    const auto onchip = onchip_plan<scalar_t>(x);
    if (onchip.use) return launch_onchip<scalar_t, false>(x, y, onchip, s, g, SpatialArgs<acc_t>{});
    ReducePass<scalar_t> pass(x, at::Tensor(), Over::SPACE, /*pooling=*/true, s);
    pass.template launch<Pass::POOL, ChannelForwardFin<acc_t>>(x, at::Tensor(), g);
    auto ap = apply_params<acc_t>(x);
    ap.s = g.s;
    launch_apply<scalar_t, true, false, false>(x, y, ap);
  });
  zero_unused_max(cw, pooled, argmax);
  tail.apply_after(y);
  return {y, pooled, argmax, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& pooled_, const at::Tensor& argmax_,
    const at::Tensor& /*hidden: recomputed*/, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
    const c10::optional<at::Tensor>& w2, const c10::optional<at::Tensor>& b2, c10::string_view kind, c10::string_view pool, c10::string_view act,
    c10::string_view gate, c10::string_view padding, c10::string_view tie) {
  check_cuda_input(x);
  check_grad(grad_y, x);
  c10::cuda::CUDAGuard guard(x.device());
  const ChannelWeights cw(x, w1, b1, w2, b2, kind, pool, act, gate, padding);
  const bool split = parse_tie(tie) == Tie::SPLIT && cw.o.pool != Pool::AVG;  // "avg": no max to share
  check_saved_pooling(pooled_, argmax_, x);
  auto pooled = pooled_.contiguous(), argmax = argmax_.contiguous();
  auto gx = at::empty_like(x);
  if (next::enabled()) {
    next::WeightGrads ng{w1, b1, w2, b2, {}};
    if (next::channel_backward(grad_y, x, cw, pooled, argmax, split, gx, ng))
      return {gx, ng.g[0], ng.g[1], ng.g[2], ng.g[3]};
  }
  // attnfused.ops runs the reference backend's ops on this error (the split rule where the new kernels
  // do not run)
  TORCH_CHECK_NOT_IMPLEMENTED(!split, "attnfused: tie='split' has CUDA kernels on the new path only "
                                      "($ATTNFUSED_CUDA_KERNELS=next), where it covers x");
  std::vector<at::Tensor> gw;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "channel_attention_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Scratch s(x);
    const auto g = cw.args<acc_t>(s, pooled, argmax, /*backward=*/true);
    ReducePass<scalar_t> pass(x, grad_y, Over::SPACE, /*pooling=*/false, s);
    pass.template launch<Pass::DOT, ChannelBackwardFin<acc_t>>(x, grad_y, g);
    auto ap = apply_params<acc_t>(x);
    ap.s = g.s;
    ap.ph = g.ph, ap.qh = g.qh, ap.ih = g.argmax;
    launch_apply<scalar_t, true, false, true>(grad_y, gx, ap);
    gw = cw.grads<acc_t>(g, w1, b1, w2, b2);
  });
  return {gx, gw[0], gw[1], gw[2], gw[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfused_C, CUDA, m) {
  m.impl("channel_attention", &channel_attention_cuda);
  m.impl("channel_attention_backward", &channel_attention_backward_cuda);
}

}  // namespace cuda
}  // namespace attnfused

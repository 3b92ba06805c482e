// CBAM (channel attention, then spatial attention on x1 = x * s), fused: x1 is never stored.
//   forward : pass 1 reads x -> pooled, s (channel half in the last block of each sample);
//             pass 2 reads x, pools x * s over channels -> smaps, t (spatial half);
//             pass 3 reads x, writes y = x * s * t.                                      (3R + 1W)
//   forward, on chip (onchip.cuh, when a sample fits one block's shared memory and the batch fills
//             the GPU): one block per sample holds it in shared memory through both halves. (1R + 1W)
//   backward: a tiny kernel recomputes s and t from the saved vectors and maps;
//             pass 1 reads dy, x: sum_c dy x s (per position) and sum_hw dy x t (per channel);
//               the last block runs the spatial backward -> dmean / C, dmax maps;
//             pass 2 reads x: sum_hw x (dmean / C + [c == sargmax] dmax), the rest of
//               d loss / d s; the last block runs the channel backward;
//             pass 3 reads dy, writes dx = (dy t + dmean / C + [c == sargmax] dmax) s
//               + davg / HW + [hw == argmax] dmax_c.                                     (5R + 1W)
// The new path (next.cuh, $ATTNFUSED_CUDA_KERNELS=next) runs first where it covers x.
#include "args.cuh"
#include "next.cuh"
#include "onchip.cuh"

namespace attnfused {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbam_cuda(
    const at::Tensor& x_in, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
    const c10::optional<at::Tensor>& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& sweight,
    const c10::optional<at::Tensor>& sbias, c10::string_view kind, c10::string_view pool, c10::string_view act,
    c10::string_view gate, c10::string_view padding, c10::string_view maps, c10::string_view sgate,
    c10::string_view tie, const c10::optional<at::Tensor>& residual, c10::string_view activation,
    const c10::optional<at::Tensor>& in_scale, const c10::optional<at::Tensor>& in_shift) {
  check_cuda_input(x_in);
  (void)parse_tie(tie);  // the forward is the same under both rules
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = Prologue(x_in, in_scale, in_shift).applied(x_in);  // (not fused: one pass)
  const ChannelWeights cw(x, w1, b1, w2, b2, kind, pool, act, gate, padding);
  const SpatialWeights sw(x, sweight, sbias, maps, sgate, "sweight", "sbias", "sgate");
  const Tail tail(x, residual, activation);
  auto y = at::empty_like(x);
  auto pooled = new_pooled(x);
  auto argmax = new_argmax(x);
  auto smaps = new_smaps(x);
  auto sargmax = new_sargmax(x);
  auto hidden = new_hidden(x, cw);
  if (x.size(0) == 0) return {y, pooled, argmax, smaps, sargmax, hidden};
  if (next::enabled() && next::cbam_forward(x, cw, sw, tail, y, pooled, argmax, smaps, sargmax, hidden))
    return {y, pooled, argmax, smaps, sargmax, hidden};
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "cbam_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Scratch s(x);
    const auto ch = cw.args<acc_t>(s, pooled, argmax, /*backward=*/false, hidden);
    const auto sp = sw.args<acc_t>(s, smaps, sargmax, /*backward=*/false);
    const auto onchip = onchip_plan<scalar_t>(x);
    if (onchip.use) return launch_onchip<scalar_t, true>(x, y, onchip, s, ch, sp);
    ReducePass<scalar_t> p1(x, at::Tensor(), Over::SPACE, /*pooling=*/true, s);
    p1.template launch<Pass::POOL, ChannelForwardFin<acc_t>>(x, at::Tensor(), ch);
    ReducePass<scalar_t> p2(x, at::Tensor(), Over::CHANNELS, /*pooling=*/true, s);
    p2.weigh_channels(ch.s);  // pool x1 = x * s without storing it
    p2.template launch<Pass::POOL, SpatialForwardFin<acc_t>>(x, at::Tensor(), sp);
    auto ap = apply_params<acc_t>(x);
    ap.s = ch.s, ap.t = sp.t;
    launch_apply<scalar_t, true, false, false>(x, y, ap);
  });
  zero_unused_max(cw, pooled, argmax);
  tail.apply_after(y);
  return {y, pooled, argmax, smaps, sargmax, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbam_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& pooled_, const at::Tensor& argmax_,
    const at::Tensor& smaps_, const at::Tensor& sargmax_, const at::Tensor& /*hidden: recomputed*/,
    const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const c10::optional<at::Tensor>& w2,
    const c10::optional<at::Tensor>& b2, const at::Tensor& sweight, const c10::optional<at::Tensor>& sbias,
    c10::string_view kind, c10::string_view pool, c10::string_view act,
    c10::string_view gate, c10::string_view padding, c10::string_view maps, c10::string_view sgate,
    c10::string_view tie) {
  check_cuda_input(x);
  check_grad(grad_y, x);
  TORCH_CHECK_VALUE(parse_tie(tie) == Tie::FIRST,
                    "tie='split' has no CUDA kernel yet: the split backward runs the reference backend's ops");
  c10::cuda::CUDAGuard guard(x.device());
  const ChannelWeights cw(x, w1, b1, w2, b2, kind, pool, act, gate, padding);
  const SpatialWeights sw(x, sweight, sbias, maps, sgate, "sweight", "sbias", "sgate");
  check_saved_pooling(pooled_, argmax_, x);
  check_saved_maps(smaps_, sargmax_, x);
  auto pooled = pooled_.contiguous(), argmax = argmax_.contiguous();
  auto smaps = smaps_.contiguous(), sargmax = sargmax_.contiguous();
  auto gx = at::empty_like(x);
  std::vector<at::Tensor> gc, gs;
  if (next::enabled()) {
    next::WeightGrads ng{w1, b1, w2, b2, {}};
    if (next::cbam_backward(grad_y, x, cw, sw, pooled, argmax, smaps, sargmax, gx, ng, sweight, sbias, gs))
      return {gx, ng.g[0], ng.g[1], ng.g[2], ng.g[3], gs[0], gs[1]};
  }
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "cbam_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Scratch s(x);
    const auto ch = cw.args<acc_t>(s, pooled, argmax, /*backward=*/true);
    const auto sp = sw.args<acc_t>(s, smaps, sargmax, /*backward=*/true);
    const int64_t N = x.size(0);
    if (N > 0) {
      TORCH_CHECK(N < INT32_MAX, "attnfused: too many samples for one launch (", N, ")");
      _cbam_gates_kernel<acc_t><<<static_cast<unsigned>(N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(ch, sp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    ReducePass<scalar_t> p1(x, grad_y, Over::BOTH, /*pooling=*/false, s);
    p1.weigh_space(sp.t);       // per channel: sum_hw dy x t
    p1.weigh_channels(ch.s);    // per position: sum_c dy x s = sum_c dy x1
    p1.template launch<Pass::DOT, SpatialBackwardFin<acc_t>, /*BOTH_DIRS=*/true>(x, grad_y, sp);
    ReducePass<scalar_t> p2(x, at::Tensor(), Over::SPACE, /*pooling=*/false, s);
    p2.weigh_space(sp.pc, sp.sargmax, sp.qc);
    p2.template launch<Pass::MASK, CbamChannelBackwardFin<acc_t>>(x, at::Tensor(),
                                                                   CbamBackwardArgs<acc_t>{ch, p1.per_c_sum()});
    auto ap = apply_params<acc_t>(x);
    ap.s = ch.s, ap.t = sp.t;
    ap.pc = sp.pc, ap.qc = sp.qc, ap.ic = sp.sargmax;
    ap.ph = ch.ph, ap.qh = ch.qh, ap.ih = ch.argmax;
    launch_apply<scalar_t, true, true, true>(grad_y, gx, ap);
    gc = cw.grads<acc_t>(ch, w1, b1, w2, b2);
    gs = sw.grads<acc_t>(sp, sweight, sbias);
  });
  return {gx, gc[0], gc[1], gc[2], gc[3], gs[0], gs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfused_C, CUDA, m) {
  m.impl("cbam", &cbam_cuda);
  m.impl("cbam_backward", &cbam_backward_cuda);
}

}  // namespace cuda
}  // namespace attnfused

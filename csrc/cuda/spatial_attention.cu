// Spatial attention, forward and backward.
//   forward : pass 1 reads x: max / argmax / mean over channels; the last block of each sample runs
//             the k x k conv and the gate -> t[n, hw]. Pass 2 reads x, writes y = x * t. (2R + 1W)
//   backward: pass 1 reads dy, x: sum_c dy * x; the last block runs the gate's and the conv's
//             backward. Pass 2 reads dy, writes dx = dy * t + dmean / C + [c == sargmax] dmax. (3R + 1W)
#include "args.cuh"
#include "next.cuh"

namespace attnfused {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_attention_cuda(
    const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, c10::string_view maps,
    c10::string_view gate, c10::string_view tie, const c10::optional<at::Tensor>& residual,
    c10::string_view activation, const c10::optional<at::Tensor>& in_scale,
    const c10::optional<at::Tensor>& in_shift) {
  check_cuda_input(x_in);
  (void)parse_tie(tie);  // the forward is the same under both rules
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = Prologue(x_in, in_scale, in_shift).applied(x_in);  // (not fused: one pass)
  const SpatialWeights sw(x, weight, bias, maps, gate);
  const Tail tail(x, residual, activation);
  auto y = at::empty_like(x);
  auto smaps = new_smaps(x);
  auto sargmax = new_sargmax(x);
  if (x.size(0) == 0) return {y, smaps, sargmax};
  if (next::enabled() && next::spatial_forward(x, sw, tail, y, smaps, sargmax)) return {y, smaps, sargmax};
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "spatial_attention_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Scratch s(x);
    const auto g = sw.args<acc_t>(s, smaps, sargmax, /*backward=*/false);
    ReducePass<scalar_t> pass(x, at::Tensor(), Over::CHANNELS, /*pooling=*/true, s);
    pass.template launch<Pass::POOL, SpatialForwardFin<acc_t>>(x, at::Tensor(), g);
    auto ap = apply_params<acc_t>(x);
    ap.t = g.t;
    launch_apply<scalar_t, true, false, false>(x, y, ap);
  });
  tail.apply_after(y);
  return {y, smaps, sargmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_attention_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& smaps_, const at::Tensor& sargmax_,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, c10::string_view maps, c10::string_view gate,
    c10::string_view tie) {
  check_cuda_input(x);
  check_grad(grad_y, x);
  TORCH_CHECK_VALUE(parse_tie(tie) == Tie::FIRST,
                    "tie='split' has no CUDA kernel yet: the split backward runs the reference backend's ops");
  c10::cuda::CUDAGuard guard(x.device());
  const SpatialWeights sw(x, weight, bias, maps, gate);
  check_saved_maps(smaps_, sargmax_, x);
  auto smaps = smaps_.contiguous(), sargmax = sargmax_.contiguous();
  auto gx = at::empty_like(x);
  std::vector<at::Tensor> gw;
  if (next::enabled() && next::spatial_backward(grad_y, x, sw, smaps, sargmax, gx, weight, bias, gw))
    return {gx, gw[0], gw[1]};
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "spatial_attention_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Scratch s(x);
    const auto g = sw.args<acc_t>(s, smaps, sargmax, /*backward=*/true);
    ReducePass<scalar_t> pass(x, grad_y, Over::CHANNELS, /*pooling=*/false, s);
    pass.template launch<Pass::DOT, SpatialBackwardFin<acc_t>>(x, grad_y, g);
    auto ap = apply_params<acc_t>(x);
    ap.t = g.t;
    ap.pc = g.pc, ap.qc = g.qc, ap.ic = g.sargmax;
    launch_apply<scalar_t, true, true, false>(grad_y, gx, ap);
    gw = sw.grads<acc_t>(g, weight, bias);
  });
  return {gx, gw[0], gw[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfused_C, CUDA, m) {
  m.impl("spatial_attention", &spatial_attention_cuda);
  m.impl("spatial_attention_backward", &spatial_attention_backward_cuda);
}

}  // namespace cuda
}  // namespace attnfused

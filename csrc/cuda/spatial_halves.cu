// The two halves of spatial attention, for when ordinary ops run between them (BatchNorm in
// training): spatial_pool (max / argmax / mean over channels) and spatial_scale (x * t), with
// their backward.
//   spatial_pool          : reads x once.                                              (1R)
//   spatial_pool_backward : writes dx = gmean / C + [c == sargmax] gmax.               (1W)
//   spatial_scale         : reads x, writes x * t (the tail, if any, after).           (1R + 1W)
//   spatial_scale_backward: sum_c dy * x -> dt (reads dy, x); dx = dy * t (reads dy).  (3R + 1W)
//   new path (next.cuh, $ATTNFUSED_CUDA_KERNELS=next): spatial_pool, spatial_scale and its backward
//   through the new passes where they cover x.
#include "args.cuh"
#include "next.cuh"

namespace attnfused {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> spatial_pool_cuda(const at::Tensor& x, c10::string_view tie) {
  check_cuda_input(x);
  (void)parse_tie(tie);  // the forward is the same under both rules
  c10::cuda::CUDAGuard guard(x.device());
  auto smaps = new_smaps(x);
  auto sargmax = new_sargmax(x);
  if (x.size(0) == 0) return {smaps, sargmax};
  if (next::enabled() && next::spatial_pool(x, smaps, sargmax)) return {smaps, sargmax};
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "spatial_pool_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Scratch s(x);
    SpatialArgs<acc_t> g{};
    g.C = x.size(1), g.H = x.size(2), g.W = x.size(3), g.HW = g.H * g.W;
    g.smaps = smaps.data_ptr<acc_t>();
    g.sargmax = sargmax.data_ptr<int64_t>();
    ReducePass<scalar_t> pass(x, at::Tensor(), Over::CHANNELS, /*pooling=*/true, s);
    pass.template launch<Pass::POOL, SpatialPoolFin<acc_t>>(x, at::Tensor(), g);
  });
  return {smaps, sargmax};
}

at::Tensor spatial_pool_backward_cuda(const at::Tensor& grad_smaps, const at::Tensor& x, const at::Tensor& sargmax_,
                                       c10::string_view tie) {
  check_cuda_input(x);
  TORCH_CHECK_VALUE(parse_tie(tie) == Tie::FIRST,
                    "tie='split' has no CUDA kernel yet: the split backward runs the reference backend's ops");
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_dtype(x);
  check_spatial_pool_grad(grad_smaps, sargmax_, x);
  auto sargmax = sargmax_.contiguous();
  auto g = grad_smaps.to(acc);
  auto pc = (g.select(1, 1) / static_cast<double>(x.size(1))).contiguous();  // small maps: ordinary ops
  auto qc = g.select(1, 0).contiguous();
  auto gx = at::empty_like(x);
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "spatial_pool_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto ap = apply_params<acc_t>(x);
    ap.pc = pc.data_ptr<acc_t>(), ap.qc = qc.data_ptr<acc_t>(), ap.ic = sargmax.data_ptr<int64_t>();
    launch_apply<scalar_t, false, true, false>(at::Tensor(), gx, ap);
  });
  return gx;
}

at::Tensor check_map(const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "t must have a floating dtype, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "t must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef({x.size(0), x.size(2), x.size(3)}), "t must have shape (N, H, W) = ",
                    at::IntArrayRef({x.size(0), x.size(2), x.size(3)}), ", got ", t.sizes());
  return t.to(acc_dtype(x)).contiguous();
}

at::Tensor spatial_scale_cuda(const at::Tensor& x, const at::Tensor& t_, const c10::optional<at::Tensor>& residual,
                              c10::string_view activation) {
  check_cuda_input(x);
  c10::cuda::CUDAGuard guard(x.device());
  auto t = check_map(t_, x);
  const Tail tail(x, residual, activation);
  auto y = at::empty_like(x);
  if (x.size(0) == 0) return y;
  if (next::enabled() && next::spatial_scale(x, t, tail, y)) return y;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "spatial_scale_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto ap = apply_params<acc_t>(x);
    ap.t = t.data_ptr<acc_t>();
    launch_apply<scalar_t, true, false, false>(x, y, ap);
  });
  tail.apply_after(y);
  return y;
}

std::tuple<at::Tensor, at::Tensor> spatial_scale_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                               const at::Tensor& t_) {
  check_cuda_input(x);
  check_grad(grad_y, x);
  c10::cuda::CUDAGuard guard(x.device());
  auto t = check_map(t_, x);
  auto gx = at::empty_like(x);
  auto gt = at::empty_like(t);  // accumulation dtype, (N, H, W)
  if (x.size(0) == 0) return {gx, gt.to(t_.scalar_type())};
  if (next::enabled() && next::spatial_scale_backward(grad_y, x, t, gx, gt)) return {gx, gt.to(t_.scalar_type())};
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "spatial_scale_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Scratch s(x);
    ReducePass<scalar_t> pass(x, grad_y, Over::CHANNELS, /*pooling=*/false, s);
    pass.per_hw_sum_into(gt.data_ptr<acc_t>());
    pass.template launch<Pass::DOT, NoFin<acc_t>>(x, grad_y, 0);
    auto ap = apply_params<acc_t>(x);
    ap.t = t.data_ptr<acc_t>();
    launch_apply<scalar_t, true, false, false>(grad_y, gx, ap);
  });
  return {gx, gt.to(t_.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfused_C, CUDA, m) {
  m.impl("spatial_pool", &spatial_pool_cuda);
  m.impl("spatial_pool_backward", &spatial_pool_backward_cuda);
  m.impl("spatial_scale", &spatial_scale_cuda);
  m.impl("spatial_scale_backward", &spatial_scale_backward_cuda);
}

}  // namespace cuda
}  // namespace attnfused

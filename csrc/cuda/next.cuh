// The new CUDA path (namespace attnfused::cuda::next, behind $ATTNFUSED_CUDA_KERNELS=next until a
// GPU run validates it): streaming passes that only stream, and the small per-sample math in
// kernels of its own. What each pass is built to hold (bench/static.py checks it in the SASS):
//   - several independent 16-byte loads per thread in flight (load_vecs), compile-time vector widths;
//   - max and argmax by branch-free selects, with torch's rules (NaN wins, then the first index);
//   - pooling computes only what the op uses (avg only: no max, no argmax);
//   - NCHW read as flat 16-byte vectors: rows of whole vectors directly, other rows (14x14, 7x7 in
//     half precision) a tile of whole rows at a time through shared memory; rows too long for a
//     tile with H*W not a whole number of vectors (and H*W < 16 / element size) still run the
//     validated kernels;
//   - no per-sample math, no tickets: each pass writes partials in fixed slots and a small kernel
//     sums them in a fixed order, so results are bit-identical run to run.
// Geometry (which thread reads what, which slot a partial goes to) is in next_plan.h.
// The kernels: next_pool.cuh (the reduction passes), next_gate.cuh (the small math), next_last.cuh
// (the last pass); below, the host entry points (next_channel.cu).
#pragma once

#include "next_last.cuh"

namespace attnfused {
namespace cuda {
namespace next {

// $ATTNFUSED_CUDA_KERNELS=next: the ops whose new kernels exist run them (read at every call).
bool enabled();

// The forwards take the op's tail (common.h): with a residual, the last pass adds it (streamed
// beside x) and applies the relu as it writes y; a relu alone runs after that pass.

// Channel attention forward (SE, ECA, CBAM's channel half): pool over space -> gate -> scale.
// Fills y, pooled, argmax and hidden (shapes and dtypes as the op returns them) and returns true, or
// returns false where the new kernels do not cover x yet: channels_last with C not a whole number
// of 16-byte vectors; NCHW with H*W not one and (H*W < 16 / element size or rows too long for a
// TilePlan); x, y or the residual not 16-byte aligned.
bool channel_forward(const at::Tensor& x, const ChannelWeights& cw, const Tail& tail, at::Tensor& y,
                     at::Tensor& pooled, at::Tensor& argmax, at::Tensor& hidden);

// The weights a backward's gradients are for (their shapes and dtypes) and, filled by it, the
// gradients (dw1, db1, dw2, db2; an empty tensor where a weight is absent).
struct WeightGrads {
  const at::Tensor& w1;
  const c10::optional<at::Tensor>& b1;
  const c10::optional<at::Tensor>& w2;
  const c10::optional<at::Tensor>& b2;
  std::vector<at::Tensor> g;
};

// Channel attention backward: a pass summing dy * x over space -> back through the gate and f over
// all samples -> a pass writing dx = dy * s + davg / HW + [hw == argmax] dmax; under the tie rule
// "split" (pool not "avg") the first pass also counts each channel's elements equal to its max and
// the last reads x too: + (dmax / count) * [x == max]. Fills dx and gw.g and returns true, or
// returns false where the new kernels do not cover x (as for the forward; dy and dx 16-byte
// aligned too).
bool channel_backward(const at::Tensor& dy, const at::Tensor& x, const ChannelWeights& cw, const at::Tensor& pooled,
                      const at::Tensor& argmax, bool split, at::Tensor& dx, WeightGrads& gw);

// The spatial_pool op's forward: one pass over x pooling over channels (the channel pool's kernels
// with C and H*W swapped), then smaps (max, mean) and sargmax. Fills smaps and sargmax and returns
// true, or returns false where the new kernels do not cover x: channels_last with C, or NCHW with
// H*W, not a whole number of 16-byte vectors; x not 16-byte aligned.
bool spatial_pool(const at::Tensor& x, at::Tensor& smaps, at::Tensor& sargmax);

// The spatial_scale op's forward: the last pass of spatial attention, y = x * t[n, hw] (t: float32, or
// float64 for double x, [N, H*W] contiguous), with the tail. Fills y and returns true, or returns
// false where spatial_pool would (y and the residual aligned too).
bool spatial_scale(const at::Tensor& x, const at::Tensor& t, const Tail& tail, at::Tensor& y);

// The spatial_scale op's backward: a pass over dy and x summing dy * x over channels -> dt (acc
// dtype, [N, H*W] contiguous), then a pass writing dx = dy * t. Fills dx and dt and returns true, or
// returns false where spatial_pool would (dy and dx aligned too).
bool spatial_scale_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& t, at::Tensor& dx,
                            at::Tensor& dt);

// Spatial attention forward: the pool over channels as spatial_pool, then the k x k conv and the
// gate over the whole batch (one thread per position), then a last pass y = x * t[n, hw]. Fills y,
// smaps and sargmax and returns true, or returns false where spatial_pool would (y aligned too).
bool spatial_forward(const at::Tensor& x, const SpatialWeights& sw, const Tail& tail, at::Tensor& y,
                     at::Tensor& smaps, at::Tensor& sargmax);

// CBAM forward: the channel forward's pool and gate (pass 1), x * s pooled over channels without
// storing it (pass 2: the spatial pool's kernels weighting each channel by s), the conv and gate,
// then y = x * s * t (pass 3). Fills the op's outputs and returns true, or returns false for NCHW
// x in half precision (no weighted column pass there yet) and where spatial_forward would.
bool cbam_forward(const at::Tensor& x, const ChannelWeights& cw, const SpatialWeights& sw, const Tail& tail,
                  at::Tensor& y, at::Tensor& pooled, at::Tensor& argmax, at::Tensor& smaps, at::Tensor& sargmax,
                  at::Tensor& hidden);

// Spatial attention backward (tie rule "first"): a pass summing dy * x over channels -> the gate
// again from the saved maps, back through it and the conv over all samples -> a pass writing dx =
// dy * t + dmean / C + [c == sargmax] dmax (NCHW: a thread holds its positions' terms for several
// channels). Fills dx and gw (dweight, dbias; dbias empty without a bias) and returns true, or
// returns false where spatial_pool would (dy and dx aligned too).
bool spatial_backward(const at::Tensor& dy, const at::Tensor& x, const SpatialWeights& sw, const at::Tensor& smaps,
                      const at::Tensor& sargmax, at::Tensor& dx, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, std::vector<at::Tensor>& gw);

// CBAM backward (tie rule "first"): the channel gate again; a pass over dy and x summing dy * x * s
// over channels -> the spatial half's backward; a pass over dy and x summing dx1 * x over space
// (dx1 = dy * t + dmean / C + [c == sargmax] dmax, the spatial half's input gradient) -> the
// channel half's backward; a pass writing dx = dx1 * s + davg / HW + [hw == argmax] dmax_c. In
// NCHW the second and third passes hold a thread's positions' terms for several channels. Fills
// dx, gc.g and gs and returns true, or returns false where spatial_backward would.
bool cbam_backward(const at::Tensor& dy, const at::Tensor& x, const ChannelWeights& cw, const SpatialWeights& sw,
                   const at::Tensor& pooled, const at::Tensor& argmax, const at::Tensor& smaps,
                   const at::Tensor& sargmax, at::Tensor& dx, WeightGrads& gc, const at::Tensor& sweight,
                   const c10::optional<at::Tensor>& sbias, std::vector<at::Tensor>& gs);

}  // namespace next
}  // namespace cuda
}  // namespace attnfused

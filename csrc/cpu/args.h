// Argument handling of the CPU ops beyond common.h's: the weight gradients' outputs and the shape of
// the MLP's saved `hidden` state.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>

#include "common.h"
#include "small_math.h"

namespace attnfused {
namespace cpu {

// ---------------------------------------------------------------------------- small math, batch level

// Weight gradient in the weight's dtype, or an empty tensor where the weight is absent (the ops' contract).
inline at::Tensor grad_out(const at::Tensor& g, const std::optional<at::Tensor>& w, const at::Tensor& like) {
  if (!(w.has_value() && w->defined())) return at::empty({0}, like.options());
  return g.to(w->scalar_type());
}

// Width of a sample's row of the forward's `hidden` output, where it saves the MLP's pre-activations
// HP (P rows of Cr) for the backward: P * Cr; 0 for the conv, whose backward recomputes its few
// operations. (Not the logits too: C more per sample took the bytes saved for backward past 1.1x
// x's at 2048 x 7 x 7.)
inline int64_t hidden_width(const ChannelWeights& w, const ChannelOptions& o) {
  return o.kind == Kind::MLP ? small::pool_inputs(o.pool) * w.Cr : 0;
}

// The forward's `hidden` output: [N, hidden_width] in the accumulation dtype, or empty for the conv.
inline at::Tensor hidden_output(const at::Tensor& x, const ChannelWeights& w, const ChannelOptions& o) {
  const int64_t width = hidden_width(w, o);
  const auto opts = x.options().dtype(acc_dtype(x));
  return width ? at::empty({x.size(0), width}, opts) : at::empty({0}, opts);
}

// The backward's view of `hidden`: null where it is empty (saved by no forward: recompute), else
// checked against the shape hidden_output gives, contiguous.
inline at::Tensor saved_hidden(const at::Tensor& hidden, const at::Tensor& x, const ChannelWeights& w,
                               const ChannelOptions& o) {
  if (hidden.numel() == 0) return at::Tensor();
  check_saved(hidden, x, "hidden", {x.size(0), hidden_width(w, o)}, acc_dtype(x));
  return hidden.contiguous();
}

}  // namespace cpu
}  // namespace attnfused

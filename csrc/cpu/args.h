// Argument handling of the CPU ops: weights and small tensors in the accumulation dtype, the weight
// gradients' outputs, and the shape of the MLP's saved `hidden` state.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>

#include "common.h"
#include "small_math.h"

namespace attnfused {
namespace cpu {

// ---------------------------------------------------------------------------- small math, batch level

// Weights of channel attention in the accumulation type (contiguous); absent ones are undefined.
struct ChannelWeights {
  at::Tensor w1, b1, w2, b2;
  int64_t C = 0, Cr = 0, k = 0;  // Cr for kind mlp, k for kind conv
};

// Small tensors (weights, t, grad_smaps) in the accumulation dtype, contiguous; undefined if absent.
inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}
inline at::Tensor to_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() && t->defined() ? to_acc(*t, acc) : at::Tensor();
}

inline ChannelWeights channel_weights(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                      const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                                      const ChannelOptions& o) {
  const int64_t size = check_channel_weights(x, w1, b1, w2, b2, o.kind);
  const auto acc = acc_dtype(x);
  ChannelWeights w{to_acc(w1, acc), to_acc(b1, acc), to_acc(w2, acc), to_acc(b2, acc), x.size(1), 0, 0};
  (o.kind == Kind::MLP ? w.Cr : w.k) = size;
  return w;
}

// Weight gradient in the weight's dtype, or an empty tensor where the weight is absent (the ops' contract).
inline at::Tensor grad_out(const at::Tensor& g, const std::optional<at::Tensor>& w, const at::Tensor& like) {
  if (!(w.has_value() && w->defined())) return at::empty({0}, like.options());
  return g.to(w->scalar_type());
}

template <typename acc_t>
inline const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
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

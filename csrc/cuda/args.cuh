// Host side of the two small halves: weights checked and converted to the accumulation dtype,
// per-sample scratch for the kernels, and the weight gradients summed over samples.
#pragma once

#include "launch.cuh"

namespace attnfused {
namespace cuda {

// common.h's ChannelWeights (checked, in the accumulation dtype) with the options, the sizes of x
// and w2 transposed, and the kernels' argument block.
struct ChannelWeights : attnfused::ChannelWeights {
  ChannelOptions o;
  int64_t N, HW;
  at::Tensor w2t;  // w2 transposed, contiguous (kind mlp)

  ChannelWeights(const at::Tensor& x, const at::Tensor& w1_, const c10::optional<at::Tensor>& b1_,
                 const c10::optional<at::Tensor>& w2_, const c10::optional<at::Tensor>& b2_, c10::string_view kind,
                 c10::string_view pool, c10::string_view act, c10::string_view gate, c10::string_view padding)
      : attnfused::ChannelWeights(x, w1_, b1_, w2_, b2_, parse_kind(kind)),
        o(parse_channel_options(kind, pool, act, gate, padding)),
        N(x.size(0)),
        HW(x.size(2) * x.size(3)) {
    if (o.kind == Kind::MLP) w2t = w2.t().contiguous();
  }

  int nv() const { return pool_inputs(o.pool); }

  // hidden: the forward's `hidden` output (new_hidden), where the MLP's pre-activations go; else scratch
  template <typename acc_t>
  ChannelArgs<acc_t> args(Scratch& s, const at::Tensor& pooled, const at::Tensor& argmax, bool backward,
                          const at::Tensor& hidden = at::Tensor()) const {
    ChannelArgs<acc_t> g{};
    g.kind = o.kind, g.pool = o.pool, g.act = o.act, g.gate = o.gate, g.padding = o.padding;
    g.C = C, g.Cr = Cr, g.k = k, g.HW = HW;
    g.w1 = w1.data_ptr<acc_t>();
    g.b1 = ptr_or_null<acc_t>(b1);
    g.w2t = ptr_or_null<acc_t>(w2t);
    g.b2 = ptr_or_null<acc_t>(b2);
    g.pooled = pooled.data_ptr<acc_t>();
    g.argmax = argmax.data_ptr<int64_t>();
    g.vin = s.f<acc_t>(N * nv() * C);
    g.hid = hidden.defined() && hidden.numel() ? hidden.data_ptr<acc_t>() : s.f<acc_t>(N * nv() * Cr);
    g.hact = s.f<acc_t>(N * nv() * Cr);
    g.z = s.f<acc_t>(N * C);
    g.s = s.f<acc_t>(N * C);
    if (backward) {
      g.dlog = s.f<acc_t>(N * C);
      g.ph = s.f<acc_t>(N * C);
      g.qh = s.f<acc_t>(N * C);
      g.dhp = s.f<acc_t>(N * nv() * Cr);
      g.hsum = s.f<acc_t>(N * Cr);
      g.dwk = s.f<acc_t>(N * k);
    }
    return g;
  }

  // (dw1, db1, dw2, db2) summed over samples, each in its weight's dtype (empty where absent)
  template <typename acc_t>
  std::vector<at::Tensor> grads(const ChannelArgs<acc_t>& g, const at::Tensor& w1_,
                                const c10::optional<at::Tensor>& b1_, const c10::optional<at::Tensor>& w2_,
                                const c10::optional<at::Tensor>& b2_) const {
    auto opts = w1.options();
    // a fresh empty tensor per absent weight: a custom op's outputs must not alias each other
    auto empty = [&] { return w1_.new_empty({0}); };
    auto cast = [](const at::Tensor& gr, const at::Tensor& w) { return gr.view(w.sizes()).to(w.scalar_type()); };
    if (o.kind == Kind::CONV) {
      auto dw = at::empty({k}, opts);
      column_sum<acc_t>(g.dwk, dw.data_ptr<acc_t>(), N, k);
      return {cast(dw, w1_), empty(), empty(), empty()};
    }
    auto dw1 = at::empty({Cr, C}, opts), dw2 = at::empty({C, Cr}, opts);
    outer_sum<acc_t>(g.dhp, g.vin, dw1.data_ptr<acc_t>(), N * nv(), Cr, C);
    outer_sum<acc_t>(g.dlog, g.hsum, dw2.data_ptr<acc_t>(), N, C, Cr);
    at::Tensor db1 = empty(), db2 = empty();
    if (b1_.has_value()) {
      db1 = at::empty({Cr}, opts);
      column_sum<acc_t>(g.dhp, db1.data_ptr<acc_t>(), N * nv(), Cr);
      db1 = cast(db1, *b1_);
    }
    if (b2_.has_value()) {  // b2 enters every f(v): once per pooled input
      db2 = at::empty({C}, opts);
      column_sum<acc_t>(g.dlog, db2.data_ptr<acc_t>(), N, C, acc_t(nv()));
      db2 = cast(db2, *b2_);
    }
    return {cast(dw1, w1_), db1, cast(dw2, *w2_), db2};
  }
};

// common.h's SpatialConvWeights with the options, the sizes of x and the kernels' argument block
// (which reads w as a flat [M * k * k]).
struct SpatialWeights : SpatialConvWeights {
  Maps maps;
  Gate gate;
  int64_t N, C, H, W;

  SpatialWeights(const at::Tensor& x, const at::Tensor& w_, const c10::optional<at::Tensor>& b_,
                 c10::string_view maps_, c10::string_view gate_, const char* wname = "weight",
                 const char* bname = "bias", const char* gname = "gate")
      : SpatialConvWeights(x, w_, b_, parse_maps(maps_), wname, bname),
        maps(parse_maps(maps_)),
        gate(parse_gate(gate_, gname)),
        N(x.size(0)),
        C(x.size(1)),
        H(x.size(2)),
        W(x.size(3)) {}

  template <typename acc_t>
  SpatialArgs<acc_t> args(Scratch& s, const at::Tensor& smaps, const at::Tensor& sargmax, bool backward) const {
    SpatialArgs<acc_t> g{};
    g.maps = maps, g.gate = gate;
    g.C = C, g.H = H, g.W = W, g.HW = H * W, g.k = k, g.M = M;
    g.w = w.data_ptr<acc_t>();
    g.b = ptr_or_null<acc_t>(b);
    g.smaps = smaps.data_ptr<acc_t>();
    g.sargmax = sargmax.data_ptr<int64_t>();
    g.z = s.f<acc_t>(N * H * W);
    g.t = s.f<acc_t>(N * H * W);
    if (backward) {
      g.dlog = s.f<acc_t>(N * H * W);
      g.pc = s.f<acc_t>(N * H * W);
      g.qc = s.f<acc_t>(N * H * W);
      g.dwp = s.f<acc_t>(N * (M * k * k + 1));
    }
    return g;
  }

  // (dweight, dbias) summed over samples, in the weights' dtypes (dbias empty without a bias)
  template <typename acc_t>
  std::vector<at::Tensor> grads(const SpatialArgs<acc_t>& g, const at::Tensor& w_,
                                const c10::optional<at::Tensor>& b_) const {
    const int64_t nw = M * k * k + 1;
    auto d = at::empty({nw}, w.options());
    column_sum<acc_t>(g.dwp, d.data_ptr<acc_t>(), N, nw);
    auto dw = d.narrow(0, 0, nw - 1).view(w_.sizes()).to(w_.scalar_type());
    // db copied out of d: dw may be a view of d, and a custom op's outputs must not alias
    auto db = b_.has_value() ? d.narrow(0, nw - 1, 1).view(b_->sizes()).to(b_->scalar_type(), false, true)
                             : w_.new_empty({0});
    return {dw, db};
  }
};

// Outputs the forward passes fill.
inline at::Tensor new_pooled(const at::Tensor& x) {
  return at::empty({x.size(0), 2, x.size(1)}, x.options().dtype(acc_dtype(x)));
}
inline at::Tensor new_argmax(const at::Tensor& x) { return at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kLong)); }
// The ops' `hidden` output: the MLP's pre-activations [N, P * Cr] (the per-sample gate and the new
// path's hidden layer write them); empty for the conv.
inline at::Tensor new_hidden(const at::Tensor& x, const ChannelWeights& cw) {
  const auto opts = x.options().dtype(acc_dtype(x));
  return cw.o.kind == Kind::MLP ? at::empty({x.size(0), cw.nv() * cw.Cr}, opts) : at::empty({0}, opts);
}
// The ops' contract: for pool "avg" nothing reads the max half of pooled or argmax, and both are
// zeros (the kernels still compute them; on the GPU the max rides along with the sum for free).
inline void zero_unused_max(const ChannelWeights& cw, at::Tensor& pooled, at::Tensor& argmax) {
  if (cw.o.pool != Pool::AVG) return;
  pooled.select(1, 1).zero_();
  argmax.zero_();
}
inline at::Tensor new_smaps(const at::Tensor& x) {
  return at::empty({x.size(0), 2, x.size(2), x.size(3)}, x.options().dtype(acc_dtype(x)));
}
inline at::Tensor new_sargmax(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(2), x.size(3)}, x.options().dtype(at::kLong));
}

// grad_y as the kernels read it: x's shape, strides and dtype.
inline void check_grad(const at::Tensor& grad_y, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad_y.device() == x.device(), "grad_y must be on ", x.device(), ", got ", grad_y.device());
  check_same_layout(grad_y, x);
}

}  // namespace cuda
}  // namespace attnfused

// Shared by the CPU and CUDA kernels: option enums parsed from the ops' string arguments
// (names listed in attnfused/_options.py), argument checks, and the tiny scalar math.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <string>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AF_HOST_DEVICE inline
#endif

namespace attnfused {

enum class Kind { MLP, CONV };
enum class Pool { AVG, MAX, AVG_MAX, MIX };
enum class Act { RELU, SILU };
enum class Gate { SIGMOID, HARDSIGMOID };
enum class Padding { ZEROS, CIRCULAR };
enum class Maps { MAX_MEAN, MEAN_MAX, MIX };
// The max gradient's tie rule: FIRST, all of it at the saved (first) argmax; SPLIT, shared evenly
// by every element equal to the max, as torch's amax backward (attnfused/_options.py TIE_RULES).
enum class Tie { FIRST, SPLIT };

namespace detail {
template <typename E, size_t N>
E parse(const char* arg, c10::string_view s, const char* const (&names)[N], const E (&values)[N]) {
  std::string all;
  for (size_t i = 0; i < N; ++i) {
    if (s == names[i]) return values[i];
    all += (i ? ", " : "") + std::string(names[i]);
  }
  TORCH_CHECK_VALUE(false, arg, " must be one of [", all, "], got '", std::string(s), "'");
}
}  // namespace detail

inline Kind parse_kind(c10::string_view s) {
  static const char* const n[] = {"mlp", "conv"};
  return detail::parse("kind", s, n, {Kind::MLP, Kind::CONV});
}
inline Pool parse_pool(c10::string_view s) {
  static const char* const n[] = {"avg", "max", "avg+max", "mix"};
  return detail::parse("pool", s, n, {Pool::AVG, Pool::MAX, Pool::AVG_MAX, Pool::MIX});
}
inline Act parse_act(c10::string_view s) {
  static const char* const n[] = {"relu", "silu"};
  return detail::parse("act", s, n, {Act::RELU, Act::SILU});
}
inline Gate parse_gate(c10::string_view s, const char* arg = "gate") {
  static const char* const n[] = {"sigmoid", "hardsigmoid"};
  return detail::parse(arg, s, n, {Gate::SIGMOID, Gate::HARDSIGMOID});
}
inline Padding parse_padding(c10::string_view s) {
  static const char* const n[] = {"zeros", "circular"};
  return detail::parse("padding", s, n, {Padding::ZEROS, Padding::CIRCULAR});
}
inline Maps parse_maps(c10::string_view s) {
  static const char* const n[] = {"max_mean", "mean_max", "mix"};
  return detail::parse("maps", s, n, {Maps::MAX_MEAN, Maps::MEAN_MAX, Maps::MIX});
}

inline Tie parse_tie(c10::string_view s) {
  static const char* const n[] = {"first", "split"};
  return detail::parse("tie", s, n, {Tie::FIRST, Tie::SPLIT});
}

// Channel-attention options, parsed once per call.
struct ChannelOptions {
  Kind kind;
  Pool pool;
  Act act;
  Gate gate;
  Padding padding;
};

inline ChannelOptions parse_channel_options(c10::string_view kind, c10::string_view pool, c10::string_view act,
                                            c10::string_view gate, c10::string_view padding) {
  return {parse_kind(kind), parse_pool(pool), parse_act(act), parse_gate(gate), parse_padding(padding)};
}

// ---------------------------------------------------------------------------- checks

#define AF_CHECK_DEVICE(t, dev) \
  TORCH_CHECK_VALUE((t).device() == (dev), #t " must be on ", (dev), ", got ", (t).device())

// x: 4-D floating, NCHW- or channels_last-contiguous (the only layouts the kernels read).
inline void check_input(const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), name, " must have a floating dtype, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), name,
                    " must be NCHW- or channels_last-contiguous, got strides ", x.strides());
  TORCH_CHECK_VALUE(x.size(0) == 0 || (x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0), name,
                    " must have non-empty C, H and W, got shape ", x.sizes());
}

// true when x is stored channels_last (NHWC in memory) and not also plain contiguous.
inline bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// grad_y must share x's strides (the autograd layer guarantees it).
inline void check_same_layout(const at::Tensor& g, const at::Tensor& x, const char* name = "grad_y") {
  TORCH_CHECK_VALUE(g.sizes() == x.sizes() && g.strides() == x.strides(), name,
                    " must have x's shape and strides, got sizes ", g.sizes(), " strides ", g.strides(),
                    " for x sizes ", x.sizes(), " strides ", x.strides());
  TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(),
                   ", got ", g.scalar_type());
}

// The forward ops' tail, out = activation(attention(x) + residual) (attnfused/ops.py): the residual
// (optional) has x's shape, dtype, device and strides; the activation is "none" or "relu".
struct Tail {
  std::optional<at::Tensor> residual;
  bool relu = false;

  Tail(const at::Tensor& x, const std::optional<at::Tensor>& residual_, c10::string_view activation)
      : residual(residual_) {
    static const char* const n[] = {"none", "relu"};
    relu = detail::parse("activation", activation, n, {false, true});
    if (residual) {
      TORCH_CHECK_VALUE(residual->device() == x.device(), "residual must be on ", x.device(), ", got ",
                        residual->device());
      check_same_layout(*residual, x, "residual");
    }
  }
  bool any() const { return relu || residual.has_value(); }
  template <typename T>
  const T* residual_ptr() const { return residual ? residual->const_data_ptr<T>() : nullptr; }
  // The tail on an output written without it (kernels that do not fuse it): two in-place passes.
  void apply_after(at::Tensor& y) const {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // a kernel's own ATen calls
    if (residual) y.add_(*residual);
    if (relu) y.relu_();
  }
};

inline void check_weight(const at::Tensor& w, const at::Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), name, " must have a floating dtype, got ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(w.device() == x.device(), name, " must be on ", x.device(), ", got ", w.device());
  TORCH_CHECK_VALUE(w.sizes() == shape, name, " must have shape ", shape, ", got ", w.sizes());
}

// Channel-attention weights for x (kind mlp: w1 [Cr, C], b1 [Cr]?, w2 [C, Cr], b2 [C]?; kind conv:
// w1 [1, 1, k] with k odd, no others). Returns Cr (mlp) or k (conv).
inline int64_t check_channel_weights(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                     const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                                     Kind kind) {
  const int64_t C = x.size(1);
  if (kind == Kind::MLP) {
    TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(0) >= 1, "w1 must have shape (hidden, ", C,
                      ") with hidden >= 1, got ", w1.sizes());
    const int64_t Cr = w1.size(0);
    check_weight(w1, x, "w1", {Cr, C});
    TORCH_CHECK_VALUE(w2.has_value() && w2->defined(), "w2 must be given for kind='mlp'");
    check_weight(*w2, x, "w2", {C, Cr});
    if (b1.has_value() && b1->defined()) check_weight(*b1, x, "b1", {Cr});
    if (b2.has_value() && b2->defined()) check_weight(*b2, x, "b2", {C});
    return Cr;
  }
  TORCH_CHECK_VALUE(w1.dim() == 3 && w1.size(0) == 1 && w1.size(1) == 1 && w1.size(2) % 2 == 1,
                    "w1 (the 1D conv weight) must have shape (1, 1, k) with k odd, got ", w1.sizes());
  check_weight(w1, x, "w1", w1.sizes());
  TORCH_CHECK_VALUE(!(b1.has_value() && b1->defined()), "b1 must be None for kind='conv'");
  TORCH_CHECK_VALUE(!(w2.has_value() && w2->defined()), "w2 must be None for kind='conv'");
  TORCH_CHECK_VALUE(!(b2.has_value() && b2->defined()), "b2 must be None for kind='conv'");
  return w1.size(2);
}

// Spatial conv weight [1, M, k, k] (M = 2, or 1 for maps 'mix'), k odd, bias [1]?. Returns k.
inline int64_t check_spatial_weights(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                     Maps maps, const char* wname = "weight", const char* bname = "bias") {
  const int64_t M = maps == Maps::MIX ? 1 : 2;
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(0) == 1 && w.size(1) == M && w.size(2) == w.size(3) &&
                        w.size(2) % 2 == 1,
                    wname, " must have shape (1, ", M, ", k, k) with k odd, got ", w.sizes());
  check_weight(w, x, wname, w.sizes());
  if (b.has_value() && b->defined()) check_weight(*b, x, bname, {1});
  return w.size(2);
}

// A tensor saved by the forward (pooled, argmax, smaps, ...): shape, dtype and device as promised.
inline void check_saved(const at::Tensor& t, const at::Tensor& x, const char* name, at::IntArrayRef shape,
                        at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

// Reductions and small math run in this dtype: float64 for float64 x, else float32.
inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The forward ops' prologue (attnfused/ops.py): with in_scale and in_shift ([C], the accumulation
// dtype, contiguous, on x's device; both or neither) the op reads x' = x * in_scale[c] + in_shift[c]
// in x's place, the product then the sum in the accumulation dtype, rounded to x's dtype (as an
// eval-mode BatchNorm's output; reference.functional.prologue).
struct Prologue {
  std::optional<at::Tensor> scale, shift;

  Prologue(const at::Tensor& x, const std::optional<at::Tensor>& scale_, const std::optional<at::Tensor>& shift_)
      : scale(scale_), shift(shift_) {
    TORCH_CHECK_VALUE(scale.has_value() == shift.has_value(), scale ? "in_shift" : "in_scale",
                      " must be given with ", scale ? "in_scale" : "in_shift", " (the input's per-channel affine)");
    if (!scale) return;
    for (const auto& [t, name] : {std::pair{&*scale, "in_scale"}, std::pair{&*shift, "in_shift"}}) {
      check_weight(*t, x, name, {x.size(1)});
      TORCH_CHECK_TYPE(t->scalar_type() == acc_dtype(x), name, " must have dtype ", acc_dtype(x), " for ",
                       x.scalar_type(), " input, got ", t->scalar_type());
      TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
    }
  }
  bool any() const { return scale.has_value(); }
  template <typename T>
  const T* scale_ptr() const { return scale ? scale->const_data_ptr<T>() : nullptr; }
  template <typename T>
  const T* shift_ptr() const { return shift ? shift->const_data_ptr<T>() : nullptr; }
  // x' written into out (shaped and laid out like x): torch's own mul and add, as the autograd
  // formula forms x' again (the CPU kernels' own loop, cpu/batch.h affine_rows, rounds as they do).
  void apply_into(const at::Tensor& x, at::Tensor out) const {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // a kernel's own ATen calls
    const auto C = x.size(1);
    const at::Tensor sc = scale->view({1, C, 1, 1}), sh = shift->view({1, C, 1, 1});
    if (x.scalar_type() == acc_dtype(x)) {
      at::mul_out(out, x, sc).add_(sh);
    } else {
      out.copy_(at::mul(x, sc).add_(sh));  // in the accumulation dtype, rounded once by the copy
    }
  }
  // x' as a tensor of x's shape, dtype and strides (kernels that do not fuse it: one pass), or x.
  at::Tensor applied(const at::Tensor& x) const {
    if (!scale) return x;
    at::Tensor out = at::empty_like(x);
    apply_into(x, out);
    return out;
  }
};

// The small tensors a forward saves for its backward (attnfused/ops.py's contracts): pooled
// [N, 2, C] and smaps [N, 2, H, W] in the accumulation dtype, argmax [N, C] and sargmax [N, H, W] int64.
inline void check_saved_pooling(const at::Tensor& pooled, const at::Tensor& argmax, const at::Tensor& x) {
  check_saved(pooled, x, "pooled", {x.size(0), 2, x.size(1)}, acc_dtype(x));
  check_saved(argmax, x, "argmax", {x.size(0), x.size(1)}, at::kLong);
}
inline void check_saved_maps(const at::Tensor& smaps, const at::Tensor& sargmax, const at::Tensor& x) {
  check_saved(smaps, x, "smaps", {x.size(0), 2, x.size(2), x.size(3)}, acc_dtype(x));
  check_saved(sargmax, x, "sargmax", {x.size(0), x.size(2), x.size(3)}, at::kLong);
}

// spatial_pool_backward's inputs: grad_smaps [N, 2, H, W] floating on x's device, sargmax as saved.
inline void check_spatial_pool_grad(const at::Tensor& grad_smaps, const at::Tensor& sargmax, const at::Tensor& x) {
  check_weight(grad_smaps, x, "grad_smaps", {x.size(0), 2, x.size(2), x.size(3)});
  check_saved(sargmax, x, "sargmax", {x.size(0), x.size(2), x.size(3)}, at::kLong);
}

// A small tensor (a weight, t, grad_smaps) in the accumulation dtype, contiguous; undefined if absent.
inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }
inline at::Tensor to_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() && t->defined() ? to_acc(*t, acc) : at::Tensor();
}

template <typename T>
inline T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Channel-attention weights, checked for x (check_channel_weights) and held in the accumulation
// dtype, contiguous; absent ones undefined. The CPU ops use it as is, the CUDA ops extend it.
struct ChannelWeights {
  at::Tensor w1, b1, w2, b2;
  int64_t C = 0, Cr = 0, k = 0;  // Cr for kind mlp, k for kind conv

  ChannelWeights(const at::Tensor& x, const at::Tensor& w1_, const std::optional<at::Tensor>& b1_,
                 const std::optional<at::Tensor>& w2_, const std::optional<at::Tensor>& b2_, Kind kind)
      : C(x.size(1)) {
    (kind == Kind::MLP ? Cr : k) = check_channel_weights(x, w1_, b1_, w2_, b2_, kind);
    const auto acc = acc_dtype(x);
    w1 = to_acc(w1_, acc), b1 = to_acc(b1_, acc), w2 = to_acc(w2_, acc), b2 = to_acc(b2_, acc);
  }
};

// The spatial conv's weight [1, M, k, k] and bias [1]?, checked for x (check_spatial_weights) and
// held in the accumulation dtype, contiguous; the bias undefined when absent.
struct SpatialConvWeights {
  at::Tensor w, b;
  int64_t M = 0, k = 0;

  SpatialConvWeights(const at::Tensor& x, const at::Tensor& w_, const std::optional<at::Tensor>& b_, Maps maps,
                     const char* wname = "weight", const char* bname = "bias")
      : M(maps == Maps::MIX ? 1 : 2) {
    k = check_spatial_weights(x, w_, b_, maps, wname, bname);
    const auto acc = acc_dtype(x);
    w = to_acc(w_, acc), b = to_acc(b_, acc);
  }
};

// ---------------------------------------------------------------------------- scalar math (float or double)

template <typename T>
AF_HOST_DEVICE T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

template <typename T>
AF_HOST_DEVICE T gate_fwd(T z, Gate g) {
  if (g == Gate::SIGMOID) return sigmoid(z);
  T v = (z + T(3)) / T(6);
  return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
}

// d gate / dz, with torch's conventions at the kinks (hardsigmoid: 1/6 on the open interval (-3, 3)).
template <typename T>
AF_HOST_DEVICE T gate_grad(T z, Gate g) {
  if (g == Gate::SIGMOID) {
    T s = sigmoid(z);
    return s * (T(1) - s);
  }
  return (z > T(-3) && z < T(3)) ? T(1) / T(6) : T(0);
}

template <typename T>
AF_HOST_DEVICE T act_fwd(T z, Act a) {
  if (a == Act::RELU) return z < T(0) ? T(0) : z;  // keeps NaN, like torch.relu
  return z * sigmoid(z);
}

// d act / dz; relu'(0) = 0 as in torch.
template <typename T>
AF_HOST_DEVICE T act_grad(T z, Act a) {
  if (a == Act::RELU) return z > T(0) ? T(1) : T(0);
  T s = sigmoid(z);
  return s * (T(1) + z * (T(1) - s));
}

}  // namespace attnfused

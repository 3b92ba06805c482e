// The new path's channel attention forward (next.cuh): pool over space (rows of NCHW, columns of
// channels_last) -> one gate block per sample -> scale. 2R + 1W, and no per-sample math inside a
// streaming pass. Run when $ATTNFUSED_CUDA_KERNELS=next; $ATTNFUSED_CUDA_DEBUG=1 prints the plan.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "next.cuh"

namespace attnfused {
namespace cuda {
namespace next {

bool enabled() {
  const char* env = std::getenv("ATTNFUSED_CUDA_KERNELS");
  return env && std::strcmp(env, "next") == 0;
}

namespace {

bool debug() {
  const char* env = std::getenv("ATTNFUSED_CUDA_DEBUG");
  return env && std::strcmp(env, "") != 0 && std::strcmp(env, "0") != 0;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename acc_t>
struct Pooling {
  PoolPartials<acc_t> pp{};
  std::string plan;
};

// Pass 1: per-channel partial sums (and maxima) over space.
template <typename T, int V, bool MAXED>
Pooling<at::acc_type<T, true>> pool_space(const at::Tensor& x, Scratch& s) {
  using acc_t = at::acc_type<T, true>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int sms = num_sms();
  auto stream = at::cuda::getCurrentCUDAStream();
  Pooling<acc_t> out;
  auto& pp = out.pp;
  auto alloc = [&](int64_t slots) {
    pp.sum = s.f<acc_t>(slots);
    pp.max = MAXED ? s.f<acc_t>(slots) : nullptr;
    pp.idx = MAXED ? s.i(slots) : nullptr;
  };
  auto launched = [&](const char* name, const auto& pl, int64_t grid) {
    TORCH_CHECK(grid < INT32_MAX, "attnfused: too many blocks for one launch (", grid, ")");
    out.plan = std::string(name) + " VEC=" + std::to_string(V) + " TX=" + std::to_string(pl.TX) +
               " chunks=" + std::to_string(pl.chunks) + " grid=" + std::to_string(grid);
  };
  if (is_channels_last(x)) {
    const ColumnPlan pl(N, C, HW, V, sms);
    alloc(N * pl.chunks * C);
    pp.chunks = pl.chunks;
    pp.n_stride = pl.chunks * C, pp.c_stride = 1, pp.k_stride = C;
    launched("pool_columns", pl, pl.grid);
    _pool_columns<T, V, MAXED><<<static_cast<unsigned>(pl.grid), kThreads, 0, stream>>>(x.data_ptr<T>(), pl, pp);
  } else {
    const RowPlan pl(N, C, HW, V, sms);
    alloc(N * C * pl.chunks);
    pp.chunks = pl.chunks;
    pp.n_stride = C * pl.chunks, pp.c_stride = pl.chunks, pp.k_stride = 1;
    launched("pool_rows", pl, pl.grid);
    _pool_rows<T, V, MAXED><<<static_cast<unsigned>(pl.grid), kThreads, 0, stream>>>(x.data_ptr<T>(), pl, pp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Pass 3: y = x * s[n, c], x read as flat 16-byte vectors (V) in either layout.
template <typename T, int V>
std::string scale(const at::Tensor& x, at::Tensor& y, const at::acc_type<T, true>* s) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), numel = x.numel();
  const bool cl = is_channels_last(x);
  const int64_t nvec = numel / V;
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(cdiv(nvec, kThreads), int64_t(num_sms()) * 32));
  auto stream = at::cuda::getCurrentCUDAStream();
  auto go = [&](auto mode_c, auto index_c) {
    constexpr ScaleRows M = decltype(mode_c)::value;
    using index_t = typename decltype(index_c)::type;
    const index_t inner = static_cast<index_t>(cl ? C : HW);
    _scale<T, V, index_t, M><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        x.data_ptr<T>(), y.data_ptr<T>(), s, static_cast<index_t>(nvec), static_cast<index_t>(N * C), inner,
        Divider<index_t>(inner), Divider<index_t>(static_cast<index_t>(cl ? HW * C : 1)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // 32-bit indices (fast division) while every element index and the grid stride fit
  const bool small = numel + grid * kThreads * V < (int64_t(1) << 32);
  using I32 = Tag<uint32_t>;
  using I64 = Tag<int64_t>;
  using CL = std::integral_constant<ScaleRows, ScaleRows::CL>;
  using WIDE = std::integral_constant<ScaleRows, ScaleRows::WIDE>;
  if (cl)
    small ? go(CL{}, I32{}) : go(CL{}, I64{});
  else
    small ? go(WIDE{}, I32{}) : go(WIDE{}, I64{});
  return std::string(" | scale VEC=") + std::to_string(V) + (small ? " u32" : " i64") + " grid=" + std::to_string(grid);
}

template <typename T, int V>
void channel_forward_vec(const at::Tensor& x, const ChannelWeights& cw, at::Tensor& y, at::Tensor& pooled,
                         at::Tensor& argmax) {
  using acc_t = at::acc_type<T, true>;
  Scratch s(x);
  const auto g = cw.args<acc_t>(s, pooled, argmax, /*backward=*/false);
  const bool maxed = cw.o.pool != Pool::AVG;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto maxed_c) {
    constexpr bool M = decltype(maxed_c)::value;
    auto pooling = pool_space<T, V, M>(x, s);
    _channel_gate<acc_t, M><<<static_cast<unsigned>(x.size(0)), kThreads, 0, stream>>>(pooling.pp, cw.HW, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return pooling.plan;
  };
  std::string plan = maxed ? run(std::true_type{}) : run(std::false_type{});
  plan += scale<T, V>(x, y, g.s);
  if (debug()) std::fprintf(stderr, "attnfused next channel_forward %s: %s\n", c10::str(x.sizes()).c_str(), plan.c_str());
}

}  // namespace

bool channel_forward(const at::Tensor& x, const ChannelWeights& cw, at::Tensor& y, at::Tensor& pooled,
                     at::Tensor& argmax) {
  TORCH_CHECK(x.size(0) > 0, "attnfused: next::channel_forward needs a non-empty batch");
  const bool cl = is_channels_last(x);
  const int64_t elem = x.element_size();
  // every 16-byte vector within one run: a position's C channels (channels_last) or a row's H*W
  const int64_t run = cl ? x.size(1) : x.size(2) * x.size(3);
  if ((run * elem) % 16 != 0 || !aligned16(x.data_ptr()) || !aligned16(y.data_ptr())) return false;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "next::channel_forward", [&] {
    channel_forward_vec<scalar_t, 16 / sizeof(scalar_t)>(x, cw, y, pooled, argmax);
  });
  return true;
}

}  // namespace next
}  // namespace cuda
}  // namespace attnfused

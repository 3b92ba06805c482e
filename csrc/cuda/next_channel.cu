// The new path's channel attention (next.cuh), run when $ATTNFUSED_CUDA_KERNELS=next
// ($ATTNFUSED_CUDA_DEBUG=1 prints each call's plan), the spatial forwards (spatial_pool, and
// spatial attention: max, mean and argmax over channels by the same passes with C and H*W swapped,
// then the conv and gate, then y = x * t), CBAM's forward, and the spatial attention and CBAM
// backwards. No per-sample math inside a streaming pass.
//   forward : pool over space (rows or tiles of NCHW, columns of channels_last) -> pooled vectors
//             -> f over all samples (MLP: two batched products; conv) and the gate -> scale.  2R + 1W
//   backward: sum over space of dy * x (and, tie rule "split", the count of each channel's max)
//             -> the gate and f again, then back through them over all samples -> dx from dy
//             (and x, "split").                                                3R + 1W ("split": 4R + 1W)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

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

// The first scratch block of a call (Scratch): the gate's vectors and a few pooling partials per
// (n, c) fit; a call that needs more takes one more block, twice as large. Without the caching
// allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1, as under compute-sanitizer) each vector is an
// allocation of its own, so that memcheck sees an access past any one of them.
// items: the (n, c) or (n, hw) a call's small vectors hold.
int64_t scratch_block(const at::Tensor& x, int64_t items) {
  const char* uncached = std::getenv("PYTORCH_NO_CUDA_MEMORY_CACHING");
  if (uncached && std::strcmp(uncached, "") != 0 && std::strcmp(uncached, "0") != 0) return 0;
  // (at most a quarter of x's bytes: a call that needs more takes further blocks)
  const int64_t want = 16 * items * int64_t(at::elementSize(acc_dtype(x)));
  return std::min(want, x.numel() * int64_t(x.element_size()) / 4) + (int64_t(64) << 10);
}

template <typename acc_t>
struct Pooling {
  PoolPartials<acc_t> pp{};
  std::string plan;
};

// Partial sums (Job) of x (and maxima), or of dy * x (dy given; and the counts of the maxima mref
// [N, K]), over space per (n, c) (Over::SPACE, K = C), or over channels per (n, hw) (Over::CHANNELS,
// K = H*W). The two are the same kernels with the roles of C and H*W swapped: the summed axis is a
// row of contiguous vectors (space in NCHW, channels in channels_last) or a column of them (space
// in channels_last, channels in NCHW). Short NCHW rows over space go through tiles. w (SCALED_MAX,
// SCALED_DOT): [N, summed length] weights, x * w pooled (CBAM: x * s over channels; the max of
// x * w down columns in 2-byte types by _pool_column_halves). pt (DOT_POS, over space): [N, H*W]
// position terms, x * (dy * t + pc + [c == ai] qc) summed (NCHW: _pool_across, partials per
// (n, c, column block)).
template <typename T, int V, Job J>
Pooling<at::acc_type<T, true>> pool_pass(const at::Tensor& x, Over over, Scratch& s, const at::Tensor& dy = at::Tensor(),
                                         const at::Tensor& mref = at::Tensor(),
                                         const at::acc_type<T, true>* w = nullptr,
                                         const Term<at::acc_type<T, true>, false>* pt = nullptr) {
  using acc_t = at::acc_type<T, true>;
  const bool space = over == Over::SPACE;
  const int64_t N = x.size(0), HWx = x.size(2) * x.size(3);
  const int64_t C = space ? x.size(1) : HWx, HW = space ? HWx : x.size(1);  // outputs, summed length
  const int sms = num_sms();
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* px = x.data_ptr<T>();
  const T* pdy = dotted(J) ? dy.data_ptr<T>() : nullptr;
  const acc_t* pm = counted(J) ? mref.data_ptr<acc_t>() : nullptr;
  Pooling<acc_t> out;
  auto& pp = out.pp;
  auto alloc = [&](int64_t slots) {
    pp.sum = s.f<acc_t>(slots);
    pp.max = maxed(J) ? s.f<acc_t>(slots) : nullptr;
    pp.idx = maxed(J) || counted(J) ? s.i(slots) : nullptr;
  };
  auto launched = [&](const char* name, const auto& pl, int64_t grid) {
    TORCH_CHECK(grid < INT32_MAX, "attnfused: too many blocks for one launch (", grid, ")");
    out.plan = std::string(name) + " VEC=" + std::to_string(V) + " TX=" + std::to_string(pl.TX) +
               " chunks=" + std::to_string(pl.chunks) + " grid=" + std::to_string(grid);
  };
  if (is_channels_last(x) == space) {
    // the weighted max in 2-byte types: two lanes per vector, each holding half its columns
    constexpr bool halves = J == Job::SCALED_MAX && sizeof(T) == 2;
    const ColumnPlan pl(N, C, HW, halves ? V / 2 : V, sms);
    alloc(N * pl.chunks * C);
    pp.chunks = pl.chunks;
    pp.n_stride = pl.chunks * C, pp.c_stride = 1, pp.k_stride = C;
    launched(halves ? "pool_column_halves" : "pool_columns", pl, pl.grid);
    const unsigned grid = static_cast<unsigned>(pl.grid);
    if constexpr (halves) {  // (a row group of a whole warp exchanges over the full warp)
      if (pl.TX == 32)
        _pool_column_halves<T, V, true><<<grid, kThreads, 0, stream>>>(px, w, pl, pp);
      else
        _pool_column_halves<T, V, false><<<grid, kThreads, 0, stream>>>(px, w, pl, pp);
    } else {
      _pool_columns<T, V, J><<<grid, kThreads, 0, stream>>>(px, pdy, pm, w, pt, pl, pp);
    }
  } else if (HW % V != 0) {  // rows of no whole number of vectors: tiles of rows through shared memory
    TORCH_CHECK(space && !scaled(J) && !positioned(J),
                "attnfused: the new kernels pool over channels, and with weights or position terms, only along whole vectors");
    const TilePlan pl(N * C, HW, V, sms);
    alloc(N * C);
    pp.chunks = 1;
    pp.n_stride = C, pp.c_stride = 1, pp.k_stride = 1;  // slot(0, n * C + c, 0) is slot(n, c, 0)
    TORCH_CHECK(pl.grid < INT32_MAX, "attnfused: too many blocks for one launch (", pl.grid, ")");
    out.plan = "pool_tiles VEC=" + std::to_string(V) + " R=" + std::to_string(pl.R) + " P=" + std::to_string(pl.P) +
               " tiles=" + std::to_string(pl.tiles) + " grid=" + std::to_string(pl.grid);
    if constexpr (!scaled(J) && !positioned(J))  // (no tiles compiled for the weighted pools)
      _pool_tiles<T, V, J><<<static_cast<unsigned>(pl.grid), kThreads, 0, stream>>>(px, pdy, pm, pl, pp);
  } else if constexpr (positioned(J)) {  // NCHW rows whose elements each need their position's terms
    const ColumnPlan pl(N, HW, C, V, sms);  // (positions as the columns, channels as the rows)
    alloc(N * C * pl.nbc);
    pp.chunks = pl.nbc;
    pp.n_stride = C * pl.nbc, pp.c_stride = pl.nbc, pp.k_stride = 1;
    launched("pool_across", pl, pl.grid);
    _pool_across<T, V><<<static_cast<unsigned>(pl.grid), kThreads, 0, stream>>>(px, pdy, pt, pl, pp);
  } else {
    const RowPlan pl(N, C, HW, V, sms);
    alloc(N * C * pl.chunks);
    pp.chunks = pl.chunks;
    pp.n_stride = C * pl.chunks, pp.c_stride = pl.chunks, pp.k_stride = 1;
    launched("pool_rows", pl, pl.grid);
    _pool_rows<T, V, J><<<static_cast<unsigned>(pl.grid), kThreads, 0, stream>>>(px, pdy, pm, w, pl, pp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The last pass over flat 16-byte vectors (V) in either layout (next_last.cuh): y = x * s[n, c],
// or, x being dy, dx from the packed terms (DX; DX_SPLIT reads x through ct.x too; DX_T, DX_ST
// from per-position terms, in NCHW by _scale_columns). A forward with a residual (ct.res) takes
// the tail in the same pass.
template <typename T, int V, Last P>
std::string scale(const at::Tensor& x, at::Tensor& y, const ChannelTerms<at::acc_type<T, true>, P>& ct) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), numel = x.numel();
  const bool cl = is_channels_last(x);
  const int64_t nvec = numel / V;  // and numel % V elements after them (NCHW rows of any H*W)
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(cdiv(nvec, kThreads), int64_t(num_sms()) * 32));
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr bool FWD = P == Last::SCALE || P == Last::SCALE_T || P == Last::SCALE_ST;
  auto go = [&](auto mode_c, auto index_c) {
    constexpr ScaleRows M = decltype(mode_c)::value;
    using index_t = typename decltype(index_c)::type;
    const index_t inner = static_cast<index_t>(cl ? C : HW);
    // div_sample: a sample's elements (channels_last), or (NCHW, ROWS) a sample's rows
    const int64_t sample = cl ? HW * C : (P == Last::SCALE_T || P == Last::SCALE_ST ? C : 1);
    auto launch = [&](auto add_c) {
      _scale<T, V, index_t, M, P, decltype(add_c)::value><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
          x.data_ptr<T>(), y.data_ptr<T>(), ct, static_cast<index_t>(nvec), static_cast<index_t>(N * C), inner,
          static_cast<index_t>(HW), Divider<index_t>(inner), Divider<index_t>(static_cast<index_t>(sample)),
          static_cast<int>(numel - nvec * V));
    };
    if constexpr (FWD) {
      ct.res ? launch(std::true_type{}) : launch(std::false_type{});
    } else {
      launch(std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // 32-bit indices while every element index and the grid stride stay within INT32_MAX: the fast
  // division (torch's IntDivider<unsigned>) adds in 32 bits and wraps past about 3e9
  const bool small = numel + grid * kThreads * V <= INT32_MAX;
  using I32 = Tag<uint32_t>;
  using I64 = Tag<int64_t>;
  using CL = std::integral_constant<ScaleRows, ScaleRows::CL>;
  using WIDE = std::integral_constant<ScaleRows, ScaleRows::WIDE>;
  using ROWS = std::integral_constant<ScaleRows, ScaleRows::ROWS>;
  if (cl) {
    small ? go(CL{}, I32{}) : go(CL{}, I64{});
  } else if constexpr (P == Last::SCALE_T || P == Last::SCALE_ST) {  // a map per position: whole rows only
    TORCH_CHECK(HW % V == 0, "attnfused: the new last pass scales by a map only rows of whole vectors");
    small ? go(ROWS{}, I32{}) : go(ROWS{}, I64{});
  } else if constexpr (P == Last::DX_T || P == Last::DX_ST) {  // a position's terms held for R channels
    TORCH_CHECK(HW % V == 0, "attnfused: the new spatial backward's last pass runs rows of whole vectors");
    const ColumnPlan pl(N, HW, C, V, num_sms());  // (positions as the columns, channels as the rows)
    TORCH_CHECK(pl.grid < INT32_MAX, "attnfused: too many blocks for one launch (", pl.grid, ")");
    _scale_columns<T, V, P><<<static_cast<unsigned>(pl.grid), kThreads, 0, stream>>>(x.data_ptr<T>(), y.data_ptr<T>(),
                                                                                     ct, pl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return std::string(P == Last::DX_T ? " | dx_t columns VEC=" : " | dx_st columns VEC=") + std::to_string(V) +
           " TX=" + std::to_string(pl.TX) + " R=" + std::to_string(pl.R) + " grid=" + std::to_string(pl.grid);
  } else {
    small ? go(WIDE{}, I32{}) : go(WIDE{}, I64{});
  }
  const char* what = P == Last::SCALE      ? " | scale VEC="
                     : P == Last::SCALE_T  ? " | scale_t VEC="
                     : P == Last::SCALE_ST ? " | scale_st VEC="
                     : P == Last::DX_T     ? " | dx_t VEC="
                     : P == Last::DX_ST    ? " | dx_st VEC="
                                           : " | dx VEC=";
  return std::string(what) + std::to_string(V) + (ct.res ? " +residual" : "") + (ct.relu ? " +relu" : "") +
         (small ? " u32" : " i64") + " grid=" + std::to_string(grid);
}

// part [S, M, J]: sum_k a[m, k] b[j, k] over all samples, k in S splits (_rows_dot); returns S
template <typename acc_t>
int64_t rows_dot(const acc_t* a, const acc_t* b, acc_t* part, int64_t M, int64_t J, int64_t K) {
  const int64_t S = cdiv(K, kSplitK);
  const int64_t blocks = cdiv(cdiv(M, kRowsPerWarp) * cdiv(J, kRowsPerWarp) * S, kWarps);
  TORCH_CHECK(blocks < INT32_MAX, "attnfused: too many blocks for one launch (", blocks, ")");
  _rows_dot<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a, b, part, M, J, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return S;
}

// A grid of one thread per item (n, c), (n, j), ...
unsigned item_blocks(int64_t items) {
  const int64_t blocks = std::max<int64_t>(1, cdiv(items, kThreads));
  TORCH_CHECK(blocks < INT32_MAX, "attnfused: too many blocks for one launch (", blocks, ")");
  return static_cast<unsigned>(blocks);
}

// f over all samples from its inputs g.vin, then the logits and the gate: the MLP as two products
// (weights read once per 8 samples) with the hidden layer between them; the conv in _channel_logits.
template <typename acc_t>
void gate_forward(const ChannelWeights& cw, const ChannelArgs<acc_t>& g, Scratch& s, int64_t N) {
  const int64_t C = cw.C, rows = N * cw.nv();
  auto stream = at::cuda::getCurrentCUDAStream();
  acc_t* out = nullptr;
  int64_t S = 0;
  if (cw.o.kind == Kind::MLP) {
    acc_t* hpart = s.f<acc_t>(cdiv(C, kSplitK) * rows * cw.Cr);
    const int64_t S1 = rows_dot(static_cast<const acc_t*>(g.vin), g.w1, hpart, rows, cw.Cr, C);
    _hidden_act<acc_t><<<item_blocks(rows * cw.Cr), kThreads, 0, stream>>>(hpart, S1, rows, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out = s.f<acc_t>(cdiv(cw.Cr, kSplitK) * rows * C);
    S = rows_dot(static_cast<const acc_t*>(g.hact), cw.w2.data_ptr<acc_t>(), out, rows, C, cw.Cr);
  }
  _channel_logits<acc_t><<<item_blocks(N * C), kThreads, 0, stream>>>(out, S, N, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The gate again in a backward: f's inputs from the saved pooled vectors, f and the gate -> g.z, g.s.
template <typename acc_t>
void gate_again(const ChannelWeights& cw, const ChannelArgs<acc_t>& g, Scratch& s, int64_t N) {
  _channel_inputs<acc_t><<<item_blocks(N * cw.C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(N, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gate_forward(cw, g, s, N);
}

// Back through the gate and f over all samples (after gate_again), from the partials pp of
// ds = sum over space of (the gate's output gradient) * x (and, SPLIT, the counts cnt they carry):
// dlog, then the MLP as two products (dh = dlog w2, dv = dhp w1) or the conv's weight pieces, then
// the dx pass's per-channel terms [N, C] (carved from s).
template <typename acc_t, bool SPLIT>
const Term<acc_t, SPLIT>* gate_backward(const ChannelWeights& cw, const ChannelArgs<acc_t>& g, Scratch& s,
                                        const PoolPartials<acc_t>& pp, int* cnt, int64_t N) {
  const int64_t C = cw.C, rows = N * cw.nv();
  auto stream = at::cuda::getCurrentCUDAStream();
  _channel_dlog<acc_t><<<item_blocks(N * C), kThreads, 0, stream>>>(pp, N, g, cnt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  acc_t* dvpart = nullptr;
  int64_t S = 0;
  if (cw.o.kind == Kind::MLP) {
    acc_t* dhpart = s.f<acc_t>(cdiv(C, kSplitK) * N * cw.Cr);
    const int64_t S1 = rows_dot(static_cast<const acc_t*>(g.dlog), g.w2t, dhpart, N, cw.Cr, C);
    _hidden_grad<acc_t><<<item_blocks(N * cw.Cr), kThreads, 0, stream>>>(dhpart, S1, N, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // [C, Cr]: rows of the product's second operand (freed on return: the caching allocator keeps
    // it from reuse until this stream's kernels are past it)
    const at::Tensor w1t = cw.w1.t().contiguous();
    dvpart = s.f<acc_t>(cdiv(cw.Cr, kSplitK) * rows * C);
    S = rows_dot(static_cast<const acc_t*>(g.dhp), w1t.data_ptr<acc_t>(), dvpart, rows, C, cw.Cr);
  } else {
    _conv_dweight<acc_t><<<item_blocks(N * cw.k * 32), kThreads, 0, stream>>>(N, g);  // a warp per (n, j)
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  using Terms = Term<acc_t, SPLIT>;
  auto* terms = static_cast<Terms*>(s.carve(N * C * int64_t(sizeof(Terms))));
  _channel_terms<acc_t, SPLIT><<<item_blocks(N * C), kThreads, 0, stream>>>(dvpart, S, N, g, cnt, terms);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return terms;
}

// The spatial conv and gate over the whole batch (_spatial_gate: tiles of rows, the maps' rows and
// halo staged in shared memory where they fit); DLOG (a backward): also dlog from the dot pass's
// partials pp.
template <typename acc_t, bool DLOG>
void conv_gate(const SpatialArgs<acc_t>& g, int64_t N, const PoolPartials<acc_t>& pp = PoolPartials<acc_t>{}) {
  const ConvTiles pl(N, g.H, g.W, g.k);
  if (pl.grid == 0) return;
  TORCH_CHECK(pl.grid < INT32_MAX, "attnfused: too many blocks for one launch (", pl.grid, ")");
  const size_t bytes = tile_stage_bytes<acc_t, 2>(pl);
  _spatial_gate<acc_t, DLOG><<<static_cast<unsigned>(pl.grid), kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
      g, pl, bytes > 0, pp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The spatial half's backward over all samples, from the partials pp of ds = sum over channels of
// dy * (the half's input): dlog (the gate again from the saved maps), the per-position terms
// [N, H*W] of the dx pass (carved from s) and the conv's per-sample weight gradients (g.dwp).
template <typename acc_t>
const Term<acc_t, false>* spatial_gate_backward(const SpatialArgs<acc_t>& g, const PoolPartials<acc_t>& pp,
                                                Scratch& s, int64_t N) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t items = N * g.HW;
  conv_gate<acc_t, true>(g, N, pp);
  auto* terms = static_cast<Term<acc_t, false>*>(s.carve(items * int64_t(sizeof(Term<acc_t, false>))));
  const ConvTiles pl(N, g.H, g.W, g.k);  // (the same tiles, over dlog's rows and halo)
  if (pl.grid > 0) {
    const size_t bytes = tile_stage_bytes<acc_t, 1>(pl);
    _spatial_terms<acc_t><<<static_cast<unsigned>(pl.grid), kThreads, bytes, stream>>>(g, pl, bytes > 0, terms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // a warp per (n, o)
  _spatial_dweight<acc_t><<<item_blocks(N * (g.M * g.k * g.k + 1) * 32), kThreads, 0, stream>>>(N, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return terms;
}

// A forward's channel half: one pass over x pooling over space (streams x), the pooled vectors and
// f's inputs, then f and the gate over all samples -> g.s [N, C]. Returns the pass's plan.
template <typename T, int V>
std::string channel_half(const at::Tensor& x, const ChannelWeights& cw, const ChannelArgs<at::acc_type<T, true>>& g,
                         Scratch& s) {
  using acc_t = at::acc_type<T, true>;
  const int64_t N = x.size(0);
  auto pool = [&](auto maxed_c) {
    constexpr bool M = decltype(maxed_c)::value;
    auto pooling = pool_pass<T, V, M ? Job::SUM_MAX : Job::SUM>(x, Over::SPACE, s);
    _channel_pooled<acc_t, M><<<item_blocks(N * cw.C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        pooling.pp, N, cw.HW, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return pooling.plan;
  };
  std::string plan = cw.o.pool != Pool::AVG ? pool(std::true_type{}) : pool(std::false_type{});
  gate_forward(cw, g, s, N);
  return plan;
}

// A forward's last-pass terms with the op's tail: the residual and the relu where there is a
// residual; a relu alone runs after the pass (finish_tail).
template <typename acc_t, Last P>
ChannelTerms<acc_t, P> with_tail(ChannelTerms<acc_t, P> ct, const Tail& tail) {
  if (tail.residual) ct.res = tail.residual->data_ptr(), ct.relu = tail.relu;
  return ct;
}
void finish_tail(const Tail& tail, at::Tensor& y) {
  if (!tail.residual && tail.relu) y.relu_();
}

template <typename T, int V>
void channel_forward_vec(const at::Tensor& x, const ChannelWeights& cw, const Tail& tail, at::Tensor& y,
                         at::Tensor& pooled, at::Tensor& argmax, at::Tensor& hidden) {
  using acc_t = at::acc_type<T, true>;
  Scratch s(x, scratch_block(x, x.size(0) * cw.nv() * cw.C));
  const auto g = cw.args<acc_t>(s, pooled, argmax, /*backward=*/false, hidden);
  // pass 1 (streams x), then the gate
  std::string plan = channel_half<T, V>(x, cw, g, s);
  // pass 2 (streams x and the residual, writes y)
  plan += scale<T, V>(x, y, with_tail(ChannelTerms<acc_t, Last::SCALE>{g.s, nullptr, nullptr}, tail));
  if (debug()) std::fprintf(stderr, "attnfused next channel_forward %s: %s\n", c10::str(x.sizes()).c_str(), plan.c_str());
}

// SPLIT: the tie rule "split" (the max's gradient shared by every element equal to it).
template <typename T, int V, bool SPLIT>
void channel_backward_vec(const at::Tensor& dy, const at::Tensor& x, const ChannelWeights& cw,
                          const at::Tensor& pooled, const at::Tensor& argmax, at::Tensor& dx, WeightGrads& gw) {
  using acc_t = at::acc_type<T, true>;
  constexpr Last P = SPLIT ? Last::DX_SPLIT : Last::DX;
  Scratch s(x, scratch_block(x, x.size(0) * cw.nv() * cw.C));
  const auto g = cw.args<acc_t>(s, pooled, argmax, /*backward=*/true);
  const int64_t N = x.size(0), C = cw.C;
  // pass 1 (streams x and dy): sum over space of dy * x (and, SPLIT, the count of each channel's max)
  const at::Tensor mref = SPLIT ? pooled.select(1, 1).contiguous() : at::Tensor();
  const auto dot = pool_pass<T, V, SPLIT ? Job::DOT_COUNT : Job::DOT>(x, Over::SPACE, s, dy, mref);
  int* cnt = SPLIT ? s.i(N * C) : nullptr;
  std::string plan = dot.plan;
  gate_again(cw, g, s, N);
  const auto* terms = gate_backward<acc_t, SPLIT>(cw, g, s, dot.pp, cnt, N);
  // pass 2 (streams dy, and x for SPLIT; writes dx)
  plan += scale<T, V, P>(dy, dx, ChannelTerms<acc_t, P>{nullptr, terms, x.data_ptr()});
  gw.g = cw.grads<acc_t>(g, gw.w1, gw.b1, gw.w2, gw.b2);
  if (debug()) std::fprintf(stderr, "attnfused next channel_backward %s: %s\n", c10::str(x.sizes()).c_str(), plan.c_str());
}

// Whether the new kernels cover x (and the tensors streamed with it), pooling over `over`: see next.cuh.
bool covers(const at::Tensor& x, const std::vector<const at::Tensor*>& streamed, Over over = Over::SPACE) {
  const bool cl = is_channels_last(x);
  const int64_t V = 16 / x.element_size(), C = x.size(1), HW = x.size(2) * x.size(3);
  // channels_last: every vector within a position's C channels; NCHW: a row's H*W as whole
  // vectors, or (over space) short rows in tiles, with no vector meeting more than two rows (the
  // last pass)
  const bool fits = cl ? C % V == 0
                       : HW % V == 0 || (over == Over::SPACE && HW >= V && TilePlan::covers(HW, static_cast<int>(V)));
  // rows and row groups past the end index up to H*W + 16384 in 32-bit ints
  if (!fits || x.size(0) == 0 || x.numel() < V || HW > INT32_MAX - (int64_t(1) << 15)) return false;
  for (const at::Tensor* t : streamed)
    if (!aligned16(t->data_ptr())) return false;
  return true;
}

// What a forward's last pass streams: x, y and the tail's residual.
std::vector<const at::Tensor*> streamed(const at::Tensor& x, const at::Tensor& y, const Tail& tail) {
  std::vector<const at::Tensor*> out{&x, &y};
  if (tail.residual) out.push_back(&*tail.residual);
  return out;
}
template <typename T, int V>
void spatial_pool_vec(const at::Tensor& x, at::Tensor& smaps, at::Tensor& sargmax) {
  using acc_t = at::acc_type<T, true>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  Scratch s(x, scratch_block(x, N * HW));
  // one pass over x: per (n, hw) partial sums, maxima and argmaxes over channels; then the maps
  const auto pooling = pool_pass<T, V, Job::SUM_MAX>(x, Over::CHANNELS, s);
  _spatial_maps<acc_t><<<item_blocks(N * HW), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      pooling.pp, N, HW, C, smaps.data_ptr<acc_t>(), sargmax.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (debug()) std::fprintf(stderr, "attnfused next spatial_pool %s: %s\n", c10::str(x.sizes()).c_str(), pooling.plan.c_str());
}
// Spatial attention's forward: the pool over channels, the conv and gate over the whole batch, and
// y = x * t[n, hw].
template <typename T, int V>
void spatial_forward_vec(const at::Tensor& x, const SpatialWeights& sw, const Tail& tail, at::Tensor& y,
                         at::Tensor& smaps, at::Tensor& sargmax) {
  using acc_t = at::acc_type<T, true>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  Scratch s(x, scratch_block(x, N * HW));
  const auto g = sw.args<acc_t>(s, smaps, sargmax, /*backward=*/false);
  auto stream = at::cuda::getCurrentCUDAStream();
  // pass 1 (streams x): partials over channels -> maps; then the conv and the gate -> t
  const auto pooling = pool_pass<T, V, Job::SUM_MAX>(x, Over::CHANNELS, s);
  _spatial_maps<acc_t><<<item_blocks(N * HW), kThreads, 0, stream>>>(pooling.pp, N, HW, C, g.smaps, g.sargmax);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  conv_gate<acc_t, false>(g, N);
  // pass 2 (streams x, writes y)
  const std::string plan = pooling.plan + scale<T, V, Last::SCALE_T>(
                                             x, y, with_tail(ChannelTerms<acc_t, Last::SCALE_T>{nullptr, nullptr, nullptr, g.t}, tail));
  if (debug()) std::fprintf(stderr, "attnfused next spatial_forward %s: %s\n", c10::str(x.sizes()).c_str(), plan.c_str());
}
// CBAM's forward: the channel half (pass 1), x1 = x * s pooled over channels without storing it
// (pass 2), the conv and gate, then y = x * s * t (pass 3).                          3R + 1W
template <typename T, int V>
void cbam_forward_vec(const at::Tensor& x, const ChannelWeights& cw, const SpatialWeights& sw, const Tail& tail,
                      at::Tensor& y, at::Tensor& pooled, at::Tensor& argmax, at::Tensor& smaps, at::Tensor& sargmax,
                      at::Tensor& hidden) {
  using acc_t = at::acc_type<T, true>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  Scratch s(x, scratch_block(x, N * (cw.nv() * C + HW)));
  const auto g = cw.args<acc_t>(s, pooled, argmax, /*backward=*/false, hidden);
  const auto sp = sw.args<acc_t>(s, smaps, sargmax, /*backward=*/false);
  auto stream = at::cuda::getCurrentCUDAStream();
  std::string plan = channel_half<T, V>(x, cw, g, s);
  const auto pooling = pool_pass<T, V, Job::SCALED_MAX>(x, Over::CHANNELS, s, at::Tensor(), at::Tensor(), g.s);
  _spatial_maps<acc_t><<<item_blocks(N * HW), kThreads, 0, stream>>>(pooling.pp, N, HW, C, sp.smaps, sp.sargmax);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  conv_gate<acc_t, false>(sp, N);
  plan += " | " + pooling.plan +
          scale<T, V, Last::SCALE_ST>(x, y, with_tail(ChannelTerms<acc_t, Last::SCALE_ST>{g.s, nullptr, nullptr, sp.t}, tail));
  if (debug()) std::fprintf(stderr, "attnfused next cbam_forward %s: %s\n", c10::str(x.sizes()).c_str(), plan.c_str());
}

// Spatial attention's backward (tie rule "first"): sum_c dy * x (pass 1), the gate again and back
// through it and the conv, then dx = dy * t + pc + [c == sargmax] qc (pass 2).
template <typename T, int V>
void spatial_backward_vec(const at::Tensor& dy, const at::Tensor& x, const SpatialWeights& sw, const at::Tensor& smaps,
                          const at::Tensor& sargmax, at::Tensor& dx, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, std::vector<at::Tensor>& gw) {
  using acc_t = at::acc_type<T, true>;
  const int64_t N = x.size(0), HW = x.size(2) * x.size(3);
  Scratch s(x, scratch_block(x, N * HW));
  const auto g = sw.args<acc_t>(s, smaps, sargmax, /*backward=*/true);
  // pass 1 (streams dy and x): per (n, hw) partial sums over channels of dy * x
  const auto dot = pool_pass<T, V, Job::DOT>(x, Over::CHANNELS, s, dy);
  const auto* pt = spatial_gate_backward(g, dot.pp, s, N);
  // pass 2 (streams dy, writes dx)
  ChannelTerms<acc_t, Last::DX_T> ct{};
  ct.pt = pt;
  const std::string plan = dot.plan + scale<T, V, Last::DX_T>(dy, dx, ct);
  gw = sw.grads<acc_t>(g, weight, bias);
  if (debug()) std::fprintf(stderr, "attnfused next spatial_backward %s: %s\n", c10::str(x.sizes()).c_str(), plan.c_str());
}

// CBAM's backward (tie rule "first"), x1 = x * s never stored:
//   the channel gate again (s); pass 1 (dy, x): sum_c dy * x1 per position -> the spatial half's
//   backward: its per-position terms and weight gradients; pass 2 (dy, x): sum_hw dx1 * x per
//   channel, dx1 = dy * t + pc + [c == sargmax] qc -> the channel half's backward; pass 3 (dy):
//   dx = dx1 * s + ph + [hw == argmax] qh.                                             5R + 1W
template <typename T, int V>
void cbam_backward_vec(const at::Tensor& dy, const at::Tensor& x, const ChannelWeights& cw, const SpatialWeights& sw,
                       const at::Tensor& pooled, const at::Tensor& argmax, const at::Tensor& smaps,
                       const at::Tensor& sargmax, at::Tensor& dx, WeightGrads& gc, const at::Tensor& sweight,
                       const c10::optional<at::Tensor>& sbias, std::vector<at::Tensor>& gs) {
  using acc_t = at::acc_type<T, true>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  Scratch s(x, scratch_block(x, N * (cw.nv() * C + HW)));
  const auto g = cw.args<acc_t>(s, pooled, argmax, /*backward=*/true);
  const auto sp = sw.args<acc_t>(s, smaps, sargmax, /*backward=*/true);
  gate_again(cw, g, s, N);
  // pass 1 (streams dy and x): per (n, hw) partial sums over channels of dy * (x * s)
  const auto dot1 = pool_pass<T, V, Job::SCALED_DOT>(x, Over::CHANNELS, s, dy, at::Tensor(), g.s);
  const auto* pt = spatial_gate_backward(sp, dot1.pp, s, N);
  // pass 2 (streams dy and x): per (n, c) partial sums over space of dx1 * x
  const auto dot2 = pool_pass<T, V, Job::DOT_POS>(x, Over::SPACE, s, dy, at::Tensor(), nullptr, pt);
  const auto* terms = gate_backward<acc_t, false>(cw, g, s, dot2.pp, nullptr, N);
  // pass 3 (streams dy, writes dx)
  ChannelTerms<acc_t, Last::DX_ST> ct{};
  ct.t = terms, ct.pt = pt;
  const std::string plan = dot1.plan + " | " + dot2.plan + scale<T, V, Last::DX_ST>(dy, dx, ct);
  gc.g = cw.grads<acc_t>(g, gc.w1, gc.b1, gc.w2, gc.b2);
  gs = sw.grads<acc_t>(sp, sweight, sbias);
  if (debug()) std::fprintf(stderr, "attnfused next cbam_backward %s: %s\n", c10::str(x.sizes()).c_str(), plan.c_str());
}
}  // namespace

bool spatial_backward(const at::Tensor& dy, const at::Tensor& x, const SpatialWeights& sw, const at::Tensor& smaps,
                      const at::Tensor& sargmax, at::Tensor& dx, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, std::vector<at::Tensor>& gw) {
  if (!covers(x, {&x, &dy, &dx}, Over::CHANNELS)) return false;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "next::spatial_backward", [&] {
    spatial_backward_vec<scalar_t, 16 / sizeof(scalar_t)>(dy, x, sw, smaps, sargmax, dx, weight, bias, gw);
  });
  return true;
}

bool cbam_backward(const at::Tensor& dy, const at::Tensor& x, const ChannelWeights& cw, const SpatialWeights& sw,
                   const at::Tensor& pooled, const at::Tensor& argmax, const at::Tensor& smaps,
                   const at::Tensor& sargmax, at::Tensor& dx, WeightGrads& gc, const at::Tensor& sweight,
                   const c10::optional<at::Tensor>& sbias, std::vector<at::Tensor>& gs) {
  if (!covers(x, {&x, &dy, &dx}, Over::CHANNELS)) return false;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "next::cbam_backward", [&] {
    cbam_backward_vec<scalar_t, 16 / sizeof(scalar_t)>(dy, x, cw, sw, pooled, argmax, smaps, sargmax, dx, gc, sweight,
                                                       sbias, gs);
  });
  return true;
}

bool cbam_forward(const at::Tensor& x, const ChannelWeights& cw, const SpatialWeights& sw, const Tail& tail,
                  at::Tensor& y, at::Tensor& pooled, at::Tensor& argmax, at::Tensor& smaps, at::Tensor& sargmax,
                  at::Tensor& hidden) {
  if (!covers(x, streamed(x, y, tail), Over::CHANNELS)) return false;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "next::cbam_forward", [&] {
    cbam_forward_vec<scalar_t, 16 / sizeof(scalar_t)>(x, cw, sw, tail, y, pooled, argmax, smaps, sargmax, hidden);
  });
  finish_tail(tail, y);
  return true;
}

bool spatial_forward(const at::Tensor& x, const SpatialWeights& sw, const Tail& tail, at::Tensor& y,
                     at::Tensor& smaps, at::Tensor& sargmax) {
  if (!covers(x, streamed(x, y, tail), Over::CHANNELS)) return false;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "next::spatial_forward", [&] {
    spatial_forward_vec<scalar_t, 16 / sizeof(scalar_t)>(x, sw, tail, y, smaps, sargmax);
  });
  finish_tail(tail, y);
  return true;
}

bool spatial_scale(const at::Tensor& x, const at::Tensor& t, const Tail& tail, at::Tensor& y) {
  if (!covers(x, streamed(x, y, tail), Over::CHANNELS)) return false;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "next::spatial_scale", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const ChannelTerms<acc_t, Last::SCALE_T> ct{nullptr, nullptr, nullptr, t.data_ptr<acc_t>()};
    const std::string plan = scale<scalar_t, 16 / sizeof(scalar_t), Last::SCALE_T>(x, y, with_tail(ct, tail));
    if (debug()) std::fprintf(stderr, "attnfused next spatial_scale %s:%s\n", c10::str(x.sizes()).c_str(), plan.c_str());
  });
  finish_tail(tail, y);
  return true;
}

bool spatial_scale_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& t, at::Tensor& dx,
                            at::Tensor& dt) {
  if (!covers(x, {&x, &dy, &dx}, Over::CHANNELS)) return false;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "next::spatial_scale_backward", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    constexpr int V = 16 / sizeof(scalar_t);
    const int64_t N = x.size(0), HW = x.size(2) * x.size(3);
    Scratch s(x, scratch_block(x, N * HW));
    // pass 1 (streams dy and x): sum_c dy * x per (n, hw), in partials, then summed in order
    const auto dot = pool_pass<scalar_t, V, Job::DOT>(x, Over::CHANNELS, s, dy);
    _spatial_dot<acc_t><<<item_blocks(N * HW), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        dot.pp, N, HW, dt.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // pass 2 (streams dy, writes dx)
    const ChannelTerms<acc_t, Last::SCALE_T> ct{nullptr, nullptr, nullptr, t.data_ptr<acc_t>()};
    const std::string plan = dot.plan + scale<scalar_t, V, Last::SCALE_T>(dy, dx, ct);
    if (debug())
      std::fprintf(stderr, "attnfused next spatial_scale_backward %s: %s\n", c10::str(x.sizes()).c_str(), plan.c_str());
  });
  return true;
}

bool spatial_pool(const at::Tensor& x, at::Tensor& smaps, at::Tensor& sargmax) {
  if (!covers(x, {&x}, Over::CHANNELS)) return false;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "next::spatial_pool", [&] {
    spatial_pool_vec<scalar_t, 16 / sizeof(scalar_t)>(x, smaps, sargmax);
  });
  return true;
}

bool channel_forward(const at::Tensor& x, const ChannelWeights& cw, const Tail& tail, at::Tensor& y,
                     at::Tensor& pooled, at::Tensor& argmax, at::Tensor& hidden) {
  if (!covers(x, streamed(x, y, tail))) return false;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "next::channel_forward", [&] {
    channel_forward_vec<scalar_t, 16 / sizeof(scalar_t)>(x, cw, tail, y, pooled, argmax, hidden);
  });
  finish_tail(tail, y);
  return true;
}

bool channel_backward(const at::Tensor& dy, const at::Tensor& x, const ChannelWeights& cw, const at::Tensor& pooled,
                      const at::Tensor& argmax, bool split, at::Tensor& dx, WeightGrads& gw) {
  if (!covers(x, {&x, &dy, &dx})) return false;
  AF_DISPATCH_CUDA_TYPES(x.scalar_type(), "next::channel_backward", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    split ? channel_backward_vec<scalar_t, V, true>(dy, x, cw, pooled, argmax, dx, gw)
          : channel_backward_vec<scalar_t, V, false>(dy, x, cw, pooled, argmax, dx, gw);
  });
  return true;
}

}  // namespace next
}  // namespace cuda
}  // namespace attnfused

// The new path's last pass (next.cuh): the forward's scale and the backward's dx, over flat
// 16-byte vectors in either layout.
#pragma once

#include "next_gate.cuh"

namespace attnfused {
namespace cuda {
namespace next {

// ---------------------------------------------------------------------------- the last pass
// Forward: y = x * s[n, c] (SCALE), y = x * t[n, hw] (SCALE_T, spatial attention), or
// y = x * (s[n, c] * t[n, hw]) (SCALE_ST, CBAM). Backward (reading dy in x's place):
// dx = dy * s + ph + [hw == argmax] qh (DX, tie rule "first"), or dx = dy * s + ph + (qh / count) *
// [x == max] (DX_SPLIT: x streamed too); spatial attention's dx = dy * t + pc + [c == sargmax] qc
// (DX_T), CBAM's dx = (dy * t + pc + [c == sargmax] qc) * s + ph + [hw == argmax] qh (DX_ST; in
// NCHW both run as _scale_columns). A forward with ADD then takes the block's tail in the same
// pass: y + residual (streamed beside x), relu if ct.relu (a select: no branch).
enum class Last { SCALE, DX, DX_SPLIT, SCALE_T, SCALE_ST, DX_T, DX_ST };

// How a flat vector of x finds its channels' values.
enum class ScaleRows {
  CL,    // channels_last: the VEC channels c0.. of one position (C % VEC == 0): one vector of each
  WIDE,  // NCHW, HW >= VEC: a vector meets at most two (n, c) rows, split at HW - r0; the elements
         // past the last whole vector (tail < VEC) by block 0
  ROWS   // NCHW, HW % VEC == 0: a vector within one row, its positions one vector of t (SCALE_T, SCALE_ST)
};

// The per-channel values of the last pass, [N, C]: the gate (SCALE, SCALE_ST), or the terms; and
// (SCALE_T, SCALE_ST) the per-position values t [N, HW], or (DX_T, DX_ST) the per-position terms;
// and a forward's tail.
template <typename acc_t, Last P>
struct ChannelTerms {
  const acc_t* s;
  const Term<acc_t, P == Last::DX_SPLIT>* t;
  const void* x;      // DX_SPLIT: x (of the stream's dtype, laid out as it)
  const acc_t* pos;   // SCALE_T, SCALE_ST: t [N, HW]
  const void* res;    // the forward's tail (ADD): the residual, laid out as y; null: none
  bool relu;          // with ADD: relu after the add
  const Term<acc_t, false>* pt;  // DX_T, DX_ST: [N, HW] Term{t, pc, qc, sargmax} per position
};

// The tail's relu: NaN stays NaN (as torch.relu)
template <typename acc_t>
__device__ __forceinline__ acc_t relu_if(acc_t v, bool relu) {
  return relu && v < acc_t(0) ? acc_t(0) : v;
}

// the max's share of element k (hw, value e) of a channel with terms t
template <typename acc_t, typename index_t>
__device__ __forceinline__ acc_t max_share(const Term<acc_t, false>& t, index_t hw, acc_t) {
  return static_cast<index_t>(t.ai) == hw ? t.qh : acc_t(0);
}
template <typename acc_t, typename index_t>
__device__ __forceinline__ acc_t max_share(const Term<acc_t, true>& t, index_t, acc_t e) {
  return t.q * acc_t(e == t.mx);  // a product, as amax's backward: a NaN q (count 0) reaches every element
}

template <typename T, int VEC, typename index_t, ScaleRows MODE, Last P, bool ADD>
__global__ void __launch_bounds__(kThreads)
    _scale(const T* __restrict__ x, T* __restrict__ y, ChannelTerms<at::acc_type<T, true>, P> ct, index_t nvec,
           index_t rows, index_t inner, index_t HW, Divider<index_t> div_row, Divider<index_t> div_sample, int tail) {
  using acc_t = at::acc_type<T, true>;
  constexpr bool PT = P == Last::DX_T || P == Last::DX_ST;  // the spatial half's backward
  constexpr bool BWD = P == Last::DX || P == Last::DX_SPLIT || PT, SPLIT = P == Last::DX_SPLIT;
  constexpr bool POS = P == Last::SCALE_T || P == Last::SCALE_ST, CHS = P == Last::SCALE || P == Last::SCALE_ST;
  static_assert(!(ADD && BWD), "the tail is a forward's");
  static_assert(!PT || MODE == ScaleRows::CL, "the spatial half's dx in NCHW: _scale_columns");
  const T* __restrict__ xs = static_cast<const T*>(ct.x);
  const T* __restrict__ rs = static_cast<const T*>(ct.res);
  for (index_t i = blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x; i < nvec;
       i += static_cast<index_t>(gridDim.x) * kThreads) {  // marker: hot loop (scale)
    const index_t e = i * VEC;
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + e);
    Vec<T, VEC> xe;  // SPLIT: x, compared with the max; ADD: the residual
    if constexpr (SPLIT) xe = load_vec<T, VEC>(xs + e);
    if constexpr (ADD) xe = load_vec<T, VEC>(rs + e);
    acc_t sv[VEC], add[VEC];
    if constexpr (PT) {  // CL; inner, div_row: C; div_sample: HW * C. One position's terms, VEC channels
      index_t q, c0;
      div_row.divmod(e, q, c0);
      const auto pt = ct.pt[q];
      if constexpr (P == Last::DX_ST) {  // dx1 = dy * t + pc + [c == sargmax] qc, then through s
        index_t n, r;
        div_sample.divmod(e, n, r);
        const index_t at = n * inner + c0, hw = q - n * HW;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const auto ch = ct.t[at + k];
          sv[k] = pt.s * ch.s;
          add[k] = (pt.ph + max_share<acc_t, index_t>(pt, c0 + k, acc_t(0))) * ch.s + ch.ph +
                   max_share<acc_t, index_t>(ch, hw, acc_t(0));
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) sv[k] = pt.s, add[k] = pt.ph + max_share<acc_t, index_t>(pt, c0 + k, acc_t(0));
      }
    } else if constexpr (MODE == ScaleRows::CL && POS) {  // inner, div_row: C; q = n * HW + hw, t's index
      index_t q, c0;
      div_row.divmod(e, q, c0);
      const acc_t tv = ct.pos[q];  // one position's VEC channels
      if constexpr (CHS) {  // div_sample: HW * C
        index_t n, r;
        div_sample.divmod(e, n, r);
        const Vec<acc_t, VEC> v = *reinterpret_cast<const Vec<acc_t, VEC>*>(ct.s + n * inner + c0);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sv[k] = v.v[k] * tv, add[k] = acc_t(0);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) sv[k] = tv, add[k] = acc_t(0);
      }
    } else if constexpr (MODE == ScaleRows::CL) {  // inner, div_row: C; div_sample: HW * C
      index_t q, c0, n, r;
      div_row.divmod(e, q, c0);
      div_sample.divmod(e, n, r);
      const index_t at = n * inner + c0;
      if constexpr (BWD) {
        const index_t hw = q - n * HW;  // q = n * HW + hw
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const auto t = ct.t[at + k];
          sv[k] = t.s;
          add[k] = t.ph + max_share<acc_t, index_t>(t, hw, SPLIT ? static_cast<acc_t>(xe.v[k]) : acc_t(0));
        }
      } else {
        const Vec<acc_t, VEC> v = *reinterpret_cast<const Vec<acc_t, VEC>*>(ct.s + at);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sv[k] = v.v[k], add[k] = acc_t(0);
      }
    } else if constexpr (MODE == ScaleRows::ROWS) {  // inner, div_row: HW; div_sample: C
      static_assert(POS && !BWD, "ROWS: the forwards with a per-position map");
      index_t row, r0, n, c;
      div_row.divmod(e, row, r0);
      div_sample.divmod(row, n, c);
      const acc_t sr = CHS ? ct.s[row] : acc_t(1);
      const Vec<acc_t, VEC> tv = *reinterpret_cast<const Vec<acc_t, VEC>*>(ct.pos + n * HW + r0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sv[k] = sr * tv.v[k], add[k] = acc_t(0);
    } else {  // WIDE; inner, div_row: HW
      static_assert(!POS, "WIDE: the passes with per-channel values only (a map per position: ROWS)");
      index_t row, r0;
      div_row.divmod(e, row, r0);
      const index_t nxt = row + 1 < rows ? row + 1 : row;
      const index_t split = inner - r0;  // elements left in the first row
      if constexpr (BWD) {
        const auto a = ct.t[row], b = ct.t[nxt];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const bool first = static_cast<index_t>(k) < split;
          const index_t hw = first ? r0 + k : k - split;
          const acc_t ev = SPLIT ? static_cast<acc_t>(xe.v[k]) : acc_t(0);
          sv[k] = first ? a.s : b.s;
          add[k] = first ? a.ph + max_share<acc_t, index_t>(a, hw, ev) : b.ph + max_share<acc_t, index_t>(b, hw, ev);
        }
      } else {
        const acc_t sa = ct.s[row], sb = ct.s[nxt];
#pragma unroll
        for (int k = 0; k < VEC; ++k) sv[k] = static_cast<index_t>(k) < split ? sa : sb, add[k] = acc_t(0);
      }
    }
    Vec<T, VEC> yv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t o = static_cast<acc_t>(xv.v[k]) * sv[k] + add[k];
      if constexpr (ADD) o = relu_if(o + static_cast<acc_t>(xe.v[k]), ct.relu);
      yv.v[k] = static_cast<T>(o);
    }
    *reinterpret_cast<Vec<T, VEC>*>(y + e) = yv;
  }
  if constexpr (!PT) {  // (PT runs in channels_last only, whose tail is 0)
    if (blockIdx.x == 0 && threadIdx.x < tail) {  // WIDE: x's last elements, past its last whole vector
      const index_t e = nvec * VEC + threadIdx.x;
      index_t row, hw;
      div_row.divmod(e, row, hw);
      acc_t out;
      if constexpr (POS) {  // (CL and ROWS, the modes with a map, have no tail: tail is 0)
        index_t n, c;
        div_sample.divmod(row, n, c);
        out = static_cast<acc_t>(x[e]) * ((CHS ? ct.s[row] : acc_t(1)) * ct.pos[n * HW + hw]);
      } else if constexpr (BWD) {
        const auto t = ct.t[row];
        out = static_cast<acc_t>(x[e]) * t.s + t.ph +
              max_share<acc_t, index_t>(t, hw, SPLIT ? static_cast<acc_t>(xs[e]) : acc_t(0));
      } else {
        out = static_cast<acc_t>(x[e]) * ct.s[row];
      }
      if constexpr (ADD) out = relu_if(out + static_cast<acc_t>(rs[e]), ct.relu);
      y[e] = static_cast<T>(out);
    }
  }
}

// The spatial half's dx from its per-position terms pt and (DX_ST) the channel's Term ch, each
// element as _scale's channels_last branch computes it; SHARE: with the position's max share
// ([c == sargmax] qc; without it, pt.qh and pt.ai are not read).
template <Last P, bool SHARE, typename acc_t>
__device__ __forceinline__ acc_t spatial_dx(acc_t dy, const Term<acc_t, false>& pt, const Term<acc_t, false>& ch,
                                            int c, int hw) {
  const acc_t pc = SHARE ? pt.ph + max_share<acc_t, int>(pt, c, acc_t(0)) : pt.ph;
  if constexpr (P == Last::DX_ST)
    return dy * (pt.s * ch.s) + (pc * ch.s + ch.ph + max_share<acc_t, int>(ch, hw, acc_t(0)));
  else
    return dy * pt.s + pc;
}

// Vectors of dy in flight per thread in _scale_columns: DX_ST's channel Terms (loaded first, one per
// row) leave room for two in 64 registers (with four, ptxas issued them two by two and spilled).
template <Last P>
constexpr int columns_loads() {
  return P == Last::DX_ST ? 2 : kLoads;
}

// NCHW (H*W % VEC == 0): the spatial half's dx (DX_T, DX_ST). Along flat vectors a position's terms
// would be read once per element (VEC 16-byte terms per vector of dy); here, in the columns'
// geometry (a ColumnPlan over channels: positions are the columns), a thread holds its VEC
// positions' t and pc and walks its R channels in order, columns_loads() vectors of dy at a time;
// DX_ST reads each channel's Term (one 16-byte load, the same address across the row's lanes). A
// position's max share ([c == sargmax] qc) falls on one channel: after the walk, the thread writes
// again each of its positions' element at that channel where the walk covered it (at most VEC
// elements per R x VEC), so that the loop holds two values per position, not four, and fits 64
// registers without a spill.
template <typename T, int VEC, Last P>
__global__ void __launch_bounds__(kThreads, kPoolBlocks)
    _scale_columns(const T* __restrict__ dy, T* __restrict__ dx, ChannelTerms<at::acc_type<T, true>, P> ct,
                   ColumnPlan pl) {
  static_assert(P == Last::DX_T || P == Last::DX_ST, "the spatial half's dx");
  using acc_t = at::acc_type<T, true>;
  using PosTerm = Term<acc_t, false>;
  const int tx = threadIdx.x % pl.TX, ty = threadIdx.x / pl.TX;
  int64_t chunk, bc, n;
  block_of(pl.chunks, pl.nbc, chunk, bc, n);
  const int64_t cv = bc * pl.TX + tx;  // pl.C: positions (the columns), pl.HW: channels (the rows)
  if (cv >= pl.cvecs) return;
  const int r0 = static_cast<int>(chunk * pl.chunk) + ty * pl.R;
  const int r1 = static_cast<int>(::min(int64_t(r0) + pl.R, pl.HW));
  const int64_t hw0 = cv * VEC;
  const PosTerm* pts = ct.pt + n * pl.C + hw0;
  acc_t ts[VEC], tp[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const PosTerm t = pts[k];
    ts[k] = t.s, tp[k] = t.ph;
  }
  const PosTerm* chs = P == Last::DX_ST ? ct.t + n * pl.HW : nullptr;
  // the channel's Term (DX_ST; one 16-byte load), else unread
  auto channel = [&](int c) { return P == Last::DX_ST ? chs[c] : PosTerm{}; };
  const int64_t o0 = n * pl.HW * pl.C + hw0;
  const int h0 = static_cast<int>(hw0);  // (H*W < 2^31: covers())
  auto write = [&](const Vec<T, VEC>& dv, int c, const PosTerm& ch) {
    Vec<T, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      ov.v[k] = static_cast<T>(spatial_dx<P, false>(static_cast<acc_t>(dv.v[k]), PosTerm{ts[k], tp[k], acc_t(0), 0},
                                                    ch, c, h0 + k));
    *reinterpret_cast<Vec<T, VEC>*>(dx + o0 + int64_t(c) * pl.C) = ov;
  };
  constexpr int L = columns_loads<P>();
  int r = r0;
  for (; r + L <= r1; r += L) {  // marker: hot loop (scale_columns)
    PosTerm ch[L];  // the rows' channel Terms first (cache hits), then dy's vectors together
#pragma unroll
    for (int u = 0; u < L; ++u) ch[u] = channel(r + u);
    Vec<T, VEC> dv[L];
    const T* at[L];
#pragma unroll
    for (int u = 0; u < L; ++u) at[u] = dy + o0 + int64_t(r + u) * pl.C;
    load_vecs<L>(dv, at);
#pragma unroll
    for (int u = 0; u < L; ++u) write(dv[u], r + u, ch[u]);
  }
#pragma unroll 1
  for (; r < r1; ++r) write(load_vec<T, VEC>(dy + o0 + int64_t(r) * pl.C), r, channel(r));
  // each position's element at its channel of the max, if this walk covered it, with the share
  // (written after the same thread's vector store of it above)
#pragma unroll 1
  for (int k = 0; k < VEC; ++k) {
    const PosTerm t = pts[k];
    if (t.ai >= r0 && t.ai < r1) {
      const int64_t e = o0 + int64_t(t.ai) * pl.C + k;
      dx[e] = static_cast<T>(spatial_dx<P, true>(static_cast<acc_t>(dy[e]), t, channel(t.ai), t.ai, h0 + k));
    }
  }
}

}  // namespace next
}  // namespace cuda
}  // namespace attnfused

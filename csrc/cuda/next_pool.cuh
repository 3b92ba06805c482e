// The new path's reduction passes over space (next.cuh): sums, maxima and argmaxes of x, and the
// backward's sums of dy * x (and counts of maxima), per (n, c), as partials in fixed slots.
#pragma once

#include "kernels.cuh"
#include "next_plan.h"

namespace attnfused {
namespace cuda {
namespace next {

static_assert(kThreads == cuda::kThreads, "next_plan.h and kernels.cuh must agree on the block size");

// ---------------------------------------------------------------------------- pooling partials

// Partial sums (and maxima, their indices) of one pooling pass: slot (n, c, k) at
// n * n_stride + c * c_stride + k * k_stride, k < chunks ascending in hw.
template <typename acc_t>
struct PoolPartials {
  acc_t* sum;
  acc_t* max;  // null when the op takes no max
  int* idx;
  int64_t n_stride, c_stride, k_stride;
  int64_t chunks;  // slots per channel
  __device__ __forceinline__ int64_t slot(int64_t n, int64_t c, int64_t k) const {
    return n * n_stride + c * c_stride + k * k_stride;
  }
};

// Loads in flight per thread and tensor of a reduction pass, compiled for 4 resident blocks per SM
// (<= 64 registers). With a max, a thread's VEC sums, maxima and indices leave room for two 16-byte
// vectors, not four; a dot (dy . x, the backward) reads two tensors, two vectors of each. The
// minimum of blocks also steers the compiler's schedule: without one it sank the loads behind
// their uses (one in flight); with one it issues them first.
// What a reduction pass computes per (n, c) over space.
enum class Job {
  SUM,         // the sum of x (pool "avg")
  SUM_MAX,     // the sum, max and argmax of x
  DOT,         // the sum of dy * x (the backward)
  DOT_COUNT,   // the sum of dy * x and the count of x equal to the channel's max (tie rule "split")
  SCALED_MAX,  // the sum, max and argmax of x * w, w [N, L] per element of the summed axis (CBAM's
               // x1 = x * s pooled over channels; the product in acc_t, unrounded; down columns
               // (NCHW) in 2-byte types by _pool_column_halves)
  SCALED_DOT,  // the sum of dy * (x * w), w as for SCALED_MAX (CBAM's backward: sum_c dy * x1)
  DOT_POS,     // the sum of x * (dy * t + pc + [c == ai] qc), one Term (t, pc, qc, ai) per position
               // (CBAM's backward: sum_hw dx1 * x, dx1 the spatial half's input gradient; columns in
               // channels_last, _pool_across in NCHW)
};
constexpr bool maxed(Job j) { return j == Job::SUM_MAX || j == Job::SCALED_MAX; }
constexpr bool scaled(Job j) { return j == Job::SCALED_MAX || j == Job::SCALED_DOT; }
constexpr bool dotted(Job j) { return j == Job::DOT || j == Job::DOT_COUNT || j == Job::SCALED_DOT || j == Job::DOT_POS; }
constexpr bool counted(Job j) { return j == Job::DOT_COUNT; }
constexpr bool positioned(Job j) { return j == Job::DOT_POS; }

// Per-channel (or per-position) values of a backward, one 16-byte load each (float; two for
// double): the channel gate s, the input gradient's terms ph = davg / HW and qh = dmax, and the
// argmax (hw); or, SPLIT, q = qh / count and the max mx. Per position (the spatial half): t, pc =
// dmean / C, qc = dmax and the channel of the max.
template <typename acc_t, bool SPLIT>
struct Term;
template <typename acc_t>
struct alignas(16) Term<acc_t, false> {
  acc_t s, ph, qh;
  int ai;
};
template <typename acc_t>
struct alignas(16) Term<acc_t, true> {
  acc_t s, ph, q, mx;
};

template <Job J>
constexpr int pool_loads() {
  return J == Job::SUM ? kLoads : 2;
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

// L 16-byte vectors of x, issued together in one inline-PTX block: as separate loads the compiler
// moved each vector's arithmetic up behind its load and kept one load in flight per thread.
template <int L, typename T>
__device__ __forceinline__ void load_raw(uint4 (&r)[L], const T* const (&p)[L]) {
  static_assert(L == 2 || L == 4, "two or four 16-byte vectors");
  if constexpr (L == 2) {
    asm volatile(
        "ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%8];\n\t"
        "ld.global.nc.v4.u32 {%4, %5, %6, %7}, [%9];"
        : "=r"(r[0].x), "=r"(r[0].y), "=r"(r[0].z), "=r"(r[0].w), "=r"(r[1].x), "=r"(r[1].y), "=r"(r[1].z),
          "=r"(r[1].w)
        : "l"(p[0]), "l"(p[1]));
  } else {
    asm volatile(
        "ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%16];\n\t"
        "ld.global.nc.v4.u32 {%4, %5, %6, %7}, [%17];\n\t"
        "ld.global.nc.v4.u32 {%8, %9, %10, %11}, [%18];\n\t"
        "ld.global.nc.v4.u32 {%12, %13, %14, %15}, [%19];"
        : "=r"(r[0].x), "=r"(r[0].y), "=r"(r[0].z), "=r"(r[0].w), "=r"(r[1].x), "=r"(r[1].y), "=r"(r[1].z),
          "=r"(r[1].w), "=r"(r[2].x), "=r"(r[2].y), "=r"(r[2].z), "=r"(r[2].w), "=r"(r[3].x), "=r"(r[3].y),
          "=r"(r[3].z), "=r"(r[3].w)
        : "l"(p[0]), "l"(p[1]), "l"(p[2]), "l"(p[3]));
  }
}

template <int L, typename T, int VEC>
__device__ __forceinline__ void load_vecs(Vec<T, VEC> (&out)[L], const T* const (&p)[L]) {
  static_assert(sizeof(Vec<T, VEC>) == 16, "16-byte vectors");
  uint4 r[L];
  load_raw<L>(r, p);
#pragma unroll
  for (int u = 0; u < L; ++u) memcpy(&out[u], &r[u], 16);
}

// A row's sum (and max, argmax; or count) over its `width` consecutive lanes (a power of two <= 32)
// by a fixed butterfly: every lane of the warp takes part and ends with the row's result.
template <Job J, typename acc_t>
__device__ __forceinline__ void lanes_merge(acc_t& s, acc_t& m, int& mi, int width) {
  for (int o = 1; o < width; o *= 2) {
    s += __shfl_xor_sync(0xffffffffu, s, o, width);
    if (maxed(J)) {
      const acc_t om = __shfl_xor_sync(0xffffffffu, m, o, width);
      const int oi = __shfl_xor_sync(0xffffffffu, mi, o, width);
      merge_max(m, mi, om, oi);
    }
    if (counted(J)) mi += __shfl_xor_sync(0xffffffffu, mi, o, width);
  }
}

// This block's place in a grid ordered (n, i, chunk), chunk fastest: its chunk, i (< ni) and n.
__device__ __forceinline__ void block_of(int64_t chunks, int64_t ni, int64_t& chunk, int64_t& i, int64_t& n) {
  const int64_t b = blockIdx.x / chunks;
  chunk = blockIdx.x - b * chunks;
  i = b % ni, n = b / ni;
}

// One thread's running sums (and maxima, with the index each came from; or, counting, the count in
// mi) of VEC slots: slot v takes element v of every vector the thread reads, in the order it reads them.
template <typename T, int VEC, Job J>
struct Slots {
  static constexpr bool MAXED = maxed(J);
  using acc_t = at::acc_type<T, true>;
  acc_t sum[VEC], mx[VEC];
  int mi[VEC];
  __device__ __forceinline__ explicit Slots(int first) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      sum[v] = acc_t(0);
      mx[v] = -std::numeric_limits<acc_t>::infinity();
      mi[v] = first;  // kept by an all -inf slot: the first index the thread visits
    }
  }
  __device__ __forceinline__ void take(const Vec<T, VEC>& xv, int index) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const acc_t e = static_cast<acc_t>(xv.v[v]);
      sum[v] += e;
      if (MAXED) take_max_in_order(mx[v], mi[v], e, index);
    }
  }
  // x * w, one weight per slot
  __device__ __forceinline__ void take(const Vec<T, VEC>& xv, int index, const Vec<acc_t, VEC>& wv) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const acc_t e = static_cast<acc_t>(xv.v[v]) * wv.v[v];
      sum[v] += e;
      take_max_in_order(mx[v], mi[v], e, index);
    }
  }
  // x * w, one weight for every slot (down columns: the row's weight)
  __device__ __forceinline__ void take(const Vec<T, VEC>& xv, int index, acc_t w) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const acc_t e = static_cast<acc_t>(xv.v[v]) * w;
      sum[v] += e;
      take_max_in_order(mx[v], mi[v], e, index);
    }
  }
  // mref: each slot's channel max (counting)
  __device__ __forceinline__ void take_dot(const Vec<T, VEC>& xv, const Vec<T, VEC>& dv, const acc_t (&mref)[VEC]) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const acc_t e = static_cast<acc_t>(xv.v[v]);
      sum[v] += static_cast<acc_t>(dv.v[v]) * e;
      if (counted(J)) mi[v] += e == mref[v];
    }
  }
  // dy * (x * w), one weight per slot (SCALED_DOT: x * w as the forward's SCALED_MAX took it)
  __device__ __forceinline__ void take_dot_scaled(const Vec<T, VEC>& xv, const Vec<T, VEC>& dv,
                                                  const Vec<acc_t, VEC>& wv) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) sum[v] += static_cast<acc_t>(dv.v[v]) * (static_cast<acc_t>(xv.v[v]) * wv.v[v]);
  }
  // dy * (x * w), one weight for every slot (SCALED_DOT down columns: the row's channel weight)
  __device__ __forceinline__ void take_dot_scaled(const Vec<T, VEC>& xv, const Vec<T, VEC>& dv, acc_t w) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) sum[v] += static_cast<acc_t>(dv.v[v]) * (static_cast<acc_t>(xv.v[v]) * w);
  }
  // x * (dy * t + pc + [c == ai] qc) (DOT_POS): pt the row's position terms, slot v channel c0 + v
  __device__ __forceinline__ void take_dot_pos(const Vec<T, VEC>& xv, const Vec<T, VEC>& dv,
                                               const Term<acc_t, false>& pt, int c0) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const acc_t d = static_cast<acc_t>(dv.v[v]) * pt.s + pt.ph + (c0 + v == pt.ai ? pt.qh : acc_t(0));
      sum[v] += d * static_cast<acc_t>(xv.v[v]);
    }
  }
};

// VEC weights w[at..] (at a multiple of VEC, w aligned to VEC of them): one or two 16-byte loads
template <int VEC, typename acc_t>
__device__ __forceinline__ Vec<acc_t, VEC> weights(const acc_t* w, int64_t at) {
  return *reinterpret_cast<const Vec<acc_t, VEC>*>(w + at);
}

// L vectors of x at `at` into xv and, for a dot, of dy at the same offsets into dv: the loads of
// both tensors issued before any use.
template <int L, bool DOT, typename T, int VEC>
__device__ __forceinline__ void load_pair(Vec<T, VEC> (&xv)[L], Vec<T, VEC> (&dv)[L], const T* const (&at)[L],
                                          const T* x, const T* dy) {
  if constexpr (L == 1 && DOT) {  // one vector of each, issued together
    Vec<T, VEC> both[2];
    const T* const p[2] = {at[0], dy + (at[0] - x)};
    load_vecs<2>(both, p);
    xv[0] = both[0], dv[0] = both[1];
  } else {
    load_vecs<L>(xv, at);
    if constexpr (DOT) {
      const T* atd[L];
#pragma unroll
      for (int u = 0; u < L; ++u) atd[u] = dy + (at[u] - x);
      load_vecs<L>(dv, atd);
    }
  }
}

// The partials of a columns pass: thread (tx, ty) holds W slots, the block's columns tx * W + v (of
// pl.TX * W); the block adds its TY row groups in order through shared memory and writes one
// partial per column.
template <typename T, int W, Job J>
__device__ __forceinline__ void columns_partials(const Slots<T, W, J>& sl, int tx, int ty, const ColumnPlan& pl,
                                                 int64_t n, int64_t bc, int64_t chunk,
                                                 const PoolPartials<at::acc_type<T, true>>& out) {
  using acc_t = at::acc_type<T, true>;
  constexpr bool MAXED = maxed(J), KEEP_I = maxed(J) || counted(J);
  __shared__ acc_t s_sum[kThreads * W];
  __shared__ acc_t s_max[MAXED ? kThreads * W : 1];
  __shared__ int s_idx[KEEP_I ? kThreads * W : 1];
  const int TXV = pl.TX * W;
#pragma unroll
  for (int v = 0; v < W; ++v) {
    s_sum[ty * TXV + tx * W + v] = sl.sum[v];
    if (MAXED) s_max[ty * TXV + tx * W + v] = sl.mx[v];
    if (KEEP_I) s_idx[ty * TXV + tx * W + v] = sl.mi[v];
  }
  __syncthreads();
  for (int j = threadIdx.x; j < TXV; j += kThreads) {
    const int64_t c = bc * TXV + j;
    if (c >= pl.C) continue;
    acc_t s = s_sum[j], m = MAXED ? s_max[j] : acc_t(0);
    int i = KEEP_I ? s_idx[j] : 0;
    for (int g = 1; g < pl.TY; ++g) {  // row groups ascend in hw
      s += s_sum[g * TXV + j];
      if (MAXED) take_max_in_order(m, i, s_max[g * TXV + j], s_idx[g * TXV + j]);
      if (counted(J)) i += s_idx[g * TXV + j];
    }
    const int64_t o = out.slot(n, c, chunk);
    out.sum[o] = s;
    if (MAXED) out.max[o] = m;
    if (KEEP_I) out.idx[o] = i;
  }
}

// channels_last: per-channel sum (and max, argmax; or the sum of dy * x, and the count of maxima)
// over the rows hw of a chunk (ColumnPlan). A thread sums VEC channels down its R rows in order,
// kLoads rows at a time; the block then adds its TY row groups in order through shared memory and
// writes one partial per channel. mref: [N, C] the channels' maxima (DOT_COUNT), else null; w:
// [N, HW] a weight per row (NCHW CBAM: SCALED_DOT, the backward's sum over channels of dy * x * s;
// SCALED_MAX, the forward's pool of x * s over channels), else null; pt: [N, HW] the positions'
// terms (DOT_POS), else null. The weighted max in 2-byte types runs as _pool_column_halves: here,
// with eight sums, maxima and indices, two vectors and their products, ptxas issued the second
// load after the first one's use at 64 registers (one load in flight; loading the rows' weights
// first did not change it).
template <typename T, int VEC, Job J>
__global__ void __launch_bounds__(kThreads, kPoolBlocks)
    _pool_columns(const T* __restrict__ x, const T* __restrict__ dy, const at::acc_type<T, true>* __restrict__ mref,
                  const at::acc_type<T, true>* __restrict__ w, const Term<at::acc_type<T, true>, false>* __restrict__ pt,
                  ColumnPlan pl, PoolPartials<at::acc_type<T, true>> out) {
  static_assert(J != Job::SCALED_MAX || sizeof(T) >= 4, "the weighted max of 2-byte types: _pool_column_halves");
  constexpr bool DOT = dotted(J);
  using acc_t = at::acc_type<T, true>;
  const int tx = threadIdx.x % pl.TX, ty = threadIdx.x / pl.TX;
  int64_t chunk, bc, n;
  block_of(pl.chunks, pl.nbc, chunk, bc, n);
  const int64_t cv = bc * pl.TX + tx;  // this thread's vector of channels
  const int r0 = static_cast<int>(chunk * pl.chunk) + ty * pl.R;
  const int r1 = static_cast<int>(::min(int64_t(r0) + pl.R, pl.HW));

  // an all -inf column keeps r0; an empty row group has r0 >= HW; counts start at 0
  Slots<T, VEC, J> sl(counted(J) ? 0 : r0);
  acc_t mr[VEC] = {};
  if (counted(J) && cv < pl.cvecs) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) mr[v] = mref[n * pl.C + cv * VEC + v];
  }
  if (cv < pl.cvecs) {
    const T* p = x + (n * pl.HW + r0) * pl.C + cv * VEC;
    int r = r0;
    constexpr int L = pool_loads<J>();
    for (; r + L <= r1; r += L, p += L * pl.C) {  // marker: hot loop (pool_columns)
      Vec<T, VEC> xv[L], dv[L];
      const T* at[L];
#pragma unroll
      for (int u = 0; u < L; ++u) at[u] = p + u * pl.C;
      load_pair<L, DOT>(xv, dv, at, x, dy);
#pragma unroll
      for (int u = 0; u < L; ++u) {
        if constexpr (positioned(J))
          sl.take_dot_pos(xv[u], dv[u], pt[n * pl.HW + r + u], static_cast<int>(cv * VEC));
        else if constexpr (scaled(J) && DOT)
          sl.take_dot_scaled(xv[u], dv[u], w[n * pl.HW + r + u]);
        else if constexpr (DOT)
          sl.take_dot(xv[u], dv[u], mr);
        else if constexpr (scaled(J))
          sl.take(xv[u], r + u, w[n * pl.HW + r + u]);
        else
          sl.take(xv[u], r + u);
      }
    }
#pragma unroll 1  // (fewer than L rows)
    for (; r < r1; ++r, p += pl.C) {
      if constexpr (positioned(J))
        sl.take_dot_pos(load_vec<T, VEC>(p), load_vec<T, VEC>(dy + (p - x)), pt[n * pl.HW + r], static_cast<int>(cv * VEC));
      else if constexpr (scaled(J) && DOT)
        sl.take_dot_scaled(load_vec<T, VEC>(p), load_vec<T, VEC>(dy + (p - x)), w[n * pl.HW + r]);
      else if constexpr (DOT)
        sl.take_dot(load_vec<T, VEC>(p), load_vec<T, VEC>(dy + (p - x)), mr);
      else if constexpr (scaled(J))
        sl.take(load_vec<T, VEC>(p), r, w[n * pl.HW + r]);
      else
        sl.take(load_vec<T, VEC>(p), r);
    }
  }

  columns_partials(sl, tx, ty, pl, n, bc, chunk, out);
}

// NCHW in 2-byte types: the sum, max and argmax over channels of x * w (SCALED_MAX: CBAM's pool of
// x1 = x * s, w [N, C] a weight per row). Down columns a thread of _pool_columns would hold eight
// sums, maxima and indices for its vector's eight positions, and at 64 registers ptxas kept one
// load in flight. Here two lanes share a vector of positions and each keeps half of them: per
// trip of four rows, lane p loads rows r + p and r + 2 + p (two 16-byte vectors in flight), the
// pair swaps halves (one shuffle per 4 bytes), and each lane takes rows r .. r + 3 of its half in
// order. The plan is a ColumnPlan over half vectors (vec = VEC / 2: lane tx owns half tx & 1 of
// vector tx / 2), so the partials and their merge are _pool_columns'.
template <typename T, int VEC, bool WARP>
__global__ void __launch_bounds__(kThreads, kPoolBlocks)
    _pool_column_halves(const T* __restrict__ x, const at::acc_type<T, true>* __restrict__ w, ColumnPlan pl,
                        PoolPartials<at::acc_type<T, true>> out) {
  static_assert(sizeof(T) == 2 && VEC == 8, "2-byte types: a vector of eight, halves of four");
  constexpr int H = VEC / 2;
  using acc_t = at::acc_type<T, true>;
  using Half = Vec<T, H>;  // 8 bytes: two 32-bit words
  const int tx = threadIdx.x % pl.TX, ty = threadIdx.x / pl.TX;
  int64_t chunk, bc, n;
  block_of(pl.chunks, pl.nbc, chunk, bc, n);
  // pl.C: positions (the columns), pl.HW: channels (the rows); pl.cvecs half vectors, an even count
  const int64_t hv = bc * pl.TX + tx;
  const int64_t first = ((hv < pl.cvecs ? hv : pl.cvecs - 1) & ~int64_t(1)) * H;  // the pair's vector
  const int p = tx & 1;  // the lane's half: positions first + p * H ..
  // the exchange's lanes: the whole warp when it is one row group (WARP: pl.TX == 32, so all its
  // lanes run the same trips), else the pair (always in one row group)
  const unsigned lanes = WARP ? 0xffffffffu : 3u << ((threadIdx.x % 32) & ~1u);
  const int r0 = static_cast<int>(chunk * pl.chunk) + ty * pl.R;
  const int r1 = static_cast<int>(::min(int64_t(r0) + pl.R, pl.HW));
  Slots<T, H, Job::SCALED_MAX> sl(r0);
  const int64_t row = pl.C;  // elements from one channel to the next
  const T* a = x + n * pl.HW * row + first + (r0 + p) * row;  // lane p's first row, r0 + p
  const acc_t* wr = w + n * pl.HW + r0;
  auto half = [](uint32_t lo, uint32_t hi) {  // two 32-bit words as four elements
    Half h;
    memcpy(&h.v[0], &lo, 4);
    memcpy(&h.v[2], &hi, 4);
    return h;
  };
  int r = r0;
  for (; r + 4 <= r1; r += 4, a += 4 * row, wr += 4) {  // marker: hot loop (pool_column_halves)
    uint4 raw[2];
    const T* const at[2] = {a, a + 2 * row};
    load_raw<2>(raw, at);
    // lane 0 keeps words (x, y) of its rows, lane 1 (z, w); the other half goes to the partner
    const uint32_t k0 = p ? raw[0].z : raw[0].x, k1 = p ? raw[0].w : raw[0].y;
    const uint32_t k2 = p ? raw[1].z : raw[1].x, k3 = p ? raw[1].w : raw[1].y;
    const uint32_t g0 = __shfl_xor_sync(lanes, p ? raw[0].x : raw[0].z, 1);
    const uint32_t g1 = __shfl_xor_sync(lanes, p ? raw[0].y : raw[0].w, 1);
    const uint32_t g2 = __shfl_xor_sync(lanes, p ? raw[1].x : raw[1].z, 1);
    const uint32_t g3 = __shfl_xor_sync(lanes, p ? raw[1].y : raw[1].w, 1);
    // rows r .. r + 3 in order: lane 0 loaded r and r + 2, lane 1 r + 1 and r + 3
    sl.take(p ? half(g0, g1) : half(k0, k1), r, wr[0]);
    sl.take(p ? half(k0, k1) : half(g0, g1), r + 1, wr[1]);
    sl.take(p ? half(g2, g3) : half(k2, k3), r + 2, wr[2]);
    sl.take(p ? half(k2, k3) : half(g2, g3), r + 3, wr[3]);
  }
  a -= p * row;  // row r, read by both lanes
#pragma unroll 1  // (fewer than four rows: both lanes read each)
  for (; r < r1; ++r, a += row, ++wr) {
    uint4 v;
    const Vec<T, VEC> whole = load_vec<T, VEC>(a);
    memcpy(&v, &whole, 16);
    sl.take(p ? half(v.z, v.w) : half(v.x, v.y), r, *wr);
  }
  columns_partials(sl, tx, ty, pl, n, bc, chunk, out);
}

// Loads of each tensor in flight per thread in _pool_across: with VEC position terms held for the
// whole walk (32 registers in half precision), one of x and one of dy (32 KB per SM at 4 blocks)
// fit 64 registers in every dtype; two of each spilled in bfloat16.
constexpr int kAcrossLoads = 1;

// NCHW (HW % VEC == 0): per (n, c), the sum over space of x * (dy * t + pc + [c == ai] qc), one
// position Term each (DOT_POS: CBAM's backward, sum_hw dx1 * x). Along rows a position's terms
// would be read once per element (VEC 16-byte terms per vector); here the columns' geometry runs
// with positions as columns (a ColumnPlan over channels): a thread holds its VEC positions' terms
// and walks its R channels, so a term is read once per R channels. Per channel the thread sums its
// VEC products, then the row's TX lanes by a butterfly; every lane walks all R rows (past the end
// clamped, adding 0) so that each butterfly has its whole warp. Partials: slot (n, c, bc), the
// block's column index bc < nbc ascending in hw.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kPoolBlocks)
    _pool_across(const T* __restrict__ x, const T* __restrict__ dy, const Term<at::acc_type<T, true>, false>* __restrict__ pt,
                 ColumnPlan pl, PoolPartials<at::acc_type<T, true>> out) {
  using acc_t = at::acc_type<T, true>;
  constexpr int L = kAcrossLoads;
  const int tx = threadIdx.x % pl.TX, ty = threadIdx.x / pl.TX;
  int64_t chunk, bc, n;
  block_of(pl.chunks, pl.nbc, chunk, bc, n);
  // pl.C: positions (the columns), pl.HW: channels (the rows)
  const int64_t cv = bc * pl.TX + tx, mine = cv < pl.cvecs ? cv : pl.cvecs - 1;
  const bool live = cv < pl.cvecs;
  const int r0 = static_cast<int>(chunk * pl.chunk) + ty * pl.R;
  Term<acc_t, false> tm[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) tm[k] = pt[n * pl.C + mine * VEC + k];
  const T* base = x + n * pl.HW * pl.C + mine * VEC;
  const int last = static_cast<int>(pl.HW) - 1;
  for (int j = 0; j < pl.R; j += L) {  // marker: hot loop (pool_across)
    Vec<T, VEC> xv[L], dv[L];
    const T* at[L];
#pragma unroll
    for (int u = 0; u < L; ++u) at[u] = base + int64_t(::min(r0 + j + u, last)) * pl.C;
    load_pair<L, true>(xv, dv, at, x, dy);
#pragma unroll
    for (int u = 0; u < L; ++u) {
      const int c = r0 + j + u;
      acc_t s = acc_t(0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t d = static_cast<acc_t>(dv[u].v[k]) * tm[k].s + tm[k].ph + (c == tm[k].ai ? tm[k].qh : acc_t(0));
        s += d * static_cast<acc_t>(xv[u].v[k]);
      }
      s = live ? s : acc_t(0);  // (a lane past the last vector re-read the last one: a select, not 0 * NaN)
      for (int o = 1; o < pl.TX; o *= 2) s += __shfl_xor_sync(0xffffffffu, s, o, pl.TX);
      if (tx == 0 && c <= last) out.sum[out.slot(n, c, bc)] = s;
    }
  }
}

// NCHW (HW % VEC == 0): per-channel sum (and max, argmax; or the sum of dy * x, and the count of
// maxima) over a piece of each row (RowPlan). A thread keeps one sum and max per vector slot v
// (hw = 16-byte vector start + v), visiting its vectors in order, kLoads at a time; slots are
// merged, then the row's TX lanes by a butterfly. w: [N, HW] a weight per element of a row
// (SCALED_MAX, SCALED_DOT), else null.
template <typename T, int VEC, Job J>
__global__ void __launch_bounds__(kThreads, kPoolBlocks)
    _pool_rows(const T* __restrict__ x, const T* __restrict__ dy, const at::acc_type<T, true>* __restrict__ mref,
               const at::acc_type<T, true>* __restrict__ w, RowPlan pl, PoolPartials<at::acc_type<T, true>> out) {
  static_assert(!positioned(J), "the pool with position terms: _pool_columns, _pool_across");
  constexpr bool MAXED = maxed(J), DOT = dotted(J);
  using acc_t = at::acc_type<T, true>;
  const int tx = threadIdx.x % pl.TX, ty = threadIdx.x / pl.TX;
  int64_t chunk, cy, n;
  block_of(pl.chunks, pl.ncy, chunk, cy, n);
  const int64_t c = cy * pl.TY + ty;
  const int v0 = static_cast<int>(chunk * pl.per_chunk);  // the piece's vectors [v0, v1)
  const int v1 = static_cast<int>(::min(int64_t(v0) + pl.per_chunk, pl.hvecs));

  // indices: the start (hw) of the vector a slot's max came from; first, the first vector visited
  // (past the piece when the lane has none)
  Slots<T, VEC, J> sl(counted(J) ? 0 : (v0 + tx) * VEC);
  acc_t mr[VEC] = {};
  if (counted(J) && c < pl.C) {
    const acc_t m0 = mref[n * pl.C + c];
#pragma unroll
    for (int v = 0; v < VEC; ++v) mr[v] = m0;
  }
  if (c < pl.C) {
    const T* row = x + (n * pl.C + c) * pl.HW;
    int i = v0 + tx;
    constexpr int L = pool_loads<J>();
    for (; i + (L - 1) * pl.TX < v1; i += L * pl.TX) {  // marker: hot loop (pool_rows)
      Vec<T, VEC> xv[L], dv[L];
      const T* at[L];
#pragma unroll
      for (int u = 0; u < L; ++u) at[u] = row + (i + u * pl.TX) * VEC;
      load_pair<L, DOT>(xv, dv, at, x, dy);
#pragma unroll
      for (int u = 0; u < L; ++u) {
        if constexpr (DOT && scaled(J))
          sl.take_dot_scaled(xv[u], dv[u], weights<VEC>(w, n * pl.HW + (i + u * pl.TX) * VEC));
        else if constexpr (DOT)
          sl.take_dot(xv[u], dv[u], mr);
        else if constexpr (scaled(J))
          sl.take(xv[u], (i + u * pl.TX) * VEC, weights<VEC>(w, n * pl.HW + (i + u * pl.TX) * VEC));
        else
          sl.take(xv[u], (i + u * pl.TX) * VEC);
      }
    }
    for (; i < v1; i += pl.TX) {
      const T* at = row + i * VEC;
      if constexpr (DOT && scaled(J))
        sl.take_dot_scaled(load_vec<T, VEC>(at), load_vec<T, VEC>(dy + (at - x)), weights<VEC>(w, n * pl.HW + i * VEC));
      else if constexpr (DOT)
        sl.take_dot(load_vec<T, VEC>(at), load_vec<T, VEC>(dy + (at - x)), mr);
      else if constexpr (scaled(J))
        sl.take(load_vec<T, VEC>(at), i * VEC, weights<VEC>(w, n * pl.HW + i * VEC));
      else
        sl.take(load_vec<T, VEC>(at), i * VEC);
    }
  }
  acc_t s = sl.sum[0], m = sl.mx[0];
  int mmi = sl.mi[0];
#pragma unroll
  for (int v = 1; v < VEC; ++v) {
    s += sl.sum[v];
    if (MAXED) merge_max(m, mmi, sl.mx[v], sl.mi[v] + v);
    if (counted(J)) mmi += sl.mi[v];
  }
  lanes_merge<J>(s, m, mmi, pl.TX);
  if (tx == 0 && c < pl.C) {
    const int64_t o = out.slot(n, c, chunk);
    out.sum[o] = s;
    if (MAXED) out.max[o] = m;
    if (MAXED || counted(J)) out.idx[o] = mmi;
  }
}

// NCHW rows of any H*W (TilePlan): a block streams tiles of R whole rows through shared memory as
// raw 16-byte vectors, the next tile's loads in flight while it sums the current one; P threads
// per row sum pieces of L elements in order, four at a time, then a butterfly over the P lanes.
// Partials: one slot per row n * C + c (slot(0, row, 0) with c_stride 1). Which vectors a thread
// loads and which elements it sums are the same in every full tile: set once. The last tile, of
// rows % R rows, is read element by element after the loop. DOT: tiles of x and dy, the sum of dy * x
// (and the count of maxima, mref [N, C] the channels' maxima).
template <typename T, int VEC, Job J>
__global__ void __launch_bounds__(kThreads, kPoolBlocks)
    _pool_tiles(const T* __restrict__ x, const T* __restrict__ dy, const at::acc_type<T, true>* __restrict__ mref,
                TilePlan pl, PoolPartials<at::acc_type<T, true>> out) {
  static_assert(!scaled(J) && !positioned(J), "no weights or position terms in tiles");
  constexpr bool MAXED = maxed(J), DOT = dotted(J);
  using acc_t = at::acc_type<T, true>;
  constexpr int kTiles = DOT ? 2 : 1;  // x's tile, then dy's
  __shared__ uint4 tile[kTiles][kThreads * kLoads];
  T* elems = reinterpret_cast<T*>(tile[0]);
  T* delems = reinterpret_cast<T*>(tile[kTiles - 1]);
  const int r = threadIdx.x / pl.P, p = threadIdx.x % pl.P;
  const int64_t tile_elems = int64_t(pl.R) * pl.HW;   // a whole number of vectors
  const int whole = static_cast<int>(tile_elems / VEC);  // <= kThreads x kLoads
  int off[kLoads];  // element offsets of the thread's vectors in a tile (past its end: the last, not stored)
#pragma unroll
  for (int u = 0; u < kLoads; ++u) off[u] = ::min(static_cast<int>(threadIdx.x) + u * kThreads, whole - 1) * VEC;
  const int h0 = p * pl.L;
  const int h1 = r < pl.R ? ::min(h0 + pl.L, static_cast<int>(pl.HW)) : h0;
  const T* mine = elems + (r < pl.R ? r * pl.HW : 0);
  const T* dmine = delems + (r < pl.R ? r * pl.HW : 0);

  auto sum_rows = [&](int64_t t, int h_end) {  // the thread's piece [h0, h_end) of its row of tile t
    const int64_t row = t * pl.R + r;
    acc_t s = acc_t(0), m = -std::numeric_limits<acc_t>::infinity();
    // an empty piece keeps -inf and h0, past the pieces before it: merges never pick it; counts start at 0
    int mi = counted(J) ? 0 : h0;
    const acc_t mr = counted(J) && h_end > h0 ? mref[row] : acc_t(0);
    auto take = [&](int h) {
      const acc_t e = static_cast<acc_t>(mine[h]);
      if constexpr (DOT) {
        s += static_cast<acc_t>(dmine[h]) * e;
        if (counted(J)) mi += e == mr;
      } else {
        s += e;
        if (MAXED) take_max_in_order(m, mi, e, h);
      }
    };
    int h = h0;
#pragma unroll 1
    for (; h + 3 < h_end; h += 4) take(h), take(h + 1), take(h + 2), take(h + 3);
    if (h < h_end) take(h);
    if (h + 1 < h_end) take(h + 1);
    if (h + 2 < h_end) take(h + 2);
    lanes_merge<J>(s, m, mi, pl.P);
    if (p == 0 && h_end > h0) {
      const int64_t o = out.slot(0, row, 0);
      out.sum[o] = s;
      if (MAXED) out.max[o] = m;
      if (MAXED || counted(J)) out.idx[o] = mi;
    }
  };

  const int64_t full = pl.rows / pl.R, step = int64_t(gridDim.x) * tile_elems;
  int64_t t = blockIdx.x;
  int64_t at0 = t * tile_elems;  // tile t's first element
  uint4 raw[kTiles][kLoads];
  auto issue = [&](int64_t e0) {
    const T* at[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) at[u] = x + e0 + off[u];
    load_raw<kLoads>(raw[0], at);
    if constexpr (DOT) {
#pragma unroll
      for (int u = 0; u < kLoads; ++u) at[u] = dy + e0 + off[u];
      load_raw<kLoads>(raw[1], at);
    }
  };
  if (t < full) issue(at0);
  for (; t < full; t += gridDim.x, at0 += step) {  // marker: hot loop (pool_tiles)
#pragma unroll
    for (int k = 0; k < kTiles; ++k)
#pragma unroll
      for (int u = 0; u < kLoads; ++u)
        if (threadIdx.x + u * kThreads < whole) tile[k][threadIdx.x + u * kThreads] = raw[k][u];
    __syncthreads();
    if (t + gridDim.x < full) issue(at0 + step);
    sum_rows(t, h1);
    __syncthreads();  // the tile is read before the next one is stored
  }
  const int64_t left = pl.rows - full * pl.R;
  if (t == full && left > 0) {
    const int64_t n = left * pl.HW, e0 = full * tile_elems;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      elems[i] = x[e0 + i];
      if constexpr (DOT) delems[i] = dy[e0 + i];
    }
    __syncthreads();
    sum_rows(t, r < left ? h1 : h0);
  }
}

}  // namespace next
}  // namespace cuda
}  // namespace attnfused

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
#pragma once

#include "kernels.cuh"
#include "next_plan.h"
#include "args.cuh"

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
  SUM,        // the sum of x (pool "avg")
  SUM_MAX,    // the sum, max and argmax of x
  DOT,        // the sum of dy * x (the backward)
  DOT_COUNT,  // the sum of dy * x and the count of x equal to the channel's max (tie rule "split")
};
constexpr bool maxed(Job j) { return j == Job::SUM_MAX; }
constexpr bool dotted(Job j) { return j == Job::DOT || j == Job::DOT_COUNT; }
constexpr bool counted(Job j) { return j == Job::DOT_COUNT; }

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
  // mref: each slot's channel max (counting)
  __device__ __forceinline__ void take_dot(const Vec<T, VEC>& xv, const Vec<T, VEC>& dv, const acc_t (&mref)[VEC]) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const acc_t e = static_cast<acc_t>(xv.v[v]);
      sum[v] += static_cast<acc_t>(dv.v[v]) * e;
      if (counted(J)) mi[v] += e == mref[v];
    }
  }
};

// L vectors of x at `at` into xv and, for a dot, of dy at the same offsets into dv: the loads of
// both tensors issued before any use.
template <int L, bool DOT, typename T, int VEC>
__device__ __forceinline__ void load_pair(Vec<T, VEC> (&xv)[L], Vec<T, VEC> (&dv)[L], const T* const (&at)[L],
                                          const T* x, const T* dy) {
  load_vecs<L>(xv, at);
  if constexpr (DOT) {
    const T* atd[L];
#pragma unroll
    for (int u = 0; u < L; ++u) atd[u] = dy + (at[u] - x);
    load_vecs<L>(dv, atd);
  }
}

// channels_last: per-channel sum (and max, argmax; or the sum of dy * x, and the count of maxima)
// over the rows hw of a chunk (ColumnPlan). A thread sums VEC channels down its R rows in order,
// kLoads rows at a time; the block then adds its TY row groups in order through shared memory and
// writes one partial per channel. mref: [N, C] the channels' maxima (DOT_COUNT), else null.
template <typename T, int VEC, Job J>
__global__ void __launch_bounds__(kThreads, kPoolBlocks)
    _pool_columns(const T* __restrict__ x, const T* __restrict__ dy, const at::acc_type<T, true>* __restrict__ mref,
                  ColumnPlan pl, PoolPartials<at::acc_type<T, true>> out) {
  constexpr bool MAXED = maxed(J), DOT = dotted(J), KEEP_I = maxed(J) || counted(J);
  using acc_t = at::acc_type<T, true>;
  const int tx = threadIdx.x % pl.TX, ty = threadIdx.x / pl.TX;
  int64_t b = blockIdx.x;
  const int64_t chunk = b % pl.chunks;
  b /= pl.chunks;
  const int64_t bc = b % pl.nbc, n = b / pl.nbc;
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
      for (int u = 0; u < L; ++u) DOT ? sl.take_dot(xv[u], dv[u], mr) : sl.take(xv[u], r + u);
    }
    for (; r < r1; ++r, p += pl.C) {
      if constexpr (DOT)
        sl.take_dot(load_vec<T, VEC>(p), load_vec<T, VEC>(dy + (p - x)), mr);
      else
        sl.take(load_vec<T, VEC>(p), r);
    }
  }

  __shared__ acc_t s_sum[kThreads * VEC];
  __shared__ acc_t s_max[MAXED ? kThreads * VEC : 1];
  __shared__ int s_idx[KEEP_I ? kThreads * VEC : 1];
  const int TXV = pl.TX * VEC;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    s_sum[ty * TXV + tx * VEC + v] = sl.sum[v];
    if (MAXED) s_max[ty * TXV + tx * VEC + v] = sl.mx[v];
    if (KEEP_I) s_idx[ty * TXV + tx * VEC + v] = sl.mi[v];
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

// NCHW (HW % VEC == 0): per-channel sum (and max, argmax; or the sum of dy * x, and the count of
// maxima) over a piece of each row (RowPlan). A
// thread keeps one sum and max per vector slot v (hw = 16-byte vector start + v), visiting its
// vectors in order, kLoads at a time; slots are merged, then the row's TX lanes by a butterfly.
template <typename T, int VEC, Job J>
__global__ void __launch_bounds__(kThreads, kPoolBlocks)
    _pool_rows(const T* __restrict__ x, const T* __restrict__ dy, const at::acc_type<T, true>* __restrict__ mref,
               RowPlan pl, PoolPartials<at::acc_type<T, true>> out) {
  constexpr bool MAXED = maxed(J), DOT = dotted(J);
  using acc_t = at::acc_type<T, true>;
  const int tx = threadIdx.x % pl.TX, ty = threadIdx.x / pl.TX;
  int64_t b = blockIdx.x;
  const int64_t chunk = b % pl.chunks;
  b /= pl.chunks;
  const int64_t cy = b % pl.ncy, n = b / pl.ncy;
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
      for (int u = 0; u < L; ++u) DOT ? sl.take_dot(xv[u], dv[u], mr) : sl.take(xv[u], (i + u * pl.TX) * VEC);
    }
    for (; i < v1; i += pl.TX) {
      const T* at = row + i * VEC;
      if constexpr (DOT)
        sl.take_dot(load_vec<T, VEC>(at), load_vec<T, VEC>(dy + (at - x)), mr);
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

// ---------------------------------------------------------------------------- the channel gate
// Small math over the whole batch, in kernels of their own: the pooled vectors from the partials,
// then (MLP) two products over all samples that read each weight once per tile of kRowsPerWarp
// samples (the hidden layer's activation between them), then the logits and the gate. Every sum has a fixed order, so reruns are bit-identical.

// The item t = (r, c) of a kernel with one thread per item of [rows, cols]; false past the end.
__device__ __forceinline__ bool item_of(int64_t rows, int64_t cols, int64_t& t, int64_t& r, int64_t& c) {
  t = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= rows * cols) return false;
  r = t / cols, c = t - r * cols;
  return true;
}

// One thread per (n, c): sum the partials in order -> pooled (avg, max), argmax and f's inputs vin.
// The op's contract for pool "avg": max half and argmax zero.
template <typename acc_t, bool MAXED>
__global__ void __launch_bounds__(kThreads)
    _channel_pooled(PoolPartials<acc_t> pp, int64_t N, int64_t HW, ChannelArgs<acc_t> g) {
  const int C = g.C, nv = pool_inputs(g.pool);
  int64_t t, n, c;
  if (!item_of(N, C, t, n, c)) return;
  int64_t o = pp.slot(n, c, 0);
  acc_t s = pp.sum[o], m = MAXED ? pp.max[o] : acc_t(0);
  int i = MAXED ? pp.idx[o] : 0;
  for (int64_t k = 1; k < pp.chunks; ++k) {
    o += pp.k_stride;
    s += pp.sum[o];
    if (MAXED) take_max_in_order(m, i, pp.max[o], pp.idx[o]);
  }
  const acc_t avg = s / acc_t(HW);
  g.pooled[(n * 2) * C + c] = avg;
  g.pooled[(n * 2 + 1) * C + c] = m;
  g.argmax[n * C + c] = i;
  for (int vi = 0; vi < nv; ++vi) g.vin[(n * nv + vi) * C + c] = small::pool_input(avg, m, g.pool, vi);
}

constexpr int kRowsPerWarp = 8;  // rows of a (samples) and of b (weights) one warp multiplies at once
constexpr int kSplitK = 256;     // k per split of a product: 8 trips of the lanes, few loads in a row

// part[s, m, j] = sum over split s of k of a[m, k] b[j, k], for a [M, K], b [J, K] (K contiguous):
// each warp takes kRowsPerWarp rows of a and of b and one split of k (kSplitK), its lanes stride
// over k, then a butterfly: a fixed order; the consumer adds the splits in order. Every row of b
// is read once per kRowsPerWarp rows of a (the weights once per 8 samples).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _rows_dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, acc_t* __restrict__ part, int64_t M,
              int64_t J, int64_t K) {
  constexpr int R = kRowsPerWarp;
  const int lane = threadIdx.x % 32;
  const int64_t w = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t tiles_j = cdiv(J, R), tiles = cdiv(M, R) * tiles_j;
  if (w >= tiles * cdiv(K, kSplitK)) return;  // whole warps leave together
  const int64_t split = w / tiles, tile = w - split * tiles;
  const int64_t m0 = (tile / tiles_j) * R, j0 = (tile % tiles_j) * R;
  const int64_t k1 = ::min(K, (split + 1) * kSplitK);
  const acc_t* ar[R];
  const acc_t* br[R];
#pragma unroll
  for (int u = 0; u < R; ++u) {
    ar[u] = a + ::min(m0 + u, M - 1) * K;  // rows past the end repeat the last (not written)
    br[u] = b + ::min(j0 + u, J - 1) * K;
  }
  acc_t acc[R][R];
#pragma unroll
  for (int u = 0; u < R; ++u)
#pragma unroll
    for (int v = 0; v < R; ++v) acc[u][v] = acc_t(0);
  for (int64_t k = split * kSplitK + lane; k < k1; k += 32) {
    acc_t av[R], bv[R];
#pragma unroll
    for (int u = 0; u < R; ++u) av[u] = ar[u][k], bv[u] = br[u][k];
#pragma unroll
    for (int u = 0; u < R; ++u)
#pragma unroll
      for (int v = 0; v < R; ++v) acc[u][v] += av[u] * bv[v];
  }
  acc_t* out = part + split * M * J;
#pragma unroll
  for (int u = 0; u < R; ++u)
#pragma unroll
    for (int v = 0; v < R; ++v) {
      const acc_t r = warp_sum(acc[u][v]);
      if (lane == (u * R + v) % 32 && m0 + u < M && j0 + v < J) out[(m0 + u) * J + j0 + v] = r;  // writes spread
    }
}

// sum over the splits of part [S, M, J] at (m, j), in order
template <typename acc_t>
__device__ __forceinline__ acc_t sum_splits(const acc_t* part, int64_t S, int64_t M, int64_t J, int64_t m, int64_t j) {
  acc_t s = part[m * J + j];
  for (int64_t k = 1; k < S; ++k) s += part[(k * M + m) * J + j];
  return s;
}

// The MLP's hidden layer, one thread per (r, j): hid[r, j] = b1[j] + sum_c vin[r, c] w1[j, c] (the
// op's `hidden` output) and hact = act(hid).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _hidden_act(const acc_t* __restrict__ part, int64_t S, int64_t rows, ChannelArgs<acc_t> g) {
  int64_t t, r, j;
  if (!item_of(rows, g.Cr, t, r, j)) return;
  const acc_t h = sum_splits(part, S, rows, int64_t(g.Cr), r, j) + (g.b1 ? g.b1[j] : acc_t(0));
  g.hid[t] = h;
  g.hact[t] = act_fwd(h, g.act);
}

// One thread per (n, c): the logits z = sum over f's inputs of f(v) (MLP: the output layer's
// product + b2; conv: the 1D conv of vin) and the gate s.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _channel_logits(const acc_t* __restrict__ part, int64_t S, int64_t N, ChannelArgs<acc_t> g) {
  const int C = g.C, nv = pool_inputs(g.pool);
  int64_t t, n, c;
  if (!item_of(N, C, t, n, c)) return;
  acc_t z = acc_t(0);
  for (int vi = 0; vi < nv; ++vi) {
    const int64_t r = n * nv + vi;
    z += g.kind == Kind::MLP ? sum_splits(part, S, N * nv, int64_t(C), r, c) + (g.b2 ? g.b2[c] : acc_t(0))
                             : small::conv1d_at(g.vin + r * C, g.w1, g.k, C, g.padding, c);
  }
  g.z[n * C + c] = z;
  g.s[n * C + c] = gate_fwd(z, g.gate);
}

// ---------------------------------------------------------------------------- the channel gate, backward
// From the dot pass's partials (sum over space of dy * x) to the input gradient's per-channel terms
// and the per-sample pieces of the weight gradients (ChannelWeights::grads sums them over samples),
// over the whole batch as the forward's gate: the same products, the same fixed orders.

// One thread per (n, c): f's inputs vin from the saved pooled vectors.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) _channel_inputs(int64_t N, ChannelArgs<acc_t> g) {
  const int C = g.C, nv = pool_inputs(g.pool);
  int64_t t, n, c;
  if (!item_of(N, C, t, n, c)) return;
  const acc_t avg = g.pooled[(n * 2) * C + c], m = g.pooled[(n * 2 + 1) * C + c];
  for (int vi = 0; vi < nv; ++vi) g.vin[(n * nv + vi) * C + c] = small::pool_input(avg, m, g.pool, vi);
}

// One thread per (n, c): ds = the dot pass's partials summed in order; dlog = ds * gate'(z); with
// counts (pp.idx: tie rule "split"), cnt = the number of elements equal to the channel's max.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _channel_dlog(PoolPartials<acc_t> pp, int64_t N, ChannelArgs<acc_t> g, int* __restrict__ cnt) {
  const int C = g.C;
  int64_t t, n, c;
  if (!item_of(N, C, t, n, c)) return;
  int64_t o = pp.slot(n, c, 0);
  acc_t ds = pp.sum[o];
  int k_eq = pp.idx ? pp.idx[o] : 0;
  for (int64_t k = 1; k < pp.chunks; ++k) {
    o += pp.k_stride;
    ds += pp.sum[o];
    if (pp.idx) k_eq += pp.idx[o];
  }
  g.dlog[t] = ds * gate_grad(g.z[t], g.gate);
  if (cnt) cnt[t] = k_eq;
}

// MLP, one thread per (n, j): dh = sum over the splits of sum_c dlog[n, c] w2[c, j], in order; per
// input vi dhp = dh * act'(hid); hsum = sum_vi hact (dw2 = dlog^T hsum).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _hidden_grad(const acc_t* __restrict__ part, int64_t S, int64_t N, ChannelArgs<acc_t> g) {
  const int Cr = g.Cr, nv = pool_inputs(g.pool);
  int64_t t, n, j;
  if (!item_of(N, Cr, t, n, j)) return;
  const acc_t dh = sum_splits(part, S, N, int64_t(Cr), n, j);
  acc_t hs = acc_t(0);
  for (int vi = 0; vi < nv; ++vi) {
    const int64_t o = (n * nv + vi) * Cr + j;
    g.dhp[o] = dh * act_grad(g.hid[o], g.act);
    hs += g.hact[o];
  }
  g.hsum[t] = hs;
}

template <typename acc_t, bool SPLIT>
struct Term;

// One thread per (n, c): d loss / d v of each input (MLP: the splits of sum_j dhp[r, j] w1[j, c];
// conv: the 1D conv's input gradient of dlog, the same for every input), folded by the pooling's
// weights into the input gradient's terms ph = davg / HW and qh = dmax (also in g), packed with s
// for the dx pass: with the argmax, or (SPLIT) with qh / cnt and the max it is shared among.
template <typename acc_t, bool SPLIT>
__global__ void __launch_bounds__(kThreads)
    _channel_terms(const acc_t* __restrict__ part, int64_t S, int64_t N, ChannelArgs<acc_t> g,
                   const int* __restrict__ cnt, Term<acc_t, SPLIT>* __restrict__ terms) {
  const int C = g.C, nv = pool_inputs(g.pool);
  int64_t t, n, c;
  if (!item_of(N, C, t, n, c)) return;
  acc_t davg = acc_t(0), dmax = acc_t(0);
  for (int vi = 0; vi < nv; ++vi) {
    const acc_t dv = g.kind == Kind::MLP ? sum_splits(part, S, N * nv, int64_t(C), n * nv + vi, c)
                                         : small::conv1d_dinput_at(g.dlog + n * C, g.w1, g.k, C, g.padding, c);
    small::pool_input_backward(dv, g.pool, vi, davg, dmax);
  }
  g.ph[t] = davg / acc_t(g.HW);
  g.qh[t] = dmax;
  if constexpr (SPLIT)  // as amax's backward: (g / count) * (x == max); no element equals a NaN max: count 0
    terms[t] = Term<acc_t, true>{g.s[t], g.ph[t], dmax / acc_t(cnt[t]), g.pooled[(n * 2 + 1) * C + c]};
  else
    terms[t] = Term<acc_t, false>{g.s[t], g.ph[t], dmax, static_cast<int>(g.argmax[t])};
}

// conv, one warp per (n, j): the per-sample weight gradient dwk[n, j] = sum_vi sum_c dlog[n, c]
// v_vi[c + j - p] (lanes stride over c, then a fixed butterfly).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) _conv_dweight(int64_t N, ChannelArgs<acc_t> g) {
  const int64_t w = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32, C = g.C, k = g.k, nv = pool_inputs(g.pool), p = (k - 1) / 2;
  if (w >= N * k) return;  // whole warps leave together
  const int64_t n = w / k;
  const int j = static_cast<int>(w - n * k);
  const acc_t* dlog = g.dlog + n * C;
  const acc_t* vin = g.vin + n * nv * C;
  acc_t a = acc_t(0);
  for (int c = lane; c < C; c += 32) {
    const int64_t i = small::conv1d_index(c + j - p, C, g.padding);
    if (i < 0) continue;
    for (int vi = 0; vi < nv; ++vi) a += dlog[c] * vin[vi * C + i];
  }
  a = warp_sum(a);
  if (lane == 0) g.dwk[w] = a;
}

// ---------------------------------------------------------------------------- the last pass
// Forward: y = x * s[n, c]. Backward (reading dy in x's place): dx = dy * s + ph + [hw == argmax] qh
// (tie rule "first"), or dx = dy * s + ph + (qh / count) * [x == max] ("split": x streamed too).
enum class Last { SCALE, DX, DX_SPLIT };

// How a flat vector of x finds its channels' values.
enum class ScaleRows {
  CL,   // channels_last: the VEC channels c0.. of one position (C % VEC == 0): one vector of each
  WIDE  // NCHW, HW >= VEC: a vector meets at most two (n, c) rows, split at HW - r0; the elements
        // past the last whole vector (tail < VEC) by block 0
};

// The backward's per-channel values, one 16-byte load each (float; two for double): the gate s,
// the input gradient's terms ph = davg / HW and qh = dmax, and the argmax (hw); or, SPLIT, q =
// qh / count and the max mx.
template <typename acc_t>
struct alignas(16) Term<acc_t, false> {
  acc_t s, ph, qh;
  int ai;
};
template <typename acc_t>
struct alignas(16) Term<acc_t, true> {
  acc_t s, ph, q, mx;
};

// The per-channel values of the last pass, [N, C]: the gate (SCALE), or the terms.
template <typename acc_t, Last P>
struct ChannelTerms {
  const acc_t* s;
  const Term<acc_t, P == Last::DX_SPLIT>* t;
  const void* x;  // DX_SPLIT: x (of the stream's dtype, laid out as it)
};

// the max's share of element k (hw, value e) of a channel with terms t
template <typename acc_t, typename index_t>
__device__ __forceinline__ acc_t max_share(const Term<acc_t, false>& t, index_t hw, acc_t) {
  return static_cast<index_t>(t.ai) == hw ? t.qh : acc_t(0);
}
template <typename acc_t, typename index_t>
__device__ __forceinline__ acc_t max_share(const Term<acc_t, true>& t, index_t, acc_t e) {
  return t.q * acc_t(e == t.mx);  // a product, as amax's backward: a NaN q (count 0) reaches every element
}

template <typename T, int VEC, typename index_t, ScaleRows MODE, Last P>
__global__ void __launch_bounds__(kThreads)
    _scale(const T* __restrict__ x, T* __restrict__ y, ChannelTerms<at::acc_type<T, true>, P> ct, index_t nvec,
           index_t rows, index_t inner, index_t HW, Divider<index_t> div_row, Divider<index_t> div_sample, int tail) {
  using acc_t = at::acc_type<T, true>;
  constexpr bool BWD = P != Last::SCALE, SPLIT = P == Last::DX_SPLIT;
  const T* __restrict__ xs = static_cast<const T*>(ct.x);
  for (index_t i = blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x; i < nvec;
       i += static_cast<index_t>(gridDim.x) * kThreads) {  // marker: hot loop (scale)
    const index_t e = i * VEC;
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + e);
    Vec<T, VEC> xe;  // SPLIT: x, compared with the max
    if constexpr (SPLIT) xe = load_vec<T, VEC>(xs + e);
    acc_t sv[VEC], add[VEC];
    if constexpr (MODE == ScaleRows::CL) {  // inner, div_row: C; div_sample: HW * C
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
    } else {  // WIDE; inner, div_row: HW
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
    for (int k = 0; k < VEC; ++k) yv.v[k] = static_cast<T>(static_cast<acc_t>(xv.v[k]) * sv[k] + add[k]);
    *reinterpret_cast<Vec<T, VEC>*>(y + e) = yv;
  }
  if (blockIdx.x == 0 && threadIdx.x < tail) {  // WIDE: x's last elements, past its last whole vector
    const index_t e = nvec * VEC + threadIdx.x;
    index_t row, hw;
    div_row.divmod(e, row, hw);
    acc_t out;
    if constexpr (BWD) {
      const auto t = ct.t[row];
      out = static_cast<acc_t>(x[e]) * t.s + t.ph +
            max_share<acc_t, index_t>(t, hw, SPLIT ? static_cast<acc_t>(xs[e]) : acc_t(0));
    } else {
      out = static_cast<acc_t>(x[e]) * ct.s[row];
    }
    y[e] = static_cast<T>(out);
  }
}

}  // namespace next
}  // namespace cuda
}  // namespace attnfused

// ---------------------------------------------------------------------------- host entry points

namespace attnfused {
namespace cuda {
namespace next {

// $ATTNFUSED_CUDA_KERNELS=next: the ops whose new kernels exist run them (read at every call).
bool enabled();

// Channel attention forward (SE, ECA, CBAM's channel half): pool over space -> gate -> scale.
// Fills y, pooled, argmax and hidden (shapes and dtypes as the op returns them) and returns true, or
// returns false where the new kernels do not cover x yet: channels_last with C not a whole number
// of 16-byte vectors; NCHW with H*W not one and (H*W < 16 / element size or rows too long for a
// TilePlan); x or y not 16-byte aligned.
bool channel_forward(const at::Tensor& x, const ChannelWeights& cw, at::Tensor& y, at::Tensor& pooled,
                     at::Tensor& argmax, at::Tensor& hidden);

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

}  // namespace next
}  // namespace cuda
}  // namespace attnfused

// The new CUDA path (namespace attnfused::cuda::next, behind $ATTNFUSED_CUDA_KERNELS=next until a
// GPU run validates it): streaming passes that only stream, and the small per-sample math in
// kernels of its own. What each pass is built to hold (bench/static.py checks it in the SASS):
//   - several independent 16-byte loads per thread in flight (load_vecs), compile-time vector widths;
//   - max and argmax by branch-free selects, with torch's rules (NaN wins, then the first index);
//   - pooling computes only what the op uses (avg only: no max, no argmax);
//   - NCHW rows read as 16-byte vectors (H*W % (16 / element size) == 0; other NCHW shapes still
//     run the validated kernels);
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

// Loads in flight per thread of a pooling pass, compiled for 4 resident blocks per SM (<= 64
// registers). With a max, a thread's VEC sums, maxima and indices leave room for two 16-byte
// vectors, not four. The minimum of blocks also steers the compiler's schedule: without one it
// sank the loads behind their uses (one in flight); with one it issues them first.
constexpr int kPoolBlocks = 4;
template <bool MAXED>
constexpr int pool_loads() {
  return MAXED ? 2 : kLoads;
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

// L 16-byte vectors of x, issued together in one inline-PTX block: as separate loads the compiler
// moved each vector's arithmetic up behind its load and kept one load in flight per thread.
template <int L, typename T, int VEC>
__device__ __forceinline__ void load_vecs(Vec<T, VEC> (&out)[L], const T* const (&p)[L]) {
  static_assert(sizeof(Vec<T, VEC>) == 16 && (L == 2 || L == 4), "two or four 16-byte vectors");
  uint4 r[L];
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
#pragma unroll
  for (int u = 0; u < L; ++u) memcpy(&out[u], &r[u], 16);
}

// channels_last: per-channel sum (and max, argmax) over the rows hw of a chunk (ColumnPlan). A
// thread sums VEC channels down its R rows in order, kLoads rows at a time; the block then adds
// its TY row groups in order through shared memory and writes one partial per channel.
template <typename T, int VEC, bool MAXED>
__global__ void __launch_bounds__(kThreads, kPoolBlocks)
    _pool_columns(const T* __restrict__ x, ColumnPlan pl, PoolPartials<at::acc_type<T, true>> out) {
  using acc_t = at::acc_type<T, true>;
  const int tx = threadIdx.x % pl.TX, ty = threadIdx.x / pl.TX;
  int64_t b = blockIdx.x;
  const int64_t chunk = b % pl.chunks;
  b /= pl.chunks;
  const int64_t bc = b % pl.nbc, n = b / pl.nbc;
  const int64_t cv = bc * pl.TX + tx;  // this thread's vector of channels
  const int r0 = static_cast<int>(chunk * pl.chunk) + ty * pl.R;
  const int r1 = static_cast<int>(::min(int64_t(r0) + pl.R, pl.HW));

  acc_t sum[VEC], mx[VEC];
  int mi[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    sum[v] = acc_t(0);
    mx[v] = -std::numeric_limits<acc_t>::infinity();
    mi[v] = r0;  // the first row visited: an all -inf column keeps it; an empty group has r0 >= HW
  }
  auto take = [&](const Vec<T, VEC>& xv, int r) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const acc_t e = static_cast<acc_t>(xv.v[v]);
      sum[v] += e;
      if (MAXED) take_max_in_order(mx[v], mi[v], e, r);
    }
  };
  if (cv < pl.cvecs) {
    const T* p = x + (n * pl.HW + r0) * pl.C + cv * VEC;
    int r = r0;
    constexpr int L = pool_loads<MAXED>();
    for (; r + L <= r1; r += L, p += L * pl.C) {  // marker: hot loop (pool_columns)
      Vec<T, VEC> xv[L];
      const T* at[L];
#pragma unroll
      for (int u = 0; u < L; ++u) at[u] = p + u * pl.C;
      load_vecs<L>(xv, at);
#pragma unroll
      for (int u = 0; u < L; ++u) take(xv[u], r + u);
    }
    for (; r < r1; ++r, p += pl.C) take(load_vec<T, VEC>(p), r);
  }

  __shared__ acc_t s_sum[kThreads * VEC];
  __shared__ acc_t s_max[MAXED ? kThreads * VEC : 1];
  __shared__ int s_idx[MAXED ? kThreads * VEC : 1];
  const int TXV = pl.TX * VEC;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    s_sum[ty * TXV + tx * VEC + v] = sum[v];
    if (MAXED) {
      s_max[ty * TXV + tx * VEC + v] = mx[v];
      s_idx[ty * TXV + tx * VEC + v] = mi[v];
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < TXV; j += kThreads) {
    const int64_t c = bc * TXV + j;
    if (c >= pl.C) continue;
    acc_t s = s_sum[j], m = MAXED ? s_max[j] : acc_t(0);
    int i = MAXED ? s_idx[j] : 0;
    for (int g = 1; g < pl.TY; ++g) {  // row groups ascend in hw
      s += s_sum[g * TXV + j];
      if (MAXED) take_max_in_order(m, i, s_max[g * TXV + j], s_idx[g * TXV + j]);
    }
    const int64_t o = out.slot(n, c, chunk);
    out.sum[o] = s;
    if (MAXED) {
      out.max[o] = m;
      out.idx[o] = i;
    }
  }
}

// NCHW (HW % VEC == 0): per-channel sum (and max, argmax) over a piece of each row (RowPlan). A
// thread keeps one sum and max per vector slot v (hw = 16-byte vector start + v), visiting its
// vectors in order, kLoads at a time; slots are merged, then the row's TX lanes by a butterfly.
template <typename T, int VEC, bool MAXED>
__global__ void __launch_bounds__(kThreads, kPoolBlocks)
    _pool_rows(const T* __restrict__ x, RowPlan pl, PoolPartials<at::acc_type<T, true>> out) {
  using acc_t = at::acc_type<T, true>;
  const int tx = threadIdx.x % pl.TX, ty = threadIdx.x / pl.TX;
  int64_t b = blockIdx.x;
  const int64_t chunk = b % pl.chunks;
  b /= pl.chunks;
  const int64_t cy = b % pl.ncy, n = b / pl.ncy;
  const int64_t c = cy * pl.TY + ty;
  const int v0 = static_cast<int>(chunk * pl.per_chunk);  // the piece's vectors [v0, v1)
  const int v1 = static_cast<int>(::min(int64_t(v0) + pl.per_chunk, pl.hvecs));

  acc_t sum[VEC], mx[VEC];
  int mi[VEC];  // the start (hw) of the vector each slot's max came from
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    sum[v] = acc_t(0);
    mx[v] = -std::numeric_limits<acc_t>::infinity();
    mi[v] = (v0 + tx) * VEC;  // the first vector visited (past the piece when the lane has none)
  }
  auto take = [&](const Vec<T, VEC>& xv, int hw) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const acc_t e = static_cast<acc_t>(xv.v[v]);
      sum[v] += e;
      if (MAXED) take_max_in_order(mx[v], mi[v], e, hw);
    }
  };
  if (c < pl.C) {
    const T* row = x + (n * pl.C + c) * pl.HW;
    int i = v0 + tx;
    constexpr int L = pool_loads<MAXED>();
    for (; i + (L - 1) * pl.TX < v1; i += L * pl.TX) {  // marker: hot loop (pool_rows)
      Vec<T, VEC> xv[L];
      const T* at[L];
#pragma unroll
      for (int u = 0; u < L; ++u) at[u] = row + (i + u * pl.TX) * VEC;
      load_vecs<L>(xv, at);
#pragma unroll
      for (int u = 0; u < L; ++u) take(xv[u], (i + u * pl.TX) * VEC);
    }
    for (; i < v1; i += pl.TX) take(load_vec<T, VEC>(row + i * VEC), i * VEC);
  }
  acc_t s = sum[0], m = mx[0];
  int mmi = mi[0];
#pragma unroll
  for (int v = 1; v < VEC; ++v) {
    s += sum[v];
    if (MAXED) merge_max(m, mmi, mx[v], mi[v] + v);
  }
  for (int o = 1; o < pl.TX; o *= 2) {  // fixed butterfly over the row's lanes (all lanes take part)
    s += __shfl_xor_sync(0xffffffffu, s, o, pl.TX);
    if (MAXED) {
      const acc_t om = __shfl_xor_sync(0xffffffffu, m, o, pl.TX);
      const int oi = __shfl_xor_sync(0xffffffffu, mmi, o, pl.TX);
      merge_max(m, mmi, om, oi);
    }
  }
  if (tx == 0 && c < pl.C) {
    const int64_t o = out.slot(n, c, chunk);
    out.sum[o] = s;
    if (MAXED) {
      out.max[o] = m;
      out.idx[o] = mmi;
    }
  }
}

// ---------------------------------------------------------------------------- the channel gate

// One block per sample: the pooled vectors from the partials (parts in order), then f and the
// gate (per_sample.cuh's channel_gate). The op's contract for pool "avg": max half and argmax zero.
template <typename acc_t, bool MAXED>
__global__ void __launch_bounds__(kThreads)
    _channel_gate(PoolPartials<acc_t> pp, int64_t HW, ChannelArgs<acc_t> g) {
  const int64_t n = blockIdx.x;
  const int C = g.C;
  for (int c = threadIdx.x; c < C; c += kThreads) {
    int64_t o = pp.slot(n, c, 0);
    acc_t s = pp.sum[o], m = MAXED ? pp.max[o] : acc_t(0);
    int i = MAXED ? pp.idx[o] : 0;
    for (int64_t k = 1; k < pp.chunks; ++k) {
      o += pp.k_stride;
      s += pp.sum[o];
      if (MAXED) take_max_in_order(m, i, pp.max[o], pp.idx[o]);
    }
    g.pooled[(n * 2) * C + c] = s / acc_t(HW);
    g.pooled[(n * 2 + 1) * C + c] = m;
    g.argmax[n * C + c] = i;
  }
  __syncthreads();
  channel_gate<WideMlp>(g, n);
}

// ---------------------------------------------------------------------------- scale: y = x * s[n, c]

// How a flat vector of x finds its channels' scales.
enum class ScaleRows {
  CL,   // channels_last: the VEC channels c0.. of one position (C % VEC == 0): one vector of s
  WIDE  // NCHW, HW >= VEC: a vector meets at most two (n, c) rows, split at HW - r0
};

template <typename T, int VEC, typename index_t, ScaleRows MODE>
__global__ void __launch_bounds__(kThreads)
    _scale(const T* __restrict__ x, T* __restrict__ y, const at::acc_type<T, true>* __restrict__ s, index_t nvec,
           index_t rows, index_t inner, Divider<index_t> div_row, Divider<index_t> div_sample) {
  using acc_t = at::acc_type<T, true>;
  for (index_t i = blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x; i < nvec;
       i += static_cast<index_t>(gridDim.x) * kThreads) {  // marker: hot loop (scale)
    const index_t e = i * VEC;
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + e);
    acc_t sv[VEC];
    if constexpr (MODE == ScaleRows::CL) {  // inner, div_row: C; div_sample: HW * C
      index_t q, c0, n, r;
      div_row.divmod(e, q, c0);
      div_sample.divmod(e, n, r);
      const Vec<acc_t, VEC> v = *reinterpret_cast<const Vec<acc_t, VEC>*>(s + n * inner + c0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sv[k] = v.v[k];
    } else {  // WIDE; inner, div_row: HW
      index_t row, r0;
      div_row.divmod(e, row, r0);
      const acc_t a = s[row], b = s[row + 1 < rows ? row + 1 : row];
      const index_t split = inner - r0;  // elements left in the first row
#pragma unroll
      for (int k = 0; k < VEC; ++k) sv[k] = static_cast<index_t>(k) < split ? a : b;
    }
    Vec<T, VEC> yv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) yv.v[k] = static_cast<T>(static_cast<acc_t>(xv.v[k]) * sv[k]);
    *reinterpret_cast<Vec<T, VEC>*>(y + e) = yv;
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
// Fills y, pooled and argmax (shapes and dtypes as the op returns them) and returns true, or
// returns false where the new kernels do not cover x yet (16-byte vectors impossible: the channels
// of channels_last or the H*W of NCHW not a multiple of 16 bytes, or x misaligned).
bool channel_forward(const at::Tensor& x, const ChannelWeights& cw, at::Tensor& y, at::Tensor& pooled,
                     at::Tensor& argmax);

}  // namespace next
}  // namespace cuda
}  // namespace attnfused

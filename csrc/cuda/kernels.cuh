// The two streaming kernels every CUDA op is built from, and the small weight-gradient kernels.
//
// One sample of x is a matrix [A, B] with B contiguous: NCHW gives A = C, B = H*W; channels_last
// gives A = H*W, B = C. A pooling over space or over channels is then a reduction along one axis:
//   "row" results (one per a) reduce along the contiguous axis b,
//   "col" results (one per b) reduce along the strided axis a.
// `_reduce_kernel` reads its tile of one or two big tensors once and writes per-tile partials;
// the last block to finish a sample (an integer ticket, not a float atomic) reduces that sample's
// partials in a fixed order and runs the op's small per-sample math (`Fin`): the MLP or 1D conv,
// the k x k conv, their backward, the gates. Results are therefore bit-identical run to run.
// `_apply_kernel` is the one elementwise pass that writes every output the size of x.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>

#include "../common.h"

namespace attnfused {
namespace cuda {

constexpr int kThreads = 256;  // every kernel here runs 256-thread blocks
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------- small helpers

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// widest vector (<= 16 bytes) whose loads stay aligned for rows of length B starting at p
template <typename T>
inline int pick_vec(int64_t B, std::initializer_list<const void*> ptrs) {
  constexpr int kMax = 16 / sizeof(T);
  if (B % kMax != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return kMax;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v, int width = 32) {
  // fixed butterfly: every lane ends with the same, order-fixed sum
  for (int o = width / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o, width);
  return v;
}

// (value, index) of a max with torch's conventions: NaN wins, ties go to the smaller index.
template <typename acc_t>
struct MaxIdx {
  acc_t v;
  int i;
  __device__ __forceinline__ static MaxIdx init() { return {-std::numeric_limits<acc_t>::infinity(), INT32_MAX}; }
  __device__ __forceinline__ void take(acc_t bv, int bi) {
    bool better;
    if (bv != bv)
      better = (v == v) || bi < i;
    else if (v != v)
      better = false;
    else
      better = bv > v || (bv == v && bi < i);
    if (better) {
      v = bv;
      i = bi;
    }
  }
};

template <typename acc_t>
__device__ __forceinline__ void warp_max(MaxIdx<acc_t>& m, int width) {
  for (int o = width / 2; o > 0; o /= 2) {
    acc_t ov = __shfl_xor_sync(0xffffffffu, m.v, o, width);
    int oi = __shfl_xor_sync(0xffffffffu, m.i, o, width);
    m.take(ov, oi);
  }
}

// ---------------------------------------------------------------------------- reduce pass

// What a reduction pass accumulates per element (p = x, or dy * x for the DOT passes).
enum class Pass {
  POOL,  // sum, max and argmax of p * m  (one direction)
  DOT,   // sum of dy * x * m             (row, col or both)
  MASK,  // sum of x * (m + [idx == other coordinate] * q)  (one direction)
};
enum Dir : int { ROW = 1, COL = 2, BOTH = 3 };

// Everything a reduce pass and its per-sample step need; filled on the host, passed by value.
template <typename acc_t>
struct Params {
  // shape: N samples of [A, B]; C, H, W as in x; cl = channels_last (A = H*W, B = C)
  int64_t N;
  int A, B, C, H, W, HW;
  bool cl;
  // tiling (see `tile_plan`): TX lanes along b (power of two <= 32), TY = kThreads / TX rows,
  // each thread covers KA rows and KB vectors along b
  int TX, KA, KB;
  int nbx, nay;  // tiles along b (row partial chunks) and along a (col partial chunks)
  // multipliers: row results use mb[b] (and ib/qb for MASK), col results use ma[a] (ia/qa)
  const acc_t* ma;
  const acc_t* mb;
  const int64_t* ia;
  const int64_t* ib;
  const acc_t* qa;
  const acc_t* qb;
  // partials [N][chunks][L] and the per-sample reduced results [N][L]
  acc_t *part_sum_r, *part_max_r, *part_sum_c, *part_max_c;
  int *part_idx_r, *part_idx_c;
  acc_t *sum_r, *max_r, *sum_c, *max_c;
  int *idx_r, *idx_c;
  int* ticket;  // [N], zeroed before the launch
};

// `Fin::run(n, params, args)` is the per-sample step, run by the last block of sample n after
// the reduced results are in place (all threads of the block call it).
template <typename T, int VEC, Pass PASS, int DIR, class Fin>
__global__ void __launch_bounds__(kThreads)
    _reduce_kernel(const T* __restrict__ x, const T* __restrict__ dy, Params<at::acc_type<T, true>> p,
                   typename Fin::Args args) {
  using acc_t = at::acc_type<T, true>;
  constexpr bool ROWS = DIR & ROW, COLS = DIR & COL;
  constexpr bool POOLING = PASS == Pass::POOL;
  static_assert(!(POOLING && DIR == BOTH), "pooling runs one direction per pass");

  const int tid = threadIdx.x;
  const int TX = p.TX, TY = kThreads / p.TX;
  const int tx = tid % TX, ty = tid / TX;
  // 1-D grid (no 65535 limit on samples): block = (n, ay, bx), bx fastest
  const int per_sample = p.nbx * p.nay;
  const int64_t n = blockIdx.x / per_sample;
  const int ay = (blockIdx.x % per_sample) / p.nbx, bx = blockIdx.x % p.nbx;
  const int b_base = bx * TX * VEC * p.KB;
  const int a_base = ay * TY * p.KA;
  const int64_t sample = n * p.A * static_cast<int64_t>(p.B);

  const acc_t* ma = p.ma ? p.ma + n * p.A : nullptr;
  const acc_t* mb = p.mb ? p.mb + n * p.B : nullptr;
  const int64_t* ia = p.ia ? p.ia + n * p.A : nullptr;
  const int64_t* ib = p.ib ? p.ib + n * p.B : nullptr;
  const acc_t* qa = p.qa ? p.qa + n * p.A : nullptr;
  const acc_t* qb = p.qb ? p.qb + n * p.B : nullptr;

  acc_t col_sum[VEC];
  MaxIdx<acc_t> col_max[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    col_sum[v] = acc_t(0);
    col_max[v] = MaxIdx<acc_t>::init();
  }

  for (int ka = 0; ka < p.KA; ++ka) {
    const int a = a_base + ka * TY + ty;
    const bool arow = a < p.A;
    acc_t row_sum = acc_t(0);
    MaxIdx<acc_t> row_max = MaxIdx<acc_t>::init();
    if (arow) {
      const acc_t m_a = ma ? ma[a] : acc_t(1);
      const T* xrow = x + sample + static_cast<int64_t>(a) * p.B;
      const T* drow = dy ? dy + sample + static_cast<int64_t>(a) * p.B : nullptr;
      for (int kb = 0; kb < p.KB; ++kb) {
        const int b = b_base + (kb * TX + tx) * VEC;
        if (b >= p.B) break;  // B % VEC == 0, so the whole vector is in range
        Vec<T, VEC> xv = *reinterpret_cast<const Vec<T, VEC>*>(xrow + b);
        Vec<T, VEC> dv;
        if (PASS == Pass::DOT) dv = *reinterpret_cast<const Vec<T, VEC>*>(drow + b);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          acc_t e = static_cast<acc_t>(xv.v[v]);
          if (PASS == Pass::DOT) e *= static_cast<acc_t>(dv.v[v]);
          if (ROWS) {
            acc_t m = mb ? mb[b + v] : acc_t(1);
            if (PASS == Pass::MASK && ib[b + v] == a) m += qb[b + v];
            row_sum += e * m;
            if (POOLING) row_max.take(e * m, b + v);
          }
          if (COLS) {
            acc_t m = m_a;
            if (PASS == Pass::MASK && ia[a] == b + v) m += qa[a];
            col_sum[v] += e * m;
            if (POOLING) col_max[v].take(e * m, a);
          }
        }
      }
    }
    if (ROWS) {  // all lanes take part in the shuffles; rows past A carry the identity
      row_sum = warp_sum(row_sum, TX);
      if (POOLING) warp_max(row_max, TX);
      if (tx == 0 && arow) {
        const int64_t o = (n * p.nbx + bx) * p.A + a;
        p.part_sum_r[o] = row_sum;
        if (POOLING) {
          p.part_max_r[o] = row_max.v;
          p.part_idx_r[o] = row_max.i;
        }
      }
    }
  }

  if (COLS) {  // fixed-order sum of the TY row-groups of the tile through shared memory
    __shared__ acc_t s_sum[kThreads * VEC];
    __shared__ acc_t s_max[POOLING ? kThreads * VEC : 1];
    __shared__ int s_idx[POOLING ? kThreads * VEC : 1];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      s_sum[ty * TX * VEC + tx * VEC + v] = col_sum[v];
      if (POOLING) {
        s_max[ty * TX * VEC + tx * VEC + v] = col_max[v].v;
        s_idx[ty * TX * VEC + tx * VEC + v] = col_max[v].i;
      }
    }
    __syncthreads();
    for (int j = tid; j < TX * VEC; j += kThreads) {
      const int b = b_base + j;
      if (b >= p.B) continue;
      acc_t s = acc_t(0);
      MaxIdx<acc_t> m = MaxIdx<acc_t>::init();
      for (int r = 0; r < TY; ++r) {
        s += s_sum[r * TX * VEC + j];
        if (POOLING) m.take(s_max[r * TX * VEC + j], s_idx[r * TX * VEC + j]);
      }
      const int64_t o = (n * p.nay + ay) * p.B + b;
      p.part_sum_c[o] = s;
      if (POOLING) {
        p.part_max_c[o] = m.v;
        p.part_idx_c[o] = m.i;
      }
    }
  }

  // last block of this sample: reduce the partials in chunk order, then the per-sample step
  __shared__ bool s_last;
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(p.ticket + n, 1) == per_sample - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (ROWS) {
    for (int a = tid; a < p.A; a += kThreads) {
      acc_t s = acc_t(0);
      MaxIdx<acc_t> m = MaxIdx<acc_t>::init();
      for (int ch = 0; ch < p.nbx; ++ch) {
        const int64_t o = (n * p.nbx + ch) * p.A + a;
        s += __ldcg(p.part_sum_r + o);
        if (POOLING) m.take(__ldcg(p.part_max_r + o), __ldcg(p.part_idx_r + o));
      }
      p.sum_r[n * p.A + a] = s;
      if (POOLING) {
        p.max_r[n * p.A + a] = m.v;
        p.idx_r[n * p.A + a] = m.i;
      }
    }
  }
  if (COLS) {
    for (int b = tid; b < p.B; b += kThreads) {
      acc_t s = acc_t(0);
      MaxIdx<acc_t> m = MaxIdx<acc_t>::init();
      for (int ch = 0; ch < p.nay; ++ch) {
        const int64_t o = (n * p.nay + ch) * p.B + b;
        s += __ldcg(p.part_sum_c + o);
        if (POOLING) m.take(__ldcg(p.part_max_c + o), __ldcg(p.part_idx_c + o));
      }
      p.sum_c[n * p.B + b] = s;
      if (POOLING) {
        p.max_c[n * p.B + b] = m.v;
        p.idx_c[n * p.B + b] = m.i;
      }
    }
  }
  __syncthreads();
  Fin::run(n, p, args);
}

// ---------------------------------------------------------------------------- apply pass

// out[n,c,hw] = ((IN ? in * t[hw] : 0) + (SP ? pc[hw] + [c == ic[hw]] qc[hw] : 0)) * s[c]
//               + (CH ? ph[c] + [hw == ih[c]] qh[c] : 0)
// s and t may be null (= 1). This covers every forward (x * s * t) and every input gradient.
template <typename acc_t>
struct ApplyParams {
  int64_t numel;
  int A, B, C, HW;
  bool cl;
  const acc_t* s;  // [N, C]
  const acc_t* t;  // [N, HW]
  const acc_t* pc;
  const acc_t* qc;
  const int64_t* ic;  // [N, HW]
  const acc_t* ph;
  const acc_t* qh;
  const int64_t* ih;  // [N, C]
};

template <typename index_t>
struct Divider {
  index_t d;
  __host__ __device__ explicit Divider(index_t d_) : d(d_) {}
  __device__ __forceinline__ void divmod(index_t v, index_t& q, index_t& r) const {
    q = v / d;
    r = v - q * d;
  }
};
template <>
struct Divider<uint32_t> {  // multiply-shift division for the 32-bit path
  at::cuda::detail::IntDivider<uint32_t> d;
  explicit Divider(uint32_t d_) : d(d_) {}  // built on the host
  __device__ __forceinline__ void divmod(uint32_t v, uint32_t& q, uint32_t& r) const {
    auto qr = d.divmod(v);
    q = qr.div;
    r = qr.mod;
  }
};

template <typename T, int VEC, typename index_t, bool IN, bool SP, bool CH>
__global__ void __launch_bounds__(kThreads)
    _apply_kernel(const T* __restrict__ in, T* __restrict__ out, ApplyParams<at::acc_type<T, true>> p,
                  Divider<index_t> divB, Divider<index_t> divA) {
  using acc_t = at::acc_type<T, true>;
  const index_t nvec = static_cast<index_t>(p.numel / VEC);
  for (index_t i = blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x; i < nvec;
       i += static_cast<index_t>(gridDim.x) * kThreads) {
    const index_t e = i * VEC;
    index_t q, b, n, a;
    divB.divmod(e, q, b);  // the VEC elements share the row (B % VEC == 0)
    divA.divmod(q, n, a);
    Vec<T, VEC> iv, ov;
    if (IN) iv = *reinterpret_cast<const Vec<T, VEC>*>(in + e);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int64_t c = p.cl ? static_cast<int64_t>(b) + v : static_cast<int64_t>(a);
      const int64_t hw = p.cl ? static_cast<int64_t>(a) : static_cast<int64_t>(b) + v;
      const int64_t nc = static_cast<int64_t>(n) * p.C + c, nhw = static_cast<int64_t>(n) * p.HW + hw;
      acc_t g = acc_t(0);
      if (IN) g = static_cast<acc_t>(iv.v[v]) * (p.t ? p.t[nhw] : acc_t(1));
      if (SP) g += p.pc[nhw] + (p.ic[nhw] == c ? p.qc[nhw] : acc_t(0));
      if (p.s) g *= p.s[nc];
      if (CH) g += p.ph[nc] + (p.ih[nc] == hw ? p.qh[nc] : acc_t(0));
      ov.v[v] = static_cast<T>(g);
    }
    *reinterpret_cast<Vec<T, VEC>*>(out + e) = ov;
  }
}

// ---------------------------------------------------------------------------- weight gradients

// out[i, j] = sum_r a[r, i] * b[r, j], r in order (a [R, I], b [R, J] row-major): the sum over
// samples of per-sample outer products, as a small tiled product with a fixed reduction order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _outer_sum_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ b, acc_t* __restrict__ out, int R,
                      int I, int J) {
  constexpr int TI = 32, TJ = 32, TR = 32;
  __shared__ acc_t sa[TR][TI + 1];
  __shared__ acc_t sb[TR][TJ + 1];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;  // 32 x 8 threads, 4 rows i each
  const int i0 = blockIdx.y * TI, j0 = blockIdx.x * TJ;
  acc_t acc[TI / kWarps] = {};
  for (int r0 = 0; r0 < R; r0 += TR) {
    for (int k = ty; k < TR; k += kWarps) {
      const int r = r0 + k;
      sa[k][tx] = (r < R && i0 + tx < I) ? a[static_cast<int64_t>(r) * I + i0 + tx] : acc_t(0);
      sb[k][tx] = (r < R && j0 + tx < J) ? b[static_cast<int64_t>(r) * J + j0 + tx] : acc_t(0);
    }
    __syncthreads();
    for (int k = 0; k < TR; ++k) {
#pragma unroll
      for (int u = 0; u < TI / kWarps; ++u) acc[u] += sa[k][ty + u * kWarps] * sb[k][tx];
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < TI / kWarps; ++u) {
    const int i = i0 + ty + u * kWarps, j = j0 + tx;
    if (i < I && j < J) out[static_cast<int64_t>(i) * J + j] = acc[u];
  }
}

// out[j] = scale * sum_r a[r, j], r in order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _column_sum_kernel(const acc_t* __restrict__ a, acc_t* __restrict__ out, int64_t R, int J, acc_t scale) {
  const int j = blockIdx.x * kThreads + threadIdx.x;
  if (j >= J) return;
  acc_t s = acc_t(0);
  for (int64_t r = 0; r < R; ++r) s += a[r * J + j];
  out[j] = s * scale;
}

}  // namespace cuda
}  // namespace attnfused

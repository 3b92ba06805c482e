// The new path's small math (next.cuh): the channel gate and its backward over the whole batch,
// from the reduction passes' partials, in kernels of their own.
#pragma once

#include "args.cuh"
#include "next_pool.cuh"

namespace attnfused {
namespace cuda {
namespace next {

// ---------------------------------------------------------------------------- the channel gate
// Small math over the whole batch, in kernels of their own: the pooled vectors from the partials,
// then (MLP) two products over all samples that read each weight once per tile of kRowsPerWarp
// samples (the hidden layer's activation between them), then the logits and the gate. Every sum
// has a fixed order, so reruns are bit-identical.

// a / b rounded as IEEE division (--use_fast_math makes float's `/` approximate): as torch's g / count
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return a / b; }

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

// One thread per (n, hw): sum the partials over channels in order -> the spatial maps smaps [N, 2, HW]
// = (max, mean) and sargmax [N, HW], the first channel of the max.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _spatial_maps(PoolPartials<acc_t> pp, int64_t N, int64_t HW, int64_t C, acc_t* __restrict__ smaps,
                  int64_t* __restrict__ sargmax) {
  int64_t t, n, p;
  if (!item_of(N, HW, t, n, p)) return;
  int64_t o = pp.slot(n, p, 0);
  acc_t s = pp.sum[o], m = pp.max[o];
  int i = pp.idx[o];
  for (int64_t k = 1; k < pp.chunks; ++k) {
    o += pp.k_stride;
    s += pp.sum[o];
    take_max_in_order(m, i, pp.max[o], pp.idx[o]);
  }
  smaps[(n * 2) * HW + p] = m;
  smaps[(n * 2 + 1) * HW + p] = s / acc_t(C);
  sargmax[n * HW + p] = i;
}

// One thread per (n, hw): a DOT pass over channels' partials, summed over its chunks in order ->
// out [N, HW] (spatial_scale's backward: dt = sum_c dy * x).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _spatial_dot(PoolPartials<acc_t> pp, int64_t N, int64_t HW, acc_t* __restrict__ out) {
  int64_t t, n, p;
  if (!item_of(N, HW, t, n, p)) return;
  int64_t o = pp.slot(n, p, 0);
  acc_t s = pp.sum[o];
  for (int64_t k = 1; k < pp.chunks; ++k) {
    o += pp.k_stride;
    s += pp.sum[o];
  }
  out[t] = s;
}

// The planes [P, H, W] of one sample (planes: plane 0; `stride` elements from one to the next) that
// a tile of ConvTiles reads: rows [lo, hi) copied to shared memory when `staged`, as an image of
// hi - lo rows whose row 0 is lo; else the planes in place. Every thread of the block calls it.
template <typename acc_t>
struct TilePlanes {
  const acc_t* at;  // plane 0, row row0
  int64_t stride;   // elements from one plane to the next
  int64_t H, row0;  // the rows the conv sees, and the first one's row in the image
};
template <typename acc_t, int P>
__device__ TilePlanes<acc_t> tile_planes(const acc_t* planes, int64_t stride, const ConvTiles& pl, bool staged,
                                         int64_t lo, int64_t hi) {
  extern __shared__ __align__(16) unsigned char stage_raw[];
  if (!staged) return TilePlanes<acc_t>{planes, stride, pl.H, 0};
  acc_t* st = reinterpret_cast<acc_t*>(stage_raw);
  const int64_t count = (hi - lo) * pl.W;
#pragma unroll
  for (int m = 0; m < P; ++m)
    for (int64_t e = threadIdx.x; e < count; e += kThreads) st[m * count + e] = planes[m * stride + lo * pl.W + e];
  __syncthreads();
  return TilePlanes<acc_t>{st, count, hi - lo, lo};
}

// The dynamic shared memory a tile kernel over P planes launches with (0: it reads them in place).
template <typename acc_t, int P>
size_t tile_stage_bytes(const ConvTiles& pl) {
  return pl.stages(P, sizeof(acc_t)) ? size_t(pl.most_rows() * pl.W * P) * sizeof(acc_t) : 0;
}

// A block per tile of rows (ConvTiles), a thread per position of them: the k x k conv of the maps
// (zero padding; the maps' rows and halo staged in shared memory) and the gate -> z and t [N, HW];
// DLOG (the backward, the gate again from the saved maps): also ds = the dot pass's partials over
// channels summed in order, and dlog = ds * gate'(z).
template <typename acc_t, bool DLOG>
__global__ void __launch_bounds__(kThreads)
    _spatial_gate(SpatialArgs<acc_t> g, ConvTiles pl, bool staged, PoolPartials<acc_t> pp) {
  int64_t n, i0, i1, lo, hi;
  pl.rows(blockIdx.x, n, i0, i1, lo, hi);
  const auto mp = tile_planes<acc_t, 2>(g.smaps + n * 2 * g.HW, g.HW, pl, staged, lo, hi);
  for (int64_t q = threadIdx.x; q < (i1 - i0) * g.W; q += kThreads) {
    const int64_t i = i0 + q / g.W, j = q - (q / g.W) * g.W, hw = i * g.W + j, t = n * g.HW + hw;
    const acc_t z = small::spatial_conv_at(mp.at, mp.at + mp.stride, g.maps, g.w, g.b, mp.H, int64_t(g.W),
                                           int64_t(g.k), i - mp.row0, j);
    g.z[t] = z;
    g.t[t] = gate_fwd(z, g.gate);
    if constexpr (DLOG) {
      int64_t o = pp.slot(n, hw, 0);
      acc_t ds = pp.sum[o];
      for (int64_t k = 1; k < pp.chunks; ++k) {
        o += pp.k_stride;
        ds += pp.sum[o];
      }
      g.dlog[t] = ds * gate_grad(z, g.gate);
    }
  }
}

// ---------------------------------------------------------------------------- the spatial gate, backward
// From the dot pass's partials over channels (sum_c dy * x, or of dy * x1 in CBAM) to the input
// gradient's per-position terms and the per-sample pieces of the conv's weight gradient
// (SpatialWeights::grads sums them over samples), over the whole batch: _spatial_gate<DLOG> above,
// then the two kernels below.

// A block per tile of rows, a thread per position: the transposed conv of dlog (its rows and halo
// staged) -> the maps' gradients, packed with t and the channel of the max: Term{t, pc = dmean /
// C, qc = dmax, sargmax} (also pc and qc in g).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _spatial_terms(SpatialArgs<acc_t> g, ConvTiles pl, bool staged, Term<acc_t, false>* __restrict__ terms) {
  int64_t n, i0, i1, lo, hi;
  pl.rows(blockIdx.x, n, i0, i1, lo, hi);
  const auto dl = tile_planes<acc_t, 1>(g.dlog + n * g.HW, g.HW, pl, staged, lo, hi);
  for (int64_t q = threadIdx.x; q < (i1 - i0) * g.W; q += kThreads) {
    const int64_t i = i0 + q / g.W, j = q - (q / g.W) * g.W, t = n * g.HW + i * g.W + j;
    acc_t dmax, dmean;
    small::spatial_dmaps_at(dl.at, g.w, g.maps, dl.H, int64_t(g.W), int64_t(g.k), i - dl.row0, j, dmax, dmean);
    g.pc[t] = dmean / acc_t(g.C);
    g.qc[t] = dmax;
    terms[t] = Term<acc_t, false>{g.t[t], g.pc[t], dmax, static_cast<int>(g.sargmax[t])};
  }
}

// One warp per (n, o): the per-sample weight gradient dw[m, i, j] (o < M k k) = sum_hw dlog[hw]
// map_m[hw + (i - p, j - p)], and (o = M k k) the bias's, sum_hw dlog[hw] -> g.dwp[n, o]; lanes
// stride over hw, then a fixed butterfly (the validated kernels' order).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) _spatial_dweight(int64_t N, SpatialArgs<acc_t> g) {
  const int kk = g.k * g.k, nw = g.M * kk + 1, p = (g.k - 1) / 2, lane = threadIdx.x % 32;
  const int64_t w = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (w >= N * nw) return;  // whole warps leave together
  const int64_t n = w / nw;
  const int o = static_cast<int>(w - n * nw);
  const acc_t* dlog = g.dlog + n * g.HW;
  acc_t a = acc_t(0);
  if (o < g.M * kk) {
    const int m = o / kk, i = (o % kk) / g.k, j = o % g.k;
    for (int hw = lane; hw < g.HW; hw += 32) a += dlog[hw] * conv_map(g, n, m, hw / g.W + i - p, hw % g.W + j - p);
  } else {
    for (int hw = lane; hw < g.HW; hw += 32) a += dlog[hw];
  }
  a = warp_sum(a);
  if (lane == 0) g.dwp[w] = a;
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
    terms[t] = Term<acc_t, true>{g.s[t], g.ph[t], div_rn(dmax, acc_t(cnt[t])), g.pooled[(n * 2 + 1) * C + c]};
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

}  // namespace next
}  // namespace cuda
}  // namespace attnfused

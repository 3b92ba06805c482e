// The small per-sample math of every block, run by one thread block per sample (the last block of a
// reduce pass, see kernels.cuh): channel MLP / 1D conv and gate, the k x k spatial conv and gate,
// and their backward. Work is split over the block's threads with fixed summation orders (warp
// butterflies and sequential loops), so it is deterministic. Vectors live in global scratch
// ([N, ...] buffers, L1/L2-resident); __syncthreads orders the phases of one sample.
// The math is csrc/small_math.h's, shared with the CPU kernels: its per-element `*_at` functions
// wherever one thread computes one output (the MLP's layers restate their loops to read the
// weights coalesced, several outputs at a time: warp_row_dots, block_column_dots). Reductions over
// C or H*W that would leave most of the block idle (hidden units, the gradients of the hidden layer
// and of the conv weights) run on a warp per output instead, with the same terms in a fixed
// butterfly order.
#pragma once

#include "../small_math.h"
#include "kernels.cuh"

namespace attnfused {
namespace cuda {

using small::pool_inputs;

// ---------------------------------------------------------------------------- channel attention

template <typename acc_t>
struct ChannelArgs {
  Kind kind;
  Pool pool;
  Act act;
  Gate gate;
  Padding padding;
  int C, Cr, k, HW;  // Cr: hidden width (mlp); k: conv size (conv)
  const acc_t* w1;   // [Cr, C] or [k]
  const acc_t* b1;   // [Cr] or null
  const acc_t* w2t;  // [Cr, C]: w2 transposed (the output layer and the hidden gradient read it coalesced)
  const acc_t* b2;   // [C] or null
  acc_t* pooled;     // [N, 2, C] (avg, max)
  int64_t* argmax;   // [N, C]
  acc_t* vin;        // [N, nv, C] the inputs f sees (pool_input of avg and max)
  acc_t* hid;        // [N, nv, Cr] pre-activations of the hidden layer
  acc_t* hact;       // [N, nv, Cr] act(hid)
  acc_t *z, *s;      // [N, C] logits and gate
  // backward
  acc_t* dlog;  // [N, C] d loss / d logits
  acc_t *ph, *qh;  // [N, C] davg / HW and dmax: the input gradient's channel terms
  acc_t* dhp;   // [N, nv, Cr] d loss / d hid
  acc_t* hsum;  // [N, Cr] sum over inputs of hact (dw2 = dlog^T hsum; dw1 = dhp^T vin)
  acc_t* dwk;   // [N, k] per-sample conv weight gradient
};

// The MLP's loops read the weights from L2 (every sample's block reads all of them): load latency
// bounds them, so each thread keeps many independent loads in flight, as many as its kernel can
// spare registers for. Every output's sum keeps the order of a plain loop (lane-strided then
// warp_sum, or j in order), whatever the width.
template <int ROWS, int COLS>
struct MlpWidth {
  static constexpr int kRows = ROWS;  // rows one warp dots at once (hidden layer, its gradient)
  static constexpr int kCols = COLS;  // columns one thread sums at once (output layer, input gradient)
};
// The forward's channel pooling pass: its occupancy, and so its bandwidth, needs few registers (the
// wide form took it from 48 to 255 registers per thread, and it ran about 2x slower at
// 128x1024x14x14 NCHW on an H100).
using NarrowMlp = MlpWidth<1, 1>;
// Kernels with one block per SM or per sample (on chip, the CBAM gates kernel), and the backward.
using WideMlp = MlpWidth<8, 8>;

// out[u] = sum_c m[j0 + u, c] * v[c] (c < n) for u < ROWS, rows past the last repeat it (the
// caller skips them); summed lane-strided, then by warp_sum: every lane gets the sums.
template <int ROWS, typename acc_t>
__device__ __forceinline__ void warp_row_dots(const acc_t* m, int rows, int n, int j0, const acc_t* v, int lane,
                                              acc_t* out) {
  const acc_t* row[ROWS];
  acc_t s[ROWS];
#pragma unroll
  for (int u = 0; u < ROWS; ++u) {
    row[u] = m + static_cast<int64_t>(min(j0 + u, rows - 1)) * n;
    s[u] = acc_t(0);
  }
#pragma unroll ROWS  // narrow (1): not unrolled, few registers
  for (int c = lane; c < n; c += 32) {
    const acc_t x = v[c];
#pragma unroll
    for (int u = 0; u < ROWS; ++u) s[u] += row[u][c] * x;
  }
#pragma unroll
  for (int u = 0; u < ROWS; ++u) out[u] = warp_sum(s[u]);
}

// For every column c < n of m [rows, n], COLS columns per thread at once: write(c, o0, o1) with
// o_v = init[c] + sum_j m[j, c] * h_v[j], j in order (init may be null: 0; h1 is read only if nv > 1).
template <int COLS, typename acc_t, typename Write>
__device__ __forceinline__ void block_column_dots(const acc_t* m, int rows, int n, const acc_t* h0, const acc_t* h1,
                                                  int nv, const acc_t* init, Write write) {
  constexpr int kUnrollJ = COLS > 1 ? 4 : 1;  // narrow (1): not unrolled, few registers
  for (int c0 = threadIdx.x; c0 < n; c0 += kThreads * COLS) {
    const acc_t* col[COLS];
    acc_t s0[COLS], s1[COLS];
#pragma unroll
    for (int i = 0; i < COLS; ++i) {
      const int c = min(c0 + i * kThreads, n - 1);  // past the last column: a repeat, not written
      col[i] = m + c;
      s0[i] = s1[i] = init ? init[c] : acc_t(0);
    }
    if (nv > 1) {
#pragma unroll kUnrollJ
      for (int j = 0; j < rows; ++j) {
        const int64_t o = static_cast<int64_t>(j) * n;
        const acc_t a0 = h0[j], a1 = h1[j];
#pragma unroll
        for (int i = 0; i < COLS; ++i) {
          const acc_t w = col[i][o];
          s0[i] += w * a0;
          s1[i] += w * a1;
        }
      }
    } else {
#pragma unroll kUnrollJ
      for (int j = 0; j < rows; ++j) {
        const int64_t o = static_cast<int64_t>(j) * n;
        const acc_t a0 = h0[j];
#pragma unroll
        for (int i = 0; i < COLS; ++i) s0[i] += col[i][o] * a0;
      }
    }
#pragma unroll
    for (int i = 0; i < COLS; ++i)
      if (c0 + i * kThreads < n) write(c0 + i * kThreads, s0[i], s1[i]);
  }
}

// z = f(pooled), s = gate(z) for sample n (and vin, hid, hact for the backward).
template <typename W, typename acc_t>
__device__ void channel_gate(const ChannelArgs<acc_t>& g, int64_t n) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int C = g.C, nv = pool_inputs(g.pool);
  const acc_t* pa = g.pooled + n * 2 * C;
  acc_t* vin = g.vin + n * nv * C;
  for (int i = tid; i < nv * C; i += kThreads) vin[i] = small::pool_input(pa[i % C], pa[C + i % C], g.pool, i / C);
  __syncthreads();
  if (g.kind == Kind::MLP) {
    const int Cr = g.Cr, ng = (Cr + W::kRows - 1) / W::kRows;
    acc_t* hid = g.hid + n * nv * Cr;
    acc_t* hact = g.hact + n * nv * Cr;
    for (int t = warp; t < nv * ng; t += kWarps) {  // hidden units j0.. of input vi (small::mlp_hidden_at)
      const int vi = t / ng, j0 = (t % ng) * W::kRows;
      acc_t a[W::kRows];
      warp_row_dots<W::kRows>(g.w1, Cr, C, j0, vin + vi * C, lane, a);
      if (lane == 0) {
#pragma unroll
        for (int u = 0; u < W::kRows; ++u) {
          const int j = j0 + u;
          if (j >= Cr) break;
          const acc_t h = a[u] + (g.b1 ? g.b1[j] : acc_t(0));
          hid[vi * Cr + j] = h;
          hact[vi * Cr + j] = act_fwd(h, g.act);
        }
      }
    }
    __syncthreads();
    // the output layer of each input, summed (small::mlp_out_at)
    block_column_dots<W::kCols>(g.w2t, Cr, C, hact, hact + Cr, nv, g.b2, [&](int c, acc_t o0, acc_t o1) {
      const acc_t z = nv > 1 ? o0 + o1 : o0;
      g.z[n * C + c] = z;
      g.s[n * C + c] = gate_fwd(z, g.gate);
    });
  } else {
    for (int c = tid; c < C; c += kThreads) {
      acc_t z = acc_t(0);
      for (int vi = 0; vi < nv; ++vi) z += small::conv1d_at(vin + vi * C, g.w1, g.k, C, g.padding, c);
      g.z[n * C + c] = z;
      g.s[n * C + c] = gate_fwd(z, g.gate);
    }
  }
  __syncthreads();
}

// Write the pooled outputs from the reduced sums / maxima over space, then the gate.
template <typename W, typename acc_t>
__device__ void channel_pool_and_gate(const ChannelArgs<acc_t>& g, int64_t n, const acc_t* sum, const acc_t* mx,
                                      const int* idx) {
  for (int c = threadIdx.x; c < g.C; c += kThreads) {
    g.pooled[(n * 2) * g.C + c] = sum[n * g.C + c] / acc_t(g.HW);
    g.pooled[(n * 2 + 1) * g.C + c] = mx[n * g.C + c];
    g.argmax[n * g.C + c] = idx[n * g.C + c];
  }
  __syncthreads();
  channel_gate<W>(g, n);
}

// Backward of the channel block for sample n, given red[c] = sum_hw dy * x: recomputes the
// gate, then dlog, the input-gradient terms ph / qh and the per-sample weight-gradient pieces.
// Runs inside a streaming reduce pass (the backward's dot or mask pass) but with the wide MLP: it
// puts those passes at 105-128 registers, not 48, which costs little next to the MLP's latency at
// the shapes where it matters (CBAM-FC training step, 128x2048x7x7 fp16 channels-last on an H100:
// 0.99 ms with 4 rows per warp, 0.86 ms wide, about 1.9 ms narrow).
template <typename acc_t>
__device__ void channel_backward(const ChannelArgs<acc_t>& g, int64_t n, const acc_t* red) {
  using W = WideMlp;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int C = g.C, nv = pool_inputs(g.pool);
  channel_gate<W>(g, n);
  for (int c = tid; c < C; c += kThreads) g.dlog[n * C + c] = red[n * C + c] * gate_grad(g.z[n * C + c], g.gate);
  __syncthreads();
  const acc_t* dlog = g.dlog + n * C;
  const acc_t* vin = g.vin + n * nv * C;
  // d loss / d v[c] of each input vi, folded into (davg, dmax) by the pooling's weights
  auto write_terms = [&](int c, acc_t dv0, acc_t dv1) {
    acc_t davg = 0, dmax = 0;
    small::pool_input_backward(dv0, g.pool, 0, davg, dmax);
    if (nv > 1) small::pool_input_backward(dv1, g.pool, 1, davg, dmax);
    g.ph[n * C + c] = davg / acc_t(g.HW);
    g.qh[n * C + c] = dmax;
  };
  if (g.kind == Kind::MLP) {
    const int Cr = g.Cr;
    // dh[j] = sum_c dlog[c] w2[c, j], W::kRows units per warp (small::mlp_dhidden_at)
    for (int j0 = warp * W::kRows; j0 < Cr; j0 += kWarps * W::kRows) {
      acc_t a[W::kRows];
      warp_row_dots<W::kRows>(g.w2t, Cr, C, j0, dlog, lane, a);
      if (lane == 0) {
#pragma unroll
        for (int u = 0; u < W::kRows; ++u) {
          const int j = j0 + u;
          if (j >= Cr) break;
          acc_t hs = acc_t(0);
          for (int vi = 0; vi < nv; ++vi) {
            const int64_t o = (n * nv + vi) * Cr + j;
            g.dhp[o] = a[u] * act_grad(g.hid[o], g.act);
            hs += g.hact[o];
          }
          g.hsum[n * Cr + j] = hs;
        }
      }
    }
    __syncthreads();
    const acc_t* dhp = g.dhp + n * nv * Cr;  // the input gradient of each input (small::mlp_dinput_at)
    block_column_dots<W::kCols>(g.w1, Cr, C, dhp, dhp + Cr, nv, static_cast<const acc_t*>(nullptr),
                      [&](int c, acc_t dv0, acc_t dv1) { write_terms(c, dv0, nv > 1 ? dv1 : acc_t(0)); });
  } else {
    const int p = (g.k - 1) / 2;
    for (int c = tid; c < C; c += kThreads) {  // the same dv for every input
      const acc_t dv = small::conv1d_dinput_at(dlog, g.w1, g.k, C, g.padding, c);
      write_terms(c, dv, dv);
    }
    for (int j = warp; j < g.k; j += kWarps) {  // dw[j] = sum_vi sum_c dlog[c] v_vi[c + j - p] (conv1d_dweight_at)
      acc_t a = acc_t(0);
      for (int c = lane; c < C; c += 32) {
        const int64_t i = small::conv1d_index(c + j - p, C, g.padding);
        if (i < 0) continue;
        for (int vi = 0; vi < nv; ++vi) a += dlog[c] * vin[vi * C + i];
      }
      a = warp_sum(a);
      if (lane == 0) g.dwk[n * g.k + j] = a;
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------- spatial attention

template <typename acc_t>
struct SpatialArgs {
  Maps maps;
  Gate gate;
  int C, H, W, HW, k, M;  // M: conv input maps (2, or 1 for "mix")
  const acc_t* w;         // [M, k, k]
  const acc_t* b;         // [1] or null
  acc_t* smaps;           // [N, 2, HW] (max, mean)
  int64_t* sargmax;       // [N, HW]
  acc_t *z, *t;           // [N, HW]
  // backward
  acc_t* dlog;     // [N, HW]
  acc_t *pc, *qc;  // [N, HW] dmean / C and dmax: the input gradient's spatial terms
  acc_t* dwp;      // [N, M*k*k + 1] per-sample weight (and bias, last) gradient
};

// Input map m of the conv at (h, w) of sample n; zero outside the image.
template <typename acc_t>
__device__ __forceinline__ acc_t conv_map(const SpatialArgs<acc_t>& g, int64_t n, int m, int h, int w) {
  if (h < 0 || h >= g.H || w < 0 || w >= g.W) return acc_t(0);
  const acc_t* sm = g.smaps + n * 2 * g.HW;
  const int hw = h * g.W + w;
  return small::spatial_map_in(sm[hw], sm[g.HW + hw], g.maps, m);
}

template <typename acc_t>
__device__ void spatial_gate(const SpatialArgs<acc_t>& g, int64_t n) {
  const acc_t* mx = g.smaps + n * 2 * g.HW;
  for (int hw = threadIdx.x; hw < g.HW; hw += kThreads) {
    const acc_t z = small::spatial_conv_at(mx, mx + g.HW, g.maps, g.w, g.b, g.H, g.W, g.k, hw / g.W, hw % g.W);
    g.z[n * g.HW + hw] = z;
    g.t[n * g.HW + hw] = gate_fwd(z, g.gate);
  }
  __syncthreads();
}

template <typename acc_t>
__device__ void spatial_pool_write(const SpatialArgs<acc_t>& g, int64_t n, const acc_t* sum, const acc_t* mx,
                                   const int* idx) {
  for (int hw = threadIdx.x; hw < g.HW; hw += kThreads) {
    g.smaps[(n * 2) * g.HW + hw] = mx[n * g.HW + hw];
    g.smaps[(n * 2 + 1) * g.HW + hw] = sum[n * g.HW + hw] / acc_t(g.C);
    g.sargmax[n * g.HW + hw] = idx[n * g.HW + hw];
  }
  __syncthreads();
}

// Backward of the spatial block for sample n, given red[hw] = sum_c dy * x (of the block's input).
template <typename acc_t>
__device__ void spatial_backward(const SpatialArgs<acc_t>& g, int64_t n, const acc_t* red) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int p = (g.k - 1) / 2, HW = g.HW;
  spatial_gate(g, n);
  for (int hw = tid; hw < HW; hw += kThreads) g.dlog[n * HW + hw] = red[n * HW + hw] * gate_grad(g.z[n * HW + hw], g.gate);
  __syncthreads();
  const acc_t* dlog = g.dlog + n * HW;
  for (int hw = tid; hw < HW; hw += kThreads) {  // transposed conv: d maps
    acc_t dmax, dmean;
    small::spatial_dmaps_at(dlog, g.w, g.maps, g.H, g.W, g.k, hw / g.W, hw % g.W, dmax, dmean);
    g.pc[n * HW + hw] = dmean / acc_t(g.C);
    g.qc[n * HW + hw] = dmax;
  }
  const int kk = g.k * g.k, nw = g.M * kk + 1;
  for (int o = warp; o < nw; o += kWarps) {  // per-sample dw[m, i, j] (spatial_dweight_at) and (last) db
    acc_t a = acc_t(0);
    if (o < g.M * kk) {
      const int m = o / kk, i = (o % kk) / g.k, j = o % g.k;
      for (int hw = lane; hw < HW; hw += 32) a += dlog[hw] * conv_map(g, n, m, hw / g.W + i - p, hw % g.W + j - p);
    } else {
      for (int hw = lane; hw < HW; hw += 32) a += dlog[hw];
    }
    a = warp_sum(a);
    if (lane == 0) g.dwp[n * nw + o] = a;
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------- the per-sample steps

// Which reduced results are per channel and which per position depends on the layout.
template <typename acc_t>
struct Reduced {
  const acc_t *sum, *max;
  const int* idx;
  __device__ static Reduced per_c(const Params<acc_t>& p) {
    return p.cl ? Reduced{p.sum_c, p.max_c, p.idx_c} : Reduced{p.sum_r, p.max_r, p.idx_r};
  }
  __device__ static Reduced per_hw(const Params<acc_t>& p) {
    return p.cl ? Reduced{p.sum_r, p.max_r, p.idx_r} : Reduced{p.sum_c, p.max_c, p.idx_c};
  }
};

template <typename acc_t>
struct NoFin {  // the reduced results are the op's output
  using Args = int;
  __device__ static void run(int64_t, const Params<acc_t>&, const Args&) {}
};

template <typename acc_t>
struct ChannelForwardFin {
  using Args = ChannelArgs<acc_t>;
  __device__ static void run(int64_t n, const Params<acc_t>& p, const Args& g) {
    auto r = Reduced<acc_t>::per_c(p);
    channel_pool_and_gate<NarrowMlp>(g, n, r.sum, r.max, r.idx);
  }
};

template <typename acc_t>
struct SpatialPoolFin {
  using Args = SpatialArgs<acc_t>;
  __device__ static void run(int64_t n, const Params<acc_t>& p, const Args& g) {
    auto r = Reduced<acc_t>::per_hw(p);
    spatial_pool_write(g, n, r.sum, r.max, r.idx);
  }
};

template <typename acc_t>
struct SpatialForwardFin {
  using Args = SpatialArgs<acc_t>;
  __device__ static void run(int64_t n, const Params<acc_t>& p, const Args& g) {
    SpatialPoolFin<acc_t>::run(n, p, g);
    spatial_gate(g, n);
  }
};

template <typename acc_t>
struct ChannelBackwardFin {
  using Args = ChannelArgs<acc_t>;
  __device__ static void run(int64_t n, const Params<acc_t>& p, const Args& g) {
    channel_backward(g, n, Reduced<acc_t>::per_c(p).sum);
  }
};

template <typename acc_t>
struct SpatialBackwardFin {
  using Args = SpatialArgs<acc_t>;
  __device__ static void run(int64_t n, const Params<acc_t>& p, const Args& g) {
    spatial_backward(g, n, Reduced<acc_t>::per_hw(p).sum);
  }
};

// CBAM backward, pass 2: the channel block's red[c] = (pass 1's sum_hw dy t x) + (this pass's
// sum_hw x (pc + [c == ic] qc)), then the channel backward.
template <typename acc_t>
struct CbamBackwardArgs {
  ChannelArgs<acc_t> ch;
  const acc_t* red1;  // [N, C] from pass 1
};

template <typename acc_t>
struct CbamChannelBackwardFin {
  using Args = CbamBackwardArgs<acc_t>;
  __device__ static void run(int64_t n, const Params<acc_t>& p, const Args& g) {
    acc_t* red = const_cast<acc_t*>(Reduced<acc_t>::per_c(p).sum);
    for (int c = threadIdx.x; c < g.ch.C; c += kThreads) red[n * g.ch.C + c] += g.red1[n * g.ch.C + c];
    __syncthreads();
    channel_backward(g.ch, n, red);
  }
};

// Gate values of both halves for the CBAM backward's first pass: one block per sample.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) _cbam_gates_kernel(ChannelArgs<acc_t> ch, SpatialArgs<acc_t> sp) {
  const int64_t n = blockIdx.x;
  channel_gate<WideMlp>(ch, n);
  spatial_gate(sp, n);
}

}  // namespace cuda
}  // namespace attnfused

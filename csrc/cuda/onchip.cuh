// The on-chip forward: one block per sample holds the whole sample in shared memory, so channel
// attention and CBAM forward read x once and write y once (1R + 1W). Picked by shape (see
// `onchip_plan`) when a sample fits in one block's shared memory and there are enough samples to
// fill most of a wave of resident blocks; $ATTNFUSED_CUDA_ONCHIP=0 turns it off, =1 takes it whenever a sample fits.
// The per-sample math is the multi-pass path's (per_sample.cuh); only the pooling's summation
// order differs (per row or column of the sample instead of per tile), fixed for a given shape.
#pragma once

#include <cstdlib>
#include <cstring>

#include "per_sample.cuh"

namespace attnfused {
namespace cuda {

template <typename acc_t>
struct OnChipParams {
  int A, B;         // the sample as [A, B], B contiguous (as in Params)
  bool cl;          // channels_last
  acc_t *csum, *cmax;  // [N, C] pooling over space
  int* cidx;
  acc_t *ssum, *smax;  // [N, HW] pooling over channels (CBAM)
  int* sidx;
};

// Sum, max and argmax of xs[a, b] * m (m indexed by the reduced coordinate, may be null) along b
// (ALONG_B: one warp per a) or along a (one thread per b). Results at out_*[i], i the kept coordinate.
template <typename T, typename acc_t>
__device__ void smem_pool(const T* xs, int A, int B, bool along_b, const acc_t* m, acc_t* out_sum, acc_t* out_max,
                          int* out_idx) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (along_b) {
    for (int a = warp; a < A; a += kWarps) {
      acc_t s = acc_t(0);
      MaxIdx<acc_t> mx = MaxIdx<acc_t>::init();
      for (int b = lane; b < B; b += 32) {
        const acc_t e = static_cast<acc_t>(xs[a * B + b]) * (m ? m[b] : acc_t(1));
        s += e;
        mx.take(e, b);
      }
      s = warp_sum(s);
      warp_max(mx, 32);
      if (lane == 0) {
        out_sum[a] = s;
        out_max[a] = mx.v;
        out_idx[a] = mx.i;
      }
    }
  } else {
    for (int b = tid; b < B; b += kThreads) {
      acc_t s = acc_t(0);
      MaxIdx<acc_t> mx = MaxIdx<acc_t>::init();
      for (int a = 0; a < A; ++a) {
        const acc_t e = static_cast<acc_t>(xs[a * B + b]) * (m ? m[a] : acc_t(1));
        s += e;
        mx.take(e, a);
      }
      out_sum[b] = s;
      out_max[b] = mx.v;
      out_idx[b] = mx.i;
    }
  }
  __syncthreads();
}

template <typename T, int VEC, bool CBAM>
__global__ void __launch_bounds__(kThreads)
    _onchip_forward_kernel(const T* __restrict__ x, T* __restrict__ y, OnChipParams<at::acc_type<T, true>> o,
                           ChannelArgs<at::acc_type<T, true>> ch, SpatialArgs<at::acc_type<T, true>> sp) {
  using acc_t = at::acc_type<T, true>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int64_t n = blockIdx.x;
  const int count = o.A * o.B;  // fits in shared memory, so in int
  const T* xg = x + n * count;
  T* yg = y + n * count;
  using V = Vec<T, VEC>;
  // several independent 16-byte loads in flight per thread: one block per SM must keep ~20 KB moving
#pragma unroll 8
  for (int i = threadIdx.x; i < count / VEC; i += kThreads) reinterpret_cast<V*>(xs)[i] = reinterpret_cast<const V*>(xg)[i];
  __syncthreads();

  const int C = ch.C, HW = o.cl ? o.A : o.B;
  // channel half: pool over space (along b in NCHW, along a in channels_last), then f and the gate
  smem_pool<T, acc_t>(xs, o.A, o.B, !o.cl, nullptr, o.csum + n * C, o.cmax + n * C, o.cidx + n * C);
  channel_pool_and_gate<WideMlp>(ch, n, o.csum, o.cmax, o.cidx);  // one block per SM: registers to spare
  const acc_t* s = ch.s + n * C;
  const acc_t* t = nullptr;
  if (CBAM) {  // spatial half on x1 = x * s, x1 never stored
    smem_pool<T, acc_t>(xs, o.A, o.B, o.cl, s, o.ssum + n * HW, o.smax + n * HW, o.sidx + n * HW);
    spatial_pool_write(sp, n, o.ssum, o.smax, o.sidx);
    spatial_gate(sp, n);
    t = sp.t + n * HW;
  }
#pragma unroll 4
  for (int i = threadIdx.x; i < count / VEC; i += kThreads) {
    const int a = (i * VEC) / o.B, b0 = (i * VEC) % o.B;  // B % VEC == 0: one row per vector
    V xv = reinterpret_cast<const V*>(xs)[i], yv;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int c = o.cl ? b0 + v : a, hw = o.cl ? a : b0 + v;
      acc_t g = static_cast<acc_t>(xv.v[v]) * s[c];
      if (CBAM) g *= t[hw];
      yv.v[v] = static_cast<T>(g);
    }
    reinterpret_cast<V*>(yg)[i] = yv;
  }
}

// Whether the on-chip forward runs for x (and with how much shared memory).
struct OnChipPlan {
  bool use = false;
  int64_t smem = 0;
};

template <typename T>
OnChipPlan onchip_plan(const at::Tensor& x) {
  OnChipPlan plan;
  const char* env = std::getenv("ATTNFUSED_CUDA_ONCHIP");
  if (env && std::strcmp(env, "0") == 0) return plan;
  const bool forced = env && std::strcmp(env, "1") == 0;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t bytes = ceil_div(x.numel() / std::max<int64_t>(x.size(0), 1) * int64_t(sizeof(T)), 16) * 16;
  if (x.size(0) == 0 || bytes > int64_t(prop->sharedMemPerBlockOptin)) return plan;
  // 3/4 of a wave of resident blocks at least: with fewer samples the multi-pass path spreads
  // each sample over many SMs
  const int64_t per_sm = std::max<int64_t>(1, int64_t(prop->sharedMemPerMultiprocessor) / (bytes + 1024));
  plan.use = forced || 4 * x.size(0) >= 3 * per_sm * prop->multiProcessorCount;
  plan.smem = bytes;
  return plan;
}

template <typename T, bool CBAM>
void launch_onchip(const at::Tensor& x, const at::Tensor& y, const OnChipPlan& plan, Scratch& s,
                   const ChannelArgs<at::acc_type<T, true>>& ch, const SpatialArgs<at::acc_type<T, true>>& sp) {
  using acc_t = at::acc_type<T, true>;
  OnChipParams<acc_t> o{};
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  o.cl = is_channels_last(x);
  o.A = o.cl ? HW : C;
  o.B = o.cl ? C : HW;
  o.csum = s.f<acc_t>(N * C), o.cmax = s.f<acc_t>(N * C), o.cidx = s.i(N * C);
  if (CBAM) o.ssum = s.f<acc_t>(N * HW), o.smax = s.f<acc_t>(N * HW), o.sidx = s.i(N * HW);
  TORCH_CHECK(N < INT32_MAX, "attnfused: too many samples for one launch (", N, ")");
  constexpr int VM = 16 / sizeof(T);
  const bool vec = pick_vec<T>(o.B, {x.data_ptr(), y.data_ptr()}) == VM;
  auto go = [&](auto kernel) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem)));
    kernel<<<static_cast<unsigned>(N), kThreads, plan.smem, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<T>(), y.data_ptr<T>(), o, ch, sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (vec)
    go(_onchip_forward_kernel<T, VM, CBAM>);
  else
    go(_onchip_forward_kernel<T, 1, CBAM>);
}

}  // namespace cuda
}  // namespace attnfused

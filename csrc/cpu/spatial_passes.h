// Spatial attention's passes on a batch, forward (a sweep per channels_last sample, else pass by
// pass) and backward, shared by the spatial attention and CBAM ops.
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "cpu/batch.h"
#include "cpu/gemm.h"
#include "cpu/passes.h"
#include "cpu/spatial_math.h"
#include "cpu/sweep.h"
#include "cpu/vec_io.h"

namespace attnfused {
namespace cpu {

// Spatial attention's forward on one channels_last sample xn (x1 = xn * S[c], S optional) in one
// sweep down its image rows: row h is pooled over channels (smaps, sargmax, the padded conv input)
// while row h - p - 1, whose conv inputs are all in by then (p = (k - 1) / 2), takes its conv, gate
// and out = x1 * t, pixel by pixel in turn with the pooling, so that the pooling's arithmetic runs
// while the output's stores drain (as separate passes, the pooling ran with the memory idle). Each
// row of x is read again p + 1 rows after its first read, from L2 (an image row of a ResNet-50
// stage is 56 KB). Every output as the passes make it: the same functions per pixel, conv output
// row and element. Meanwhile [ahead_x, + ahead_bytes), x that comes next, is fetched into cache.
// `tail`: the forward's tail, its residual indexed like on.
template <typename scalar_t>
void spatial_forward_sweep(const scalar_t* xn, const Dims& d, const acc_type<scalar_t>* S,
                           const acc_type<scalar_t>* weight, const acc_type<scalar_t>* bias, Maps maps, Gate gate,
                           int64_t k, acc_type<scalar_t>* smn, int64_t* san, scalar_t* on, bool stream,
                           const scalar_t* ahead_x, int64_t ahead_bytes, const OutTail<scalar_t>& tail) {
  using acc_t = acc_type<scalar_t>;
  const PadDims g(d.H, d.W, k, maps);
  std::vector<acc_t> pad(g.M * g.plane(), acc_t(0)), z(d.W), t(d.W);
  stream = stream && d.C * int64_t(sizeof(scalar_t)) % 64 == 0;  // whole lines only, as apply
  const char* ahead = reinterpret_cast<const char*>(ahead_x);
  const int64_t per_pixel = d.HW ? (ahead_bytes / d.HW + 63) / 64 * 64 : 0;  // in whole lines
  int64_t ahead_done = 0;
  for (int64_t h = 0; h < d.H + g.p + 1; ++h) {
    const int64_t r = h - g.p - 1;  // the row to scale
    if (r >= 0) {
      std::fill(z.begin(), z.end(), bias ? bias[0] : acc_t(0));
      corr2d_acc(pad.data(), g.M, weight, g, z.data(), r, r + 1);
      gate_forward(z.data(), gate, d.W, t.data());
    }
    for (int64_t w = 0; w < d.W; ++w) {
      if (r >= 0) {
        const int64_t i = (r * d.W + w) * d.C;
        const bool nt = stream && VecIO<scalar_t>::can_stream(on + i);
        if (S)
          apply_row<scalar_t, true, true, false, true, false>(on + i, xn + i, d.C, true, &t[w], nullptr, S, nullptr,
                                                              nt, tail.at(i));
        else
          apply_row<scalar_t, true, true, false, false, false>(on + i, xn + i, d.C, true, &t[w], nullptr, nullptr,
                                                               nullptr, nt, tail.at(i));
      }
      for (const int64_t end = std::min(ahead_bytes, ahead_done + per_pixel); ahead_done < end; ahead_done += 64)
        __builtin_prefetch(ahead + ahead_done, 0, 3);
      if (h < d.H) {
        const int64_t hw = h * d.W + w;
        pool_pixel(xn + hw * d.C, d.C, S, smn[hw], smn[d.HW + hw], san[hw]);
        for (int64_t m = 0; m < g.M; ++m)
          pad[m * g.plane() + (h + g.p) * g.Wp + w + g.p] =
              small::spatial_map_in(smn[hw], smn[d.HW + hw], maps, int(m));
      }
    }
  }
  if (stream) stream_fence();
}

// Spatial attention's passes on x1 = x * S[n, c] (S optional: plain x) for samples
// [n0, n0 + d1.N): smaps [N, 2, HW] and sargmax [N, HW] of x1, the conv and gate t, and out = x1 * t
// (then the tail, its residual indexed like out). xg: what the passes read for those samples (from
// their first: x's, or a prologue's x', GroupInput); the other pointers are the whole batch's, x's
// too (the sweep fetches the next samples' x ahead).
template <typename scalar_t>
void spatial_forward_samples(const scalar_t* x, const scalar_t* xg, const Dims& d, const acc_type<scalar_t>* S,
                             const acc_type<scalar_t>* weight, const acc_type<scalar_t>* bias, Maps maps, Gate gate,
                             int64_t k, acc_type<scalar_t>* smaps, int64_t* sargmax, scalar_t* out, int64_t n0,
                             const Dims& d1, const OutTail<scalar_t>& tail) {
  using acc_t = acc_type<scalar_t>;
  const bool stream = stream_output<scalar_t>(d);
  if (d.cl && at::in_parallel_region()) {  // each sample by one thread (for_samples): in one sweep
    // Samples past kGroupBytes (each its own group) fetch the thread's next sample during their
    // sweep, for the next pass over space to find in cache: the 56x56 forward at batch 32 measured
    // 6-11% faster; smaller samples gained nothing (28x28, 1.6 MB) or lost 10-13% (14x14, groups
    // of two).
    const NextSamples next = next_samples;
    const bool fetch = d.sample() * int64_t(sizeof(scalar_t)) > kGroupBytes;
    const int64_t share = fetch ? next.count * d.sample() / d1.N : 0;
    for (int64_t n = n0; n < n0 + d1.N; ++n)
      spatial_forward_sweep(xg + (n - n0) * d.sample(), d, S ? S + n * d.C : nullptr, weight, bias, maps, gate, k,
                            smaps + n * 2 * d.HW, sargmax + n * d.HW, out + n * d.sample(), stream,
                            x + next.n0 * d.sample() + (n - n0) * share, share * int64_t(sizeof(scalar_t)),
                            tail.at(n * d.sample()));
    return;
  }
  std::vector<acc_t> z(d1.N * d.HW), t(d1.N * d.HW);
  const scalar_t* xn = xg;
  const acc_t* Sn = S ? S + n0 * d.C : nullptr;
  acc_t* smn = smaps + n0 * 2 * d.HW;
  pool_channels<scalar_t>(xn, d1, Sn, smn, sargmax + n0 * d.HW);
  spatial_small_forward<acc_t>(smn, weight, bias, maps, gate, d1.N, d.H, d.W, k, z.data(), t.data());
  const OutTail<scalar_t> tn = tail.at(n0 * d.sample());
  if (S)
    apply<scalar_t, true, true, false, true, false>(out + n0 * d.sample(), xn, d1, t.data(), nullptr, Sn, nullptr,
                                                    nullptr, NoHot(), stream, tn);
  else
    apply<scalar_t, true, true, false, false, false>(out + n0 * d.sample(), xn, d1, t.data(), nullptr, nullptr,
                                                     nullptr, nullptr, NoHot(), stream, tn);
}

// Spatial attention's backward on x1 = x * S[n, c] (S optional: plain x), shared by the spatial
// attention and CBAM ops. `samples` covers samples [n0, n0 + d1.N) (run it through for_samples):
// the gate t from the saved maps, dz = gate'(z) sum_c dy * x1, back through the conv's input to
// dmax and B = dmean / C. `weights` then sums the conv's bias gradient over the batch and gives
// the job (run_jobs) of its weight gradient.
template <typename acc_t>
struct SpatialBackward {
  Dims d;
  const acc_t *smaps, *weight, *bias;
  Maps maps;
  Gate gate;
  int64_t k, pad_len;
  std::vector<acc_t> z, t, dz, dmax, B, pads;  // [N, HW] each; pads: the conv's padded inputs

  SpatialBackward(const Dims& d_, const acc_t* smaps_, const acc_t* weight_, const acc_t* bias_, Maps maps_,
                  Gate gate_, int64_t k_)
      : d(d_), smaps(smaps_), weight(weight_), bias(bias_), maps(maps_), gate(gate_), k(k_),
        pad_len(padded_size(d_, k_, maps_)), z(d_.N * d_.HW), t(d_.N * d_.HW), dz(d_.N * d_.HW),
        dmax(d_.N * d_.HW), B(d_.N * d_.HW), pads(d_.N * pad_len) {}

  static int64_t padded_size(const Dims& d, int64_t k, Maps maps) {
    const PadDims g(d.H, d.W, k, maps);
    return g.M * g.plane();
  }

  template <typename scalar_t>
  void samples(const scalar_t* dy, const scalar_t* x, const acc_t* S, int64_t n0, const Dims& d1) {
    const int64_t i0 = n0 * d.HW, len = d1.N * d.HW;
    const scalar_t* xn = x + n0 * d.sample();
    const scalar_t* dyn = dy + n0 * d.sample();
    spatial_small_forward<acc_t>(smaps + 2 * i0, weight, bias, maps, gate, d1.N, d.H, d.W, k, z.data() + i0,
                                 t.data() + i0);
    if (S)
      dot_channels<scalar_t, true>(dyn, xn, d1, S + n0 * d.C, dz.data() + i0);
    else
      dot_channels<scalar_t, false>(dyn, xn, d1, nullptr, dz.data() + i0);
    gate_backward(z.data() + i0, gate, len, dz.data() + i0);
    spatial_input_backward<acc_t>(smaps + 2 * i0, dz.data() + i0, weight, maps, d1.N, d.H, d.W, k, dmax.data() + i0,
                                  B.data() + i0, pads.data() + n0 * pad_len);
    for (int64_t i = i0; i < i0 + len; ++i) B[i] /= acc_t(d.C);
  }

  Job weights(acc_t* dweight, acc_t* dbias) const {
    return spatial_weight_backward<acc_t>(dz.data(), pads.data(), maps, d.N, d.H, d.W, k, dweight, dbias);
  }
};

}  // namespace cpu
}  // namespace attnfused

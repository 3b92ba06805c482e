// The fused elementwise pass (apply): one read of the input, one write of the output, with the
// one-hot terms of the max gradients (HotIndex) rewritten while each row is in L1.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "cpu/batch.h"
#include "cpu/vec_io.h"

namespace attnfused {
namespace cpu {

// The elements whose gradient takes a max's one-hot term, listed per row of the elementwise pass
// (rows as in Dims): argmax [N, C] marks (n, c, argmax[n, c]) and sargmax [N, HW] marks
// (n, sargmax[n, hw], hw). The one that lies along the rows (argmax for NCHW, sargmax for
// channels_last) marks one position per row and is read directly; the other is bucketed by row per
// sample (a counting sort, positions in increasing order). Indices are range-checked here.
class HotIndex {
 public:
  HotIndex(const Dims& d, const int64_t* argmax, const int64_t* sargmax)
      : rows_(d.rows()), along_(d.cl ? sargmax : argmax) {
    check(argmax, d.N, d.C, d.HW, "argmax", "H*W");
    check(sargmax, d.N, d.HW, d.C, "sargmax", "C");
    const int64_t* across = d.cl ? argmax : sargmax;  // [N, cols]: the row it marks
    if (!across) return;
    const int64_t cols = d.row_len();
    start_.assign(d.N * (rows_ + 1), 0);
    pos_.resize(d.N * cols);
    for (int64_t n = 0; n < d.N; ++n) {
      int64_t* st = start_.data() + n * (rows_ + 1);
      const int64_t* an = across + n * cols;
      for (int64_t j = 0; j < cols; ++j) ++st[an[j] + 1];
      for (int64_t r = 0; r < rows_; ++r) st[r + 1] += st[r];
      std::vector<int64_t> fill(st, st + rows_);
      for (int64_t j = 0; j < cols; ++j) pos_[n * cols + fill[an[j]]++] = j;
      for (int64_t r = 0; r <= rows_; ++r) st[r] += n * cols;
    }
  }

  // Calls f(j) for each marked position j along row r of sample n (a position may come twice).
  template <typename F>
  void for_row(int64_t n, int64_t r, const F& f) const {
    if (along_) f(along_[n * rows_ + r]);
    if (!start_.empty()) {
      const int64_t* st = start_.data() + n * (rows_ + 1) + r;
      for (int64_t k = st[0]; k < st[1]; ++k) f(pos_[k]);
    }
  }

 private:
  static void check(const int64_t* idx, int64_t N, int64_t len, int64_t bound, const char* name,
                    const char* what) {
    if (!idx) return;
    for (int64_t i = 0; i < N * len; ++i)
      TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < bound, name, "[", i / len, ", ", i % len, "] = ", idx[i],
                        " is outside [0, ", what, " = ", bound, ")");
  }
  int64_t rows_;
  const int64_t* along_;
  std::vector<int64_t> start_, pos_;
};

struct NoHot {  // the `value` of an apply without marked elements (never called)
  double operator()(int64_t, int64_t, int64_t) const { return 0.0; }
};

// apply's pass on the NCHW rows [b, e) of length L (at least a vector) as one run: out[f] = in[f]
// * S[i] + A[i] (each optional) for f in row i, the same operations per element as row by row.
// Each vector takes its factors from its first row, blended with the next row's in the lanes past
// that row's end. `stream`: the run is stored with non-temporal stores from its first aligned
// vector on (the elements before it and after its last whole vector plainly).
template <typename scalar_t, bool kS, bool kA>
void apply_run(scalar_t* out, const scalar_t* in, int64_t L, const acc_type<scalar_t>* S,
               const acc_type<scalar_t>* A, int64_t b, int64_t e, bool stream) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  int64_t f = b * L, i = b, next = (b + 1) * L;  // element f lies in row i, which ends before next
  const int64_t end = e * L;
  auto one = [&] {  // element f, then on to f + 1
    acc_t v = static_cast<acc_t>(in[f]);
    if constexpr (kS) v = v * S[i];
    if constexpr (kA) v = v + A[i];
    out[f] = static_cast<scalar_t>(v);
    if (++f == next) ++i, next += L;
  };
  stream = stream && IO::can_stream(out);  // out aligned: a vector at f is aligned when f is
  if (stream)
    while (f < end && f % V != 0) one();
  const Vec lane = Vec::arange(acc_t(0), acc_t(1));
  for (; f + V <= end; f += V) {
    const int64_t k = next - f;  // lanes [0, k) lie in row i, the rest (if any) in row i + 1 (L >= V)
    Vec v = IO::load(in + f);
    if (k >= V) {
      if constexpr (kS) v = v * Vec(S[i]);
      if constexpr (kA) v = v + Vec(A[i]);
    } else {
      const Vec later = lane >= Vec(static_cast<acc_t>(k));
      if constexpr (kS) v = v * Vec::blendv(Vec(S[i]), Vec(S[i + 1]), later);
      if constexpr (kA) v = v + Vec::blendv(Vec(A[i]), Vec(A[i + 1]), later);
    }
    stream ? IO::store_stream(out + f, v) : IO::store(out + f, v);
    if (k <= V) ++i, next += L;
  }
  while (f < end) one();
  if (stream) stream_fence();
}

// One row of apply's pass: po[j] = (pin[j] * T + B) * S + A for j in [0, L), each factor optional
// (kIn false: pin = 0). Along an NCHW row T and B vary (T[j], B[j]) and S and A are fixed (S[0],
// A[0]); along a channels_last row (`cl`) the reverse. nt: stored past the caches (po aligned, the
// caller fences).
template <typename scalar_t, bool kIn, bool kT, bool kB, bool kS, bool kA>
inline void apply_row(scalar_t* po, const scalar_t* pin, int64_t L, bool cl, const acc_type<scalar_t>* T,
                      const acc_type<scalar_t>* B, const acc_type<scalar_t>* S, const acc_type<scalar_t>* A,
                      bool nt) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  auto put = [&](int64_t j, const Vec& v) { nt ? IO::store_stream(po + j, v) : IO::store(po + j, v); };
  auto elem = [&](acc_t v, int64_t j) {
    const int64_t t = cl ? 0 : j, s = cl ? j : 0;
    if constexpr (kT) v = v * T[t];
    if constexpr (kB) v = v + B[t];
    if constexpr (kS) v = v * S[s];
    if constexpr (kA) v = v + A[s];
    return v;
  };
  int64_t j = 0;
  if (!cl) {
    const Vec vs(kS ? S[0] : acc_t(1)), va(kA ? A[0] : acc_t(0));
    for (; j + IO::kSize <= L; j += IO::kSize) {
      Vec v = kIn ? IO::load(pin + j) : Vec(acc_t(0));
      if constexpr (kT) v = v * Vec::loadu(T + j);
      if constexpr (kB) v = v + Vec::loadu(B + j);
      if constexpr (kS) v = v * vs;
      if constexpr (kA) v = v + va;
      put(j, v);
    }
  } else {
    const Vec vt(kT ? T[0] : acc_t(1)), vb(kB ? B[0] : acc_t(0));
    for (; j + IO::kSize <= L; j += IO::kSize) {
      Vec v = kIn ? IO::load(pin + j) : Vec(acc_t(0));
      if constexpr (kT) v = v * vt;
      if constexpr (kB) v = v + vb;
      if constexpr (kS) v = v * Vec::loadu(S + j);
      if constexpr (kA) v = v + Vec::loadu(A + j);
      put(j, v);
    }
  }
  for (; j < L; ++j) po[j] = static_cast<scalar_t>(elem(kIn ? static_cast<acc_t>(pin[j]) : acc_t(0), j));
}

// The elementwise pass: out = (in * T[n, hw] + B[n, hw]) * S[n, c] + A[n, c], each factor optional
// (kIn false: in = 0). One read of `in`, one write of `out`. With `hot`, the marked elements of each
// row are then rewritten, while the row is in L1, by `value(n, c, hw)`, which recomputes the whole
// gradient there (so the rounding matches the plain pass plus the one-hot term). `stream` (big
// outputs, stream_output): write `out` with non-temporal stores where every stored line is
// streamed whole. Not with `hot`, whose plain stores into lines just streamed measured 1.5x slower
// in all; not on rows that end inside a line and go row by row, which leave lines part streamed,
// part stored (NCHW 14x14 and 7x7 at batch 32 wrote 3x slower than with plain stores).
template <typename scalar_t, bool kIn, bool kT, bool kB, bool kS, bool kA, typename F = NoHot>
void apply(scalar_t* out, const scalar_t* in, const Dims& d, const acc_type<scalar_t>* T,
           const acc_type<scalar_t>* B, const acc_type<scalar_t>* S, const acc_type<scalar_t>* A,
           const HotIndex* hot = nullptr, const F& value = F(), bool stream = false) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  const int64_t R = d.rows(), L = d.row_len();
  const bool whole_lines = L * int64_t(sizeof(scalar_t)) % 64 == 0;
  // NCHW rows, each with fixed factors (S, A), that are not whole lines: the rows of a chunk are
  // one contiguous run, taken a vector at a time across the row ends, so that it streams whole
  // (ECA's forward at batch 32 measured 1.2x faster at 14 x 14 and 7 x 7).
  const bool flat = kIn && !kT && !kB && !d.cl && !hot && !whole_lines && L >= V;
  stream = stream && !hot && (whole_lines || flat);
  at::parallel_for(0, d.N * R, grain_rows(L), [&](int64_t b, int64_t e) {
    if (flat) {
      apply_run<scalar_t, kS, kA>(out, in, L, S, A, b, e, stream);
      return;
    }
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = i / R, r = i % R;
      const scalar_t* pin = in + i * L;
      scalar_t* po = out + i * L;
      const bool nt = stream && IO::can_stream(po);
      const acc_t* Tn = kT ? T + n * d.HW : nullptr;
      const acc_t* Bn = kB ? B + n * d.HW : nullptr;
      const acc_t* Sn = kS ? S + n * d.C : nullptr;
      const acc_t* An = kA ? A + n * d.C : nullptr;
      // along the row: NCHW runs over hw (T, B vary, S, A fixed); channels_last over c (the reverse)
      auto fixed = [&](const acc_t* p) { return p ? p + r : nullptr; };
      if (d.cl)
        apply_row<scalar_t, kIn, kT, kB, kS, kA>(po, pin, L, true, fixed(Tn), fixed(Bn), Sn, An, nt);
      else
        apply_row<scalar_t, kIn, kT, kB, kS, kA>(po, pin, L, false, Tn, Bn, fixed(Sn), fixed(An), nt);
      if (hot)
        hot->for_row(n, r, [&](int64_t p) {
          po[p] = static_cast<scalar_t>(d.cl ? value(n, p, r) : value(n, r, p));
        });
    }
    if (stream) stream_fence();  // before another thread reads the streamed rows
  });
}

}  // namespace cpu
}  // namespace attnfused

// The fused elementwise pass (apply): one read of the input, one write of the output, with the
// one-hot terms of the max gradients (HotIndex) rewritten while each row is in L1.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
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

  // Range check of a saved argmax [N, len] (null: none) with values in [0, bound).
  static void check(const int64_t* idx, int64_t N, int64_t len, int64_t bound, const char* name,
                    const char* what) {
    if (!idx) return;
    for (int64_t i = 0; i < N * len; ++i)
      TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < bound, name, "[", i / len, ", ", i % len, "] = ", idx[i],
                        " is outside [0, ", what, " = ", bound, ")");
  }
 private:
  int64_t rows_;
  const int64_t* along_;
  std::vector<int64_t> start_, pos_;
};

// The split tie rule's marks (Tie::SPLIT): every element equal to a max, not only the saved argmax.
// The maxima are read at the saved argmaxes, cmax[n, c] = x[n, c, argmax[n, c]] (the channel max over
// H*W) and smax[n, hw] = v[n, sargmax[n, hw], hw] (the spatial max over C of v = x, or of x1 = x *
// S[n, c] for CBAM, recomputed as the forward computed it: the same acc_t product), so the argmax
// itself always ties (count >= 1) unless the max is NaN. One scan of x (vectorised compares) lists
// the tied positions of each row, in increasing order, in per-chunk buffers; the counts
// ccount[n, c] (channel) and scount[n, hw] (spatial) are then taken from the lists, sample by
// sample (integers: exact, in any order). The lists hold one entry per tied element: a few per row
// on ordinary data, as many as x's elements only on inputs made of ties. A NaN max (count 0) ties
// nothing; it, or a NaN max gradient, makes the whole reduction NaN (cpoison / spoison), as torch's
// amax backward ((g / count) * mask) does.
template <typename scalar_t>
class TieIndex {
 public:
  using acc_t = acc_type<scalar_t>;

  // d, x, argmax [N, C], sargmax [N, HW] and S [N, C] of the same samples (argmax or sargmax null:
  // that max is not taken; S null: v = x).
  TieIndex(const Dims& d, const scalar_t* x, const int64_t* argmax, const int64_t* sargmax,
           const acc_t* S = nullptr)
      : d_(d), x_(x), S_(S), R_(d.rows()) {
    HotIndex::check(argmax, d.N, d.C, d.HW, "argmax", "H*W");
    HotIndex::check(sargmax, d.N, d.HW, d.C, "sargmax", "C");
    if (argmax) {
      cmax_.resize(d.N * d.C);
      for (int64_t n = 0; n < d.N; ++n)
        for (int64_t c = 0; c < d.C; ++c) cmax_[n * d.C + c] = xv(n, c, argmax[n * d.C + c]);
    }
    if (sargmax) {
      smax_.resize(d.N * d.HW);
      for (int64_t n = 0; n < d.N; ++n)
        for (int64_t hw = 0; hw < d.HW; ++hw) smax_[n * d.HW + hw] = v1(n, sargmax[n * d.HW + hw], hw);
    }
    const int64_t rows = d.N * R_, L = d.row_len();
    chunk_ = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(L, 1));
    const int64_t chunks = rows ? (rows + chunk_ - 1) / chunk_ : 0;
    bufs_.resize(chunks);
    beg_.resize(rows);
    end_.resize(rows);
    if (argmax || sargmax)
      at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k)
          for (int64_t i = k * chunk_; i < std::min(rows, (k + 1) * chunk_); ++i) {
            beg_[i] = static_cast<int64_t>(bufs_[k].size());
            scan(i, bufs_[k]);
            end_[i] = static_cast<int64_t>(bufs_[k].size());
          }
      });
    else
      std::fill(end_.begin(), end_.end(), int64_t(0)), std::fill(beg_.begin(), beg_.end(), int64_t(0));
    if (argmax) ccount_.assign(d.N * d.C, 0);
    if (sargmax) scount_.assign(d.N * d.HW, 0);
    at::parallel_for(0, d.N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n)
        for (int64_t r = 0; r < R_; ++r)
          for_row(n, r, [&](int64_t j) {
            const int64_t c = d_.cl ? j : r, hw = d_.cl ? r : j;
            if (ctie(n, c, hw)) ++ccount_[n * d_.C + c];
            if (stie(n, c, hw)) ++scount_[n * d_.HW + hw];
          });
    });
  }

  // Calls f(j) for each tied position j along row r of sample n, in increasing order.
  template <typename F>
  void for_row(int64_t n, int64_t r, const F& f) const {
    const int64_t i = n * R_ + r;
    const int64_t* p = bufs_[i / chunk_].data();
    for (int64_t q = beg_[i]; q < end_[i]; ++q) f(p[q]);
  }

  // Whether x[n, c, hw] ties the channel max (with argmax), v[n, c, hw] the spatial max (sargmax).
  bool ctie(int64_t n, int64_t c, int64_t hw) const {
    return !cmax_.empty() && xv(n, c, hw) == cmax_[n * d_.C + c];
  }
  bool stie(int64_t n, int64_t c, int64_t hw) const {
    return !smax_.empty() && v1(n, c, hw) == smax_[n * d_.HW + hw];
  }
  // The share g / count of a tied element (called where ctie / stie holds: count >= 1).
  acc_t cshare(int64_t n, int64_t c, acc_t g) const { return g / static_cast<acc_t>(ccount_[n * d_.C + c]); }
  acc_t sshare(int64_t n, int64_t hw, acc_t g) const { return g / static_cast<acc_t>(scount_[n * d_.HW + hw]); }
  // Whether every element of the reduction that does not tie gets NaN, as in torch's (g / count) *
  // mask where the share g / count is not finite (a NaN max: count 0; a NaN or infinite gradient g)
  // and some element does not tie: the caller then puts NaN into the term all the reduction's
  // elements get (A per (n, c), B per pixel), and gives the tied ones the term as it was plus the share.
  bool cpoison(int64_t n, int64_t c, acc_t g) const {
    if (cmax_.empty()) return false;
    const int64_t k = ccount_[n * d_.C + c];
    return k < d_.HW && !std::isfinite(g / static_cast<acc_t>(k));
  }
  bool spoison(int64_t n, int64_t hw, acc_t g) const {
    if (smax_.empty()) return false;
    const int64_t k = scount_[n * d_.HW + hw];
    return k < d_.C && !std::isfinite(g / static_cast<acc_t>(k));
  }

 private:
  static constexpr int64_t kChunkElems = int64_t(1) << 14;  // elements of x per chunk of rows

  acc_t xv(int64_t n, int64_t c, int64_t hw) const { return static_cast<acc_t>(x_[d_.at(n, c, hw)]); }
  acc_t v1(int64_t n, int64_t c, int64_t hw) const {
    return S_ ? xv(n, c, hw) * S_[n * d_.C + c] : xv(n, c, hw);
  }

  // Appends the tied positions of row i (of N * R) to out.
  void scan(int64_t i, std::vector<int64_t>& out) const {
    using IO = VecIO<scalar_t>;
    using Vec = typename IO::Vec;
    constexpr int64_t V = IO::kSize;
    const int64_t n = i / R_, r = i % R_, L = d_.row_len();
    const scalar_t* p = x_ + i * L;
    const bool cl = d_.cl, hasc = !cmax_.empty(), hass = !smax_.empty();
    const acc_t* cm = hasc ? cmax_.data() + n * d_.C : nullptr;   // along c (channels_last) or cm[r]
    const acc_t* sm = hass ? smax_.data() + n * d_.HW : nullptr;  // along hw (NCHW) or sm[r]
    const acc_t* Sn = S_ ? S_ + n * d_.C : nullptr;
    auto tied = [&](int64_t j) {
      const int64_t c = cl ? j : r, hw = cl ? r : j;
      const acc_t v = static_cast<acc_t>(p[j]);
      if (hasc && v == cm[c]) return true;
      return hass && (Sn ? v * Sn[c] : v) == sm[hw];
    };
    constexpr int none = (1 << V) - 1;  // zero_mask of a vector without a tie
    int64_t j = 0;
    for (; j + V <= L; j += V) {
      const Vec v = IO::load(p + j);
      Vec hit(acc_t(0));
      if (cl) {
        if (hasc) hit = hit | (v == Vec::loadu(cm + j));
        if (hass) hit = hit | ((Sn ? v * Vec::loadu(Sn + j) : v) == Vec(sm[r]));
      } else {
        if (hasc) hit = hit | (v == Vec(cm[r]));
        if (hass) hit = hit | ((Sn ? v * Vec(Sn[r]) : v) == Vec::loadu(sm + j));
      }
      if (hit.zero_mask() != none)
        for (int64_t l = 0; l < V; ++l)
          if (tied(j + l)) out.push_back(j + l);
    }
    for (; j < L; ++j)
      if (tied(j)) out.push_back(j);
  }

  Dims d_;
  const scalar_t* x_;
  const acc_t* S_;
  int64_t R_, chunk_ = 1;
  std::vector<acc_t> cmax_, smax_;
  std::vector<int64_t> ccount_, scount_, beg_, end_;
  std::vector<std::vector<int64_t>> bufs_;
};

struct NoHot {  // the `value` of an apply without marked elements (never called)
  double operator()(int64_t, int64_t, int64_t) const { return 0.0; }
};

// A forward's tail (Tail in common.h) as its output pass applies it to each value before the store:
// v + residual (r: the residual, indexed like the output; null: none), then relu (NaN stays NaN, as
// torch.relu). r + offset where r is null stays null (tail.at).
template <typename scalar_t>
struct OutTail {
  const scalar_t* r = nullptr;
  bool relu = false;

  OutTail() = default;
  OutTail(const Tail& t) : r(t.residual_ptr<scalar_t>()), relu(t.relu) {}
  OutTail(const scalar_t* r_, bool relu_) : r(r_), relu(relu_) {}
  bool any() const { return r || relu; }
  OutTail at(int64_t offset) const { return {r ? r + offset : nullptr, relu}; }

  template <typename acc_t>
  acc_t operator()(acc_t v, int64_t j) const {
    if (r) v = v + static_cast<acc_t>(r[j]);
    return relu && v < acc_t(0) ? acc_t(0) : v;
  }
  template <typename Vec>
  Vec vec(Vec v, int64_t j) const {
    if (r) v = v + VecIO<scalar_t>::load(r + j);
    const Vec zero(typename Vec::value_type(0));
    return relu ? Vec::blendv(v, zero, v < zero) : v;
  }
};

// apply's pass on the NCHW rows [b, e) of length L (at least a vector) as one run: out[f] = in[f]
// * S[i] + A[i] (each optional) for f in row i, the same operations per element as row by row.
// Each vector takes its factors from its first row, blended with the next row's in the lanes past
// that row's end. `stream`: the run is stored with non-temporal stores from its first aligned
// vector on (the elements before it and after its last whole vector plainly).
template <typename scalar_t, bool kS, bool kA>
void apply_run(scalar_t* out, const scalar_t* in, int64_t L, const acc_type<scalar_t>* S,
               const acc_type<scalar_t>* A, int64_t b, int64_t e, bool stream, const OutTail<scalar_t>& tail) {
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
    out[f] = static_cast<scalar_t>(tail(v, f));
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
    if (tail.any()) v = tail.vec(v, f);
    stream ? IO::store_stream(out + f, v) : IO::store(out + f, v);
    if (k <= V) ++i, next += L;
  }
  while (f < end) one();
  if (stream) stream_fence();
}

// One row of apply's pass: po[j] = (pin[j] * T + B) * S + A for j in [0, L), each factor optional
// (kIn false: pin = 0). Along an NCHW row T and B vary (T[j], B[j]) and S and A are fixed (S[0],
// A[0]); along a channels_last row (`cl`) the reverse. nt: stored past the caches (po aligned, the
// caller fences). `tail`: the forward's tail, its residual indexed like po.
template <typename scalar_t, bool kIn, bool kT, bool kB, bool kS, bool kA>
inline void apply_row(scalar_t* po, const scalar_t* pin, int64_t L, bool cl, const acc_type<scalar_t>* T,
                      const acc_type<scalar_t>* B, const acc_type<scalar_t>* S, const acc_type<scalar_t>* A,
                      bool nt, const OutTail<scalar_t>& tail = {}) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  const bool has_tail = tail.any();
  auto put = [&](int64_t j, Vec v) {
    if (has_tail) v = tail.vec(v, j);
    nt ? IO::store_stream(po + j, v) : IO::store(po + j, v);
  };
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
  for (; j < L; ++j) po[j] = static_cast<scalar_t>(tail(elem(kIn ? static_cast<acc_t>(pin[j]) : acc_t(0), j), j));
}

// The elementwise pass: out = (in * T[n, hw] + B[n, hw]) * S[n, c] + A[n, c], each factor optional
// (kIn false: in = 0). One read of `in`, one write of `out`. With `hot`, the marked elements of each
// row are then rewritten, while the row is in L1, by `value(n, c, hw)`, which recomputes the whole
// gradient there (so the rounding matches the plain pass plus the one-hot term). `stream` (big
// outputs, stream_output): write `out` with non-temporal stores where every stored line is
// streamed whole. Not with `hot`, whose plain stores into lines just streamed measured 1.5x slower
// in all; not on rows that end inside a line and go row by row, which leave lines part streamed,
// part stored (NCHW 14x14 and 7x7 at batch 32 wrote 3x slower than with plain stores).
// `hot`: a HotIndex, a TieIndex (anything with for_row), or nullptr. `tail`: a forward's tail (its
// residual indexed like out), applied to each value as it is stored (not with `hot`).
template <typename scalar_t, bool kIn, bool kT, bool kB, bool kS, bool kA, typename F = NoHot,
          typename H = std::nullptr_t>
void apply(scalar_t* out, const scalar_t* in, const Dims& d, const acc_type<scalar_t>* T,
           const acc_type<scalar_t>* B, const acc_type<scalar_t>* S, const acc_type<scalar_t>* A,
           H hot = nullptr, const F& value = F(), bool stream = false, const OutTail<scalar_t>& tail = {}) {
  constexpr bool kHot = !std::is_same_v<H, std::nullptr_t>;
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  const int64_t R = d.rows(), L = d.row_len();
  const bool whole_lines = L * int64_t(sizeof(scalar_t)) % 64 == 0;
  // NCHW rows, each with fixed factors (S, A), that are not whole lines: the rows of a chunk are
  // one contiguous run, taken a vector at a time across the row ends, so that it streams whole
  // (ECA's forward at batch 32 measured 1.2x faster at 14 x 14 and 7 x 7).
  bool has_hot = false;
  if constexpr (kHot) has_hot = hot != nullptr;
  TORCH_INTERNAL_ASSERT(!(has_hot && tail.any()), "a tail on a pass with marked elements");
  const bool flat = kIn && !kT && !kB && !d.cl && !has_hot && !whole_lines && L >= V;
  stream = stream && !has_hot && (whole_lines || flat);
  at::parallel_for(0, d.N * R, grain_rows(L), [&](int64_t b, int64_t e) {
    if (flat) {
      apply_run<scalar_t, kS, kA>(out, in, L, S, A, b, e, stream, tail);
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
      const OutTail<scalar_t> row_tail = tail.at(i * L);
      if (d.cl)
        apply_row<scalar_t, kIn, kT, kB, kS, kA>(po, pin, L, true, fixed(Tn), fixed(Bn), Sn, An, nt, row_tail);
      else
        apply_row<scalar_t, kIn, kT, kB, kS, kA>(po, pin, L, false, Tn, Bn, fixed(Sn), fixed(An), nt, row_tail);
      if constexpr (kHot)
        if (has_hot)
          hot->for_row(n, r, [&](int64_t p) {
          po[p] = static_cast<scalar_t>(d.cl ? value(n, p, r) : value(n, r, p));
        });
    }
    if (stream) stream_fence();  // before another thread reads the streamed rows
  });
}

}  // namespace cpu
}  // namespace attnfused

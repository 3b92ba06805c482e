// The big tensor's shape and layout (Dims), and how a batch is split across threads: samples in
// groups (for_samples) and column blocks (parallel_col_blocks).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "common.h"
#include "cpu/vec_io.h"

namespace attnfused {
namespace cpu {

// ---------------------------------------------------------------------------- the passes on (N, C, HW)

// Shape of the big tensor and its layout.
struct Dims {
  int64_t N, C, H, W, HW;
  bool cl;  // channels_last
  int64_t rows() const { return cl ? HW : C; }     // rows per sample
  int64_t row_len() const { return cl ? C : HW; }  // contiguous run
  int64_t sample() const { return C * HW; }
  int64_t at(int64_t n, int64_t c, int64_t hw) const {
    return n * C * HW + (cl ? hw * C + c : c * HW + hw);
  }
  Dims first(int64_t n) const { return Dims{n, C, H, W, HW, cl}; }  // shaped like n of the samples
  int64_t numel() const { return N * C * HW; }
};

// Whether a pass's output (a tensor shaped like x, of the batch d) is big enough to be written past
// the caches; apply then streams it where it can.
template <typename scalar_t>
bool stream_output(const Dims& d) {
  return d.numel() * int64_t(sizeof(scalar_t)) >= kStreamBytes;
}

// Samples are taken in groups of up to this many bytes of x: the channel MLP then reads its
// weights once per group rather than once per sample (at 2048 x 7 x 7 the weights are 5x a
// sample's bytes), while a group's x still stays in cache between the passes.
constexpr int64_t kGroupBytes = int64_t(2) << 20;

// How a sequence of passes runs (for_samples): 0 pass by pass over the whole batch, a region per
// pass; else sample by sample in one parallel region over groups of this many samples. Each region
// costs a thread hand-off (65-85 us measured here under OMP_WAIT_POLICY=PASSIVE, a few us when
// threads spin), and a sample read by consecutive passes stays in cache: measured equal or faster
// at every ResNet-50 stage shape at batch 8 (CBAM backward 15-30%). Needs enough samples to keep
// every thread busy; the groups are then the fewest, a multiple of the thread count, that fit
// kGroupBytes (at least one sample). $ATTNFUSED_CPU_PER_SAMPLE=0 / =1 forces batch passes / one
// sample per group (the tests run both and the default).
inline int64_t samples_per_group(const Dims& d, int64_t sample_bytes) {
  const char* env = std::getenv("ATTNFUSED_CPU_PER_SAMPLE");
  if (env && (env[0] == '0' || env[0] == '1')) return env[0] == '1' ? 1 : 0;
  const int64_t threads = at::get_num_threads();
  if (d.N < threads || (d.N % threads != 0 && d.N < 4 * threads)) return 0;
  for (int64_t groups = threads;; groups += threads) {
    const int64_t g = (d.N + groups - 1) / groups;
    if (g == 1 || g * sample_bytes <= kGroupBytes) return g;
  }
}

// The samples [n0, n0 + count) that the calling thread takes next in for_samples (count 0: none),
// for a pass that fetches them ahead.
struct NextSamples {
  int64_t n0 = 0, count = 0;
};
inline thread_local NextSamples next_samples;

// Runs f(n0, d1) over the samples [n0, n0 + d1.N): group by group in one parallel region, or
// f(0, d) once (its passes parallel), as samples_per_group says. Results do not depend on the split.
template <typename scalar_t, typename F>
void for_samples(const Dims& d, const F& f) {
  const int64_t g = samples_per_group(d, d.sample() * int64_t(sizeof(scalar_t)));
  if (g == 0) return f(int64_t(0), d);
  at::parallel_for(0, (d.N + g - 1) / g, 1, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      next_samples = q + 1 < e ? NextSamples{(q + 1) * g, std::min(g, d.N - (q + 1) * g)} : NextSamples{};
      f(q * g, d.first(std::min(g, d.N - q * g)));
    }
    next_samples = NextSamples{};
  });
}

// A thread keeps its staging buffer (GroupInput) from call to call up to this size; a larger group
// (one sample past it, or a whole batch run pass by pass) gets a buffer of its own for the call.
constexpr int64_t kStageKeepBytes = int64_t(16) << 20;

// v as computed, rounded: the barrier keeps the compiler from contracting v with a following add
// into one FMA (one rounding), where torch's mul and add, which the backward runs, round twice.
// (MSVC does not contract across statements.)
template <typename T>
inline T rounded(T v) {
#if defined(__GNUC__)
  asm volatile("" : "+m"(v));
#endif
  return v;
}

// out[r, :] = x[r, :] * scale + shift over `rows` rows of `len` elements, the product rounded
// before the sum as torch's mul then add round it (Prologue::apply_into), then to scalar_t as
// torch's conversion rounds: bit-identical to the autograd formula's x'. Channel of row r (NCHW) or
// of element j of a row (channels_last).
template <typename scalar_t>
void affine_rows(const scalar_t* x, scalar_t* out, const Dims& d, int64_t rows, const acc_type<scalar_t>* scale,
                 const acc_type<scalar_t>* shift) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  const int64_t L = d.row_len();
  at::parallel_for(0, rows, grain_rows(L), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* p = x + r * L;
      scalar_t* q = out + r * L;
      const int64_t c = r % d.C;  // NCHW: the row's channel
      for (int64_t j = 0; j < L; j += V) {
        const int64_t n = std::min(V, L - j);
        const Vec a = d.cl ? Vec::loadu(scale + j, n) : Vec(scale[c]);
        const Vec b = d.cl ? Vec::loadu(shift + j, n) : Vec(shift[c]);
        IO::store(q + j, rounded(IO::load(p + j, n) * a) + b, n);
      }
    }
  });
}

// What a forward's passes read for the samples [n0, n0 + count) of x: x itself, or with a prologue
// (common.h) x' of those samples, staged by the calling thread in a buffer of its own that it keeps
// (affine_rows): the group's passes then read x' from cache (for_samples sizes a group to stay
// there), and x is read from memory once, by the staging. get() points at the group's first
// sample, laid out as in x.
template <typename scalar_t>
class GroupInput {
 public:
  GroupInput(const Prologue& pro, const at::Tensor& x, const Dims& d, int64_t n0, int64_t count) {
    ptr_ = x.const_data_ptr<scalar_t>() + n0 * d.sample();
    if (!pro.any() || count == 0) return;
    const int64_t bytes = count * d.sample() * int64_t(sizeof(scalar_t));
    void* buf;
    if (bytes <= kStageKeepBytes) {
      thread_local std::vector<char> keep;  // grows to the thread's largest group, then is reused
      constexpr int64_t kAlign = 64;
      if (int64_t(keep.size()) < bytes + kAlign) keep.resize(bytes + kAlign);
      const auto at = reinterpret_cast<uintptr_t>(keep.data());
      buf = keep.data() + (kAlign - at % kAlign) % kAlign;
    } else {
      own_ = at::empty({bytes}, x.options().dtype(at::kByte));
      buf = own_.data_ptr();
    }
    affine_rows<scalar_t>(ptr_, static_cast<scalar_t*>(buf), d, count * d.rows(),
                          pro.scale_ptr<acc_type<scalar_t>>(), pro.shift_ptr<acc_type<scalar_t>>());
    ptr_ = static_cast<const scalar_t*>(buf);
  }
  const scalar_t* get() const { return ptr_; }

 private:
  const scalar_t* ptr_;
  at::Tensor own_;
};

inline Dims dims_of(const at::Tensor& x) {
  Dims d{x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) * x.size(3), is_channels_last(x)};
  return d;
}

// Runs f(n, j0, L) over the column blocks [j0, j0 + L) of every sample of a column pass over `len`
// columns, in parallel.
template <typename scalar_t, typename F>
void parallel_col_blocks(const Dims& d, int64_t len, const F& f) {
  const ColBlocks cb(len, VecIO<scalar_t>::kSize);
  at::parallel_for(0, d.N * cb.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) f(t / cb.count, cb.begin(t % cb.count), cb.length(t % cb.count, len));
  });
}

}  // namespace cpu
}  // namespace attnfused

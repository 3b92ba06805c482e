// A benchmark instrument, not a block, and not part of the installed library: bench/traffic.py
// compiles it just in time (probe_op) with the extension's headers and flags, as the op
// torch.ops.attnfused_bench.traffic_probe(x, dy, passes) -> (out, sums). It makes the memory
// traffic of the fused CPU ops' pass structure without their arithmetic. The samples are taken as
// the ops take them (for_samples: groups in one parallel region, or pass by pass over the batch),
// and each group goes through `passes` in order, each a linear sweep over the group's bytes:
//   r  read x                       d  read dy and x
//   w  read x, write out            p  read dy, write out
// out is written as the ops write their outputs: non-temporal stores where they stream
// (stream_output, "w"), plain stores where a one-hot fix-up follows ("p", the backward's dx).
// The CBAM forward is "r,r,w" (3R+1W), its backward "d,d,p" (5R+1W); a copy is "w".
// Returns out (a copy of x for "w", of dy for "p"; empty without a writing pass) and, per sample,
// the sum of every element read (so that no read can be dropped).
#include "cpu/batch.h"
#include "cpu/vec_io.h"

#include <torch/library.h>

namespace attnfused {
namespace cpu {
namespace {

using at::Tensor;

enum class Pass { R, D, W, P };

std::vector<Pass> parse_passes(c10::string_view spec) {
  std::vector<Pass> out;
  const std::string s(spec);
  for (size_t i = 0; i < s.size(); i += 2) {
    const char c = s[i];
    TORCH_CHECK_VALUE((c == 'r' || c == 'd' || c == 'w' || c == 'p') && (i + 1 == s.size() || s[i + 1] == ','),
                      "passes must be a comma list of r, d, w and p (e.g. \"r,r,w\"), got \"", s, "\"");
    out.push_back(c == 'r' ? Pass::R : c == 'd' ? Pass::D : c == 'w' ? Pass::W : Pass::P);
  }
  TORCH_CHECK_VALUE(!out.empty(), "passes must name at least one pass, got \"", s, "\"");
  return out;
}

// sum of p[0, n) in 4 chains (a single chain would cap the read rate at the add latency)
template <typename scalar_t>
acc_type<scalar_t> sweep_sum(const scalar_t* p, int64_t n) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  Vec a0(acc_t(0)), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    a0 += IO::load(p + i);
    a1 += IO::load(p + i + V);
    a2 += IO::load(p + i + 2 * V);
    a3 += IO::load(p + i + 3 * V);
  }
  acc_t s = lanes_sum((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += static_cast<acc_t>(p[i]);
  return s;
}

// out[0, n) = src[0, n) (streamed where `stream` and aligned), returning the sum of src
template <typename scalar_t>
acc_type<scalar_t> sweep_copy(const scalar_t* src, scalar_t* out, int64_t n, bool stream) {
  using IO = VecIO<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  const bool nt = stream && IO::can_stream(out);
  Vec a(acc_t(0));
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    const Vec v = IO::load(src + i);
    a += v;
    nt ? IO::store_stream(out + i, v) : IO::store(out + i, v);
  }
  acc_t s = lanes_sum(a);
  for (; i < n; ++i) {
    out[i] = src[i];
    s += static_cast<acc_t>(src[i]);
  }
  return s;
}

std::tuple<Tensor, Tensor> traffic_probe_kernel(const Tensor& x, const std::optional<Tensor>& dy,
                                                c10::string_view passes) {
  check_input(x);
  const std::vector<Pass> ps = parse_passes(passes);
  bool reads_dy = false, writes = false;
  for (Pass p : ps) {
    reads_dy = reads_dy || p == Pass::D || p == Pass::P;
    writes = writes || p == Pass::W || p == Pass::P;
  }
  const bool has_dy = dy.has_value() && dy->defined();
  TORCH_CHECK_VALUE(!reads_dy || has_dy, "dy must be given for passes \"d\" and \"p\", got None");
  if (has_dy) check_same_layout(*dy, x, "dy");
  const Dims d = dims_of(x);
  Tensor out = writes ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor sums = at::zeros({d.N}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "traffic_probe_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = has_dy ? dy->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* po = writes ? out.data_ptr<scalar_t>() : nullptr;
    double* ps_out = sums.data_ptr<double>();
    const bool stream = stream_output<scalar_t>(d);
    const int64_t len = d.sample();
    for_samples<scalar_t>(d, [&](int64_t n0, const Dims& d1) {
      for (Pass p : ps) {
        // the samples of the group in parallel (inline inside a group region, parallel in batch passes)
        at::parallel_for(n0, n0 + d1.N, 1, [&](int64_t b, int64_t e) {
          for (int64_t n = b; n < e; ++n) {
            const int64_t off = n * len;
            double s = 0;
            switch (p) {
              case Pass::R: s = sweep_sum(px + off, len); break;
              case Pass::D: s = double(sweep_sum(pdy + off, len)) + double(sweep_sum(px + off, len)); break;
              case Pass::W: s = sweep_copy(px + off, po + off, len, stream); break;
              case Pass::P: s = sweep_copy(pdy + off, po + off, len, false); break;
            }
            ps_out[n] += s;
          }
          stream_fence();
        });
      }
    });
  });
  return {out, sums};
}

}  // namespace

// a fragment: bench's Python code may define ops in the same namespace
TORCH_LIBRARY_FRAGMENT(attnfused_bench, m) {
  m.def("traffic_probe(Tensor x, Tensor? dy, str passes) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnfused_bench, CPU, m) {
  m.impl("traffic_probe", &traffic_probe_kernel);
}

}  // namespace cpu
}  // namespace attnfused

// The gates (sigmoid, hardsigmoid) and their derivatives, vectorized over arrays in the accumulation type.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"
#include "cpu/vec_io.h"

namespace attnfused {
namespace cpu {

// ---------------------------------------------------------------------------- gates, vectorized

// f(i, n) for the vectors [i, i + n) (n <= V) covering [0, count), in parallel.
template <typename acc_t, typename F>
void parallel_vectors(int64_t count, const F& f) {
  constexpr int64_t V = at::vec::Vectorized<acc_t>::size();
  at::parallel_for(0, (count + V - 1) / V, kGrainElems / V, [&](int64_t b, int64_t e) {
    for (int64_t i = b * V; i < std::min(count, e * V); i += V) f(i, std::min(V, count - i));
  });
}

// sigmoid through at::vec's exp (SLEEF's, 1 ulp); lanes are independent, so an element's value
// does not depend on where it falls in a vector
template <typename Vec>
inline Vec vec_sigmoid(const Vec& v) {
  return Vec(1) / (Vec(1) + v.neg().exp());
}

// s[i] = gate(z[i]).
template <typename acc_t>
void gate_forward(const acc_t* z, Gate g, int64_t count, acc_t* s) {
  using Vec = at::vec::Vectorized<acc_t>;
  parallel_vectors<acc_t>(count, [&](int64_t i, int64_t n) {
    const Vec v = Vec::loadu(z + i, n), one(1), zero(0);
    Vec r = g == Gate::SIGMOID ? vec_sigmoid(v) : (v + Vec(3)) / Vec(6);
    if (g == Gate::HARDSIGMOID) {  // clamped to [0, 1], NaN kept
      r = Vec::blendv(r, zero, r < zero);
      r = Vec::blendv(r, one, r > one);
    }
    r.store(s + i, n);
  });
}

// d[i] *= gate'(z[i]), with torch's conventions at the kinks (hardsigmoid: 1/6 on (-3, 3)).
template <typename acc_t>
void gate_backward(const acc_t* z, Gate g, int64_t count, acc_t* d) {
  using Vec = at::vec::Vectorized<acc_t>;
  parallel_vectors<acc_t>(count, [&](int64_t i, int64_t n) {
    const Vec v = Vec::loadu(z + i, n);
    Vec grad;
    if (g == Gate::SIGMOID) {
      const Vec sg = vec_sigmoid(v);
      grad = sg * (Vec(1) - sg);
    } else {
      grad = Vec::blendv(Vec(0), Vec(acc_t(1) / acc_t(6)), (v > Vec(-3)) & (v < Vec(3)));
    }
    (Vec::loadu(d + i, n) * grad).store(d + i, n);
  });
}

}  // namespace cpu
}  // namespace attnfused

// The new CUDA pooling passes (csrc/cuda/next.cuh) run on the CPU: this program replays their
// decomposition (csrc/cuda/next_plan.h: which thread reads which vectors, in what order, how the
// partials merge: per-thread slots, the lanes' butterfly, the row groups, the chunks) over random
// inputs and checks sum, max and argmax against a direct computation with torch's rules. Integer
// inputs make every sum exact, so an element read twice or missed changes the sum; small ranges
// make ties; some rows are all -inf, some hold NaNs. Built and run by tests/test_next_plan.py.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "cuda/next_plan.h"

using namespace attnfused::cuda::next;

struct Pooled {
  double sum;
  float max;
  int idx;
};

static int failures = 0;

static void check(const char* what, const Pooled& got, const std::vector<float>& vals, long n, long c) {
  double s = 0;
  float m = vals[0];
  int mi = 0;
  for (size_t i = 0; i < vals.size(); ++i) {
    s += vals[i];
    if (std::isnan(m)) continue;
    if (std::isnan(vals[i]) || vals[i] > m) m = vals[i], mi = static_cast<int>(i);
  }
  const bool nan = std::isnan(m);
  const bool ok = (nan ? std::isnan(got.max) : got.max == m) && got.idx == mi &&
                  (std::isnan(s) ? std::isnan(got.sum) : got.sum == s);
  if (!ok && failures++ < 10)
    std::printf("%s n=%ld c=%ld: got (%g, %g, %d), want (%g, %g, %d)\n", what, n, c, got.sum, got.max, got.idx, s, m, mi);
}

struct Lane {
  float s, m;
  int i;
};

// _channel_gate: a channel's partials summed and merged in order
static Pooled gate(const std::vector<Lane>& parts) {
  Pooled p{0, parts[0].m, parts[0].i};
  float s = parts[0].s;
  for (size_t k = 1; k < parts.size(); ++k) {
    s += parts[k].s;
    take_max_in_order(p.max, p.idx, parts[k].m, parts[k].i);
  }
  p.sum = s;
  return p;
}

// per-channel pooling of x [N, C, HW] (NCHW) as _pool_rows + _channel_gate compute it
static void rows(std::mt19937& rng, long N, long C, long HW, int vec, int sms, const std::vector<float>& x) {
  const RowPlan pl(N, C, HW, vec, sms);
  for (long n = 0; n < N; ++n)
    for (long c = 0; c < C; ++c) {
      const float* row = x.data() + (n * C + c) * HW;
      std::vector<Lane> parts;
      for (long k = 0; k < pl.chunks; ++k) {
        const int v0 = static_cast<int>(k * pl.per_chunk);
        const int v1 = static_cast<int>(std::min<int64_t>(v0 + pl.per_chunk, pl.hvecs));
        std::vector<Lane> lane(pl.TX);
        for (int tx = 0; tx < pl.TX; ++tx) {
          std::vector<float> sum(vec, 0.f), mx(vec, -std::numeric_limits<float>::infinity());
          std::vector<int> mi(vec, (v0 + tx) * vec);
          for (int i = v0 + tx; i < v1; i += pl.TX)
            for (int v = 0; v < vec; ++v) {
              const float e = row[i * vec + v];
              sum[v] += e;
              take_max_in_order(mx[v], mi[v], e, i * vec);
            }
          Lane l{sum[0], mx[0], mi[0]};
          for (int v = 1; v < vec; ++v) {
            l.s += sum[v];
            merge_max(l.m, l.i, mx[v], mi[v] + v);
          }
          lane[tx] = l;
        }
        for (int o = 1; o < pl.TX; o *= 2) {  // xor butterfly: every lane adds its partner's
          std::vector<Lane> next = lane;
          for (int t = 0; t < pl.TX; ++t) {
            next[t].s = lane[t].s + lane[t ^ o].s;
            merge_max(next[t].m, next[t].i, lane[t ^ o].m, lane[t ^ o].i);
          }
          lane = next;
        }
        parts.push_back(lane[0]);
      }
      const Pooled p = gate(parts);
      check("rows", p, std::vector<float>(row, row + HW), n, c);
    }
  (void)rng;
}

// per-channel pooling of x [N, HW, C] (channels_last) as _pool_columns + _channel_gate compute it
static void columns(long N, long C, long HW, int vec, int sms, const std::vector<float>& x) {
  const ColumnPlan pl(N, C, HW, vec, sms);
  for (long n = 0; n < N; ++n)
    for (long c = 0; c < C; ++c) {
      const long cv = c / vec, v = c % vec;
      const int tx = static_cast<int>(cv % pl.TX);
      std::vector<Lane> parts;
      for (long k = 0; k < pl.chunks; ++k) {
        std::vector<Lane> group(pl.TY);
        for (int ty = 0; ty < pl.TY; ++ty) {
          const int r0 = static_cast<int>(k * pl.chunk) + ty * pl.R;
          const int r1 = static_cast<int>(std::min<int64_t>(r0 + pl.R, HW));
          Lane g{0.f, -std::numeric_limits<float>::infinity(), r0};
          for (int r = r0; r < r1; ++r) {
            const float e = x[(n * HW + r) * C + cv * vec + v];
            g.s += e;
            take_max_in_order(g.m, g.i, e, r);
          }
          group[ty] = g;
        }
        Lane p = group[0];
        for (int g = 1; g < pl.TY; ++g) {
          p.s += group[g].s;
          take_max_in_order(p.m, p.i, group[g].m, group[g].i);
        }
        parts.push_back(p);
      }
      const Pooled p = gate(parts);
      std::vector<float> vals(HW);
      for (long r = 0; r < HW; ++r) vals[r] = x[(n * HW + r) * C + c];
      check("columns", p, vals, n, c);
      (void)tx;
    }
}

int main() {
  std::mt19937 rng(1234);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  int cases = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const int vec = trial % 3 == 0 ? 4 : 8;
    const long N = 1 + rng() % 3, C = vec * (1 + rng() % 40), HW = vec * (1 + rng() % (trial % 2 ? 40 : 700));
    const int sms = (trial % 4 == 0) ? 1 : (trial % 4 == 1 ? 8 : 132);
    const int range = 1 + rng() % 6;  // few distinct values: many ties
    std::vector<float> x(N * C * HW);
    for (auto& e : x) e = static_cast<float>(static_cast<int>(rng() % (2 * range + 1)) - range);
    // special runs: all -inf, and NaNs (one or two) at random places, in both layouts' rows
    if (trial % 5 == 0)
      for (long i = 0; i < HW; ++i) x[i] = -inf;
    if (trial % 3 == 1) x[rng() % x.size()] = nan;
    if (trial % 7 == 2) x[rng() % x.size()] = nan, x[rng() % x.size()] = nan;
    rows(rng, N, C, HW, vec, sms, x);      // x read as [N, C, HW]
    columns(N, C, HW, vec, sms, x);        // the same memory read as [N, HW, C]
    cases += 2;
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}

// The new CUDA pooling passes (csrc/cuda/next_pool.cuh) run on the CPU: this program replays their
// decomposition (csrc/cuda/next_plan.h: which thread reads which vectors, in what order, how the
// partials merge: per-thread slots, the lanes' butterfly, the row groups, the chunks) over random
// inputs and checks sum, max and argmax against a direct computation with torch's rules. Integer
// inputs make every sum exact, so an element read twice or missed changes the sum; small ranges
// make ties; some rows are all -inf, some hold NaNs. Also the NCHW passes that hold a position's
// terms down a column of channels (_pool_across, _scale_columns): which elements each thread reads,
// sums and writes. Built and run by tests/test_next_plan.py.
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

// lanes_merge: the xor butterfly over a row's lanes, every lane adding its partner's; lane 0's result
static Lane lanes_merge(std::vector<Lane> lane) {
  for (size_t o = 1; o < lane.size(); o *= 2) {
    std::vector<Lane> next = lane;
    for (size_t t = 0; t < lane.size(); ++t) {
      next[t].s = lane[t].s + lane[t ^ o].s;
      merge_max(next[t].m, next[t].i, lane[t ^ o].m, lane[t ^ o].i);
    }
    lane = next;
  }
  return lane[0];
}

// _channel_pooled: a channel's partials summed and merged in order
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

// per-channel pooling of x [N, C, HW] (NCHW) as _pool_rows + _channel_pooled compute it
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
        parts.push_back(lanes_merge(lane));
      }
      const Pooled p = gate(parts);
      check("rows", p, std::vector<float>(row, row + HW), n, c);
    }
  (void)rng;
}

// per-channel pooling of x [N, HW, C] (channels_last) as _pool_columns + _channel_pooled compute it
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

// per-channel pooling of x [N, C, HW] (NCHW, any HW) as _pool_tiles computes it: each tile's
// vectors land in a shared-memory copy through the threads' load offsets (a slot no thread
// fills keeps a sentinel that breaks the sum), then P lanes per row sum their pieces and merge
static void tiles(long N, long C, long HW, int vec, int sms, const std::vector<float>& x) {
  const TilePlan pl(N * C, HW, vec, sms);
  if (pl.R % TilePlan::rows_aligned(HW, vec) != 0 || int64_t(pl.R) * HW > TilePlan::capacity(vec) || pl.R * pl.P > kThreads ||
      pl.grid > int64_t(sms) * kPoolBlocks || pl.tiles != cdiv(N * C, pl.R)) {
    if (failures++ < 10) std::printf("tiles plan HW=%ld vec=%d: R=%d tiles=%ld grid=%ld\n", HW, vec, pl.R, (long)pl.tiles, (long)pl.grid);
    return;
  }
  const long tile_elems = long(pl.R) * HW, whole = tile_elems / vec, full = N * C / pl.R;
  const float sentinel = 1e30f;
  for (long t = 0; t < pl.tiles; ++t) {
    std::vector<float> smem(TilePlan::capacity(vec), sentinel);
    long rows_here = pl.R;
    if (t < full) {
      for (int tid = 0; tid < kThreads; ++tid)
        for (int u = 0; u < kLoads; ++u) {
          const long i = tid + u * kThreads, off = std::min(i, whole - 1) * vec;
          if (i < whole)
            for (int v = 0; v < vec; ++v) smem[i * vec + v] = x[t * tile_elems + off + v];
        }
    } else {
      rows_here = N * C - full * pl.R;
      for (long i = 0; i < rows_here * HW; ++i) smem[i] = x[full * tile_elems + i];
    }
    for (int r = 0; r < pl.R; ++r) {
      std::vector<Lane> lane(pl.P);
      for (int p = 0; p < pl.P; ++p) {
        const int h0 = p * pl.L, h1 = r < rows_here ? static_cast<int>(std::min<long>(h0 + pl.L, HW)) : h0;
        Lane l{0.f, -std::numeric_limits<float>::infinity(), h0};
        for (int h = h0; h < h1; ++h) {
          const float e = smem[r * HW + h];
          l.s += e;
          take_max_in_order(l.m, l.i, e, h);
        }
        lane[p] = l;
      }
      const Lane merged = lanes_merge(lane);
      if (r >= rows_here) continue;
      const long row = t * pl.R + r;
      const Pooled got{merged.s, merged.m, merged.i};
      check("tiles", got, std::vector<float>(x.begin() + row * HW, x.begin() + (row + 1) * HW), row / C, row % C);
    }
  }
}

// NCHW per-channel sums over space as _pool_across computes them (a ColumnPlan over channels:
// positions are the columns): a thread walks all R rows of its group (loads past the last row or
// vector clamped, their sums dropped), sums its VEC elements per row, then the row's TX lanes by
// the butterfly; lane 0 writes slot (n, c, bc); the gate sums the nbc slots in order. Each slot
// must be written exactly once.
static void across(long N, long C, long HW, int vec, int sms, const std::vector<float>& x) {
  const ColumnPlan pl(N, HW, C, vec, sms);  // pl.C: positions, pl.HW: channels
  std::vector<float> slot(N * C * pl.nbc, 0.f);
  std::vector<int> writes(slot.size(), 0);
  const long last = C - 1;
  for (long n = 0; n < N; ++n)
    for (long bc = 0; bc < pl.nbc; ++bc)
      for (long chunk = 0; chunk < pl.chunks; ++chunk)
        for (int ty = 0; ty < pl.TY; ++ty) {
          const int r0 = static_cast<int>(chunk * pl.chunk) + ty * pl.R;
          for (int j = 0; j < pl.R; ++j) {
            const long c = r0 + j, cl = std::min(c, last);
            std::vector<Lane> lane(pl.TX);
            for (int tx = 0; tx < pl.TX; ++tx) {
              const long cv = bc * pl.TX + tx, mine = cv < pl.cvecs ? cv : pl.cvecs - 1;
              float s = 0.f;
              for (int k = 0; k < vec; ++k) s += x[(n * C + cl) * HW + mine * vec + k];
              lane[tx] = Lane{cv < pl.cvecs ? s : 0.f, 0.f, 0};
            }
            const Lane merged = lanes_merge(lane);
            if (c <= last) {
              const long o = (n * C + c) * pl.nbc + bc;
              slot[o] = merged.s;
              ++writes[o];
            }
          }
        }
  for (long n = 0; n < N; ++n)
    for (long c = 0; c < C; ++c) {
      float s = 0.f;
      bool once = true;
      for (long k = 0; k < pl.nbc; ++k) {
        s += slot[(n * C + c) * pl.nbc + k];
        once = once && writes[(n * C + c) * pl.nbc + k] == 1;
      }
      double want = 0;
      for (long h = 0; h < HW; ++h) want += x[(n * C + c) * HW + h];
      const bool ok = once && (std::isnan(want) ? std::isnan(s) : s == want);
      if (!ok && failures++ < 10) std::printf("across n=%ld c=%ld: got %g (once: %d), want %g\n", n, c, s, once, want);
    }
}

// NCHW dx as _scale_columns writes it: every element once by the walk of the thread holding its
// positions, then each position's element at its channel of the max (ai, random) once more, by
// that same thread after its walk (so the vector store and the rewrite are in program order).
static void scale_columns(std::mt19937& rng, long N, long C, long HW, int vec, int sms) {
  const ColumnPlan pl(N, HW, C, vec, sms);
  std::vector<int> writer(N * C * HW, -1), writes(N * C * HW, 0), rewrites(N * C * HW, 0);
  std::vector<int> ai(N * HW);
  for (auto& a : ai) a = static_cast<int>(rng() % C);
  int thread = 0;
  for (long n = 0; n < N; ++n)
    for (long bc = 0; bc < pl.nbc; ++bc)
      for (long chunk = 0; chunk < pl.chunks; ++chunk)
        for (int ty = 0; ty < pl.TY; ++ty)
          for (int tx = 0; tx < pl.TX; ++tx, ++thread) {
            const long cv = bc * pl.TX + tx;
            if (cv >= pl.cvecs) continue;
            const int r0 = static_cast<int>(chunk * pl.chunk) + ty * pl.R;
            const int r1 = static_cast<int>(std::min<int64_t>(int64_t(r0) + pl.R, C));
            for (int r = r0; r < r1; ++r)
              for (int k = 0; k < vec; ++k) {
                const long e = (n * C + r) * HW + cv * vec + k;
                ++writes[e];
                writer[e] = thread;
              }
            for (int k = 0; k < vec; ++k) {
              const int a = ai[n * HW + cv * vec + k];
              if (a >= r0 && a < r1) {
                const long e = (n * C + a) * HW + cv * vec + k;
                rewrites[e] += writer[e] == thread ? 1 : 100;
              }
            }
          }
  for (long n = 0; n < N; ++n)
    for (long c = 0; c < C; ++c)
      for (long h = 0; h < HW; ++h) {
        const long e = (n * C + c) * HW + h;
        const int want = ai[n * HW + h] == c ? 1 : 0;
        if ((writes[e] != 1 || rewrites[e] != want) && failures++ < 10)
          std::printf("scale_columns n=%ld c=%ld hw=%ld: %d writes, %d rewrites (want 1, %d)\n", n, c, h, writes[e],
                      rewrites[e], want);
      }
}

// NCHW pooling over channels of x * w (w [N, C] per row) as _pool_column_halves computes it in
// 2-byte types: a ColumnPlan over half vectors (vec / 2 positions); per trip of four rows lane p
// reads rows r + p and r + 2 + p of its pair's vector, the pair swaps halves, and each lane takes
// rows r .. r + 3 of its half in order; the rest of the rows (fewer than four) both lanes read;
// then the row groups merge in order (columns_partials) and the chunks (the maps kernel).
static void column_halves(long N, long C, long HW, int vec, int sms, const std::vector<float>& x,
                          const std::vector<float>& w) {
  const int H = vec / 2;
  const ColumnPlan pl(N, HW, C, H, sms);  // pl.C: positions, pl.HW: channels
  for (long n = 0; n < N; ++n)
    for (long hw = 0; hw < HW; ++hw) {
      const long hv = hw / H, v = hw % H, first = (hv & ~1L) * H;
      const int p = static_cast<int>(hv & 1);
      std::vector<Lane> parts;
      for (long k = 0; k < pl.chunks; ++k) {
        Lane merged{0.f, -std::numeric_limits<float>::infinity(), 0};
        for (int ty = 0; ty < pl.TY; ++ty) {
          const int r0 = static_cast<int>(k * pl.chunk) + ty * pl.R;
          const int r1 = static_cast<int>(std::min<int64_t>(r0 + pl.R, C));
          Lane g{0.f, -std::numeric_limits<float>::infinity(), r0};
          using Words = std::vector<float>;  // a vector of `vec` elements as the kernel's 4 words (x, y, z, w)
          auto load = [&](int row) { return Words(&x[(n * C + row) * HW + first], &x[(n * C + row) * HW + first] + vec); };
          auto word = [&](const Words& a, int k) { return Words(a.begin() + k * (H / 2), a.begin() + (k + 1) * (H / 2)); };
          auto half = [&](const Words& lo, const Words& hi) {
            Words h(lo);
            h.insert(h.end(), hi.begin(), hi.end());
            return h;
          };
          auto take = [&](const Words& h, int row) {  // element v of the half the lane holds for `row`
            const float e = h[v] * w[n * C + row];
            g.s += e;
            take_max_in_order(g.m, g.i, e, row);
          };
          int r = r0;
          for (; r + 4 <= r1; r += 4) {
            Words raw[2][2];  // [lane][u]: lane q reads rows r + q and r + 2 + q
            for (int q = 0; q < 2; ++q)
              for (int u = 0; u < 2; ++u) raw[q][u] = load(r + q + 2 * u);
            // as the kernel: keep (x, y) or (z, w); send the other pair to the partner (xor 1)
            auto keep = [&](int q, int u, int k) { return word(raw[q][u], q ? 2 + k : k); };
            auto sent = [&](int q, int u, int k) { return word(raw[q][u], q ? k : 2 + k); };
            const Words k0 = keep(p, 0, 0), k1 = keep(p, 0, 1), k2 = keep(p, 1, 0), k3 = keep(p, 1, 1);
            const Words g0 = sent(1 - p, 0, 0), g1 = sent(1 - p, 0, 1), g2 = sent(1 - p, 1, 0), g3 = sent(1 - p, 1, 1);
            take(p ? half(g0, g1) : half(k0, k1), r);
            take(p ? half(k0, k1) : half(g0, g1), r + 1);
            take(p ? half(g2, g3) : half(k2, k3), r + 2);
            take(p ? half(k2, k3) : half(g2, g3), r + 3);
          }
          for (; r < r1; ++r) {
            const Words a = load(r);
            take(p ? half(word(a, 2), word(a, 3)) : half(word(a, 0), word(a, 1)), r);
          }
          if (ty == 0) merged = g;
          else {
            merged.s += g.s;
            take_max_in_order(merged.m, merged.i, g.m, g.i);
          }
        }
        parts.push_back(merged);
      }
      const Pooled got = gate(parts);
      std::vector<float> vals(C);
      for (long c = 0; c < C; ++c) vals[c] = x[(n * C + c) * HW + hw] * w[n * C + c];
      check("column_halves", got, vals, n, hw);
    }
}

// The spatial conv in tiles of rows (ConvTiles): every output row of every sample computed by one
// block; its staged rows [lo, hi) hold the rows its outputs read (within the image) and no more
// than most_rows(); and the conv of the staged rows as an image of hi - lo rows whose row 0 is lo
// (as _spatial_gate and _spatial_terms call small_math.h's conv with it) gives every output bit
// for bit what the whole image gives. The conv here follows small::spatial_conv_at's loops.
static float conv_at(const float* img, int64_t H, int64_t W, int k, const std::vector<float>& w, int64_t h,
                     int64_t x) {
  const int64_t p = (k - 1) / 2;
  float acc = 0.25f;
  for (int64_t dy = 0; dy < k; ++dy) {
    const int64_t hh = h + dy - p;
    if (hh < 0 || hh >= H) continue;
    for (int64_t dx = 0; dx < k; ++dx) {
      const int64_t ww = x + dx - p;
      if (ww < 0 || ww >= W) continue;
      acc += w[dy * k + dx] * img[hh * W + ww];
    }
  }
  return acc;
}

static void conv_tiles(std::mt19937& rng, long N, long H, long W, int k) {
  const ConvTiles pl(N, H, W, k);
  std::vector<float> img(N * H * W), w(k * k);
  for (auto& e : img) e = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 37.f;
  for (auto& e : w) e = static_cast<float>(static_cast<int>(rng() % 201) - 100) / 13.f;
  std::vector<int> done(N * H, 0);
  for (long b = 0; b < pl.grid; ++b) {
    int64_t n, i0, i1, lo, hi;
    pl.rows(b, n, i0, i1, lo, hi);
    const int64_t p = (k - 1) / 2;
    const bool ok = n < N && 0 <= lo && lo <= std::max<int64_t>(0, i0 - p) && std::min<int64_t>(H, i1 + p) <= hi &&
                    hi <= H && hi - lo <= pl.most_rows() && i1 - i0 <= pl.TR &&
                    (W >= kThreads ? pl.TR == 1 : pl.TR * W <= kThreads);
    if (!ok && failures++ < 10)
      std::printf("conv_tiles H=%ld W=%ld k=%d block %ld: n=%ld rows [%ld, %ld) staged [%ld, %ld)\n", H, W, k, b, (long)n,
                  (long)i0, (long)i1, (long)lo, (long)hi);
    const std::vector<float> staged(img.begin() + (n * H + lo) * W, img.begin() + (n * H + hi) * W);
    for (int64_t i = i0; i < i1; ++i) {
      ++done[n * H + i];
      for (int64_t x = 0; x < W; ++x) {
        const float whole = conv_at(img.data() + n * H * W, H, W, k, w, i, x);
        const float tile = conv_at(staged.data(), hi - lo, W, k, w, i - lo, x);
        if (whole != tile && failures++ < 10)
          std::printf("conv_tiles H=%ld W=%ld k=%d (%ld, %ld): staged %g, whole %g\n", H, W, k, (long)i, (long)x, tile, whole);
      }
    }
  }
  for (long r = 0; r < N * H; ++r)
    if (done[r] != 1 && failures++ < 10) std::printf("conv_tiles H=%ld W=%ld k=%d: row %ld computed %d times\n", H, W, k, r, done[r]);
}

// integers in a small range (exact sums, many ties); by trial: a first run of HW all -inf, and
// NaNs (one or two) at random places
static std::vector<float> input(std::mt19937& rng, int trial, long size, long HW) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const int range = 1 + rng() % 6;
  std::vector<float> x(size);
  for (auto& e : x) e = static_cast<float>(static_cast<int>(rng() % (2 * range + 1)) - range);
  if (trial % 5 == 0)
    for (long i = 0; i < HW; ++i) x[i] = -inf;
  if (trial % 3 == 1) x[rng() % x.size()] = nan;
  if (trial % 7 == 2) x[rng() % x.size()] = nan, x[rng() % x.size()] = nan;
  return x;
}

int main() {
  std::mt19937 rng(1234);
  int cases = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const int vec = trial % 3 == 0 ? 4 : 8;
    const long N = 1 + rng() % 3, C = vec * (1 + rng() % 40), HW = vec * (1 + rng() % (trial % 2 ? 40 : 700));
    const int sms = (trial % 4 == 0) ? 1 : (trial % 4 == 1 ? 8 : 132);
    const std::vector<float> x = input(rng, trial, N * C * HW, HW);
    rows(rng, N, C, HW, vec, sms, x);      // x read as [N, C, HW]
    columns(N, C, HW, vec, sms, x);        // the same memory read as [N, HW, C]
    across(N, C, HW, vec, sms, x);         // [N, C, HW], summed along rows in the columns' geometry
    scale_columns(rng, N, C, HW, vec, sms);
    std::vector<float> w(N * C);           // small integer weights (exact products)
    for (auto& e : w) e = static_cast<float>(1 + rng() % 3);
    if (vec == 8) column_halves(N, C, HW, vec, sms, x, w);  // [N, C, HW] pooled over channels
    cases += 5;
  }
  // NCHW rows of any length through tiles (HW not a whole number of vectors, or short)
  for (int trial = 0; trial < 80; ++trial) {
    const int vec = trial % 3 == 0 ? 4 : (trial % 3 == 1 ? 8 : 2);
    const long HW = trial < 8 ? 1 + trial : 1 + rng() % (trial % 2 ? 60 : 900);
    if (!TilePlan::covers(HW, vec)) continue;
    const long N = 1 + rng() % 3, C = 1 + rng() % 70;
    const int sms = (trial % 4 == 0) ? 1 : (trial % 4 == 1 ? 3 : 132);
    const std::vector<float> x = input(rng, trial, N * C * HW, HW);
    tiles(N, C, HW, vec, sms, x);
    ++cases;
  }
  // the spatial conv's tiles: small and large images, rows wider than a block, every odd k
  for (int trial = 0; trial < 40; ++trial) {
    const long N = 1 + rng() % 3, H = 1 + rng() % (trial % 2 ? 12 : 70), W = trial % 5 == 0 ? 257 + rng() % 300 : 1 + rng() % 90;
    conv_tiles(rng, N, H, W, 1 + 2 * static_cast<int>(rng() % 4));
    ++cases;
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}

// Tiling geometry of the new CUDA passes (namespace attnfused::cuda::next) and their max rule:
// plain C++, shared by the host (which sizes grids and partial buffers), the kernels, and a test
// that runs the passes' decomposition on the CPU (tests/test_next_plan.py compiles this header
// with the C++ compiler alone, without CUDA or ATen). Everything here depends only on the shape, the dtype's vector width
// and the device's SM count, so the tiling, and with it the summation order, is fixed for a given
// (shape, dtype, layout, device).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define AF_HD __host__ __device__ __forceinline__
#else
#define AF_HD inline
#endif

namespace attnfused {
namespace cuda {
namespace next {

constexpr int kThreads = 256;            // threads per block of every new kernel
constexpr int kWarps = kThreads / 32;
constexpr int kLoads = 4;                // independent 16-byte loads a thread issues before using one
constexpr int kPoolBlocks = 4;           // resident blocks per SM a pooling pass is compiled for

AF_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------- max with torch's rules
// Branch-free: two compares and two selects per element.

// Visits in increasing index: the first NaN, else the first of equal maxima.
template <typename acc_t>
AF_HD void take_max_in_order(acc_t& m, int& mi, acc_t v, int vi) {
  // !(v <= m) is v > m or either is NaN; m == m then keeps a NaN max
  const bool t = !(v <= m) & (m == m);
  m = t ? v : m;
  mi = t ? vi : mi;
}

// Two (max, index) pairs of any order: NaN wins, ties (or two NaNs) go to the smaller index.
template <typename acc_t>
AF_HD void merge_max(acc_t& m, int& mi, acc_t v, int vi) {
  const bool vn = v != v, mn = m != m, first = vi < mi;
  const bool t = vn ? ((!mn) | first) : ((!mn) & ((v > m) | ((v == m) & first)));
  m = t ? v : m;
  mi = t ? vi : mi;
}

// ---------------------------------------------------------------------------- pooling over space, NCHW
// A sample [C, HW] with HW % vec == 0: TX lanes along a row's vectors, TY = kThreads / TX rows
// (channels) per block; a row is split into `chunks` pieces when samples are too few to fill the
// GPU. A thread visits vectors tx, tx + TX, ... of its piece, kLoads at a time. Partials
// [N, C, chunks]; chunks ascend in hw.
struct RowPlan {
  int64_t N = 0, C = 0, HW = 0;
  int vec = 1, TX = 1, TY = 1;
  int64_t hvecs = 0, ncy = 0, chunks = 1, per_chunk = 0, grid = 0;

  RowPlan() = default;
  AF_HD RowPlan(int64_t N_, int64_t C_, int64_t HW_, int vec_, int sms) : N(N_), C(C_), HW(HW_), vec(vec_) {
    hvecs = HW / vec;
    while (TX < 32 && TX < hvecs) TX *= 2;
    TY = kThreads / TX;
    ncy = cdiv(C, TY);
    // split rows while the grid is under two waves of 8 blocks per SM and pieces keep 4 x kLoads trips
    while (N * ncy * chunks < int64_t(sms) * 16 && cdiv(hvecs, TX * chunks * 2) >= 4 * kLoads) chunks *= 2;
    per_chunk = cdiv(hvecs, chunks);  // vectors per piece
    chunks = cdiv(hvecs, per_chunk);
    grid = N * ncy * chunks;
  }
};

// ---------------------------------------------------------------------------- pooling over space, NCHW short rows
// Rows whose H*W is not a whole number of 16-byte vectors (14x14 and 7x7 in half precision): a
// block streams tiles of R whole rows (R x HW consecutive elements) as flat 16-byte vectors into
// shared memory, kLoads per thread; then P threads per row each sum a piece of L elements in
// order and merge by a butterfly. R is a multiple of g = vec / gcd(HW, vec), so every tile starts
// on a 16-byte boundary. Tiles go to blocks round-robin (block b: tiles b, b + grid, ...), R sized
// so that the rounds come out nearly even. Partials [N, C, 1]. Rows that do not fit g to a tile
// (g x HW > kThreads x kLoads x vec) are not covered.
struct TilePlan {
  int64_t rows = 0, HW = 0;  // rows = N x C
  int vec = 1, R = 0, P = 1, L = 0;
  int64_t tiles = 0, grid = 0;

  AF_HD static int64_t capacity(int vec) { return int64_t(kThreads) * kLoads * vec; }  // elements per tile
  AF_HD static int64_t rows_aligned(int64_t HW, int vec) {  // g: rows that span whole vectors
    int64_t g = 1;
    while ((g * HW) % vec != 0) g *= 2;  // vec is a power of two: g <= vec
    return g;
  }
  AF_HD static bool covers(int64_t HW, int vec) { return HW > 0 && rows_aligned(HW, vec) * HW <= capacity(vec); }

  TilePlan() = default;
  AF_HD TilePlan(int64_t rows_, int64_t HW_, int vec_, int sms) : rows(rows_), HW(HW_), vec(vec_) {
    if (rows <= 0 || !covers(HW, vec)) return;  // nothing to launch (grid 0)
    const int64_t g = rows_aligned(HW, vec);
    int64_t most = capacity(vec) / HW / g * g;  // the most rows a tile holds
    most = most < kThreads ? most : kThreads;
    // as many rounds of sms x kPoolBlocks tiles as the largest tiles need, then the tiles as
    // small as those rounds allow, so the last round is nearly full
    const int64_t slots = int64_t(sms) * kPoolBlocks;
    const int64_t rounds = cdiv(cdiv(rows, most), slots);
    R = static_cast<int>(cdiv(cdiv(rows, rounds * slots), g) * g);
    while (P < 32 && int64_t(R) * P * 2 <= kThreads && P < HW) P *= 2;
    L = static_cast<int>(cdiv(HW, P));
    tiles = cdiv(rows, R);
    grid = tiles < slots ? tiles : slots;
  }
};

// ---------------------------------------------------------------------------- pooling over space, channels_last
// A sample [HW, C]: TX lanes x vec channels per row, TY = kThreads / TX row groups; a block covers
// a chunk of TY x R rows of TX x vec channels, each row group R consecutive rows (kLoads at a
// time), so each thread visits its rows in order. Partials [N, chunks, C]; chunks ascend in hw.
struct ColumnPlan {
  int64_t N = 0, C = 0, HW = 0;
  int vec = 1, TX = 1, TY = 1, R = 1;
  int64_t cvecs = 0, nbc = 0, chunk = 0, chunks = 1, grid = 0;

  ColumnPlan() = default;
  AF_HD ColumnPlan(int64_t N_, int64_t C_, int64_t HW_, int vec_, int sms) : N(N_), C(C_), HW(HW_), vec(vec_) {
    cvecs = cdiv(C, vec);
    while (TX < 32 && TX < cvecs) TX *= 2;
    TY = kThreads / TX;
    nbc = cdiv(cvecs, TX);
    // rows per thread: the most (<= 16 x kLoads) that still gives two waves of 8 blocks per SM
    R = kLoads;
    while (R < 16 * kLoads && N * nbc * cdiv(HW, int64_t(TY) * R * 2) >= int64_t(sms) * 16) R *= 2;
    chunk = int64_t(TY) * R;
    chunks = cdiv(HW, chunk);
    grid = N * nbc * chunks;
  }
};

// ---------------------------------------------------------------------------- the spatial conv, tiled
// The k x k conv over a sample's maps (and its transpose over dlog) as tiles of TR whole rows: a
// block of kThreads computes rows [i0, i1) of sample n (TR x W positions, TR >= 1) and first copies
// rows [lo, hi) = [i0 - p, i1 + p) of the planes it reads, clamped to the image, into shared
// memory, where they fit kStageBytes. The conv then sees an image of hi - lo rows whose row 0 is
// lo: its zero padding falls where the image's does (a clamped edge is the image's edge, an
// unclamped one has its halo staged), so each output is the same sum in the same order.
constexpr int64_t kStageBytes = 48 * 1024;  // (the static shared memory limit: no opt-in)

struct ConvTiles {
  int64_t N = 0, H = 0, W = 0;
  int p = 0, TR = 1;
  int64_t tiles = 0, grid = 0;  // tiles per sample, blocks

  ConvTiles() = default;
  AF_HD ConvTiles(int64_t N_, int64_t H_, int64_t W_, int k) : N(N_), H(H_), W(W_), p((k - 1) / 2) {
    TR = W >= kThreads ? 1 : static_cast<int>(kThreads / W);
    if (TR > H) TR = static_cast<int>(H);
    tiles = H > 0 ? cdiv(H, TR) : 0;
    grid = N * tiles;
  }
  // the most rows a block stages, and whether `planes` planes of them fit (else it reads in place)
  AF_HD int64_t most_rows() const { return TR + 2 * p < H ? TR + 2 * p : H; }
  AF_HD bool stages(int planes, int64_t elem) const { return most_rows() * W * planes * elem <= kStageBytes; }
  // block b: sample n, output rows [i0, i1), staged rows [lo, hi)
  AF_HD void rows(int64_t b, int64_t& n, int64_t& i0, int64_t& i1, int64_t& lo, int64_t& hi) const {
    n = b / tiles;
    i0 = (b - n * tiles) * TR;
    i1 = i0 + TR < H ? i0 + TR : H;
    lo = i0 - p > 0 ? i0 - p : 0;
    hi = i1 + p < H ? i1 + p : H;
  }
};

}  // namespace next
}  // namespace cuda
}  // namespace attnfused

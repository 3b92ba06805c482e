// Host side shared by the CUDA ops: argument checks, scratch buffers, tiling plans and launches
// of the reduce / apply / weight-gradient kernels.
#pragma once

#include <torch/library.h>

#include <vector>

#include "per_sample.cuh"

namespace attnfused {
namespace cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// x: checked by common.h's check_input, on a CUDA device, non-empty C, H, W (N may be 0)
inline void check_cuda_input(const at::Tensor& x) {
  check_input(x);
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, "x must have C, H, W > 0, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.size(1) < INT32_MAX && x.size(2) * x.size(3) < INT32_MAX,
                    "x's C and H*W must each be below 2**31, got shape ", x.sizes());
}

// Scratch vectors of one call; the caching allocator keeps them stream-ordered. Given a block size
// (the new path), f and i carve their vectors out of blocks of that size, each next block twice as
// large: a call then takes one allocation, or a few, instead of one per vector. Without one (the
// validated path), each vector is a tensor of its own.
struct Scratch {
  static constexpr int64_t kAlign = 256;  // every carved vector starts on a 256-byte boundary
  at::TensorOptions acc, i32;
  std::vector<at::Tensor> keep;
  int64_t block = 0;  // the next block's size in bytes; 0: a tensor per vector
  char* free_at = nullptr;
  int64_t left = 0;  // bytes left in the current block
  explicit Scratch(const at::Tensor& x, int64_t block_bytes = 0)
      : acc(x.options().dtype(acc_dtype(x))), i32(x.options().dtype(at::kInt)), block(block_bytes) {}
  Scratch(const Scratch&) = delete;  // two copies would carve the same bytes
  Scratch& operator=(const Scratch&) = delete;
  void* carve(int64_t bytes) {
    bytes = ceil_div(std::max<int64_t>(bytes, 1), kAlign) * kAlign;
    if (bytes > left) {
      left = std::max(bytes, block);
      keep.push_back(at::empty({left}, acc.dtype(at::kByte)));
      free_at = static_cast<char*>(keep.back().data_ptr());
      block *= 2;
    }
    void* p = free_at;
    free_at += bytes;
    left -= bytes;
    return p;
  }
  template <typename acc_t>
  acc_t* f(int64_t n) {
    if (block) return static_cast<acc_t*>(carve(n * int64_t(sizeof(acc_t))));
    keep.push_back(at::empty({std::max<int64_t>(n, 1)}, acc));
    return keep.back().data_ptr<acc_t>();
  }
  int* i(int64_t n) {
    if (block) return static_cast<int*>(carve(n * int64_t(sizeof(int))));
    keep.push_back(at::empty({std::max<int64_t>(n, 1)}, i32));
    return keep.back().data_ptr<int>();
  }
  int* zeros_i(int64_t n) {  // (a fill kernel; the new path needs none)
    keep.push_back(at::zeros({std::max<int64_t>(n, 1)}, i32));
    return keep.back().data_ptr<int>();
  }
};

// Which axis a reduce pass sums over, by meaning.
enum class Over { SPACE, CHANNELS, BOTH };

// One reduce pass over x (and dy): tiling, partial and result buffers, launch.
template <typename T>
struct ReducePass {
  using acc_t = at::acc_type<T, true>;
  Params<acc_t> p{};
  int vec = 1;
  int dir = ROW;

  ReducePass(const at::Tensor& x, const at::Tensor& dy, Over over, bool pooling, Scratch& s) {
    p.N = x.size(0);
    p.C = x.size(1);
    p.H = x.size(2);
    p.W = x.size(3);
    p.HW = p.H * p.W;
    p.cl = is_channels_last(x);
    p.A = p.cl ? p.HW : p.C;
    p.B = p.cl ? p.C : p.HW;
    // per-channel results reduce over space: rows (along b = hw) in NCHW, columns in channels_last
    if (over == Over::BOTH)
      dir = BOTH;
    else
      dir = ((over == Over::SPACE) != p.cl) ? ROW : COL;
    vec = pick_vec<T>(p.B, {x.data_ptr(), dy.defined() ? dy.data_ptr() : nullptr});
    plan();
    const int64_t N = p.N;
    if (dir & ROW) {
      p.part_sum_r = s.f<acc_t>(N * p.nbx * p.A);
      p.sum_r = s.f<acc_t>(N * p.A);
      if (pooling) {
        p.part_max_r = s.f<acc_t>(N * p.nbx * p.A);
        p.part_idx_r = s.i(N * p.nbx * p.A);
        p.max_r = s.f<acc_t>(N * p.A);
        p.idx_r = s.i(N * p.A);
      }
    }
    if (dir & COL) {
      p.part_sum_c = s.f<acc_t>(N * p.nay * p.B);
      p.sum_c = s.f<acc_t>(N * p.B);
      if (pooling) {
        p.part_max_c = s.f<acc_t>(N * p.nay * p.B);
        p.part_idx_c = s.i(N * p.nay * p.B);
        p.max_c = s.f<acc_t>(N * p.B);
        p.idx_c = s.i(N * p.B);
      }
    }
    p.ticket = s.zeros_i(N);
  }

  // Tiles: TX lanes x VEC elements along b; rows of threads along a. Enough blocks to fill the
  // GPU about twice over, without tiles so thin that partials dominate.
  void plan() {
    const int64_t vecs_b = ceil_div(p.B, vec);
    int TX = 1;
    while (TX < 32 && TX < vecs_b) TX *= 2;
    p.TX = TX;
    const int TY = kThreads / TX;
    const int64_t target = int64_t(num_sms()) * 16;
    if (dir == ROW) {
      p.KA = 1;
      p.nay = ceil_div(p.A, TY);
      int64_t blocks = p.N * p.nay;
      int64_t nbx = 1;
      if (blocks < target)  // few samples: split the rows too (blocks may be 0 for an empty batch)
        nbx = std::max<int64_t>(1, std::min(ceil_div(target, std::max<int64_t>(1, blocks)), ceil_div(vecs_b, TX * 4)));
      p.KB = ceil_div(vecs_b, TX * nbx);
      p.nbx = ceil_div(vecs_b, TX * p.KB);
      if (blocks > 4 * target) {  // many short rows: several rows per thread
        p.KA = static_cast<int>(std::min<int64_t>(8, blocks / (2 * target)));
        p.nay = ceil_div(p.A, TY * p.KA);
      }
    } else {
      p.KB = 1;
      p.nbx = ceil_div(vecs_b, TX);
      int64_t want = ceil_div(target, std::max<int64_t>(1, p.N * p.nbx));
      int64_t most = ceil_div(p.A, TY * 4);
      int64_t nay = std::max<int64_t>(1, std::min(want, most));
      p.KA = ceil_div(p.A, TY * nay);
      p.nay = ceil_div(p.A, TY * p.KA);
    }
  }

  // per-channel / per-position reduced results
  acc_t* per_c_sum() const { return p.cl ? p.sum_c : p.sum_r; }
  acc_t* per_hw_sum() const { return p.cl ? p.sum_r : p.sum_c; }
  // write the per-position sums to `out` [N, HW] instead of scratch
  void per_hw_sum_into(acc_t* out) { (p.cl ? p.sum_r : p.sum_c) = out; }

  // multiplier of the per-channel results, indexed by the position they sum over (MASK: + [c == idx] q)
  void weigh_space(const acc_t* m, const int64_t* idx = nullptr, const acc_t* q = nullptr) {
    if (p.cl) {
      p.ma = m, p.ia = idx, p.qa = q;
    } else {
      p.mb = m, p.ib = idx, p.qb = q;
    }
  }
  // multiplier of the per-position results, indexed by channel
  void weigh_channels(const acc_t* m) {
    if (p.cl)
      p.mb = m;
    else
      p.ma = m;
  }

  // BOTH_DIRS: the pass was made with Over::BOTH (instantiates only the two-direction kernel)
  template <Pass PASS, class Fin, bool BOTH_DIRS = false>
  void launch(const at::Tensor& x, const at::Tensor& dy, const typename Fin::Args& args) {
    TORCH_CHECK((dir == BOTH) == BOTH_DIRS, "attnfused: reduce pass launched with the wrong direction");
    if (p.N == 0) return;
    constexpr int V = 16 / sizeof(T);
    if (vec == V)
      launch_dir<PASS, Fin, BOTH_DIRS, V>(x, dy, args);
    else
      launch_dir<PASS, Fin, BOTH_DIRS, 1>(x, dy, args);
  }

 private:
  template <Pass PASS, class Fin, bool BOTH_DIRS, int V>
  void launch_dir(const at::Tensor& x, const at::Tensor& dy, const typename Fin::Args& args) {
    if constexpr (BOTH_DIRS)
      go<PASS, BOTH, Fin, V>(x, dy, args);
    else if (dir == ROW)
      go<PASS, ROW, Fin, V>(x, dy, args);
    else
      go<PASS, COL, Fin, V>(x, dy, args);
  }

  template <Pass PASS, int DIR, class Fin, int V>
  void go(const at::Tensor& x, const at::Tensor& dy, const typename Fin::Args& args) {
    const int64_t blocks = p.N * p.nbx * p.nay;
    TORCH_CHECK(blocks < INT32_MAX, "attnfused: too many blocks for one launch (", blocks, ")");
    const T* dptr = dy.defined() ? dy.data_ptr<T>() : nullptr;
    _reduce_kernel<T, V, PASS, DIR, Fin><<<static_cast<unsigned>(blocks), kThreads, 0,
                                          at::cuda::getCurrentCUDAStream()>>>(x.data_ptr<T>(), dptr, p, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename T>
struct Tag {
  using type = T;
};

// The apply pass: writes out (x's size and strides) from in (x's size and strides, or undefined).
template <typename T, bool IN, bool SP, bool CH>
void launch_apply(const at::Tensor& in, const at::Tensor& out, const ApplyParams<at::acc_type<T, true>>& ap) {
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const int vec = pick_vec<T>(ap.B, {out.data_ptr(), in.defined() ? in.data_ptr() : nullptr});
  const T* iptr = in.defined() ? in.data_ptr<T>() : nullptr;
  T* optr = out.data_ptr<T>();
  auto stream = at::cuda::getCurrentCUDAStream();
  auto go = [&](auto vec_c, auto index_c) {
    constexpr int V = decltype(vec_c)::value;
    using index_t = typename decltype(index_c)::type;
    const int64_t nvec = numel / V;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(nvec, kThreads), int64_t(num_sms()) * 32));
    _apply_kernel<T, V, index_t, IN, SP, CH><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        iptr, optr, ap, Divider<index_t>(static_cast<index_t>(ap.B)), Divider<index_t>(static_cast<index_t>(ap.A)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  constexpr int VMAX = 16 / sizeof(T);
  // 32-bit indices while every element index and the grid stride stay within INT32_MAX: the fast
  // division (torch's IntDivider<unsigned>) adds in 32 bits and wraps past about 3e9
  const bool small = numel + int64_t(num_sms()) * 32 * kThreads * VMAX <= INT32_MAX;
  using I32 = Tag<uint32_t>;
  using I64 = Tag<int64_t>;
  using V1 = std::integral_constant<int, 1>;
  using VM = std::integral_constant<int, VMAX>;
  if (vec == VMAX) {
    small ? go(VM{}, I32{}) : go(VM{}, I64{});
  } else {
    small ? go(V1{}, I32{}) : go(V1{}, I64{});
  }
}

template <typename acc_t>
ApplyParams<acc_t> apply_params(const at::Tensor& x) {
  ApplyParams<acc_t> ap{};
  ap.numel = x.numel();
  ap.C = x.size(1);
  ap.HW = x.size(2) * x.size(3);
  ap.cl = is_channels_last(x);
  ap.A = ap.cl ? ap.HW : ap.C;
  ap.B = ap.cl ? ap.C : ap.HW;
  return ap;
}

// out [I, J] = sum_r a[r, i] b[r, j] in the accumulation dtype
template <typename acc_t>
void outer_sum(const acc_t* a, const acc_t* b, acc_t* out, int64_t R, int I, int J) {
  TORCH_CHECK(R < INT32_MAX, "attnfused: too many rows for the weight gradient (", R, ")");
  dim3 grid(ceil_div(J, 32), ceil_div(I, 32));
  _outer_sum_kernel<acc_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a, b, out, static_cast<int>(R), I, J);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void column_sum(const acc_t* a, acc_t* out, int64_t R, int J, acc_t scale = acc_t(1)) {
  if (J == 0) return;
  _column_sum_kernel<acc_t><<<ceil_div(J, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a, out, R, J, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Floating dtypes the CUDA kernels take: float32, float16, bfloat16 and float64.
#define AF_DISPATCH_CUDA_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace cuda
}  // namespace attnfused

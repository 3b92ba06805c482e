// Operator schemas of the compiled extension (namespace attnfused_C). Kernels register per
// device with TORCH_LIBRARY_IMPL in cpu/ and cuda/. The public ops (torch.ops.attnfused.*)
// are defined in attnfused/ops.py and dispatch here for the "cpu" and "cuda" backends; the
// contracts (saved tensors, dtypes, strides) are documented there.
#include <torch/library.h>

#include <string>

// Build facts baked in by the compile flags (attnfused/backends/extension.py: build_flags).
#define AF_STR2(x) #x
#define AF_STR(x) AF_STR2(x)
#ifndef AF_BUILD
#define AF_BUILD unknown
#endif
#ifndef AF_CPU_ARCH
#define AF_CPU_ARCH unknown
#endif
#ifdef AF_WITH_CUDA
#define AF_CUDA_FLAG "1"
#else
#define AF_CUDA_FLAG "0"
#define AF_CUDA_ARCHS
#endif

namespace {
// "key=value;..." read by attnfused.backends.extension.build_info().
std::string build_info() {
  return std::string("cpu=1;cuda=") + AF_CUDA_FLAG + ";cuda_archs=" AF_STR(AF_CUDA_ARCHS) ";build=" AF_STR(AF_BUILD)
         ";cpu_arch=" AF_STR(AF_CPU_ARCH);
}
}  // namespace

TORCH_LIBRARY(attnfused_C, m) {
  m.def("channel_attention(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, str kind, str pool, "
        "str act, str gate, str padding, str tie, Tensor? residual=None, str activation=\"none\", "
        "Tensor? in_scale=None, Tensor? in_shift=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("channel_attention_backward(Tensor grad_y, Tensor x, Tensor pooled, Tensor argmax, Tensor hidden, "
        "Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, str kind, str pool, str act, str gate, str padding, str tie) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("spatial_attention(Tensor x, Tensor weight, Tensor? bias, str maps, str gate, str tie, Tensor? residual=None, "
        "str activation=\"none\", Tensor? in_scale=None, Tensor? in_shift=None) -> (Tensor, Tensor, Tensor)");
  m.def("spatial_attention_backward(Tensor grad_y, Tensor x, Tensor smaps, Tensor sargmax, Tensor weight, "
        "Tensor? bias, str maps, str gate, str tie) -> (Tensor, Tensor, Tensor)");
  m.def("cbam(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, Tensor sweight, Tensor? sbias, str kind, "
        "str pool, str act, str gate, str padding, str maps, str sgate, str tie, Tensor? residual=None, "
        "str activation=\"none\", Tensor? in_scale=None, Tensor? in_shift=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cbam_backward(Tensor grad_y, Tensor x, Tensor pooled, Tensor argmax, Tensor smaps, Tensor sargmax, "
        "Tensor hidden, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, Tensor sweight, Tensor? sbias, str kind, "
        "str pool, str act, str gate, str padding, str maps, str sgate, str tie) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("spatial_pool(Tensor x, str tie) -> (Tensor, Tensor)");
  m.def("spatial_pool_backward(Tensor grad_smaps, Tensor x, Tensor sargmax, str tie) -> Tensor");
  m.def("spatial_scale(Tensor x, Tensor t, Tensor? residual=None, str activation=\"none\") -> Tensor");
  m.def("spatial_scale_backward(Tensor grad_y, Tensor x, Tensor t) -> (Tensor, Tensor)");
  m.def("_build_info() -> str", &build_info);
}

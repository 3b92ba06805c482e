// Two probes for the next design step of the CUDA kernels, run by `python -m bench.gpu_check`:
//   l2     the rate at which a chunk of 8-64 MB is read again and again (it stays in L2 when it
//          fits), beside the rate of a 1 GB read (device memory);
//   cluster  cudaOccupancyMaxActiveClusters for clusters of 8 and 16 CTAs of 256 threads, each CTA
//          holding 1/cluster of a ResNet-50 stage's sample (fp16) in shared memory.
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 bench/gpu_probes.cu -o gpu_probes
// Output: CSV lines on stdout (probe,what,value,unit). No torch: it builds in seconds.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(call)                                                                              \
  do {                                                                                           \
    cudaError_t e_ = (call);                                                                     \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

constexpr int kUnroll = 4;  // independent 16-byte loads in flight per thread

// Reads n 16-byte words `reps` times (L2 only: ld.global.cg), 4 loads in flight per thread;
// the xor keeps the loads alive, and a never-true test keeps the store out of the timing.
__global__ void __launch_bounds__(256) read_kernel(const int4* __restrict__ p, size_t n, int reps, int4* sink) {
  int acc = 0;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (int r = 0; r < reps; ++r) {
    size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = __ldcg(p + i + u * stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n; i += stride) {
      int4 v = __ldcg(p + i);
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  if (acc == 0x7fffffff) sink[0] = make_int4(acc, 0, 0, 0);
}

// A CTA that owns `dynamic shared memory` bytes; only its occupancy is asked for.
__global__ void cluster_kernel(int* out) {
  extern __shared__ int smem[];
  smem[threadIdx.x] = threadIdx.x;
  __syncthreads();
  if (smem[0] != 0) out[0] = 1;
}

static float time_reads(const int4* buf, size_t n, int reps, int grid, int4* sink) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  read_kernel<<<grid, 256>>>(buf, n, 1, sink);  // warm-up: brings the chunk into L2
  CHECK(cudaGetLastError());
  float best = 1e30f;
  for (int t = 0; t < 5; ++t) {
    CHECK(cudaEventRecord(a));
    read_kernel<<<grid, 256>>>(buf, n, reps, sink);
    CHECK(cudaGetLastError());
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (ms < best) best = ms;
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return best;
}

static void probe_l2(const cudaDeviceProp& prop) {
  const size_t big = size_t(1) << 30;
  int4* buf = nullptr;
  int4* sink = nullptr;
  CHECK(cudaMalloc(&buf, big));
  CHECK(cudaMalloc(&sink, sizeof(int4)));
  CHECK(cudaMemset(buf, 0x5a, big));  // not zeros: the values are xor-ed
  const int grid = prop.multiProcessorCount * 8;
  std::printf("l2,l2_bytes,%d,B\n", prop.l2CacheSize);
  const int sizes_mb[] = {8, 16, 24, 32, 40, 48, 64};
  for (int mb : sizes_mb) {
    const size_t bytes = size_t(mb) << 20;
    const int reps = 20;
    const float ms = time_reads(buf, bytes / 16, reps, grid, sink);
    std::printf("l2,reread_%dMB,%.1f,GB/s\n", mb, double(bytes) * reps / (ms * 1e-3) / 1e9);
  }
  const float ms = time_reads(buf, big / 16, 1, grid, sink);
  std::printf("l2,read_1GB,%.1f,GB/s\n", double(big) / (ms * 1e-3) / 1e9);
  CHECK(cudaFree(buf));
  CHECK(cudaFree(sink));
}

static void probe_clusters(const cudaDeviceProp& prop) {
  int* out = nullptr;
  CHECK(cudaMalloc(&out, sizeof(int)));
  struct Stage {
    int C, H, W;
  };
  const Stage stages[] = {{256, 56, 56}, {512, 28, 28}, {1024, 14, 14}, {2048, 7, 7}};
  const int sizes[] = {8, 16};
  CHECK(cudaFuncSetAttribute(cluster_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  for (const Stage& s : stages) {
    const size_t sample = size_t(s.C) * s.H * s.W * 2;  // fp16
    for (int cs : sizes) {
      const size_t per_cta = ((sample + cs - 1) / cs + 127) / 128 * 128;
      int clusters = 0;
      if (per_cta <= size_t(prop.sharedMemPerBlockOptin)) {
        CHECK(cudaFuncSetAttribute(cluster_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(per_cta)));
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(cs * prop.multiProcessorCount, 1, 1);
        cfg.blockDim = dim3(256, 1, 1);
        cfg.dynamicSmemBytes = per_cta;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = cs;
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        cudaError_t e = cudaOccupancyMaxActiveClusters(&clusters, cluster_kernel, &cfg);
        if (e != cudaSuccess) {
          std::printf("cluster,%dx%dx%d_c%d_error,%s,\n", s.C, s.H, s.W, cs, cudaGetErrorString(e));
          (void)cudaGetLastError();
          continue;
        }
      }
      // 0 clusters: the sample does not fit the cluster's shared memory
      std::printf("cluster,%dx%dx%d_c%d_smem%zuKB,%d,clusters\n", s.C, s.H, s.W, cs, per_cta / 1024, clusters);
    }
  }
  CHECK(cudaFree(out));
}

int main(int argc, char** argv) {
  int dev = 0;
  CHECK(cudaSetDevice(dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("probe,what,value,unit\n");
  std::printf("device,name,%s,\n", prop.name);
  std::printf("device,sms,%d,\n", prop.multiProcessorCount);
  std::printf("device,smem_optin_per_block,%zu,B\n", size_t(prop.sharedMemPerBlockOptin));
  const bool all = argc < 2;
  for (int i = 1; i < argc || all; ++i) {
    const char* what = all ? "all" : argv[i];
    if (all || std::strcmp(what, "l2") == 0) probe_l2(prop);
    if (all || std::strcmp(what, "cluster") == 0) probe_clusters(prop);
    if (all) break;
  }
  CHECK(cudaDeviceSynchronize());
  return 0;
}

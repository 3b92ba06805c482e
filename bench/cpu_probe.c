// What one core of this machine can do, apart from torch: the figures behind
// bench/results/cpu-AMD-EPYC-2c/NOTES.md ("This machine"). x86-64 with AVX2 and FMA.
//
//   gcc -O3 -mavx2 -mfma -pthread bench/cpu_probe.c -o /tmp/cpu_probe
//   /tmp/cpu_probe THREADS TEST [ARGS]
//
// TEST (each thread runs it on buffers of its own, at the same time; best of 4-5 rounds):
//   fma          12 independent FMA chains: FMA lanes per ns
//   read D       sums 128 MB, prefetching D bytes ahead into L2 (D = 0: none): GB/s read
//   ntwrite      streams (non-temporal stores) a constant over 64 MB: GB/s written
//   copy         reads 64 MB and streams it out scaled: GB/s read + written
//   scale KB     streams out 64 MB of x * t * S[c] with x taken from a KB-sized buffer (in L2 or
//                L3), 2048 channels per pixel as the channels-last sweep does: GB/s written
//   pool L R     the channels-last pooling over space (sum, max, argmax per channel) of 64 MB of
//                2048 x 7 x 7 samples, as cols_pool walks them: column blocks of L floats, R rows
//                per step with the accumulators in registers: GB/s read
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char* test;
static long arg, arg2;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float* filled(long n, float v) {
  float* p = aligned_alloc(64, n * sizeof(float));
  for (long i = 0; i < n; ++i) p[i] = v + (i & 15) * 1e-3f;
  return p;
}

static void report(const char* what, double amount, double seconds, float keep) {
  printf("%s %.1f %s\n", test, amount / seconds / 1e9, what);
  if (keep == -1.0f) printf("(%g)\n", keep);  // keeps the sums alive
}

// Runs the statements given `rounds` times, keeping the fastest round's seconds in `best`.
#define BEST_OF(rounds, ...)                    \
  for (int round_ = 0; round_ < (rounds); ++round_) { \
    const double t0_ = now();                   \
    __VA_ARGS__                                 \
    const double t_ = now() - t0_;              \
    if (t_ < best) best = t_;                   \
  }

static void* run(void* unused) {
  (void)unused;
  double best = 1e30;
  float keep = 0;
  if (!strcmp(test, "fma")) {
    const long n = 100000000;
    __m256 acc[12], x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(i * 1e-3f);
    BEST_OF(4, for (long k = 0; k < n; ++k) for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], x, y);)
    for (int i = 0; i < 12; ++i) keep += _mm256_cvtss_f32(acc[i]);
    report("FMA lanes per ns", n * 12.0 * 8, best, keep);
  } else if (!strcmp(test, "read")) {
    const long n = 32L << 20;
    const float* q = filled(n, 1);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    BEST_OF(4, for (long i = 0; i < n; i += 32) {
      if (arg) {
        _mm_prefetch((const char*)(q + i) + arg, _MM_HINT_T1);
        _mm_prefetch((const char*)(q + i) + arg + 64, _MM_HINT_T1);
      }
      a0 = _mm256_add_ps(a0, _mm256_load_ps(q + i));
      a1 = _mm256_add_ps(a1, _mm256_load_ps(q + i + 8));
      a2 = _mm256_add_ps(a2, _mm256_load_ps(q + i + 16));
      a3 = _mm256_add_ps(a3, _mm256_load_ps(q + i + 24));
    })
    keep = _mm256_cvtss_f32(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    report("GB/s read", n * 4.0, best, keep);
  } else if (!strcmp(test, "pool")) {
    const long C = 2048, HW = 49, sample = C * HW, samples = (64L << 20) / (sample * 4);
    if (arg2 < 1 || arg < 16 || arg % 16 || C % arg) {
      fprintf(stderr, "pool L R: L a multiple of 16 dividing 2048, R >= 1\n");
      exit(2);
    }
    const float* x = filled(samples * sample, 0.5f);
    float *sum = filled(C, 0), *mx = filled(C, 0), *ix = filled(C, 0);
    BEST_OF(4,
      for (long n = 0; n < samples; ++n) {
        const float* xs = x + n * sample;
        for (long j0 = 0; j0 < C; j0 += arg)
          for (long r0 = 0; r0 < HW; r0 += arg2)
            for (long j = j0; j < j0 + arg; j += 16) {
              __m256 s[2], m[2], ai[2];
              for (int u = 0; u < 2; ++u) {
                s[u] = r0 ? _mm256_load_ps(sum + j + 8 * u) : _mm256_setzero_ps();
                m[u] = r0 ? _mm256_load_ps(mx + j + 8 * u) : _mm256_set1_ps(-1e30f);
                ai[u] = r0 ? _mm256_load_ps(ix + j + 8 * u) : _mm256_setzero_ps();
              }
              for (long row = r0; row < r0 + arg2 && row < HW; ++row) {
                const __m256 vr = _mm256_set1_ps((float)row);
                for (int u = 0; u < 2; ++u) {
                  const __m256 v = _mm256_load_ps(xs + row * C + j + 8 * u);
                  const __m256 take = _mm256_cmp_ps(v, m[u], _CMP_GT_OQ);
                  s[u] = _mm256_add_ps(s[u], v);
                  m[u] = _mm256_blendv_ps(m[u], v, take);
                  ai[u] = _mm256_blendv_ps(ai[u], vr, take);
                }
              }
              for (int u = 0; u < 2; ++u) {
                _mm256_store_ps(sum + j + 8 * u, s[u]);
                _mm256_store_ps(mx + j + 8 * u, m[u]);
                _mm256_store_ps(ix + j + 8 * u, ai[u]);
              }
            }
        keep += sum[n % C] + mx[n % C] + ix[n % C];
      }
    )
    report("GB/s read", samples * sample * 4.0, best, keep);
  } else {
    const long n = 16L << 20;
    const int copy = !strcmp(test, "copy"), scale = !strcmp(test, "scale");
    if (!copy && !scale && strcmp(test, "ntwrite")) {
      fprintf(stderr, "unknown test %s\n", test);
      exit(2);
    }
    const long src = copy ? n : scale ? arg * 256 : 8;  // floats
    if (scale && (src < 2048 || src % 2048)) {
      fprintf(stderr, "scale KB: a multiple of 8 (whole pixels of 2048 floats)\n");
      exit(2);
    }
    float* p = filled(n, 0);
    const float* q = filled(src, 1);
    const float* S = filled(2048, 1.0001f);
    const __m256 c = _mm256_set1_ps(1.0001f);
    BEST_OF(5,
      if (copy) {
        for (long i = 0; i < n; i += 8) _mm256_stream_ps(p + i, _mm256_mul_ps(_mm256_load_ps(q + i), c));
      } else if (scale) {
        for (long i = 0; i < n; i += 2048) {  // one channels-last pixel of 2048 channels
          const float* x = q + i % src;
          const __m256 t = _mm256_set1_ps(0.5f + (i & 7));
          for (int k = 0; k < 2048; k += 8)
            _mm256_stream_ps(p + i + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_load_ps(x + k), t), _mm256_load_ps(S + k)));
        }
      } else {
        for (long i = 0; i < n; i += 8) _mm256_stream_ps(p + i, c);
      }
      _mm_sfence();
    )
    keep = p[n / 3];
    report(copy ? "GB/s read + written" : "GB/s written", copy ? n * 8.0 : n * 4.0, best, keep);
  }
  return NULL;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s THREADS fma|read D|ntwrite|copy|scale KB|pool L R\n", argv[0]);
    return 2;
  }
  const int threads = atoi(argv[1]);
  test = argv[2];
  arg = argc > 3 ? atol(argv[3]) : 0;
  arg2 = argc > 4 ? atol(argv[4]) : 0;
  if (threads < 1 || threads > 64) {
    fprintf(stderr, "THREADS: 1 to 64\n");
    return 2;
  }
  pthread_t th[64];
  for (int i = 0; i < threads; ++i) pthread_create(&th[i], NULL, run, NULL);
  for (int i = 0; i < threads; ++i) pthread_join(th[i], NULL);
  return 0;
}

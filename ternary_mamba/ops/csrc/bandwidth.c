// The benchmarks' memory-bandwidth probe: a multi-threaded streaming read, read the way the GEMVs read (each
// thread one contiguous range, four interleaved streams, wide loads, software prefetch 8 KB ahead into L2), so
// that no GEMV can honestly exceed it.  Returns a sum of what it read (the loads cannot be optimised away).
#include "kernels.h"
#include "vec16.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

float stream_read(const float *buf, int64_t n) {
    float total = 0.f;
    #pragma omp parallel reduction(+ : total)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t per = (n / nt) & ~(int64_t)63, lo = t * per, hi = t == nt - 1 ? n : lo + per;
        const int64_t q = ((hi - lo) / 4) & ~(int64_t)15;   // four streams of q floats
        const float *s0 = buf + lo, *s1 = s0 + q, *s2 = s1 + q, *s3 = s2 + q;
        float r = 0.f;
        int64_t i = 0;
#if defined(__AVX2__) && !defined(__AVX512F__)
        // explicit ymm accumulators: GCC spills 64-byte generic vectors to the stack on AVX2-only CPUs
        __m256 b0 = _mm256_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
        for (; i < q; i += 16) {
            _mm_prefetch((const char *)(s0 + i) + 8192, _MM_HINT_T1);
            _mm_prefetch((const char *)(s1 + i) + 8192, _MM_HINT_T1);
            _mm_prefetch((const char *)(s2 + i) + 8192, _MM_HINT_T1);
            _mm_prefetch((const char *)(s3 + i) + 8192, _MM_HINT_T1);
            b0 = _mm256_add_ps(b0, _mm256_add_ps(_mm256_loadu_ps(s0 + i), _mm256_loadu_ps(s0 + i + 8)));
            b1 = _mm256_add_ps(b1, _mm256_add_ps(_mm256_loadu_ps(s1 + i), _mm256_loadu_ps(s1 + i + 8)));
            b2 = _mm256_add_ps(b2, _mm256_add_ps(_mm256_loadu_ps(s2 + i), _mm256_loadu_ps(s2 + i + 8)));
            b3 = _mm256_add_ps(b3, _mm256_add_ps(_mm256_loadu_ps(s3 + i), _mm256_loadu_ps(s3 + i + 8)));
        }
        r = hsum8(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
#endif
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (; i < q; i += 16) {
#ifdef __AVX2__
            if ((i & 15) == 0) {
                _mm_prefetch((const char *)(s0 + i) + 8192, _MM_HINT_T1);
                _mm_prefetch((const char *)(s1 + i) + 8192, _MM_HINT_T1);
                _mm_prefetch((const char *)(s2 + i) + 8192, _MM_HINT_T1);
                _mm_prefetch((const char *)(s3 + i) + 8192, _MM_HINT_T1);
            }
#endif
            a0 += vload(s0 + i); a1 += vload(s1 + i); a2 += vload(s2 + i); a3 += vload(s3 + i);
        }
        r += hsum16(a0 + a1 + a2 + a3);
        for (int64_t i = lo + 4 * q; i < hi; i++) r += buf[i];
        total += r;
    }
    return total;
}

// The benchmarks' compute probe: independent FMA chains on registers (no memory), `iters` steps of 8 vectors per
// thread, on every OpenMP thread at once (the caller times it).  Comparing 1 thread with n: on VMs whose vCPUs share
// physical cores (SMT siblings on the host) n threads do not give n times the arithmetic, and a kernel bound by
// arithmetic on one thread stays so on all of them (the decode GEMVs on 2 such vCPUs).  Returns a sum of the
// chains (so the loop cannot be optimised away).
float vector_probe(int64_t iters) {
    float sink = 0.f;
    #pragma omp parallel reduction(+ : sink)
    {
        v16 a[8];
        for (int k = 0; k < 8; k++) a[k] = (v16){0} + 1.f + 1e-3f * (float)(k + omp_get_thread_num());
        const v16 m = (v16){0} + 0.999999f, c = (v16){0} + 1e-7f;
        for (int64_t i = 0; i < iters; i++)
            for (int k = 0; k < 8; k++) a[k] = a[k] * m + c;
        for (int k = 0; k < 8; k++) sink += hsum16(a[k]);
    }
    return sink;
}

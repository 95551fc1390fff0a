// The benchmarks' memory-bandwidth probe: a multi-threaded streaming read, each thread one contiguous range (as the
// GEMVs split their rows) read as four interleaved streams with wide loads and software prefetch 8 KB ahead into L2:
// the fastest read we know on these machines (1.1-1.2x the one stream per thread the r32 GEMV reads on the AMD EPYC
// kind, scripts/stream_probe.sh), so that no GEMV can honestly exceed it.  Returns a sum of what it read (the loads
// cannot be optimised away).
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

// The decode step's own bytes with nothing computed on them (`bench decode`'s read-only pass): n ranges in the order
// a token visits them (per layer in_proj's codes and scales, the conv and SSM states, out_proj's; then the head), in
// one parallel region per kernel call of the step (flags[i] & 2: range i starts a region), each range split over the
// threads as the GEMVs split their rows (one contiguous part per thread), each part read as the probe reads
// (stream_read: four streams, wide loads, L2 prefetch: the fastest read we know on these machines, 1.2x one stream
// on the AMD EPYC kind); a range with flags[i] & 1 is read as one stream and written back (x ^ zero, zero = 0 at run time: the same values, the
// traffic of the state update).  What a mode's arithmetic costs on top of its bytes is the gap between a token and
// this pass.  Returns a checksum (the loads cannot go away).
int64_t stream_ranges(uint8_t *const *ptrs, const int64_t *nbytes, const uint8_t *flags, int64_t n, int64_t zero) {
    typedef int64_t vi8 __attribute__((vector_size(64)));
    typedef int64_t vi8u __attribute__((vector_size(64), aligned(1)));
    int64_t sum = 0;
    for (int64_t r0 = 0, r1; r0 < n; r0 = r1) {
        for (r1 = r0 + 1; r1 < n && !(flags[r1] & 2); r1++) {}
        #pragma omp parallel reduction(^ : sum)
        {
            const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
            const vi8 z = (vi8){0} + zero;
            vi8 acc = {0};
            for (int64_t r = r0; r < r1; r++) {
                uint8_t *base = ptrs[r];
                const int64_t lines = nbytes[r] / 64, lo = lines * t / nt, hi = lines * (t + 1) / nt;
                const int write = flags[r] & 1;
                int64_t i = lo;
                if (!write) {           // as the probe reads: four streams (quarters of the part), 8 KB prefetch
                    const int64_t q = (hi - lo) / 4;
                    const uint8_t *s0 = base + 64 * lo, *s1 = s0 + 64 * q, *s2 = s1 + 64 * q, *s3 = s2 + 64 * q;
                    vi8 b1 = {0}, b2 = {0}, b3 = {0};
                    for (int64_t j = 0; j < 64 * q; j += 64) {
#ifdef __AVX2__
                        _mm_prefetch((const char *)s0 + j + 8192, _MM_HINT_T1);
                        _mm_prefetch((const char *)s1 + j + 8192, _MM_HINT_T1);
                        _mm_prefetch((const char *)s2 + j + 8192, _MM_HINT_T1);
                        _mm_prefetch((const char *)s3 + j + 8192, _MM_HINT_T1);
#endif
                        acc ^= *(const vi8u *)(const void *)(s0 + j);
                        b1 ^= *(const vi8u *)(const void *)(s1 + j);
                        b2 ^= *(const vi8u *)(const void *)(s2 + j);
                        b3 ^= *(const vi8u *)(const void *)(s3 + j);
                    }
                    acc ^= b1 ^ b2 ^ b3;
                    i = lo + 4 * q;
                }
                for (; i < hi; i++) {
                    vi8u *p = (vi8u *)(void *)(base + 64 * i);
#ifdef __AVX2__
                    _mm_prefetch((const char *)p + 16384, _MM_HINT_T1);
#endif
                    const vi8 v = *p;
                    acc ^= v;
                    if (write) *p = v ^ z;
                }
                if (t == nt - 1)
                    for (int64_t i = 64 * lines; i < nbytes[r]; i++) acc[0] ^= base[i];
            }
            for (int k = 0; k < 8; k++) sum ^= acc[k];
        }
    }
    return sum;
}

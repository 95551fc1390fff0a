// 16-float vector helpers shared by the C kernels (GCC vector types, so the same code becomes one zmm with
// AVX-512, two ymm with AVX2, or scalar code), small in-cache GEMMs, and the OpenMP fallback.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

// Builds without OpenMP run the parallel loops on one thread.
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline void omp_set_num_threads(int n) { (void)n; }
#endif

// 16 floats: one zmm, two ymm, or scalar code.  Values have the type's natural alignment; memory is accessed
// through the 4-byte-aligned twin.  (One under-aligned type for both made GCC move every AVX2 half-vector through
// general registers: the scan ran 14x slower on AVX2 builds than on AVX-512 ones.)
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

static inline v16 vload(const float *p) { return *(const v16u *)p; }
static inline void vstore(float *p, v16 v) { *(v16u *)p = v; }

// Triangular shapes of the products inside a chunk (gemm_tri's `tri`), so that known zeros are skipped:
enum { DENSE = 0, A_LOWER = 1,   // A[i, q] == 0 for q > i
       A_UPPER = 2,              // A[i, q] == 0 for q < i
       C_LOWER = 3 };            // only C[i, j] with j <= i is needed (columns past the diagonal block: garbage)

// C[i, 0:N] (+)= sum_q A[i*sar + q*sac] * B[q*ldb + 0:N]   for i < m.   N % 16 == 0.  acc = 0 overwrites C.
#define LOADC(p) (acc ? vload(p) : (v16){0})
// Without AVX-512, GCC keeps 64-byte vector variables in memory and moves them through general registers (the
// scan ran 14x slower on AVX2 builds): the hot loops below then work on two 32-byte halves instead.
#if !defined(__AVX512F__) && defined(__AVX2__)
#define V8_HALVES 1
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
static inline v8 v8load(const float *p) { return *(const v8u *)p; }
static inline void v8store(float *p, v8 v) { *(v8u *)p = v; }
#define LOADC8(p) (acc ? v8load(p) : (v8){0})
#else
#define V8_HALVES 0
#endif
static inline void gemm_tri(int tri, int acc, int64_t m, int64_t N, int64_t K, const float *A, int64_t sar, int64_t sac,
                            const float *B, int64_t ldb, float *C, int64_t ldc) {
    int64_t i0 = 0;
    for (; i0 + 4 <= m; i0 += 4) {
        const int64_t qlo = tri == A_UPPER ? i0 : 0, qhi = tri == A_LOWER && i0 + 4 < K ? i0 + 4 : K;
        const int64_t nhi = tri == C_LOWER && (i0 + 4 + 15) / 16 * 16 < N ? (i0 + 4 + 15) / 16 * 16 : N;
        int64_t j0 = 0;
        // (a 4 x 32 tile with eight 16-float accumulators measured slower than this 4 x 16 one on both kinds:
        // the 130m prefill scan took 5.8 ms per layer with it on AVX-512, 3.2 without)
        for (; j0 < nhi; j0 += 16) {
            const float *a0 = A + i0 * sar, *a1 = a0 + sar, *a2 = a1 + sar, *a3 = a2 + sar;
#if V8_HALVES
            v8 c0l = LOADC8(C + i0 * ldc + j0), c0h = LOADC8(C + i0 * ldc + j0 + 8);
            v8 c1l = LOADC8(C + (i0 + 1) * ldc + j0), c1h = LOADC8(C + (i0 + 1) * ldc + j0 + 8);
            v8 c2l = LOADC8(C + (i0 + 2) * ldc + j0), c2h = LOADC8(C + (i0 + 2) * ldc + j0 + 8);
            v8 c3l = LOADC8(C + (i0 + 3) * ldc + j0), c3h = LOADC8(C + (i0 + 3) * ldc + j0 + 8);
            for (int64_t q = qlo; q < qhi; q++) {
                const v8 bl = v8load(B + q * ldb + j0), bh = v8load(B + q * ldb + j0 + 8);
                const float x0 = a0[q * sac], x1 = a1[q * sac], x2 = a2[q * sac], x3 = a3[q * sac];
                c0l += x0 * bl; c0h += x0 * bh; c1l += x1 * bl; c1h += x1 * bh;
                c2l += x2 * bl; c2h += x2 * bh; c3l += x3 * bl; c3h += x3 * bh;
            }
            v8store(C + i0 * ldc + j0, c0l); v8store(C + i0 * ldc + j0 + 8, c0h);
            v8store(C + (i0 + 1) * ldc + j0, c1l); v8store(C + (i0 + 1) * ldc + j0 + 8, c1h);
            v8store(C + (i0 + 2) * ldc + j0, c2l); v8store(C + (i0 + 2) * ldc + j0 + 8, c2h);
            v8store(C + (i0 + 3) * ldc + j0, c3l); v8store(C + (i0 + 3) * ldc + j0 + 8, c3h);
#else
            v16 c0 = LOADC(C + i0 * ldc + j0), c1 = LOADC(C + (i0 + 1) * ldc + j0);
            v16 c2 = LOADC(C + (i0 + 2) * ldc + j0), c3 = LOADC(C + (i0 + 3) * ldc + j0);
            for (int64_t q = qlo; q < qhi; q++) {
                const v16 b0 = vload(B + q * ldb + j0);
                c0 += a0[q * sac] * b0; c1 += a1[q * sac] * b0; c2 += a2[q * sac] * b0; c3 += a3[q * sac] * b0;
            }
            vstore(C + i0 * ldc + j0, c0); vstore(C + (i0 + 1) * ldc + j0, c1);
            vstore(C + (i0 + 2) * ldc + j0, c2); vstore(C + (i0 + 3) * ldc + j0, c3);
#endif
        }
    }
    for (; i0 < m; i0++) {
        const int64_t qlo = tri == A_UPPER ? i0 : 0, qhi = tri == A_LOWER && i0 + 1 < K ? i0 + 1 : K;
        const int64_t nhi = tri == C_LOWER && (i0 + 1 + 15) / 16 * 16 < N ? (i0 + 1 + 15) / 16 * 16 : N;
        for (int64_t j0 = 0; j0 < nhi; j0 += 16) {
#if V8_HALVES
            v8 cl = LOADC8(C + i0 * ldc + j0), ch = LOADC8(C + i0 * ldc + j0 + 8);
            for (int64_t q = qlo; q < qhi; q++) {
                const float a = A[i0 * sar + q * sac];
                cl += a * v8load(B + q * ldb + j0);
                ch += a * v8load(B + q * ldb + j0 + 8);
            }
            v8store(C + i0 * ldc + j0, cl); v8store(C + i0 * ldc + j0 + 8, ch);
#else
            v16 c = LOADC(C + i0 * ldc + j0);
            for (int64_t q = qlo; q < qhi; q++) c += A[i0 * sar + q * sac] * vload(B + q * ldb + j0);
            vstore(C + i0 * ldc + j0, c);
#endif
        }
    }
}

static inline void gemm_acc(int64_t m, int64_t N, int64_t K, const float *A, int64_t sar, int64_t sac,
                            const float *B, int64_t ldb, float *C, int64_t ldc) {
    gemm_tri(DENSE, 1, m, N, K, A, sar, sac, B, ldb, C, ldc);
}
#undef LOADC
#undef LOADC8

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols.  8 x 8 tiles in registers with AVX (the state-sized
// transposes of the scan: a strided scalar copy of a 64 x 32 block costs several times more).
#ifdef __AVX__
#include <immintrin.h>
static inline void transpose8x8(const float *s, int64_t lds, float *d, int64_t ldd) {
    __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + lds), r2 = _mm256_loadu_ps(s + 2 * lds),
           r3 = _mm256_loadu_ps(s + 3 * lds), r4 = _mm256_loadu_ps(s + 4 * lds), r5 = _mm256_loadu_ps(s + 5 * lds),
           r6 = _mm256_loadu_ps(s + 6 * lds), r7 = _mm256_loadu_ps(s + 7 * lds);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
                 t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r0 = _mm256_permute2f128_ps(u0, u4, 0x20); r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
    r2 = _mm256_permute2f128_ps(u2, u6, 0x20); r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
    r4 = _mm256_permute2f128_ps(u0, u4, 0x31); r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
    r6 = _mm256_permute2f128_ps(u2, u6, 0x31); r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
    _mm256_storeu_ps(d, r0); _mm256_storeu_ps(d + ldd, r1); _mm256_storeu_ps(d + 2 * ldd, r2);
    _mm256_storeu_ps(d + 3 * ldd, r3); _mm256_storeu_ps(d + 4 * ldd, r4); _mm256_storeu_ps(d + 5 * ldd, r5);
    _mm256_storeu_ps(d + 6 * ldd, r6); _mm256_storeu_ps(d + 7 * ldd, r7);
}
#endif
static inline void transpose(const float *src, int64_t rows, int64_t cols, int64_t lds, float *dst, int64_t ldd) {
    int64_t r0 = 0;
#ifdef __AVX__
    for (; r0 + 8 <= rows; r0 += 8) {
        int64_t c0 = 0;
        for (; c0 + 8 <= cols; c0 += 8) transpose8x8(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
        for (; c0 < cols; c0++)
            for (int64_t r = r0; r < r0 + 8; r++) dst[c0 * ldd + r] = src[r * lds + c0];
    }
#endif
    for (; r0 < rows; r0++)
        for (int64_t c = 0; c < cols; c++) dst[c * ldd + r0] = src[r0 * lds + c];
}

typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));

// exp on 16 lanes (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp), inputs clamped.  The
// same body serves vexp8 (8 lanes, AVX2 builds: see V8_HALVES).
#define VEXP_BODY(VT, VIT)                                                                     \
    const VT hi = (VT){0} + 88.3762626647949f, lo = (VT){0} + -87.3365447505531f;              \
    VIT m = x > hi;                                                                            \
    x = (VT)(((VIT)x & ~m) | ((VIT)hi & m));                                                   \
    m = x < lo;                                                                                \
    x = (VT)(((VIT)x & ~m) | ((VIT)lo & m));                                                   \
    VT fx = x * 1.44269504088896341f + 0.5f;                                                   \
    VT t = __builtin_convertvector(__builtin_convertvector(fx, VIT), VT);   /* truncation */  \
    m = t > fx;                                                             /* -> floor */    \
    fx = t - (VT)(m & (VIT)((VT){0} + 1.f));                                                   \
    x = x - fx * 0.693359375f + fx * 2.12194440e-4f;                                           \
    const VT z = x * x;                                                                        \
    VT y = (VT){0} + 1.9875691500e-4f;                                                         \
    y = y * x + 1.3981999507e-3f;                                                              \
    y = y * x + 8.3334519073e-3f;                                                              \
    y = y * x + 4.1665795894e-2f;                                                              \
    y = y * x + 1.6666665459e-1f;                                                              \
    y = y * x + 5.0000001201e-1f;                                                              \
    y = y * z + x + 1.f;                                                                       \
    const VIT e = (__builtin_convertvector(fx, VIT) + 127) << 23;                              \
    return y * (VT)e;
static inline v16 vexp(v16 x) { VEXP_BODY(v16, vi16) }

// The widest vector the CPU keeps in registers, for loops that only need "some lanes": vw (VW floats), vwload,
// vwstore, vwexp, vwsum.  16 with AVX-512 (and in portable builds), 8 with AVX2 only.
#if V8_HALVES
typedef int32_t vi8 __attribute__((vector_size(32)));
static inline v8 vexp8(v8 x) { VEXP_BODY(v8, vi8) }
typedef v8 vw;
typedef vi8 viw;
#define VW 8
#define vwload v8load
#define vwstore v8store
#define vwexp vexp8
#else
typedef v16 vw;
typedef vi16 viw;
#define VW 16
#define vwload vload
#define vwstore vstore
#define vwexp vexp
#endif

// Sum of the 16 lanes (halving: 16 -> 8 -> 4 -> 1).
static inline float hsum16(v16 v) {
    typedef float v8 __attribute__((vector_size(32), aligned(4)));
    typedef float v4 __attribute__((vector_size(16), aligned(4)));
    v8 lo, hi;
    memcpy(&lo, &v, 32);
    memcpy(&hi, (const char *)&v + 32, 32);
    lo += hi;
    v4 a, b;
    memcpy(&a, &lo, 16);
    memcpy(&b, (const char *)&lo + 16, 16);
    a += b;
    return (a[0] + a[2]) + (a[1] + a[3]);
}

// Sum of a vw's lanes: hsum16 with AVX-512 (the same bits as before vw existed), halving pairs with AVX2.
static inline float vwsum(vw v) {
#if V8_HALVES
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
#else
    return hsum16(v);
#endif
}

static inline float dot(const float *a, const float *b, int64_t n) {
    vw acc = {0};
    int64_t i = 0;
    for (; i + VW <= n; i += VW) acc += vwload(a + i) * vwload(b + i);
    float s = vwsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

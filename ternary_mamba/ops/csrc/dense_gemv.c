// Dense products of the decode path: fp32, fp16 and int8 (per-row scale) weights times a few tokens.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#include "vec16.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

// y (nb, out) = x (nb, in) . w^T for a few tokens (decode, short prompts).  Rows go in blocks of four: four
// independent weight streams per thread keep more memory requests in flight than one row at a time (+5-15 % of
// bandwidth on this class of machine, measured in a C harness), blocks of 64 rows keep each thread's reads
// sequential, and the four rows (in L1 after the first token) are reused for every token, four tokens at a time,
// so the weights are read from memory once whatever nb is.
// Software prefetch of the four rows 8 KB ahead into L2 (T1): streaming 360 MB of 130m fp32 projections went
// from 25-28 GB/s (none) to ~30 (4 KB) and 35-39 (8 KB) in a C harness (2 threads, AVX-512 EPYC); in the engine the
// 130m fp32 decode went from 49-54 to 58-63 tok/s.  Past a row's end the prefetch continues in the same row of the
// next block (rows of 8 KB, as at 1.3B, would otherwise prefetch the neighbour row being read right now).
// Prefetching past the matrix end is harmless.
#ifdef __AVX2__
#define PREFETCH4_L2(i) { int64_t o_ = (i) * 4 + 8192; const int64_t s_ = in * 4; \
    if (o_ >= s_) o_ += 3 * s_;   /* past the row's end: the same row of the next block of four */ \
    const char *p_ = (const char *)r0 + o_; \
    _mm_prefetch(p_, _MM_HINT_T1); _mm_prefetch(p_ + s_, _MM_HINT_T1); \
    _mm_prefetch(p_ + 2 * s_, _MM_HINT_T1); _mm_prefetch(p_ + 3 * s_, _MM_HINT_T1); }
#else
#define PREFETCH4_L2(i) {}
#endif
static void f32_rows4(const float *w, const float *x, float *y, int64_t out, int64_t in, int64_t nb, int64_t o) {
    const float *r0 = w + o * in, *r1 = r0 + in, *r2 = r1 + in, *r3 = r2 + in;
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        const float *x0 = x + b * in, *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;
        // sixteen named accumulators (an array of vectors is kept on the stack by GCC)
        v16 a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
        v16 a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
        for (int64_t i = 0; i < in; i += 16) {
            if (b == 0) PREFETCH4_L2(i)
            const v16 w0 = vload(r0 + i), w1 = vload(r1 + i), w2 = vload(r2 + i), w3 = vload(r3 + i);
            v16 xv = vload(x0 + i);
            a00 += w0 * xv; a01 += w1 * xv; a02 += w2 * xv; a03 += w3 * xv;
            xv = vload(x1 + i);
            a10 += w0 * xv; a11 += w1 * xv; a12 += w2 * xv; a13 += w3 * xv;
            xv = vload(x2 + i);
            a20 += w0 * xv; a21 += w1 * xv; a22 += w2 * xv; a23 += w3 * xv;
            xv = vload(x3 + i);
            a30 += w0 * xv; a31 += w1 * xv; a32 += w2 * xv; a33 += w3 * xv;
        }
        float *y0 = y + b * out + o, *y1 = y0 + out, *y2 = y1 + out, *y3 = y2 + out;
        y0[0] = hsum16(a00); y0[1] = hsum16(a01); y0[2] = hsum16(a02); y0[3] = hsum16(a03);
        y1[0] = hsum16(a10); y1[1] = hsum16(a11); y1[2] = hsum16(a12); y1[3] = hsum16(a13);
        y2[0] = hsum16(a20); y2[1] = hsum16(a21); y2[2] = hsum16(a22); y2[3] = hsum16(a23);
        y3[0] = hsum16(a30); y3[1] = hsum16(a31); y3[2] = hsum16(a32); y3[3] = hsum16(a33);
    }
#if defined(__AVX2__) && !defined(__AVX512F__)
    // AVX2: explicit ymm accumulators (GCC keeps 64-byte generic vectors on the stack when the CPU has only
    // 32-byte registers: the generic loop below streamed at half the speed of this one)
    for (; b < nb; b++) {
        const float *xb = x + b * in;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        for (int64_t i = 0; i < in; i += 16) {
            if (b == 0) PREFETCH4_L2(i)
            const __m256 xl = _mm256_loadu_ps(xb + i), xh = _mm256_loadu_ps(xb + i + 8);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + i), xl, a0); c0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + i + 8), xh, c0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + i), xl, a1); c1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + i + 8), xh, c1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + i), xl, a2); c2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + i + 8), xh, c2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + i), xl, a3); c3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + i + 8), xh, c3);
        }
        float *yb = y + b * out + o;
        yb[0] = hsum8(_mm256_add_ps(a0, c0));
        yb[1] = hsum8(_mm256_add_ps(a1, c1));
        yb[2] = hsum8(_mm256_add_ps(a2, c2));
        yb[3] = hsum8(_mm256_add_ps(a3, c3));
    }
#endif
    for (; b < nb; b++) {
        const float *xb = x + b * in;
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t i = 0; i < in; i += 16) {
            if (b == 0) PREFETCH4_L2(i)
            const v16 xv = vload(xb + i);
            a0 += vload(r0 + i) * xv;
            a1 += vload(r1 + i) * xv;
            a2 += vload(r2 + i) * xv;
            a3 += vload(r3 + i) * xv;
        }
        float *yb = y + b * out + o;
        yb[0] = hsum16(a0);
        yb[1] = hsum16(a1);
        yb[2] = hsum16(a2);
        yb[3] = hsum16(a3);
    }
}

void f32_gemv(const float *w, const float *x, float *y, int64_t out, int64_t in, int64_t nb) {
    if (in % 16 == 0) {
        // each thread streams one contiguous range of rows (static split): the hardware prefetchers follow one
        // sequential stream per thread, and no scheduling traffic: +17 % on a 154 MB head and 1.7x on matrices
        // in L3 against dynamic blocks of 64 rows (C harness, 2 threads, AVX-512 EPYC)
        const int64_t nblk = (out + 3) / 4;
        #pragma omp parallel for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t o = blk * 4;
            if (o + 4 <= out) f32_rows4(w, x, y, out, in, nb, o);
            else
                for (int64_t r = o; r < out; r++)
                    for (int64_t b = 0; b < nb; b++) y[b * out + r] = dot(w + r * in, x + b * in, in);
        }
        return;
    }
    #pragma omp parallel for schedule(guided)
    for (int64_t o = 0; o < out; o++) {
        const float *row = w + o * in;
        for (int64_t b = 0; b < nb; b++) y[b * out + o] = dot(row, x + b * in, in);
    }
}

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, mant = h & 1023;
    uint32_t bits;
    if (e == 0) {                                       // zero / subnormal: mant * 2^-24
        float f = (float)mant * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((e + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// y (nb, out) = x (nb, in) . w^T with w stored as fp16 (converted exactly to fp32 on the fly; F16C when present).
// One fp16 row . x (the arithmetic of every f16_gemv product, also used to rescore single rows exactly).
// Prefetch: 8 KB ahead into L2 (T1); the former T0 prefetch four rows ahead read the 154 MB 130m head at 26-28 GB/s,
// 4 KB ahead at 30-37 (C harness, 2 threads, AVX-512 EPYC).
float f16_dot(const uint16_t *row, const float *xx, int64_t in) {
    float acc = 0.f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    for (; i + 32 <= in; i += 32) {
        _mm_prefetch((const char *)(row + i) + 8192, _MM_HINT_T1);
        b0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + i))), _mm512_loadu_ps(xx + i), b0);
        b1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + i + 16))),
                             _mm512_loadu_ps(xx + i + 16), b1);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
#elif defined(__AVX2__) && defined(__F16C__)
#define F16W(off) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i + (off))))
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= in; i += 32) {
        _mm_prefetch((const char *)(row + i) + 8192, _MM_HINT_T1);
        a0 = _mm256_fmadd_ps(F16W(0), _mm256_loadu_ps(xx + i), a0);
        a1 = _mm256_fmadd_ps(F16W(8), _mm256_loadu_ps(xx + i + 8), a1);
        a2 = _mm256_fmadd_ps(F16W(16), _mm256_loadu_ps(xx + i + 16), a2);
        a3 = _mm256_fmadd_ps(F16W(24), _mm256_loadu_ps(xx + i + 24), a3);
    }
#undef F16W
    const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    acc = hsum8(a);
#endif
    for (; i < in; i++) acc += half_to_float(row[i]) * xx[i];
    return acc;
}

void f16_gemv(const uint16_t *w, const float *x, float *y, int64_t out, int64_t in, int64_t nb) {
    #pragma omp parallel for schedule(guided)
    for (int64_t o = 0; o < out; o++)
        for (int64_t b = 0; b < nb; b++) y[b * out + o] = f16_dot(w + o * in, x + b * in, in);
}

// y (nb, out) = x (nb, in) . (w int8 (out, in) * scale[out])^T : the 8-bit embedding/head at inference.
void i8_gemv(const int8_t *w, const float *scale, const float *x, float *y, int64_t out, int64_t in, int64_t nb) {
    #pragma omp parallel for schedule(guided)
    for (int64_t o = 0; o < out; o++) {
        const int8_t *row = w + o * in;
        for (int64_t b = 0; b < nb; b++) {
            const float *xx = x + b * in;
            float acc = 0.f;
#ifdef __AVX2__
#define I8W(off) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + i + (off)))))
            __m256 a = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 32 <= in; i += 32) {
                if ((i & 63) == 0) _mm_prefetch((const char *)(row + i) + 4096, _MM_HINT_T1);
                a = _mm256_fmadd_ps(I8W(0), _mm256_loadu_ps(xx + i), a);
                a1 = _mm256_fmadd_ps(I8W(8), _mm256_loadu_ps(xx + i + 8), a1);
                a2 = _mm256_fmadd_ps(I8W(16), _mm256_loadu_ps(xx + i + 16), a2);
                a3 = _mm256_fmadd_ps(I8W(24), _mm256_loadu_ps(xx + i + 24), a3);
            }
            for (; i + 8 <= in; i += 8) a = _mm256_fmadd_ps(I8W(0), _mm256_loadu_ps(xx + i), a);
#undef I8W
            a = _mm256_add_ps(_mm256_add_ps(a, a1), _mm256_add_ps(a2, a3));
            acc = hsum8(a);
            for (; i < in; i++) acc += row[i] * xx[i];
#else
            for (int64_t i = 0; i < in; i++) acc += row[i] * xx[i];
#endif
            y[b * out + o] = acc * scale[o];
        }
    }
}

// The decode engine's int8-activation ternary GEMV in a row-interleaved layout ("r32"), built for fewer
// instructions per weight than tq2_gemv_a8z (decode_a8.c, which stays the reference kernel and the fallback).
// Reference: ops/ternary_linear.py ternary_linear_a8_ref; tests/test_decode_layouts.py.
//
// Layout (tq2r32_pack, once when the engine is built): rows in blocks of 32 (the last block padded with zero
// weights); per block and per 16 inputs k (each row's code bytes 4k..4k+3), 128 bytes: dword lane r of the first 64
// holds row r's 4 code bytes, of the second 64 row 16 + r's.  So one vpdpbusd lane is one row and the same
// activation dword serves all 32 rows: plane p (weights 16k + 4b + p of the 4 bytes b) is `byte & (3 << 2p)`, one
// AND, multiplied by the activations of plane p broadcast from one dword, into an accumulator of its own; the four
// are combined once per group by exact shifts (plane p's sum is a multiple of 4^p).  Per 16 inputs and 32 rows:
// 2 code loads, 4 broadcasts, 8 ANDs, 8 vpdpbusd — about 1.4-1.5x the rate of the 4-row layout it replaced
// (vpermb per plane, 64-byte activation loads) in cache on the AMD EPYC kind, which made the decode GEMVs
// bound by memory instead of arithmetic at 2 threads (docs/SPEED.md).  Without VNNI, AVX2 + FMA + F16C
// builds run the same layout through vpmaddubsw (below, R32_AVX2).  Scales: fp16 (the packed file's own
// precision; the conversion is exact), per block and group the 32 rows' scales in lane order.
//
// Activations (r32_quantize_x): x quantized per row to int8 (absmax / 127, round to nearest even, exactly as
// tq2_quantize_xz); per 16 inputs, 4 dwords, dword p = the values of inputs 16k + p, +4, +8, +12; per group the sum
// of the values (codes are t + 1: sum (t + 1) q - sum q = sum t q).
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__F16C__)
#define DECODE_R32 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DECODE_R32 1
#define R32_AVX2 1                             // the same layout through vpmaddubsw (AVX2, no VNNI): see r32_gemv
#endif
#define R32_PREFETCH 16384
#define R32_MAX_G 65536                        // int32 plane sums stay below 2^31 (4 G/4 * 128 * 127)

int tq2r32_available(void) {
#ifdef DECODE_R32
    return 1;
#else
    return 0;
#endif
}

static int r32_shape_ok(int64_t in, int64_t G) {
    return tq2r32_available() && G > 0 && G % 16 == 0 && G <= R32_MAX_G && in % G == 0;
}

static uint16_t f2h_exact(float v, int *ok) {           // fp32 -> fp16 bits; *ok = 0 unless the value round-trips
    uint16_t h = 0;
#ifdef DECODE_R32
    h = (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    if (_cvtsh_ss(h) != v) *ok = 0;
#else
    (void)v;
    *ok = 0;
#endif
    return h;
}

// codes (out, in/4) tq2, scales (out, in/G) fp32 -> dst (ceil(out/32) blocks of 32 rows x in/4 bytes, the layout
// above), dst_scales (blocks, in/G, 32) fp16.  0, or -1 when the layout does not apply (G not a multiple of 16, in %
// G, no kernel in this build), -2 when a scale is not exactly an fp16 value (nothing usable written).
int tq2r32_pack(const uint8_t *codes, const float *scales, uint8_t *dst, uint16_t *dst_scales, int64_t out,
                int64_t in, int64_t G) {
    if (!r32_shape_ok(in, G)) return -1;
    const int64_t rb = in / 4, ns = in / 16, ng = in / G, nblk = (out + 31) / 32;
    int ok = 1;
    #pragma omp parallel for schedule(static) reduction(& : ok)     // once per engine
    for (int64_t blk = 0; blk < nblk; blk++)
        for (int r = 0; r < 32; r++) {
            const int64_t o = 32 * blk + r;
            for (int64_t k = 0; k < ns; k++) {
                uint8_t *d = dst + (blk * ns + k) * 128 + 64 * (r / 16) + 4 * (r % 16);
                if (o < out) memcpy(d, codes + o * rb + 4 * k, 4);
                else memset(d, 0x55, 4);                    // code 1 in every field: weight 0
            }
            for (int64_t g = 0; g < ng; g++)
                dst_scales[(blk * ng + g) * 32 + r] = o < out ? f2h_exact(scales[o * ng + g], &ok) : 0;
        }
    return ok ? 0 : -2;
}

#ifdef DECODE_R32
// The activations' quantizer, shared by both builds: per 16 inputs, 16 floats x inv -> int8 (round to nearest even,
// as tq2_quantize_xz), 4x4-transposed into the layout above, their int32 values added into the group's sum.
#ifndef R32_AVX2
typedef __m512i r32_sum;
static inline r32_sum r32_sum_zero(void) { return _mm512_setzero_si512(); }
static inline int32_t r32_sum_total(r32_sum s) { return _mm512_reduce_add_epi32(s); }
static inline __m128i r32_q16(const float *x, float inv, r32_sum *sum) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(inv)));
    *sum = _mm512_add_epi32(*sum, v);
    return _mm512_cvtsepi32_epi8(v);
}
#else
typedef __m256i r32_sum;
static inline r32_sum r32_sum_zero(void) { return _mm256_setzero_si256(); }
static inline int32_t r32_sum_total(r32_sum v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}
static inline __m128i r32_q16(const float *x, float inv, r32_sum *sum) {
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i v0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), vinv));
    const __m256i v1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), vinv));
    *sum = _mm256_add_epi32(*sum, _mm256_add_epi32(v0, v1));
    const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(v0, v1), _mm256_setzero_si256());
    // 128-bit lane 0 bytes 0-7: x0-3, x8-11; lane 1: x4-7, x12-15 -> in order
    return _mm_unpacklo_epi32(_mm256_castsi256_si128(p8), _mm256_extracti128_si256(p8, 1));
}
#endif

// x (nb, in) -> xa (nb, in) int8 in the layout above, S (nb, in/G) int32 group sums, xs (nb) row scales.
static void r32_quantize_x(const float *x, int8_t *xa, int32_t *S, float *xs, int64_t in, int64_t G, int64_t nb) {
    const __m128i tr = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);   // 4x4 byte transpose
    for (int64_t b = 0; b < nb; b++) {
        const float *xr = x + b * in;
        float inv;
        xs[b] = i8_row_scale(xr, in, &inv);
        for (int64_t g = 0; g < in / G; g++) {
            r32_sum sum = r32_sum_zero();
            for (int64_t i = g * G; i < (g + 1) * G; i += 16)
                _mm_storeu_si128((__m128i *)(void *)(xa + b * in + i),
                                 _mm_shuffle_epi8(r32_q16(xr + i, inv, &sum), tr));
            S[b * (in / G) + g] = r32_sum_total(sum);
        }
    }
}
#endif

#if defined(DECODE_R32) && !defined(R32_AVX2)
static void r32_gemv(const uint8_t *codes, const uint16_t *scales, const int8_t *xa, const int32_t *S,
                     const float *xs, float *y, int64_t out, int64_t in, int64_t G, int64_t nb) {
    const int64_t ns = in / 16, ng = in / G, spg = G / 16, nblk = (out + 31) / 32;
    #pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const __m512i m0 = _mm512_set1_epi8(3), m1 = _mm512_set1_epi8(12), m2 = _mm512_set1_epi8(48);
        const __m512i m3 = _mm512_set1_epi8((char)192);
        const uint8_t *w0 = codes + blk * ns * 128;
        for (int64_t b = 0; b < nb; b++) {
            const int32_t *xd = (const int32_t *)(const void *)(xa + b * in);
            const int32_t *Sb = S + b * ng;
            __m512 f0 = _mm512_setzero_ps(), f1 = f0;
            for (int64_t g = 0; g < ng; g++) {
                __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
                for (int64_t k = g * spg; k < (g + 1) * spg; k++) {
                    const uint8_t *wp = w0 + k * 128;
                    if (b == 0) {
                        _mm_prefetch((const char *)wp + R32_PREFETCH, _MM_HINT_T1);
                        _mm_prefetch((const char *)wp + R32_PREFETCH + 64, _MM_HINT_T1);
                    }
                    __m512i w = _mm512_loadu_si512((const void *)wp), v = _mm512_loadu_si512((const void *)(wp + 64));
                    __asm__("" : "+v"(w), "+v"(v));        // one load each: GCC would fold a load into every AND
                    const int32_t *xk = xd + 4 * k;
                    const __m512i x0 = _mm512_set1_epi32(xk[0]), x1 = _mm512_set1_epi32(xk[1]);
                    const __m512i x2 = _mm512_set1_epi32(xk[2]), x3 = _mm512_set1_epi32(xk[3]);
                    a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(w, m0), x0);
                    c0 = _mm512_dpbusd_epi32(c0, _mm512_and_si512(v, m0), x0);
                    a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(w, m1), x1);
                    c1 = _mm512_dpbusd_epi32(c1, _mm512_and_si512(v, m1), x1);
                    a2 = _mm512_dpbusd_epi32(a2, _mm512_and_si512(w, m2), x2);
                    c2 = _mm512_dpbusd_epi32(c2, _mm512_and_si512(v, m2), x2);
                    a3 = _mm512_dpbusd_epi32(a3, _mm512_and_si512(w, m3), x3);
                    c3 = _mm512_dpbusd_epi32(c3, _mm512_and_si512(v, m3), x3);
                }
                const __m512i sg = _mm512_set1_epi32(Sb[g]);
                const __m512i A = _mm512_add_epi32(_mm512_add_epi32(a0, _mm512_srai_epi32(a1, 2)),
                                                   _mm512_add_epi32(_mm512_srai_epi32(a2, 4),
                                                                    _mm512_srai_epi32(a3, 6)));
                const __m512i C = _mm512_add_epi32(_mm512_add_epi32(c0, _mm512_srai_epi32(c1, 2)),
                                                   _mm512_add_epi32(_mm512_srai_epi32(c2, 4),
                                                                    _mm512_srai_epi32(c3, 6)));
                const uint16_t *sp = scales + (blk * ng + g) * 32;
                f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(A, sg)),
                                     _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)sp)), f0);
                f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(C, sg)),
                                     _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(sp + 16))), f1);
            }
            float r[32];
            _mm512_storeu_ps(r, _mm512_mul_ps(f0, _mm512_set1_ps(xs[b])));
            _mm512_storeu_ps(r + 16, _mm512_mul_ps(f1, _mm512_set1_ps(xs[b])));
            const int64_t R = out - 32 * blk < 32 ? out - 32 * blk : 32;
            memcpy(y + b * out + 32 * blk, r, (size_t)R * 4);
        }
    }
}
#endif

#if defined(R32_AVX2)
// AVX2 without VNNI: the same layout and integer sums.  Per 16 inputs each quarter of a block's 128 bytes (8 rows, a
// ymm) gives its planes as (byte >> 2p) & 3, multiplied by the broadcast activation dword of plane p with vpmaddubsw
// (u8 x s8 pairs -> int16: at most 2 x 2 x 127 per plane, 2032 for the four), summed in int16 for up to 16 steps
// (32512 at most) and widened to int32 by one vpmaddwd against ones.
static void r32_gemv(const uint8_t *codes, const uint16_t *scales, const int8_t *xa, const int32_t *S,
                     const float *xs, float *y, int64_t out, int64_t in, int64_t G, int64_t nb) {
    const int64_t ns = in / 16, ng = in / G, spg = G / 16, nblk = (out + 31) / 32;
    #pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
        const uint8_t *w0 = codes + blk * ns * 128;
        for (int64_t b = 0; b < nb; b++) {
            const int32_t *xd = (const int32_t *)(const void *)(xa + b * in);
            __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t g = 0; g < ng; g++) {
                __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                  _mm256_setzero_si256()};
                for (int64_t k0 = g * spg; k0 < (g + 1) * spg; k0 += 16) {
                    const int64_t k1 = k0 + 16 < (g + 1) * spg ? k0 + 16 : (g + 1) * spg;
                    __m256i a16[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                      _mm256_setzero_si256()};
                    for (int64_t k = k0; k < k1; k++) {
                        const uint8_t *wp = w0 + k * 128;
                        if (b == 0) {
                            _mm_prefetch((const char *)wp + R32_PREFETCH, _MM_HINT_T1);
                            _mm_prefetch((const char *)wp + R32_PREFETCH + 64, _MM_HINT_T1);
                        }
                        const int32_t *xk = xd + 4 * k;
                        const __m256i x0 = _mm256_set1_epi32(xk[0]), x1 = _mm256_set1_epi32(xk[1]);
                        const __m256i x2 = _mm256_set1_epi32(xk[2]), x3 = _mm256_set1_epi32(xk[3]);
                        for (int q = 0; q < 4; q++) {
                            const __m256i w = _mm256_loadu_si256((const __m256i *)(const void *)(wp + 32 * q));
                            const __m256i p0 = _mm256_and_si256(w, m3);
                            const __m256i p1 = _mm256_and_si256(_mm256_srli_epi16(w, 2), m3);
                            const __m256i p2 = _mm256_and_si256(_mm256_srli_epi16(w, 4), m3);
                            const __m256i p3 = _mm256_and_si256(_mm256_srli_epi16(w, 6), m3);
                            const __m256i t = _mm256_add_epi16(
                                _mm256_add_epi16(_mm256_maddubs_epi16(p0, x0), _mm256_maddubs_epi16(p1, x1)),
                                _mm256_add_epi16(_mm256_maddubs_epi16(p2, x2), _mm256_maddubs_epi16(p3, x3)));
                            a16[q] = _mm256_add_epi16(a16[q], t);
                        }
                    }
                    for (int q = 0; q < 4; q++) acc[q] = _mm256_add_epi32(acc[q], _mm256_madd_epi16(a16[q], ones));
                }
                const __m256i sg = _mm256_set1_epi32(S[b * ng + g]);
                const uint16_t *sp = scales + (blk * ng + g) * 32;
                for (int q = 0; q < 4; q++) {
                    const __m256 sq = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sp + 8 * q)));
                    f[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[q], sg)), sq, f[q]);
                }
            }
            float r[32];
            for (int q = 0; q < 4; q++) _mm256_storeu_ps(r + 8 * q, _mm256_mul_ps(f[q], _mm256_set1_ps(xs[b])));
            const int64_t R = out - 32 * blk < 32 ? out - 32 * blk : 32;
            memcpy(y + b * out + 32 * blk, r, (size_t)R * 4);
        }
    }
}
#endif

int64_t tq2r32_work_bytes(int64_t in, int64_t nb) { return nb * in + 4 * nb * (in / 16) + 4 * nb + 192; }

// Quantize x and run the kernel, in `work` (tq2r32_work_bytes): 0, or -1 when it does not apply (nothing written).
int tq2r32_gemv_auto(const uint8_t *codes, const uint16_t *scales, const float *x, float *y, int8_t *work,
                     int64_t out, int64_t in, int64_t G, int64_t nb) {
#ifndef DECODE_R32
    (void)codes; (void)scales; (void)x; (void)y; (void)work; (void)out; (void)in; (void)G; (void)nb;
    return -1;
#else
    if (!r32_shape_ok(in, G)) return -1;
    int8_t *xa = (int8_t *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    int32_t *S = (int32_t *)(void *)(xa + ((nb * in + 63) & ~(int64_t)63));
    float *xs = (float *)(void *)(S + nb * (in / G));
    r32_quantize_x(x, xa, S, xs, in, G, nb);
    r32_gemv(codes, scales, xa, S, xs, y, out, in, G, nb);
    return 0;
#endif
}

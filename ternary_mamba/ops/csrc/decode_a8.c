// Decode GEMVs with int8 activations on AVX512-VNNI, laid out so that every 64-byte load of weights is one
// vpdpbusd operand (the memory-roofline decode modes; reference: ops/ternary_linear.py ternary_linear_a8_ref and
// runtime/heads.py q4_head_a8_ref, tests/test_decode_fast.py).  Both return -1 where they do not apply (no
// AVX512-VNNI in this build, or a shape they were not written for): the caller then runs its other kernel.
//
// tq2_gemv_a8z: ternary codes (tq2: 4 per byte, byte i of a 128-value chunk holds values 4i..4i+3) times x
// quantized per row to int8 (absmax / 127, round to nearest even: tq2_quantize_x's rounding).  Two chunks (256
// values, 64 bytes of codes) per zmm: code plane j (bits 2j) of both chunks against the activations stored plane
// by plane (tq2_quantize_xz), so each plane is one and/shift and one vpdpbusd; int32 lanes 0-7 hold chunk c, 8-15
// chunk c + 1, started at minus the chunk's activation sum (sum (t + 1) q - sum q = sum t q), then scaled by the
// chunk's group scale in fp32.  Four rows at a time share every activation load.  Requires in % 256 == 0 and
// G % 128 == 0.
//
// q4_gemv_a8 (AVX512-VNNI, and an AVX2 variant below): the 4-bit head (quant/tables.py q4: 32 values per 16 bytes, byte j = value j | value j + 16 << 4,
// w = (n - 8) s) times x quantized per 128 values to int8 (absmax / 127 per chunk).  One zmm = 4 blocks: low
// nibbles against the chunk's values j, high nibbles against values j + 16 (q4_quantize_x stores them so), lanes
// 4k..4k+3 = block k, started at -8 sum q of the block; scaled by s_block * s_chunk.  Requires in % 128 == 0.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#include "vec16.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define DECODE_A8Z 1
#endif
#define A8Z_PREFETCH 8192

static inline int8_t q8(float v) { return (int8_t)lrintf(v); }

// x (nb, in) -> xq (nb, in) int8 in the plane layout: per 256 values (chunks c, c + 1), plane j = [x[c*128 + 4i + j]
// for i < 32] then [x[(c+1)*128 + 4i + j] for i < 32]; init (nb, in/256, 16) int32: lane 0 = -sum q of chunk c,
// lane 8 = -sum q of chunk c + 1, other lanes 0; xs (nb) = absmax / 127.
void tq2_quantize_xz(const float *x, int8_t *xq, int32_t *init, float *xs, int64_t in, int64_t nb) {
    for (int64_t b = 0; b < nb; b++) {
        const float *xr = x + b * in;
        float inv;
        xs[b] = i8_row_scale(xr, in, &inv);
        int8_t *q = xq + b * in;
        int32_t *ini = init + b * (in / 256) * 16;
        int64_t p = 0;
#if defined(DECODE_A8Z) && defined(__AVX512VBMI__)
        // per chunk: 128 values -> int8 in natural order (cvtps_epi32 rounds to nearest even, as lrintf), then
        // one vpermt2b per two planes (plane j, index i <- value 4i + j); the pair's planes side by side
        __m512i perm01, perm23;
        {
            int8_t idx[128];
            for (int o = 0; o < 64; o++) idx[o] = (int8_t)(4 * (o % 32) + o / 32);
            for (int o = 0; o < 64; o++) idx[64 + o] = (int8_t)(4 * (o % 32) + 2 + o / 32);
            perm01 = _mm512_loadu_si512((const void *)idx);
            perm23 = _mm512_loadu_si512((const void *)(idx + 64));
        }
        const __m512 vinv = _mm512_set1_ps(inv);
        for (; p < in / 256; p++) {
            __m512i pl[2][2];                    // [chunk][planes 0-1 | planes 2-3]
            int32_t sums[2];
            for (int h = 0; h < 2; h++) {
                const float *xc = xr + p * 256 + h * 128;
                __m512i bytes[2], vs = _mm512_setzero_si512();
                for (int half = 0; half < 2; half++) bytes[half] = q8_64(xc + 64 * half, vinv, &vs);
                sums[h] = _mm512_reduce_add_epi32(vs);
                pl[h][0] = _mm512_permutex2var_epi8(bytes[0], perm01, bytes[1]);
                pl[h][1] = _mm512_permutex2var_epi8(bytes[0], perm23, bytes[1]);
            }
            for (int j = 0; j < 4; j++) {        // plane j: [chunk c plane j | chunk c + 1 plane j]
                const __m512i a = pl[0][j / 2], c = pl[1][j / 2];
                const __m256i lo = (j % 2) ? _mm512_extracti64x4_epi64(a, 1) : _mm512_castsi512_si256(a);
                const __m256i hi = (j % 2) ? _mm512_extracti64x4_epi64(c, 1) : _mm512_castsi512_si256(c);
                _mm512_storeu_si512((void *)(q + p * 256 + 64 * j), _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
            }
            for (int l = 0; l < 16; l++) ini[p * 16 + l] = 0;
            ini[p * 16] = -sums[0];
            ini[p * 16 + 8] = -sums[1];
        }
#endif
        for (; p < in / 256; p++) {
            int32_t sums[2] = {0, 0};
            for (int h = 0; h < 2; h++)
                for (int j = 0; j < 4; j++)
                    for (int i = 0; i < 32; i++) {
                        const int8_t v = q8(xr[p * 256 + h * 128 + 4 * i + j] * inv);
                        q[p * 256 + 64 * j + 32 * h + i] = v;
                        sums[h] += v;
                    }
            for (int l = 0; l < 16; l++) ini[p * 16 + l] = 0;
            ini[p * 16] = -sums[0];
            ini[p * 16 + 8] = -sums[1];
        }
    }
}

int tq2_gemv_a8z(const uint8_t *codes, const float *scales, const int8_t *xq, const int32_t *init, const float *xs,
                 float *y, int64_t out, int64_t in, int64_t G, int64_t nb) {
#ifndef DECODE_A8Z
    (void)codes; (void)scales; (void)xq; (void)init; (void)xs; (void)y; (void)out; (void)in; (void)G; (void)nb;
    return -1;
#else
    if (in % 256 || G % 128 || in % G) return -1;
    const int64_t row_bytes = in / 4, ng = in / G, npair = in / 256, nblk = (out + 3) / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const int64_t o0 = 4 * blk, R = out - o0 < 4 ? out - o0 : 4;
        const uint8_t *rows[4];
        const float *srow[4];
        for (int k = 0; k < 4; k++) {          // rows past `out` repeat the last one (their results are dropped)
            const int64_t o = o0 + (k < R ? k : R - 1);
            rows[k] = codes + o * row_bytes;
            srow[k] = scales + o * ng;
        }
        const __m512i m3 = _mm512_set1_epi8(3);
#ifdef __AVX512VBMI__
        // planes 0-2 by vpermb (the low 6 bits of a code byte -> its 2-bit field j; port 5) instead of a shift and
        // a mask each (port 0, which the vpdpbusd already fill); plane 3 = (byte >> 2) through the plane-2 table
        __m512i tp[3];
        {
            uint8_t t[3][64];
            for (int i = 0; i < 64; i++)
                for (int j = 0; j < 3; j++) t[j][i] = (uint8_t)((i >> (2 * j)) & 3);
            for (int j = 0; j < 3; j++) tp[j] = _mm512_loadu_si512((const void *)t[j]);
        }
#endif
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *q = xq + b * in;
            const int32_t *ini = init + b * npair * 16;
            __m512 accf[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t p = 0; p < npair; p++) {
                const __m512i x0 = _mm512_loadu_si512((const void *)(q + 256 * p));
                const __m512i x1 = _mm512_loadu_si512((const void *)(q + 256 * p + 64));
                const __m512i x2 = _mm512_loadu_si512((const void *)(q + 256 * p + 128));
                const __m512i x3 = _mm512_loadu_si512((const void *)(q + 256 * p + 192));
                const __m512i a0 = _mm512_loadu_si512((const void *)(ini + 16 * p));
                const int64_t g0 = (256 * p) / G, g1 = (256 * p + 128) / G;
                for (int k = 0; k < 4; k++) {
                    const uint8_t *c = rows[k] + 64 * p;
                    if (b == 0) _mm_prefetch((const char *)c + A8Z_PREFETCH, _MM_HINT_T1);
                    const __m512i w = _mm512_loadu_si512((const void *)c);
#ifdef __AVX512VBMI__
                    __m512i acc = _mm512_dpbusd_epi32(a0, _mm512_permutexvar_epi8(w, tp[0]), x0);
                    acc = _mm512_dpbusd_epi32(acc, _mm512_permutexvar_epi8(w, tp[1]), x1);
                    acc = _mm512_dpbusd_epi32(acc, _mm512_permutexvar_epi8(w, tp[2]), x2);
                    acc = _mm512_dpbusd_epi32(acc, _mm512_permutexvar_epi8(_mm512_srli_epi16(w, 2), tp[2]), x3);
                    (void)m3;
#else
                    __m512i acc = _mm512_dpbusd_epi32(a0, _mm512_and_si512(w, m3), x0);
                    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(w, 2), m3), x1);
                    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(w, 4), m3), x2);
                    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(w, 6), m3), x3);
#endif
                    const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(srow[k][g0]), _mm256_set1_ps(srow[k][g1]), 1);
                    accf[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sv, accf[k]);
                }
            }
            for (int k = 0; k < R; k++) y[b * out + o0 + k] = _mm512_reduce_add_ps(accf[k]) * xs[b];
        }
    }
    return 0;
#endif
}

// x (nb, in) -> xq (nb, in) int8 per 128-value chunk: the chunk's 4 blocks' values j < 16 first ([x[32k + j]]
// for k < 4, j < 16), then their values j + 16; init (nb, in/128, 16) int32: lane 4k = -8 sum q of block k;
// xs (nb, in/128) = the chunk's absmax / 127.
void q4_quantize_x(const float *x, int8_t *xq, int32_t *init, float *xs, int64_t in, int64_t nb) {
    const int64_t nc = in / 128;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t c = 0; c < nc; c++) {
            const float *xr = x + b * in + 128 * c;
            const float m = absmax_f32(xr, 128);
            const float inv = m > 0.f ? 127.f / m : 0.f;
            xs[b * nc + c] = m / 127.f;
            int8_t *q = xq + b * in + 128 * c;
            int32_t *ini = init + (b * nc + c) * 16;
            for (int k = 0; k < 4; k++) {
                int32_t s = 0;
                for (int j = 0; j < 16; j++) {
                    const int8_t lo = q8(xr[32 * k + j] * inv), hi = q8(xr[32 * k + 16 + j] * inv);
                    q[16 * k + j] = lo;
                    q[64 + 16 * k + j] = hi;
                    s += lo + hi;
                }
                for (int l = 0; l < 4; l++) ini[4 * k + l] = 0;
                ini[4 * k] = -8 * s;
            }
        }
}

int q4_gemv_a8(const uint8_t *w, const float *scale, const int8_t *xq, const int32_t *init, const float *xs,
               float *y, int64_t out, int64_t in, int64_t nb) {
#if defined(DECODE_A8Z)
    if (in % 128) return -1;
    const int64_t nc = in / 128, rb = in / 2, ng = in / 32;
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = w + o * rb;
        const float *srow = scale + o * ng;
        const __m512i m4 = _mm512_set1_epi8(15);
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *q = xq + b * in;
            const int32_t *ini = init + b * nc * 16;
            const float *sx = xs + b * nc;
            __m512 accf = _mm512_setzero_ps();
            for (int64_t c = 0; c < nc; c++) {
                if (b == 0) _mm_prefetch((const char *)row + 64 * c + A8Z_PREFETCH, _MM_HINT_T1);
                const __m512i v = _mm512_loadu_si512((const void *)(row + 64 * c));
                __m512i acc = _mm512_loadu_si512((const void *)(ini + 16 * c));
                acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(v, m4), _mm512_loadu_si512((const void *)(q + 128 * c)));
                acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4),
                                          _mm512_loadu_si512((const void *)(q + 128 * c + 64)));
                const __m512 s4 = _mm512_castps128_ps512(_mm_mul_ps(_mm_loadu_ps(srow + 4 * c), _mm_set1_ps(sx[c])));
                accf = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_permutexvar_ps(spread, s4), accf);
            }
            y[b * out + o] = _mm512_reduce_add_ps(accf);
        }
    }
    return 0;
#elif defined(__AVX2__)
    // AVX2 (no VNNI): half a chunk (2 blocks, 32 bytes) per ymm; vpmaddubsw of the low nibbles against values j and
    // of the high nibbles against values j + 16, summed in int16 (|.| <= 2 * 2 * 15 * 127), widened by vpmaddwd:
    // lanes 0-3 = block 2h, 4-7 = block 2h + 1, started at the init's lanes 8h..8h+7.  Two rows share every
    // activation load.
    if (in % 128) return -1;
    const int64_t nc = in / 128, rb = in / 2, ng = in / 32, npair = (out + 1) / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t pr = 0; pr < npair; pr++) {
        const int64_t o0 = 2 * pr, R = out - o0 < 2 ? 1 : 2;
        const uint8_t *rows[2] = {w + o0 * rb, w + (o0 + R - 1) * rb};
        const float *srow[2] = {scale + o0 * ng, scale + (o0 + R - 1) * ng};
        const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *q = xq + b * in;
            const int32_t *ini = init + b * nc * 16;
            const float *sx = xs + b * nc;
            __m256 accf[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t c = 0; c < nc; c++) {
                __m256 s4[2];                    // the chunk's 4 block scales x its activation scale, per row
                for (int k = 0; k < 2; k++)
                    s4[k] = _mm256_castps128_ps256(_mm_mul_ps(_mm_loadu_ps(srow[k] + 4 * c), _mm_set1_ps(sx[c])));
                for (int h = 0; h < 2; h++) {
                    const __m256i ql = _mm256_loadu_si256((const __m256i *)(q + 128 * c + 32 * h));
                    const __m256i qh = _mm256_loadu_si256((const __m256i *)(q + 128 * c + 64 + 32 * h));
                    const __m256i a0 = _mm256_loadu_si256((const __m256i *)(ini + 16 * c + 8 * h));
                    const __m256i spread = h ? _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3)
                                             : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
                    for (int k = 0; k < 2; k++) {
                        const uint8_t *p = rows[k] + 64 * c + 32 * h;
                        if (b == 0 && h == 0) _mm_prefetch((const char *)p + A8Z_PREFETCH, _MM_HINT_T1);
                        const __m256i v = _mm256_loadu_si256((const __m256i *)p);
                        const __m256i s16 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(_mm256_and_si256(v, m4), ql),
                            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), qh));
                        const __m256i acc = _mm256_add_epi32(a0, _mm256_madd_epi16(s16, ones));
                        accf[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_permutevar8x32_ps(s4[k], spread),
                                                  accf[k]);
                    }
                }
            }
            for (int k = 0; k < R; k++) y[b * out + o0 + k] = hsum8(accf[k]);
        }
    }
    return 0;
#else
    (void)w; (void)scale; (void)xq; (void)init; (void)xs; (void)y; (void)out; (void)in; (void)nb;
    return -1;
#endif
}

// Which int8-activation 4-bit-head kernel this build has: 2 = AVX512-VNNI, 1 = AVX2 (vpmaddubsw), 0 = none (the
// fp32-activation q4_gemv runs).
int q4_a8_kernel(void) {
#if defined(DECODE_A8Z)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

// Scratch bytes the *_auto entry points need for nb rows of length in (at most this; tm_qwork_bytes covers it).
int64_t a8z_work_bytes(int64_t in, int64_t nb) { return nb * in + nb * in / 2 + 4 * nb * (in / 128 + 1) + 192; }

// Quantize x and run the kernel, in `work` (a8z_work_bytes): 0, or -1 when it does not apply (nothing written).
int tq2_gemv_a8z_auto(const uint8_t *codes, const float *scales, const float *x, float *y, int8_t *work,
                      int64_t out, int64_t in, int64_t G, int64_t nb) {
#ifndef DECODE_A8Z
    (void)codes; (void)scales; (void)x; (void)y; (void)work; (void)out; (void)in; (void)G; (void)nb;
    return -1;
#else
    if (in % 256 || G % 128 || in % G || nb < 1) return -1;
    int8_t *xq = work;
    int32_t *init = (int32_t *)(work + ((nb * in + 63) & ~(int64_t)63));
    float *xs = (float *)(init + nb * (in / 256) * 16);
    tq2_quantize_xz(x, xq, init, xs, in, nb);
    return tq2_gemv_a8z(codes, scales, xq, init, xs, y, out, in, G, nb);
#endif
}

int q4_gemv_a8_auto(const uint8_t *w, const float *scale, const float *x, float *y, int8_t *work,
                    int64_t out, int64_t in, int64_t nb) {
#if !defined(DECODE_A8Z) && !defined(__AVX2__)
    (void)w; (void)scale; (void)x; (void)y; (void)work; (void)out; (void)in; (void)nb;
    return -1;
#else
    if (in % 128 || nb < 1) return -1;
    int8_t *xq = work;
    int32_t *init = (int32_t *)(work + ((nb * in + 63) & ~(int64_t)63));
    float *xs = (float *)(init + nb * (in / 128) * 16);
    q4_quantize_x(x, xq, init, xs, in, nb);
    return q4_gemv_a8(w, scale, xq, init, xs, y, out, in, nb);
#endif
}

// The decode engine's int8-activation ternary GEMV in a row-interleaved layout ("r4"), built for fewer
// instructions per weight than tq2_gemv_a8z (decode_a8.c, which stays the reference kernel and the fallback):
// on 2 vCPUs that share their compute (the AMD EPYC kind), the decode GEMVs are bound by arithmetic as much as
// by bandwidth, so every instruction per weight counts.  Reference: ops/ternary_linear.py ternary_linear_a8_ref;
// tests/test_decode_layouts.py.
//
// Layout (tq2r4_pack, once when the engine is built): rows in blocks of 4 (the last block padded with zero
// weights); per block, per 128-value chunk c, per half h (code bytes 16h..16h+15 of the chunk's 32), 64 bytes
// whose 128-bit lane j holds, for rows r = 0..3, that row's 4 code bytes 16h+4j..16h+4j+3.  So one vpdpbusd lane
// (a dword) is one row, and lane 4j + r belongs to row r: every fp32 scale vector is one broadcast of the 4 rows'
// group scales, kept in fp16 (the packed file's own precision: the conversion is exact, and half the bytes of
// the fp32 scales, 19 MB less per token at 1.3B).  Per chunk and block: 2 code loads, 8 plane extractions
// (vpermb), 8 vpdpbusd, one int -> fp32 conversion and one fma for 4 rows x 128 weights.
//
// Activations (tq2r4_quantize_x): x quantized per row to int8 (absmax / 127, round to nearest even, exactly as
// tq2_quantize_xz), stored per chunk, half, plane p: 64 bytes, lane j dword r = the values of code bytes
// 16h+4j..+3 at plane p (value 4 byte + p) for every r (so each dword meets its row's codes); init per chunk: 16
// int32, lanes 0..3 = -sum q of the chunk (codes are t + 1: sum (t + 1) q - sum q = sum t q).
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__F16C__)
#define DECODE_R4 1
#endif
#define R4_PREFETCH 16384

int tq2r4_available(void) {
#ifdef DECODE_R4
    return 1;
#else
    return 0;
#endif
}

static uint16_t f2h_exact(float v, int *ok) {           // fp32 -> fp16 bits; *ok = 0 unless the value round-trips
    uint16_t h = 0;
#ifdef DECODE_R4
    h = (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    if (_cvtsh_ss(h) != v) *ok = 0;
#else
    (void)v;
    *ok = 0;
#endif
    return h;
}

// codes (out, in/4) tq2, scales (out, in/G) fp32 -> dst (out4 = ceil(out/4)*4 rows, in/4 bytes each, r4 layout),
// dst_scales (out4/4, in/G, 4) fp16.  0, or -1 when the layout does not apply (in or G not a multiple of 128,
// in % G, no kernel in this build), -2 when a scale is not exactly an fp16 value (nothing usable written).
int tq2r4_pack(const uint8_t *codes, const float *scales, uint8_t *dst, uint16_t *dst_scales, int64_t out,
               int64_t in, int64_t G) {
    if (!tq2r4_available() || in % 128 || G % 128 || in % G) return -1;
    const int64_t rb = in / 4, nc = in / 128, ng = in / G, nblk = (out + 3) / 4;
    int ok = 1;
    for (int64_t blk = 0; blk < nblk; blk++) {
        uint8_t *d = dst + blk * 4 * rb;
        for (int r = 0; r < 4; r++) {
            const int64_t o = 4 * blk + r;
            for (int64_t c = 0; c < nc; c++)
                for (int h = 0; h < 2; h++)
                    for (int j = 0; j < 4; j++) {
                        uint8_t *q = d + c * 128 + h * 64 + j * 16 + r * 4;
                        if (o < out) memcpy(q, codes + o * rb + c * 32 + 16 * h + 4 * j, 4);
                        else memset(q, 0x55, 4);            // code 1 in every field: weight 0
                    }
            for (int64_t g = 0; g < ng; g++)
                dst_scales[(blk * ng + g) * 4 + r] = o < out ? f2h_exact(scales[o * ng + g], &ok) : 0;
        }
    }
    return ok ? 0 : -2;
}

// x (nb, in) -> xb (nb, 4 in) int8, init (nb, in/128, 16) int32, xs (nb): the layout above.
void tq2r4_quantize_x(const float *x, int8_t *xb, int32_t *init, float *xs, int64_t in, int64_t nb) {
    for (int64_t b = 0; b < nb; b++) {
        const float *xr = x + b * in;
        float inv;
        xs[b] = i8_row_scale(xr, in, &inv);
        int8_t *q = xb + b * 4 * in;
        int32_t *ini = init + b * (in / 128) * 16;
        int64_t c = 0;
#if defined(DECODE_R4) && defined(__AVX512VBMI__)
        // per chunk: 128 values -> int8 in natural order (cvtps_epi32 rounds to nearest even, as lrintf), then one
        // vpermb per half and plane: output byte 16 j + 4 r + k <- value 64 h + 4 (4 j + k) + p
        __m512i idx[4];
        {
            int8_t t[64];
            for (int p = 0; p < 4; p++) {
                for (int o = 0; o < 64; o++) t[o] = (int8_t)(4 * (4 * (o / 16) + o % 4) + p);
                idx[p] = _mm512_loadu_si512((const void *)t);
            }
        }
        const __m512 vinv = _mm512_set1_ps(inv);
        for (; c < in / 128; c++) {
            __m512i vs = _mm512_setzero_si512();
            for (int h = 0; h < 2; h++) {
                const __m512i bytes = q8_64(xr + 128 * c + 64 * h, vinv, &vs);
                for (int p = 0; p < 4; p++)
                    _mm512_storeu_si512((void *)(q + c * 512 + h * 256 + p * 64), _mm512_permutexvar_epi8(idx[p], bytes));
            }
            const int32_t s = _mm512_reduce_add_epi32(vs);
            for (int l = 0; l < 16; l++) ini[c * 16 + l] = l < 4 ? -s : 0;
        }
#endif
        for (; c < in / 128; c++) {
            int8_t v[128];
            int32_t s = 0;
            for (int i = 0; i < 128; i++) {
                v[i] = (int8_t)lrintf(xr[128 * c + i] * inv);
                s += v[i];
            }
            for (int h = 0; h < 2; h++)
                for (int p = 0; p < 4; p++)
                    for (int j = 0; j < 4; j++) {
                        int8_t four[4];
                        for (int k = 0; k < 4; k++) four[k] = v[4 * (16 * h + 4 * j + k) + p];
                        for (int r = 0; r < 4; r++) memcpy(q + c * 512 + h * 256 + p * 64 + j * 16 + r * 4, four, 4);
                    }
            for (int l = 0; l < 16; l++) ini[c * 16 + l] = l < 4 ? -s : 0;
        }
    }
}

int tq2r4_gemv(const uint8_t *codes, const uint16_t *scales, const int8_t *xb, const int32_t *init,
               const float *xs, float *y, int64_t out, int64_t in, int64_t G, int64_t nb) {
#ifndef DECODE_R4
    (void)codes; (void)scales; (void)xb; (void)init; (void)xs; (void)y; (void)out; (void)in; (void)G; (void)nb;
    return -1;
#else
    if (in % 128 || G % 128 || in % G) return -1;
    const int64_t nc = in / 128, ng = in / G, nblk = (out + 3) / 4, rb = in / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const uint8_t *w0 = codes + blk * 4 * rb;
        const uint16_t *sc = scales + blk * ng * 4;
        const int64_t R = out - 4 * blk < 4 ? out - 4 * blk : 4;
#ifdef __AVX512VBMI__
        // planes 0-2 by vpermb on the byte's low 6 bits (port 5), plane 3 as plane 2 of (byte >> 2)
        uint8_t t[3][64];
        for (int i = 0; i < 64; i++)
            for (int j = 0; j < 3; j++) t[j][i] = (uint8_t)((i >> (2 * j)) & 3);
        const __m512i tp0 = _mm512_loadu_si512((const void *)t[0]), tp1 = _mm512_loadu_si512((const void *)t[1]);
        const __m512i tp2 = _mm512_loadu_si512((const void *)t[2]);
#else
        const __m512i m3 = _mm512_set1_epi8(3);
#endif
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *xq = xb + b * 4 * in;
            const int32_t *ini = init + b * nc * 16;
            __m512 accf = _mm512_setzero_ps();
            for (int64_t c = 0; c < nc; c++) {
                const uint8_t *wc = w0 + 128 * c;
                if (b == 0) {
                    _mm_prefetch((const char *)wc + R4_PREFETCH, _MM_HINT_T1);
                    _mm_prefetch((const char *)wc + R4_PREFETCH + 64, _MM_HINT_T1);
                }
                const int8_t *xc = xq + 512 * c;
                __m512i acc0 = _mm512_loadu_si512((const void *)(ini + 16 * c)), acc1 = _mm512_setzero_si512();
                for (int h = 0; h < 2; h++) {
                    const __m512i w = _mm512_loadu_si512((const void *)(wc + 64 * h));
                    const int8_t *xh = xc + 256 * h;
#ifdef __AVX512VBMI__
                    const __m512i p0 = _mm512_permutexvar_epi8(w, tp0), p1 = _mm512_permutexvar_epi8(w, tp1);
                    const __m512i p2 = _mm512_permutexvar_epi8(w, tp2);
                    const __m512i p3 = _mm512_permutexvar_epi8(_mm512_srli_epi16(w, 2), tp2);
#else
                    const __m512i p0 = _mm512_and_si512(w, m3), p1 = _mm512_and_si512(_mm512_srli_epi16(w, 2), m3);
                    const __m512i p2 = _mm512_and_si512(_mm512_srli_epi16(w, 4), m3);
                    const __m512i p3 = _mm512_and_si512(_mm512_srli_epi16(w, 6), m3);
#endif
                    acc0 = _mm512_dpbusd_epi32(acc0, p0, _mm512_loadu_si512((const void *)xh));
                    acc1 = _mm512_dpbusd_epi32(acc1, p1, _mm512_loadu_si512((const void *)(xh + 64)));
                    acc0 = _mm512_dpbusd_epi32(acc0, p2, _mm512_loadu_si512((const void *)(xh + 128)));
                    acc1 = _mm512_dpbusd_epi32(acc1, p3, _mm512_loadu_si512((const void *)(xh + 192)));
                }
                int64_t s4;                                  // the 4 rows' fp16 scales of this chunk's group
                memcpy(&s4, sc + 4 * ((128 * c) / G), 8);
                const __m512 sv = _mm512_cvtph_ps(_mm256_set1_epi64x(s4));
                accf = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1)), sv, accf);
            }
            const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(accf), _mm512_extractf32x8_ps(accf, 1));
            const __m128 a4 = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1)),
                                         _mm_set1_ps(xs[b]));
            float r4[4];
            _mm_storeu_ps(r4, a4);
            for (int k = 0; k < R; k++) y[b * out + 4 * blk + k] = r4[k];
        }
    }
    return 0;
#endif
}

int64_t tq2r4_work_bytes(int64_t in, int64_t nb) { return 4 * nb * in + 64 * nb * (in / 128) + 4 * nb + 192; }

// Quantize x and run the kernel, in `work` (tq2r4_work_bytes): 0, or -1 when it does not apply (nothing written).
int tq2r4_gemv_auto(const uint8_t *codes, const uint16_t *scales, const float *x, float *y, int8_t *work,
                    int64_t out, int64_t in, int64_t G, int64_t nb) {
    if (!tq2r4_available() || in % 128 || G % 128 || in % G) return -1;
    int8_t *xb = (int8_t *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    int32_t *init = (int32_t *)(xb + 4 * nb * in);
    float *xs = (float *)(init + 16 * nb * (in / 128));
    tq2r4_quantize_x(x, xb, init, xs, in, nb);
    return tq2r4_gemv(codes, scales, xb, init, xs, y, out, in, G, nb);
}

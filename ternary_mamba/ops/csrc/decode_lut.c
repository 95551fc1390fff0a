// The decode engine's exact ternary GEMV (fp32 activations) by table lookup, for fewer vector instructions per
// weight than tq2_gemv (tq2_gemv.c, which stays the reference kernel and the fallback): the exact path is bound
// by arithmetic on 2 vCPUs, not by bytes.  Reference: ops/ternary_linear.py ternary_linear_ref (the fake-quant
// product); tests/test_decode_layouts.py.
//
// Tables: within each group of G inputs, every 3 consecutive inputs (a "triple"; the group's last one padded with
// zero inputs) give the 27 sums T[m] = t0 x0 + t1 x1 + t2 x2 over the weight triples, m = (t0 + 1) + 3 (t1 + 1) +
// 9 (t2 + 1), added in increasing i (exact fp32 adds: each t x is exact), as two zmm (entries 27-31 zero).  A row's
// 3 weights on that triple are one 5-bit index m, and their product with x is one two-table permute (vpermi2ps
// reads the index's low 5 bits).  Codes: rows in blocks of 64, one fp32 lane per row in four zmm; per group, dword
// slot d of a row holds the indexes of its triples 6d..6d+5 at bits 5s, so a slot's six lookups take one shift
// each and no zero-extension (tq2lut_pack re-lays the tq2 codes once when the engine is built).  Per 64 rows x 3
// weights: two table loads, four shifts, four permutes, four adds (the 16-entry subset-sum tables this replaced,
// pos and neg of 4 weights looked up separately: a zero-extension, a shift, two permutes and two adds per 16 rows
// x 4 weights) -- 1.24-1.35x the rate streamed at the 1.3B in_proj shape (AMD EPYC kind, 2 threads, docs/SPEED.md).
// Bytes: ceil(G / 18) dwords per row and group, at most G / 4 bytes (tq2's) for G a multiple of 16, equal at 128.
// Per group the 64 rows' fp16 scales (the packed file's own precision, converted exactly) multiply the group's
// sums.  Not bit-identical to tq2_gemv (another summation order): equal within fp32 rounding, as every exact path.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#include "vec16.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__F16C__)
#define DECODE_LUT 1
#endif
#define LUT_ROWS 64
#define LUT_PREFETCH 8192
#define LUT_ZERO 13                                   // the index of three zero weights: 1 + 3 + 9

int tq2lut_available(void) {
#ifdef DECODE_LUT
    return 1;
#else
    return 0;
#endif
}

static int lut_shape_ok(int64_t in, int64_t G) { return G > 0 && G % 16 == 0 && in % G == 0; }
static int64_t lut_triples(int64_t G) { return (G + 2) / 3; }
static int64_t lut_slots(int64_t G) { return (lut_triples(G) + 5) / 6; }

// Bytes of tq2lut_pack's codes per block of 64 rows (0 where the layout does not apply).
int64_t tq2lut_block_bytes(int64_t in, int64_t G) {
    return lut_shape_ok(in, G) ? in / G * lut_slots(G) * LUT_ROWS * 4 : 0;
}

// codes (out, in/4) tq2, scales (out, in/G) fp32 -> dst (ceil(out/64) blocks of tq2lut_block_bytes: per group,
// lut_slots(G) slots x 64 rows of uint32), dst_scales (ceil(out/64), in/G, 64) fp16.  Padding rows and triples
// get zero weights.  0, or -1 when it does not apply (no kernel, G not a multiple of 16, in % G), -2 when a scale
// is not exactly an fp16 value (nothing usable written).
int tq2lut_pack(const uint8_t *codes, const float *scales, uint8_t *dst, uint16_t *dst_scales, int64_t out,
                int64_t in, int64_t G) {
#ifndef DECODE_LUT
    (void)codes; (void)scales; (void)dst; (void)dst_scales; (void)out; (void)in; (void)G;
    return -1;
#else
    if (!lut_shape_ok(in, G)) return -1;
    const int64_t rb = in / 4, ng = in / G, nt = lut_triples(G), nd = lut_slots(G), nblk = (out + 63) / 64;
    uint32_t *d32 = (uint32_t *)(void *)dst;
    int ok = 1;
    #pragma omp parallel for schedule(static) reduction(& : ok)     // once per engine: 1.3B's 1.24 G weights
    for (int64_t blk = 0; blk < nblk; blk++) {
        uint8_t c[18 * nd];                                      // a row's group of code fields (t + 1), padded
        for (int r = 0; r < LUT_ROWS; r++) {
            const int64_t o = LUT_ROWS * blk + r;
            for (int64_t g = 0; g < ng; g++) {
                if (o < out) {
                    for (int64_t j = 0; j < 18 * nd; j++) {
                        const int64_t k = g * G + j;
                        const int f = j < G ? (codes[o * rb + k / 4] >> (2 * (k % 4))) & 3 : 1;
                        c[j] = (uint8_t)(f == 3 ? 1 : f);               // 3 is no tq2 code (load rejects it)
                    }
                }
                for (int64_t d = 0; d < nd; d++) {
                    uint32_t v = 0;
                    for (int s = 0; s < 6; s++) {
                        const int64_t t = 6 * d + s;                    // digit i = code field of input 3t + i
                        const int m = o < out && t < nt ? c[3 * t] + 3 * c[3 * t + 1] + 9 * c[3 * t + 2] : LUT_ZERO;
                        v |= (uint32_t)m << (5 * s);
                    }
                    d32[((blk * ng + g) * nd + d) * LUT_ROWS + r] = v;
                }
                uint16_t h = 0;
                if (o < out) {
                    h = (uint16_t)_cvtss_sh(scales[o * ng + g], _MM_FROUND_TO_NEAREST_INT);
                    ok &= _cvtsh_ss(h) == scales[o * ng + g];
                }
                dst_scales[(blk * ng + g) * LUT_ROWS + r] = h;
            }
        }
    }
    return ok ? 0 : -2;
#endif
}

// The tables of nb rows: (nb, in/G, lut_triples(G), 32) floats, at most 12 in per row (G = 16; G >= 16).
int64_t tq2lut_work_bytes(int64_t in, int64_t nb) { return 48 * nb * in + 64; }

#ifdef DECODE_LUT
// One lookup step of a slot: triple 6d + s of the group against the four code vectors of the block.
#define LUT_STEP(s)                                                                                 \
    if ((s) < smax) {                                                                               \
        const float *Tt = Tg + (6 * d + (s)) * 32;                                                  \
        const __m512 tl = _mm512_load_ps(Tt), th = _mm512_load_ps(Tt + 16);                         \
        a0 = _mm512_add_ps(a0, _mm512_permutex2var_ps(tl, _mm512_srli_epi32(c0, 5 * (s)), th));     \
        a1 = _mm512_add_ps(a1, _mm512_permutex2var_ps(tl, _mm512_srli_epi32(c1, 5 * (s)), th));     \
        a2 = _mm512_add_ps(a2, _mm512_permutex2var_ps(tl, _mm512_srli_epi32(c2, 5 * (s)), th));     \
        a3 = _mm512_add_ps(a3, _mm512_permutex2var_ps(tl, _mm512_srli_epi32(c3, 5 * (s)), th));     \
    }
#endif

// x (nb, in) -> y (nb, out) through tq2lut_pack's layout; work: tq2lut_work_bytes (the tables).  0, or -1.
int tq2lut_gemv(const uint8_t *codes, const uint16_t *scales, const float *x, float *y, void *work, int64_t out,
                int64_t in, int64_t G, int64_t nb) {
#ifndef DECODE_LUT
    (void)codes; (void)scales; (void)x; (void)y; (void)work; (void)out; (void)in; (void)G; (void)nb;
    return -1;
#else
    if (!lut_shape_ok(in, G)) return -1;
    const int64_t ng = in / G, nt = lut_triples(G), nd = lut_slots(G), nblk = (out + 63) / 64;
    const uint32_t *c32 = (const uint32_t *)(const void *)codes;
    float *T = (float *)(((uintptr_t)work + 63) & ~(uintptr_t)63);       // (nb, ng, nt, 32)
    #pragma omp parallel
    {
        // digit i of entry m, minus 1 (the weight), per half of the 32 entries; entries 27-31 all zero
        __m512 D[2][3];
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 3; i++) {
                float v[16];
                for (int l = 0; l < 16; l++) {
                    const int m = 16 * h + l, p = i == 0 ? 1 : i == 1 ? 3 : 9;
                    v[l] = m < 27 ? (float)((m / p) % 3 - 1) : 0.f;
                }
                D[h][i] = _mm512_loadu_ps(v);
            }
        #pragma omp for schedule(static)
        for (int64_t bg = 0; bg < nb * ng; bg++) {                 // batch row b = bg / ng, group g = bg % ng
            const float *xg = x + bg * G;
            float *Tg = T + bg * nt * 32;
            for (int64_t t = 0; t < nt; t++) {
                const int64_t k = 3 * t;
                const __m512 x0 = _mm512_set1_ps(xg[k]), x1 = _mm512_set1_ps(k + 1 < G ? xg[k + 1] : 0.f);
                const __m512 x2 = _mm512_set1_ps(k + 2 < G ? xg[k + 2] : 0.f);
                for (int h = 0; h < 2; h++)       // t0 x0 + t1 x1 + t2 x2 in this order (each product exact)
                    _mm512_store_ps(Tg + 32 * t + 16 * h,
                                    _mm512_fmadd_ps(D[h][2], x2, _mm512_fmadd_ps(D[h][1], x1, _mm512_mul_ps(D[h][0], x0))));
            }
        }
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t R = out - LUT_ROWS * blk < LUT_ROWS ? out - LUT_ROWS * blk : LUT_ROWS;
            for (int64_t b = 0; b < nb; b++) {
                __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
                for (int64_t g = 0; g < ng; g++) {
                    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    const uint32_t *cp = c32 + (blk * ng + g) * nd * LUT_ROWS;
                    const float *Tg = T + (b * ng + g) * nt * 32;
                    for (int64_t d = 0; d < nd; d++) {
                        const uint32_t *cd = cp + d * LUT_ROWS;
                        if (b == 0)
                            for (int q = 0; q < 4; q++) _mm_prefetch((const char *)(cd + 16 * q) + LUT_PREFETCH, _MM_HINT_T1);
                        const __m512i c0 = _mm512_loadu_si512((const void *)cd);
                        const __m512i c1 = _mm512_loadu_si512((const void *)(cd + 16));
                        const __m512i c2 = _mm512_loadu_si512((const void *)(cd + 32));
                        const __m512i c3 = _mm512_loadu_si512((const void *)(cd + 48));
                        const int64_t smax = nt - 6 * d;         // 6 except in the group's last slot
                        LUT_STEP(0) LUT_STEP(1) LUT_STEP(2) LUT_STEP(3) LUT_STEP(4) LUT_STEP(5)
                    }
                    const uint16_t *sp = scales + (blk * ng + g) * LUT_ROWS;
                    f0 = _mm512_fmadd_ps(a0, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)sp)), f0);
                    f1 = _mm512_fmadd_ps(a1, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(sp + 16))), f1);
                    f2 = _mm512_fmadd_ps(a2, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(sp + 32))), f2);
                    f3 = _mm512_fmadd_ps(a3, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(sp + 48))), f3);
                }
                float r[LUT_ROWS];
                _mm512_storeu_ps(r, f0);
                _mm512_storeu_ps(r + 16, f1);
                _mm512_storeu_ps(r + 32, f2);
                _mm512_storeu_ps(r + 48, f3);
                memcpy(y + b * out + LUT_ROWS * blk, r, (size_t)R * 4);
            }
        }
    }
    return 0;
#endif
}

// The decode engine's exact ternary GEMV (fp32 activations) by table lookup, for fewer vector instructions per
// weight than tq2_gemv (tq2_gemv.c, which stays the reference kernel and the fallback): the exact path is bound
// by arithmetic on 2 vCPUs, not by bytes.  Reference: ops/ternary_linear.py ternary_linear_ref (the fake-quant
// product); tests/test_decode_layouts.py.
//
// For every 4 consecutive inputs (a "quad") the 16 subset sums S[m] = sum over the bits i of m of x[4q + i] (in
// increasing i, exact fp32 adds) form one zmm.  A row's 4 ternary weights on that quad are two 4-bit masks, pos
// (t = +1) and neg (t = -1), and their product with x is S[pos] - S[neg].  Rows go in blocks of 16, one per fp32
// lane: per quad, 16 bytes hold the 16 rows' pos | neg << 4 (tq2lut_pack, once when the engine is built), so
// 64 weights cost one zero-extension, one shift, two vpermps and two adds (tq2_gemv: 12 instructions).  Per group
// the 16 rows' fp16 scales (the packed file's own precision, converted exactly) multiply the group's sums.  Not
// bit-identical to tq2_gemv (another summation order): equal within fp32 rounding, as every exact path here.
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
#define LUT_PREFETCH 8192

int tq2lut_available(void) {
#ifdef DECODE_LUT
    return 1;
#else
    return 0;
#endif
}

static int lut_shape_ok(int64_t in, int64_t G) { return G > 0 && G % 8 == 0 && in % G == 0; }

// codes (out, in/4) tq2, scales (out, in/G) fp32 -> dst (ceil(out/16) blocks x in/4 quads x 16 bytes), dst_scales
// (ceil(out/16), in/G, 16) fp16.  0, or -1 when it does not apply (no kernel, G not a multiple of 8, in % G), -2
// when a scale is not exactly an fp16 value (nothing usable written).
int tq2lut_pack(const uint8_t *codes, const float *scales, uint8_t *dst, uint16_t *dst_scales, int64_t out,
                int64_t in, int64_t G) {
#ifndef DECODE_LUT
    (void)codes; (void)scales; (void)dst; (void)dst_scales; (void)out; (void)in; (void)G;
    return -1;
#else
    if (!lut_shape_ok(in, G)) return -1;
    const int64_t nq = in / 4, ng = in / G, nblk = (out + 15) / 16;
    uint8_t pn[256];                                   // code byte -> pos | neg << 4
    for (int b = 0; b < 256; b++) {
        int pos = 0, neg = 0;
        for (int i = 0; i < 4; i++) {
            const int c = (b >> (2 * i)) & 3;
            pos |= (c == 2) << i;
            neg |= (c == 0) << i;
        }
        pn[b] = (uint8_t)(pos | neg << 4);
    }
    int ok = 1;
    for (int64_t blk = 0; blk < nblk; blk++)
        for (int r = 0; r < 16; r++) {
            const int64_t o = 16 * blk + r;
            for (int64_t q = 0; q < nq; q++) dst[(blk * nq + q) * 16 + r] = o < out ? pn[codes[o * nq + q]] : 0;
            for (int64_t g = 0; g < ng; g++) {
                uint16_t h = 0;
                if (o < out) {
                    h = (uint16_t)_cvtss_sh(scales[o * ng + g], _MM_FROUND_TO_NEAREST_INT);
                    ok &= _cvtsh_ss(h) == scales[o * ng + g];
                }
                dst_scales[(blk * ng + g) * 16 + r] = h;
            }
        }
    return ok ? 0 : -2;
#endif
}

int64_t tq2lut_work_bytes(int64_t in, int64_t nb) { return 16 * nb * in + 64; }

// x (nb, in) -> y (nb, out) through tq2lut_pack's layout; work: tq2lut_work_bytes (the tables).  0, or -1.
int tq2lut_gemv(const uint8_t *codes, const uint16_t *scales, const float *x, float *y, void *work, int64_t out,
                int64_t in, int64_t G, int64_t nb) {
#ifndef DECODE_LUT
    (void)codes; (void)scales; (void)x; (void)y; (void)work; (void)out; (void)in; (void)G; (void)nb;
    return -1;
#else
    if (!lut_shape_ok(in, G)) return -1;
    const int64_t nq = in / 4, ng = in / G, qpg = G / 4, nblk = (out + 15) / 16;
    float *T = (float *)(((uintptr_t)work + 63) & ~(uintptr_t)63);       // (nb, nq, 16)
    #pragma omp parallel
    {
        // the tables: lane m of quad q = sum of x[4q + i] over the bits i of m, added in increasing i (adding the
        // absent terms as +0 changes no value)
        const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        #pragma omp for schedule(static)
        for (int64_t bq = 0; bq < nb * nq; bq++) {
            const float *xq = x + 4 * bq;                  // row b = bq / nq, quad q = bq % nq: x + b * in + 4 q
            __m512 s = _mm512_setzero_ps();
            for (int i = 0; i < 4; i++) {
                const __mmask16 m = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(1 << i));
                s = _mm512_mask_add_ps(s, m, s, _mm512_set1_ps(xq[i]));
            }
            _mm512_store_ps(T + 16 * bq, s);
        }
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const uint8_t *cb = codes + blk * nq * 16;
            const uint16_t *sb = scales + blk * ng * 16;
            const int64_t R = out - 16 * blk < 16 ? out - 16 * blk : 16;
            for (int64_t b = 0; b < nb; b++) {
                const float *Tb = T + b * nq * 16;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t g = 0; g < ng; g++) {
                    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                    for (int64_t q = g * qpg; q < (g + 1) * qpg; q += 2) {
                        if (b == 0 && (q & 3) == 0) _mm_prefetch((const char *)(cb + q * 16) + LUT_PREFETCH, _MM_HINT_T1);
                        const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cb + q * 16)));
                        const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cb + q * 16 + 16)));
                        const __m512 t0 = _mm512_load_ps(Tb + 16 * q), t1 = _mm512_load_ps(Tb + 16 * q + 16);
                        a0 = _mm512_add_ps(a0, _mm512_sub_ps(_mm512_permutexvar_ps(i0, t0),
                                                             _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), t0)));
                        a1 = _mm512_add_ps(a1, _mm512_sub_ps(_mm512_permutexvar_ps(i1, t1),
                                                             _mm512_permutexvar_ps(_mm512_srli_epi32(i1, 4), t1)));
                    }
                    const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sb + g * 16)));
                    acc = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), sv, acc);
                }
                float r16[16];
                _mm512_storeu_ps(r16, acc);
                for (int k = 0; k < R; k++) y[b * out + 16 * blk + k] = r16[k];
            }
        }
    }
    return 0;
#endif
}

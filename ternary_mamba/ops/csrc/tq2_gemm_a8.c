// Prefill with int8 activations (opt-in, like the a8 GEMV; what llama.cpp's TQ2_0 does with q8_K): a ternary GEMM
// on AVX512-VNNI.  x (nt, in) fp32 is quantized per token to int8 (absmax / 127, the a8 GEMV's rounding), then
//   y[t, o] = xs[t] * sum_g s[o, g] * (sum_{i in g} (t[o, i] + 1) q[t, i] - qsum[t, g])
// with integer sums per group.  Each thread takes blocks of 16 output rows: it unpacks the block's codes once into
// the VNNI layout (4 consecutive inputs of 16 rows = one 64-byte vector, 16 x in bytes, L2-resident) and runs it
// against every token, 16 tokens at a time (16 int32 accumulators, one vpdpbusd per token per 4 inputs; a tile of
// 32 rows x 8 tokens, one broadcast for two vpdpbusd, measured slower here).  The activations are laid out per
// tile so that the 16 broadcasts read one 64-byte line: 400-500 -> 610 G int8 ops/s (130m and 1.3B in_proj shapes,
// 512 tokens, 2 threads, AVX-512 EPYC).
// AVX2 builds (no VNNI) run the same scheme on 16 rows x 6 tokens: vpmaddubsw (codes + 1 as u8 times int8 -> int16
// pairs, at most 2 * 2 * 127 = 508, no saturation) summed in int16 over up to 64 steps of 4 inputs (<= 32512), then
// one vpmaddwd per group widens to int32: the same integer sums, so the same results.  16 x 6 tiles: 320-350 G int8
// ops/s (8 x 8: 270-295; 16 x 5 the same; 16 x 4, which GCC keeps without spills, 270-300), on the 130m and
// 1.3B in_proj shapes, 512 tokens, 2 threads, haswell build on the EPYC: the vpmaddubsw rate bounds it, not spills.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "vec16.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TQ2_VNNI 1
#define TQ2_GEMM_A8 1
#define BR 16   // output rows per block (one 16-lane vector)
#define BT 16   // tokens per tile (16 int32 accumulators)
#elif defined(__AVX2__)
#define TQ2_GEMM_A8 1
#define BR 16   // two 8-lane vectors
#define BT 6    // 12 int16 accumulators + 2 weight vectors + 1 broadcast: 15 of the 16 ymm registers
#endif

int tq2_has_vnni512(void) {
#ifdef TQ2_VNNI
    return 1;
#else
    return 0;
#endif
}

#ifdef TQ2_GEMM_A8
static uint32_t EXPAND[256];   // code byte -> its four (t + 1) as bytes, little-endian
static void init_expand(void) {
    for (int c = 0; c < 256; c++)
        EXPAND[c] = (uint32_t)(c & 3) | (uint32_t)((c >> 2) & 3) << 8 | (uint32_t)((c >> 4) & 3) << 16
                    | (uint32_t)(c >> 6) << 24;
}

// Rows o0..o0+BR-1 (rows past `out` read as t = 0): W[kb][r] = the four (t[o0 + r][4 kb + j] + 1), one dword.
static void unpack_block(const uint8_t *codes, int64_t out, int64_t in, int64_t o0, uint32_t *W) {
    const int64_t rb = in / 4;
    for (int64_t r = 0; r < BR; r++) {
        const int64_t o = o0 + r;
        if (o >= out) {
            for (int64_t kb = 0; kb < rb; kb++) W[kb * BR + r] = 0x01010101u;   // t = 0
            continue;
        }
        const uint8_t *c = codes + o * rb;
        for (int64_t kb = 0; kb < rb; kb++) W[kb * BR + r] = EXPAND[c[kb]];
    }
}

// Per token: q = round(x * 127 / absmax) (as tq2_quantize_x), its scale and its sum per group.
static void quantize_tokens(const float *x, int8_t *xq, float *xs, int32_t *qsum, int64_t nt, int64_t ntp,
                            int64_t in, int64_t G) {
    const int64_t ng = in / G;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < ntp; t++) {
        int8_t *q = xq + t * in;
        if (t >= nt) {                                   // padding tokens: zeros (their outputs are not written)
            memset(q, 0, in);
            xs[t] = 0.f;
            for (int64_t g = 0; g < ng; g++) qsum[t * ng + g] = 0;
            continue;
        }
        const float *xr = x + t * in;
        const float m = absmax_f32(xr, in);
        const float inv = m > 0.f ? 127.f / m : 0.f;
        xs[t] = m / 127.f;
#ifdef TQ2_VNNI
        const __m512 vinv = _mm512_set1_ps(inv);
#endif
        for (int64_t g = 0; g < ng; g++) {
            int32_t s = 0;
            int64_t j = g * G;
#ifdef TQ2_VNNI
            if (G % 16 == 0) {   // cvtps_epi32 rounds to nearest even under the default MXCSR, as lrintf does
                __m512i vs = _mm512_setzero_si512();
                for (; j < (g + 1) * G; j += 16) {
                    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + j), vinv));
                    _mm_storeu_si128((__m128i *)(q + j), _mm512_cvtsepi32_epi8(v));
                    vs = _mm512_add_epi32(vs, v);
                }
                s = _mm512_reduce_add_epi32(vs);
            }
#endif
            for (; j < (g + 1) * G; j++) {
                q[j] = (int8_t)lrintf(xr[j] * inv);
                s += q[j];
            }
            qsum[t * ng + g] = s;
        }
    }
}
#endif

// Returns 0, -1 without AVX512-VNNI or AVX2 (the caller then dequantizes), -2 when memory could not be allocated.
// Requires in % G == 0 and G % 4 == 0.
int tq2_gemm_a8(const uint8_t *codes, const float *scales, const float *x, float *y,
                int64_t out, int64_t in, int64_t G, int64_t nt) {
#ifndef TQ2_GEMM_A8
    (void)codes; (void)scales; (void)x; (void)y; (void)out; (void)in; (void)G; (void)nt;
    return -1;
#else
    if (G % 4 || in % G) return -1;
#ifndef TQ2_VNNI
    if (G > 256) return -1;     // the int16 sums of the AVX2 path hold at most 64 steps of 4 inputs
#endif
    init_expand();
    const int64_t ng = in / G, ntp = (nt + BT - 1) / BT * BT, nblk = (out + BR - 1) / BR;
    int8_t *xq = aligned_alloc(64, (size_t)(ntp * in + 63) / 64 * 64);
    float *xs = malloc(sizeof(float) * ntp);
    int32_t *qsum = malloc(sizeof(int32_t) * ntp * ng);
    const int nth = omp_get_max_threads();
    uint32_t *wall = aligned_alloc(64, (size_t)nth * BR * in);
    if (!xq || !xs || !qsum || !wall) {
        free(xq); free(xs); free(qsum); free(wall);
        return -2;
    }
    quantize_tokens(x, xq, xs, qsum, nt, ntp, in, G);
    // tile layout for the kernel: per 16 tokens, per 4 inputs, the 16 tokens' 4 bytes side by side (one base
    // pointer and immediate offsets for the 16 broadcasts; strided rows left the compiler short of registers)
    int32_t *xt = aligned_alloc(64, (size_t)(ntp * in + 63) / 64 * 64);
    if (!xt) {
        free(xq); free(xs); free(qsum); free(wall);
        return -2;
    }
    const int64_t rb = in / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < ntp; t++)
        for (int64_t kb = 0; kb < rb; kb++) {
            int32_t v;
            memcpy(&v, xq + t * in + 4 * kb, 4);
            xt[((t / BT) * rb + kb) * BT + t % BT] = v;
        }
    #pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const int64_t o0 = blk * BR;
        uint32_t *W = wall + (size_t)omp_get_thread_num() * BR * (in / 4);
        unpack_block(codes, out, in, o0, W);
        float sg[BR] __attribute__((aligned(64)));
        float accf[BT][BR] __attribute__((aligned(64)));      // fp32 results of the tile, [token][row] (in L1)
        for (int64_t t0 = 0; t0 < ntp; t0 += BT) {
            memset(accf, 0, sizeof(accf));
            const int32_t *qt = xt + (t0 / BT) * rb * BT;
            for (int64_t g = 0; g < ng; g++) {
                for (int r = 0; r < BR; r++) sg[r] = o0 + r < out ? scales[(o0 + r) * ng + g] : 0.f;
#ifdef TQ2_VNNI
                __m512i acc[BT];
                for (int i = 0; i < BT; i++) acc[i] = _mm512_setzero_si512();
                for (int64_t kb = g * G / 4; kb < (g + 1) * G / 4; kb++) {
                    const __m512i w = _mm512_load_si512((const void *)(W + kb * BR));
                    const int32_t *qk = qt + kb * BT;
                    for (int i = 0; i < BT; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], w, _mm512_set1_epi32(qk[i]));
                }
                const __m512 s0 = _mm512_load_ps(sg);
                for (int i = 0; i < BT; i++) {
                    const __m512i qs = _mm512_set1_epi32(qsum[(t0 + i) * ng + g]);
                    _mm512_store_ps(accf[i], _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i], qs)), s0,
                                                             _mm512_load_ps(accf[i])));
                }
#else
                __m256i acc0[BT], acc1[BT];                                   // rows 0-7, rows 8-15
                for (int i = 0; i < BT; i++) acc0[i] = acc1[i] = _mm256_setzero_si256();
                for (int64_t kb = g * G / 4; kb < (g + 1) * G / 4; kb++) {   // int16 sums: G <= 256 (checked)
                    const __m256i w0 = _mm256_loadu_si256((const __m256i *)(W + kb * BR));
                    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(W + kb * BR + 8));
                    const int32_t *qk = qt + kb * BT;
                    for (int i = 0; i < BT; i++) {
                        const __m256i b = _mm256_set1_epi32(qk[i]);
                        acc0[i] = _mm256_add_epi16(acc0[i], _mm256_maddubs_epi16(w0, b));
                        acc1[i] = _mm256_add_epi16(acc1[i], _mm256_maddubs_epi16(w1, b));
                    }
                }
                const __m256i ones = _mm256_set1_epi16(1);
                const __m256 s0 = _mm256_load_ps(sg), s1 = _mm256_load_ps(sg + 8);
                for (int i = 0; i < BT; i++) {
                    const __m256i qs = _mm256_set1_epi32(qsum[(t0 + i) * ng + g]);
                    const __m256i lo = _mm256_sub_epi32(_mm256_madd_epi16(acc0[i], ones), qs);
                    const __m256i hi = _mm256_sub_epi32(_mm256_madd_epi16(acc1[i], ones), qs);
                    _mm256_store_ps(accf[i], _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), s0, _mm256_load_ps(accf[i])));
                    _mm256_store_ps(accf[i] + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), s1,
                                                                 _mm256_load_ps(accf[i] + 8)));
                }
#endif
            }
            for (int i = 0; i < BT && t0 + i < nt; i++) {
                const float sx = xs[t0 + i];
                for (int j = 0; j < BR && o0 + j < out; j++) y[(t0 + i) * out + o0 + j] = accf[i][j] * sx;
            }
        }
    }
    free(xq); free(xs); free(qsum); free(wall); free(xt);
    return 0;
#endif
}

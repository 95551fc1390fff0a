// tq1 decoded directly in the int8-activation decode GEMV: a probe, not a shipped kernel (docs/SPEED.md, "tq1
// decoded directly").  It answers one question of the issue "Decode at the memory roofline": would a GEMV that
// reads tq1's 5 trits per byte beat the tq2 kernel the decoder runs (ops/csrc/decode_a8.c tq2_gemv_a8z) once the
// tq1 file is not re-packed to tq2 at load?  Both tq1 variants are checked against tq2_gemv_a8z on the same trits
// (exit 1 if they disagree), then all three are timed, interleaved, on one matrix in cache (compute rate) and on
// many matrices streamed from memory (the decode case).  Run: bash scripts/tq1_probe.sh (AVX512-VNNI + VBMI only).
//
// tq1 layout here: per row, blocks of 320 values in 64 bytes; byte i holds the trits of values 64k + i (k < 5), so
// each plane k is 64 activations in natural order, one vpdpbusd operand.
//  M: the byte is llama.cpp's fraction f = ceil(v * 256 / 243) of v = sum_k (t_k + 1) 3^(4-k): digit k =
//     (3 m_k) >> 8 with m_0 = f, m_{k+1} = 3 m_k mod 256 (two byte adds); since 256 d_k = 3 m_k - m_{k+1},
//     sum_i d_k,i x_i = (3 sum m_k x - sum m_{k+1} x) / 256 exactly: two vpdpbusd per plane, no tables.
//  L: the byte is v itself; digit k = T_k[v] through two vpermi2b (index bits 0-6) and a blend on bit 7.
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <omp.h>
#include "decode_a8.c"
#if !defined(DECODE_A8Z) || !defined(__AVX512VBMI__)
#error "the tq1 probe needs AVX512-VNNI and AVX512-VBMI"
#endif

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

// tq1 kernel layout: per row, blocks of 320 values in 64 bytes; byte i holds trits (t+1) of values 64k + i, k < 5,
// as the fraction f = ceil(v * 256 / 243), v = sum_k d_k 3^(4-k): digit k = (3 m_k) >> 8, m_{k+1} = 3 m_k mod 256.
// Option M: sum_i d_k,i x_i = (3 sum m_k x - sum m_{k+1} x) / 256 exactly; two vpdpbusd per plane, no tables.
int tq1_gemv_a8_M(const uint8_t *codes, const float *scales, const int8_t *xq, const int32_t *ginit, const float *xs,
                  float *y, int64_t out, int64_t in, int64_t G) {
    if (in % 320 || G % 128 || in % G) return -1;
    const int64_t row_bytes = in / 5, ng = in / G, nblk = in / 320, nq = (out + 3) / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t q4 = 0; q4 < nq; q4++) {
        const int64_t o0 = 4 * q4;
        const uint8_t *rows[4]; const float *srow[4];
        for (int k = 0; k < 4; k++) { rows[k] = codes + (o0 + k) * row_bytes; srow[k] = scales + (o0 + k) * ng; }
        __m512 accf[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        __m512i A[4], B[4];
        int64_t gcur = -1;
        for (int64_t b = 0; b < nblk; b++) {
            __m512i m[4];
            for (int r = 0; r < 4; r++) {
                _mm_prefetch((const char *)rows[r] + 64 * b + A8Z_PREFETCH, _MM_HINT_T1);
                m[r] = _mm512_loadu_si512((const void *)(rows[r] + 64 * b));
            }
            for (int k = 0; k < 5; k++) {
                const int64_t v0 = 320 * b + 64 * k, g = v0 / G;
                if (g != gcur) {
                    if (gcur >= 0)
                        for (int r = 0; r < 4; r++) {
                            const __m512i t = _mm512_sub_epi32(_mm512_add_epi32(A[r], _mm512_add_epi32(A[r], A[r])), B[r]);
                            accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(srow[r][gcur]), accf[r]);
                        }
                    const __m512i bi = _mm512_loadu_si512((const void *)(ginit + 16 * g));
                    for (int r = 0; r < 4; r++) { A[r] = _mm512_setzero_si512(); B[r] = bi; }
                    gcur = g;
                }
                const __m512i x = _mm512_loadu_si512((const void *)(xq + v0));
                for (int r = 0; r < 4; r++) {
                    const __m512i m2 = _mm512_add_epi8(m[r], _mm512_add_epi8(m[r], m[r]));
                    A[r] = _mm512_dpbusd_epi32(A[r], m[r], x);
                    B[r] = _mm512_dpbusd_epi32(B[r], m2, x);
                    m[r] = m2;
                }
            }
        }
        for (int r = 0; r < 4; r++) {
            const __m512i t = _mm512_sub_epi32(_mm512_add_epi32(A[r], _mm512_add_epi32(A[r], A[r])), B[r]);
            accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(srow[r][gcur]), accf[r]);
            y[o0 + r] = _mm512_reduce_add_ps(accf[r]) * xs[0] * (1.f / 256.f);
        }
    }
    return 0;
}

// Option L: digit k = T_k[f] through two vpermi2b (index bits 0-6) and a blend on bit 7; one vpdpbusd per plane.
static uint8_t TL[5][256];
int tq1_gemv_a8_L(const uint8_t *codes, const float *scales, const int8_t *xq, const int32_t *ginit1, const float *xs,
                  float *y, int64_t out, int64_t in, int64_t G) {
    if (in % 320 || G % 128 || in % G) return -1;
    const int64_t row_bytes = in / 5, ng = in / G, nblk = in / 320, nq = (out + 3) / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t q4 = 0; q4 < nq; q4++) {
        __m512i T[5][4];
        for (int k = 0; k < 5; k++) for (int j = 0; j < 4; j++) T[k][j] = _mm512_loadu_si512((const void *)(TL[k] + 64 * j));
        const int64_t o0 = 4 * q4;
        const uint8_t *rows[4]; const float *srow[4];
        for (int k = 0; k < 4; k++) { rows[k] = codes + (o0 + k) * row_bytes; srow[k] = scales + (o0 + k) * ng; }
        __m512 accf[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        __m512i A[4];
        int64_t gcur = -1;
        for (int64_t b = 0; b < nblk; b++) {
            __m512i f[4]; __mmask64 hm[4];
            for (int r = 0; r < 4; r++) {
                _mm_prefetch((const char *)rows[r] + 64 * b + A8Z_PREFETCH, _MM_HINT_T1);
                f[r] = _mm512_loadu_si512((const void *)(rows[r] + 64 * b));
                hm[r] = _mm512_movepi8_mask(f[r]);
            }
            for (int k = 0; k < 5; k++) {
                const int64_t v0 = 320 * b + 64 * k, g = v0 / G;
                if (g != gcur) {
                    if (gcur >= 0)
                        for (int r = 0; r < 4; r++)
                            accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(A[r]), _mm512_set1_ps(srow[r][gcur]), accf[r]);
                    const __m512i bi = _mm512_loadu_si512((const void *)(ginit1 + 16 * g));
                    for (int r = 0; r < 4; r++) A[r] = bi;
                    gcur = g;
                }
                const __m512i x = _mm512_loadu_si512((const void *)(xq + v0));
                for (int r = 0; r < 4; r++) {
                    const __m512i lo = _mm512_permutex2var_epi8(T[k][0], f[r], T[k][1]);
                    const __m512i hi = _mm512_permutex2var_epi8(T[k][2], f[r], T[k][3]);
                    A[r] = _mm512_dpbusd_epi32(A[r], _mm512_mask_blend_epi8(hm[r], lo, hi), x);
                }
            }
        }
        for (int r = 0; r < 4; r++) {
            accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(A[r]), _mm512_set1_ps(srow[r][gcur]), accf[r]);
            y[o0 + r] = _mm512_reduce_add_ps(accf[r]) * xs[0];
        }
    }
    return 0;
}

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (uint32_t)rng; }

int main(int argc, char **argv) {
    const int64_t out = argc > 1 ? atoll(argv[1]) : 8192, in = 2560, G = 128;
    const int64_t nmat = argc > 2 ? atoll(argv[2]) : 1, reps = argc > 3 ? atoll(argv[3]) : 50;
    const int64_t ng = in / G;
    int8_t *t = malloc(out * in);                       // trits
    for (int64_t i = 0; i < out * in; i++) t[i] = (int8_t)(rnd() % 3) - 1;
    float *s = malloc(out * ng * 4), *x = malloc(in * 4);
    for (int64_t i = 0; i < out * ng; i++) s[i] = 0.01f + (rnd() % 1000) * 1e-5f;
    for (int64_t i = 0; i < in; i++) x[i] = ((int)(rnd() % 2001) - 1000) * 1e-3f;
    // tq2 codes: byte i of a 128-chunk holds values 4i..4i+3 (value 4i + j in bits 2j)
    uint8_t *c2 = aligned_alloc(64, nmat * out * in / 4); memset(c2, 0, nmat * out * in / 4);
    for (int64_t o = 0; o < out; o++) for (int64_t v = 0; v < in; v++)
        c2[o * in / 4 + (v / 128) * 32 + (v % 128) / 4] |= (uint8_t)((t[o * in + v] + 1) << (2 * (v % 4)));
    // tq1 (M: fraction encoding; L: plain base-3 value v, tables digit k = T_k[v])
    uint8_t *c1 = aligned_alloc(64, nmat * out * in / 5), *c1L = aligned_alloc(64, nmat * out * in / 5);
    for (int64_t o = 0; o < out; o++) for (int64_t b = 0; b < in / 320; b++) for (int i = 0; i < 64; i++) {
        int v = 0;
        for (int k = 0; k < 5; k++) v = 3 * v + (t[o * in + 320 * b + 64 * k + i] + 1);
        c1[o * in / 5 + 64 * b + i] = (uint8_t)((v * 256 + 242) / 243);
        c1L[o * in / 5 + 64 * b + i] = (uint8_t)v;
    }
    for (int v = 0; v < 256; v++) { int u = v < 243 ? v : 0; for (int k = 4; k >= 0; k--) { TL[k][v] = (uint8_t)(u % 3); u /= 3; } }
    for (int64_t mm = 1; mm < nmat; mm++) { memcpy(c2 + mm * out * in / 4, c2, out * in / 4); memcpy(c1 + mm * out * in / 5, c1, out * in / 5); memcpy(c1L + mm * out * in / 5, c1L, out * in / 5); }
    int8_t *xq2 = aligned_alloc(64, in); int32_t *ini2 = aligned_alloc(64, in / 256 * 64); float xs;
    tq2_quantize_xz(x, xq2, ini2, &xs, in, 1);
    // natural-order int8 x for tq1 and per-group inits: M: B starts at 256 sum q (t = 3A - B = 256 sum (d-1) q);
    // L: A starts at -sum q; lane 0 of each group's 16
    int8_t *xq1 = aligned_alloc(64, in); int32_t *giM = aligned_alloc(64, ng * 64), *giL = aligned_alloc(64, ng * 64);
    memset(giM, 0, ng * 64); memset(giL, 0, ng * 64);
    for (int64_t i = 0; i < in; i++) { xq1[i] = (int8_t)lrintf(x[i] / xs); giM[16 * (i / G)] += 256 * xq1[i]; giL[16 * (i / G)] -= xq1[i]; }
    float *y2 = malloc(out * 4), *y1 = malloc(out * 4), *yL = malloc(out * 4);
    tq2_gemv_a8z(c2, s, xq2, ini2, &xs, y2, out, in, G, 1);
    tq1_gemv_a8_M(c1, s, xq1, giM, &xs, y1, out, in, G);
    tq1_gemv_a8_L(c1L, s, xq1, giL, &xs, yL, out, in, G);
    double e1 = 0, eL = 0, nrm = 0;
    for (int64_t o = 0; o < out; o++) { e1 = fmax(e1, fabs(y1[o] - y2[o])); eL = fmax(eL, fabs(yL[o] - y2[o])); nrm = fmax(nrm, fabs(y2[o])); }
    printf("threads %d, %ld x %ld, %ld matrices (tq2 %.1f MB, tq1 %.1f MB): max|M - tq2| %.1e, max|L - tq2| %.1e (max|y| %.2f)\n",
           omp_get_max_threads(), (long)out, (long)in, (long)nmat, nmat * out * in / 4e6, nmat * out * in / 5e6, e1, eL, nrm);
    if (!(e1 <= 1e-5 * nrm) || !(eL <= 1e-5 * nrm)) { fprintf(stderr, "tq1 probe: the tq1 kernels disagree with tq2_gemv_a8z\n"); return 1; }
    for (int round = 0; round < 3; round++) {
        double best[3] = {1e9, 1e9, 1e9};
        for (int64_t r = 0; r < reps; r++) {
            const int64_t mm = r % nmat;
            double t0 = now(); tq2_gemv_a8z(c2 + mm * out * in / 4, s, xq2, ini2, &xs, y2, out, in, G, 1);
            double t1 = now(); tq1_gemv_a8_M(c1 + mm * out * in / 5, s, xq1, giM, &xs, y1, out, in, G);
            double t2 = now(); tq1_gemv_a8_L(c1L + mm * out * in / 5, s, xq1, giL, &xs, yL, out, in, G);
            double t3 = now();
            best[0] = fmin(best[0], t1 - t0); best[1] = fmin(best[1], t2 - t1); best[2] = fmin(best[2], t3 - t2);
        }
        const double w = (double)out * in;
        printf("  tq2 a8z %.3f ms (%.1f Gw/s, %.1f GB/s) | tq1 M %.3f ms (%.1f Gw/s, %.1f GB/s) | tq1 L %.3f ms (%.1f Gw/s, %.1f GB/s)\n",
               best[0] * 1e3, w / best[0] / 1e9, w / 4 / best[0] / 1e9, best[1] * 1e3, w / best[1] / 1e9, w / 5 / best[1] / 1e9,
               best[2] * 1e3, w / best[2] / 1e9, w / 5 / best[2] / 1e9);
    }
    return 0;
}

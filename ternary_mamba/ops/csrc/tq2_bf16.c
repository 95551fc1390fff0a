// The paper's W1.58A16 on CPUs that have AVX512-BF16: ternary codes x bf16 activations (runtime/packed_linear.py,
// `use_bf16_activations`).  Not exact (x is rounded to bf16; every product t * x_bf16 and every sum is exact or
// fp32), ~1.4x the exact fp32 kernel's throughput: per 32 weights one multishift (code i to the low bits of
// 16-bit lane i), one vpermw through a {-1, 0, +1, 0} bf16 table and one vdpbf16ps, against four shuffles and two
// FMAs for fp32 activations.  Also the bf16 dequantization that prefill's bf16 GEMM uses.
#include <math.h>
#include <string.h>
#include "kernels.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define TQ2_BF16 1
#endif
#define CODE_PREFETCH_BF16 4096

int tq2_has_bf16(void) {
#ifdef TQ2_BF16
    return 1;
#else
    return 0;
#endif
}

void f32_to_bf16(const float *x, uint16_t *xb, int64_t n) {
    for (int64_t i = 0; i < n; i++) xb[i] = f2bf(x[i]);
}

#ifdef TQ2_BF16
// Rows k = 0..R-1 (R <= 4) of one block: y[k] = sum_g s[k, g] * sum_{i in g} t[k, i] * xb[i].
static inline __attribute__((always_inline)) void bf16_rows(int R, const uint8_t *rows, int64_t row_bytes, const float *srows, const uint16_t *xb,
                             int64_t ngroups, int64_t G, float *y) {
    const int64_t gbytes = G / 4;
    // byte 2i of each qword: the 8 bits at offset 2i of the broadcast code word (code i in its low 2 bits);
    // byte 2i + 1: ignored (vpermw reads the low 5 bits of each 16-bit index)
    const __m512i ctl = _mm512_set_epi8(
        0, 62, 0, 60, 0, 58, 0, 56, 0, 54, 0, 52, 0, 50, 0, 48, 0, 46, 0, 44, 0, 42, 0, 40, 0, 38, 0, 36, 0, 34, 0, 32,
        0, 30, 0, 28, 0, 26, 0, 24, 0, 22, 0, 20, 0, 18, 0, 16, 0, 14, 0, 12, 0, 10, 0, 8, 0, 6, 0, 4, 0, 2, 0, 0);
    const __m512i tbl = _mm512_set1_epi64(0x00003F800000BF80ll);   // bf16 {-1, 0, +1, 0}, period 4 over 32 entries
    __m512 acc_row[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < ngroups; g++) {
        const uint16_t *xg = xb + g * G;
        __m512 a[4][2];
        for (int k = 0; k < R; k++) {
            _mm_prefetch((const char *)rows + k * row_bytes + g * gbytes + CODE_PREFETCH_BF16, _MM_HINT_T1);
            a[k][0] = a[k][1] = _mm512_setzero_ps();
        }
        for (int64_t j = 0; j < gbytes; j += 16) {                  // 64 weights of each row
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xg + 4 * j);
            const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xg + 4 * j + 32);
            for (int k = 0; k < R; k++) {
                const uint8_t *p = rows + k * row_bytes + g * gbytes + j;
                uint64_t c0, c1;
                memcpy(&c0, p, 8);
                memcpy(&c1, p + 8, 8);
                const __m512i i0 = _mm512_multishift_epi64_epi8(ctl, _mm512_set1_epi64((long long)c0));
                const __m512i i1 = _mm512_multishift_epi64_epi8(ctl, _mm512_set1_epi64((long long)c1));
                a[k][0] = _mm512_dpbf16_ps(a[k][0], (__m512bh)_mm512_permutexvar_epi16(i0, tbl), x0);
                a[k][1] = _mm512_dpbf16_ps(a[k][1], (__m512bh)_mm512_permutexvar_epi16(i1, tbl), x1);
            }
        }
        for (int k = 0; k < R; k++)
            acc_row[k] = _mm512_fmadd_ps(_mm512_add_ps(a[k][0], a[k][1]), _mm512_set1_ps(srows[k * ngroups + g]),
                                         acc_row[k]);
    }
    for (int k = 0; k < R; k++) y[k] = _mm512_reduce_add_ps(acc_row[k]);
}
#endif

// codes (out, in/4) tq2; scales (out, in/G) fp32; xb (nb, in) bf16 bits; y (nb, out).  Requires G % 64 == 0.
void tq2_gemv_bf16(const uint8_t *codes, const float *scales, const uint16_t *xb, float *y,
                   int64_t out, int64_t in, int64_t G, int64_t nb) {
    const int64_t row_bytes = in / 4, ngroups = in / G, nblk = (out + 3) / 4;
    #pragma omp parallel for schedule(guided)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const int64_t o = 4 * blk, R = out - o < 4 ? out - o : 4;
        for (int64_t b = 0; b < nb; b++) {
            float r[4];
#ifdef TQ2_BF16
            if (R == 4)   // a constant row count: the accumulators stay in registers
                bf16_rows(4, codes + o * row_bytes, row_bytes, scales + o * ngroups, xb + b * in, ngroups, G, r);
            else
                bf16_rows((int)R, codes + o * row_bytes, row_bytes, scales + o * ngroups, xb + b * in, ngroups, G, r);
#else
            for (int64_t k = 0; k < R; k++) {         // portable: the same products, summed in another order
                const uint8_t *row = codes + (o + k) * row_bytes;
                float acc = 0.f;
                for (int64_t g = 0; g < ngroups; g++) {
                    float s = 0.f;
                    for (int64_t i = g * G; i < (g + 1) * G; i++)
                        s += (float)(((row[i / 4] >> (2 * (i % 4))) & 3) - 1) * bf2f(xb[b * in + i]);
                    acc += s * scales[(o + k) * ngroups + g];
                }
                r[k] = acc;
            }
#endif
            for (int64_t k = 0; k < R; k++) y[b * out + o + k] = r[k];
        }
    }
}

// w (out, in) bf16 bits = bf16(scale * t), rounded to nearest even: the weight prefill's bf16 GEMM reads.
void tq2_dequant_bf16(const uint8_t *codes, const float *scales, uint16_t *w, int64_t out, int64_t in, int64_t G) {
    const int64_t row_bytes = in / 4, ngroups = in / G;
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = codes + o * row_bytes;
        uint16_t *wr = w + o * in;
        for (int64_t g = 0; g < ngroups; g++) {
            const uint16_t pos = f2bf(scales[o * ngroups + g]), neg = pos ^ 0x8000u;
            int64_t i = g * G;
#ifdef TQ2_BF16
            // 16 weights per step: codes -> {-1, 0, +1} x scale in fp32 (exact), one rounding to bf16 (RNE, as f2bf)
            const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            const __m512 tbl = _mm512_setr_ps(-1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f,
                                              -1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f);
            const __m512 vs = _mm512_set1_ps(scales[o * ngroups + g]);
            for (; i + 16 <= (g + 1) * G; i += 16) {
                uint32_t c;
                memcpy(&c, row + i / 4, 4);
                const __m512 w = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32((int)c), sh), tbl), vs);
                _mm256_storeu_si256((__m256i *)(wr + i), (__m256i)_mm512_cvtneps_pbh(w));
            }
#endif
            const uint16_t val[4] = {neg, 0, pos, 0};
            for (; i < (g + 1) * G; i++) wr[i] = val[(row[i / 4] >> (2 * (i % 4))) & 3];
        }
    }
}

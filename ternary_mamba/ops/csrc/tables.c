// Quantized lookup tables (quant/tables.py): the 4-bit output head's GEMV and the row lookup of an fp32 / fp16 /
// int8 / q4 embedding.  q4: per row, groups of 32 values in 16 bytes (byte j: value j low nibble, value j + 16
// high nibble), w = (n - 8) * scale[g].
#include <math.h>
#include <string.h>
#include "kernels.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

static inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, mant = h & 1023;
    uint32_t bits;
    if (e == 0) {
        float f = (float)mant * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (e == 31) bits = sign | 0x7f800000u | (mant << 13);
    else bits = sign | ((e + 112) << 23) | (mant << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

// y (nb, out) = x (nb, in) . W^T, W the q4 table (out, in): per group sum_g s_g (sum_i n_i x_i - 8 sum_i x_i).
// xsum (nb, in / 32) is the per-group sum of x, computed here once for all rows.  Requires in % 32 == 0.
void q4_gemv(const uint8_t *q, const float *scale, const float *x, float *y, float *xsum,
             int64_t out, int64_t in, int64_t nb) {
    const int64_t ng = in / 32, rb = in / 2;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.f;
            for (int i = 0; i < 32; i++) s += x[b * in + 32 * g + i];
            xsum[b * ng + g] = 8.f * s;
        }
    #pragma omp parallel for schedule(guided)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = q + o * rb;
        const float *srow = scale + o * ng;
        for (int64_t b = 0; b < nb; b++) {
            const float *xx = x + b * in, *xs = xsum + b * ng;
            float acc = 0.f;
#ifdef __AVX2__
            const __m128i m4 = _mm_set1_epi8(15);
            __m256 accv = _mm256_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                const __m128i v = _mm_loadu_si128((const __m128i *)(row + 16 * g));
                const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
                const float *xg = xx + 32 * g;
#define Q4W(src, sh) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(src, sh)))
                __m256 a = _mm256_mul_ps(Q4W(lo, 0), _mm256_loadu_ps(xg));
                a = _mm256_fmadd_ps(Q4W(lo, 8), _mm256_loadu_ps(xg + 8), a);
                a = _mm256_fmadd_ps(Q4W(hi, 0), _mm256_loadu_ps(xg + 16), a);
                a = _mm256_fmadd_ps(Q4W(hi, 8), _mm256_loadu_ps(xg + 24), a);
#undef Q4W
                // the group's dot product minus 8 sum(x) (in lane 0), times its scale
                a = _mm256_sub_ps(a, _mm256_setr_ps(xs[g], 0, 0, 0, 0, 0, 0, 0));
                accv = _mm256_fmadd_ps(a, _mm256_set1_ps(srow[g]), accv);
            }
            acc = hsum8(accv);
#else
            for (int64_t g = 0; g < ng; g++) {
                float a = 0.f;
                for (int j = 0; j < 16; j++) {
                    const uint8_t c = row[16 * g + j];
                    a += (float)(c & 15) * xx[32 * g + j] + (float)(c >> 4) * xx[32 * g + 16 + j];
                }
                acc += (a - xs[g]) * srow[g];
            }
#endif
            y[b * out + o] = acc;
        }
    }
}

// out (n, d) = rows ids of a table: kind 0 fp32, 4 fp16, 3 int8 (scale per row), 5 q4 (scale per group of 32).
// The arithmetic of quant/tables.py's dequantize_table: one multiply per value.
void table_rows(int64_t kind, const void *w, const float *scale, const int64_t *ids, int64_t n, int64_t d, float *out) {
    for (int64_t r = 0; r < n; r++) {
        const int64_t t = ids[r];
        float *o = out + r * d;
        if (kind == 0) memcpy(o, (const float *)w + t * d, d * sizeof(float));
        else if (kind == 4)
            for (int64_t i = 0; i < d; i++) o[i] = h2f(((const uint16_t *)w)[t * d + i]);
        else if (kind == 3)
            for (int64_t i = 0; i < d; i++) o[i] = (float)((const int8_t *)w)[t * d + i] * scale[t];
        else {
            const uint8_t *row = (const uint8_t *)w + t * (d / 2);
            const float *s = scale + t * (d / 32);
            for (int64_t g = 0; g < d / 32; g++)
                for (int j = 0; j < 16; j++) {
                    const uint8_t c = row[16 * g + j];
                    o[32 * g + j] = (float)((int)(c & 15) - 8) * s[g];
                    o[32 * g + 16 + j] = (float)((int)(c >> 4) - 8) * s[g];
                }
        }
    }
}

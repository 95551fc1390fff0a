// Ternary matrix x vector products straight from 2-bit packed codes (tq2 layout, see ops/packing.py).
//   y[b, o] = sum_g s[o, g] * sum_{i in g} t[o, i] * x[b, i],   t in {-1, 0, +1}
// Codes of row o occupy in/4 bytes; each byte holds 4 codes (code + 1, 2 bits each, low bits first).
// A 256-entry table turns one byte into 4 floats; with AVX2 two bytes make one 8-wide FMA operand.
// Rows are split across OpenMP threads; a row's codes stay in L1 while all b rows of x use them.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

// Software prefetch of the codes this many bytes ahead (into L2).  Decode streams ~200 MB of codes per token at
// 1.3B; the compute-bound loop issued its loads too late for the hardware prefetchers: 30 -> 46 G weights/s over
// 48 layers' matrices (C harness, 2 threads, AVX-512 EPYC; 2, 4, 8 and 16 KB tried, 4-8 KB best; 8 KB kept, as for
// the dense GEMVs in lm_step.c).
#define CODE_PREFETCH 8192

static float LUT[256][4] __attribute__((aligned(16)));

// Filled once when the library is loaded (before any thread can call a kernel): no flag to race on.
__attribute__((constructor)) static void init_lut(void) {
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < 4; j++) LUT[b][j] = (float)(((b >> (2 * j)) & 3) - 1);
}

int tq2_has_avx2(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

static inline int load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return (int)v;
}

// One output row: sum_g s[g] * sum_{i in g} t[i] x[i].  Independent accumulators per group keep the FMA
// latency chain off the critical path.
static inline float tq2_row_dot(const uint8_t *row, const float *srow, const float *x, int64_t ngroups,
                                int64_t G) {
    const int64_t gbytes = G / 4;
#ifdef __AVX512F__
    if (G % 16 == 0) {
        // 16 codes per 32-bit broadcast; permutexvar reads the low 4 bits of each lane, so the table repeats
        // {-1, 0, +1, -} four times and the neighbouring code's bits are ignored.  Two accumulators, a0 for
        // code words 0, 2, 4, ... of the group and a1 for 1, 3, 5, ...: tq2_rows4_dot uses the same order.
        const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512 tbl = _mm512_setr_ps(-1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f,
                                          -1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f);
        __m512 acc_row = _mm512_setzero_ps();
        for (int64_t g = 0; g < ngroups; g++) {
            const uint8_t *p = row + g * gbytes;
            const float *xg = x + g * G;
            _mm_prefetch((const char *)p + CODE_PREFETCH, _MM_HINT_T1);
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            int64_t j = 0;
#define TQ2_W16(off) _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(load_u32(p + j + (off))), sh), tbl)
            for (; j + 8 <= gbytes; j += 8) {         // 32 weights
                a0 = _mm512_fmadd_ps(TQ2_W16(0), _mm512_loadu_ps(xg + 4 * j), a0);
                a1 = _mm512_fmadd_ps(TQ2_W16(4), _mm512_loadu_ps(xg + 4 * j + 16), a1);
            }
            for (; j < gbytes; j += 4) a0 = _mm512_fmadd_ps(TQ2_W16(0), _mm512_loadu_ps(xg + 4 * j), a0);
#undef TQ2_W16
            acc_row = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(srow[g]), acc_row);
        }
        return _mm512_reduce_add_ps(acc_row);
    }
#endif
#ifdef __AVX2__
    // 16 codes = 32 bits: broadcast, shift each lane to its code and map {0,1,2} -> {-1,0,+1} with an
    // in-register table (permutevar), then FMA.  No memory table: two loads per 8 weights (codes, x).
    const __m256i sh_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i sh_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    // permutevar reads only the low 3 bits of each lane: bit 2 (the next code's low bit) is ignored by
    // repeating the table, so no mask is needed (code 3 never occurs).
    const __m256 tbl = _mm256_setr_ps(-1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f);
    __m256 acc_row = _mm256_setzero_ps();
    for (int64_t g = 0; g < ngroups; g++) {
        const uint8_t *p = row + g * gbytes;
        const float *xg = x + g * G;
        _mm_prefetch((const char *)p + CODE_PREFETCH, _MM_HINT_T1);
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= gbytes; j += 8) {       // 32 weights
            uint32_t c0, c1;
            memcpy(&c0, p + j, 4);
            memcpy(&c1, p + j + 4, 4);
            const __m256i b0 = _mm256_set1_epi32((int)c0), b1 = _mm256_set1_epi32((int)c1);
            const __m256 w0 = _mm256_permutevar8x32_ps(tbl, _mm256_srlv_epi32(b0, sh_lo));
            const __m256 w1 = _mm256_permutevar8x32_ps(tbl, _mm256_srlv_epi32(b0, sh_hi));
            const __m256 w2 = _mm256_permutevar8x32_ps(tbl, _mm256_srlv_epi32(b1, sh_lo));
            const __m256 w3 = _mm256_permutevar8x32_ps(tbl, _mm256_srlv_epi32(b1, sh_hi));
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg + 4 * j), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 4 * j + 8), a1);
            a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xg + 4 * j + 16), a2);
            a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xg + 4 * j + 24), a3);
        }
        for (; j < gbytes; j += 2) {            // 8 weights
            const __m256i b0 = _mm256_set1_epi32((int)(p[j] | (p[j + 1] << 8)));
            const __m256 w0 = _mm256_permutevar8x32_ps(tbl, _mm256_srlv_epi32(b0, sh_lo));
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg + 4 * j), a0);
        }
        const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        acc_row = _mm256_fmadd_ps(a, _mm256_set1_ps(srow[g]), acc_row);
    }
    return hsum8(acc_row);
#else
    float res = 0.f;
    for (int64_t g = 0; g < ngroups; g++) {
        float acc = 0.f;
        const uint8_t *p = row + g * gbytes;
        const float *xg = x + g * G;
        for (int64_t j = 0; j < gbytes; j++) {
            const float *w = LUT[p[j]];
            acc += w[0] * xg[4 * j] + w[1] * xg[4 * j + 1] + w[2] * xg[4 * j + 2] + w[3] * xg[4 * j + 3];
        }
        res += acc * srow[g];
    }
    return res;
#endif
}

#ifdef __AVX512F__
// Four output rows at once, each with exactly tq2_row_dot's arithmetic (same accumulators, same order, so the
// same bits): every x vector is loaded once for the four rows.  The single-row loop is bound by its loads
// (a code broadcast and an x vector per 16 weights); sharing x makes decode's ternary GEMVs 1.35-1.5x faster
// (C harness, 130m in_proj shape, interleaved A/B).  Requires G % 32 == 0.  y[k] = row k's product.
static inline void tq2_rows4_dot(const uint8_t *rows, int64_t row_bytes, const float *srows, const float *x,
                                 int64_t ngroups, int64_t G, float *y) {
    const int64_t gbytes = G / 4;
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512 tbl = _mm512_setr_ps(-1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f,
                                      -1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f);
    __m512 acc_row[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < ngroups; g++) {
        const float *xg = x + g * G;
        for (int k = 0; k < 4; k++) _mm_prefetch((const char *)rows + k * row_bytes + g * gbytes + CODE_PREFETCH, _MM_HINT_T1);
        __m512 a[4][2];
        for (int k = 0; k < 4; k++) a[k][0] = a[k][1] = _mm512_setzero_ps();
        for (int64_t j = 0; j < gbytes; j += 8)           // 32 weights of each row
            for (int i = 0; i < 2; i++) {                 // accumulator i: code word j + 4i
                const __m512 xv = _mm512_loadu_ps(xg + 4 * j + 16 * i);
                for (int k = 0; k < 4; k++) {
                    const uint8_t *p = rows + k * row_bytes + g * gbytes + j + 4 * i;
                    const __m512 w = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(load_u32(p)), sh), tbl);
                    a[k][i] = _mm512_fmadd_ps(w, xv, a[k][i]);
                }
            }
        for (int k = 0; k < 4; k++)
            acc_row[k] = _mm512_fmadd_ps(_mm512_add_ps(a[k][0], a[k][1]), _mm512_set1_ps(srows[k * ngroups + g]), acc_row[k]);
    }
    for (int k = 0; k < 4; k++) y[k] = _mm512_reduce_add_ps(acc_row[k]);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// Two output rows at once with exactly tq2_row_dot's AVX2 arithmetic (same four accumulators per group, same order,
// so the same bits): every x vector is loaded once for both rows, and the two rows' eight FMA chains overlap.
// 1.10x the single-row loop (C harness, 1.3B in_proj shape, one Zen 3 core: 10.0 -> 11.1 G weights/s; four rows
// spill the 16 ymm registers and were slower).  Requires G % 32 == 0.
static inline void tq2_rows2_dot(const uint8_t *rows, int64_t row_bytes, const float *srows, const float *x,
                                 int64_t ngroups, int64_t G, float *y) {
    const int64_t gbytes = G / 4;
    const __m256i sh_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i sh_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    const __m256 tbl = _mm256_setr_ps(-1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f);
    __m256 acc_row[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < ngroups; g++) {
        const float *xg = x + g * G;
        for (int k = 0; k < 2; k++) _mm_prefetch((const char *)rows + k * row_bytes + g * gbytes + CODE_PREFETCH, _MM_HINT_T1);
        __m256 a[2][4];
        for (int k = 0; k < 2; k++) a[k][0] = a[k][1] = a[k][2] = a[k][3] = _mm256_setzero_ps();
        for (int64_t j = 0; j < gbytes; j += 8)           // 32 weights of each row
            for (int i = 0; i < 4; i++) {                 // accumulator i: weights 8i..8i+7 of the 32
                const __m256 xv = _mm256_loadu_ps(xg + 4 * j + 8 * i);
                for (int k = 0; k < 2; k++) {
                    const __m256i b = _mm256_set1_epi32(load_u32(rows + k * row_bytes + g * gbytes + j + 4 * (i / 2)));
                    a[k][i] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(tbl, _mm256_srlv_epi32(b, (i % 2) ? sh_hi : sh_lo)),
                                              xv, a[k][i]);
                }
            }
        for (int k = 0; k < 2; k++)
            acc_row[k] = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(a[k][0], a[k][1]), _mm256_add_ps(a[k][2], a[k][3])),
                                         _mm256_set1_ps(srows[k * ngroups + g]), acc_row[k]);
    }
    for (int k = 0; k < 2; k++) y[k] = hsum8(acc_row[k]);
}
#endif

// codes (out, in/4) uint8; scales (out, in/G) fp32; x (nb, in); y (nb, out).  Requires in % G == 0, G % 8 == 0.
void tq2_gemv(const uint8_t *codes, const float *scales, const float *x, float *y,
              int64_t out, int64_t in, int64_t G, int64_t nb) {
    const int64_t row_bytes = in / 4, ngroups = in / G;
#ifdef __AVX512F__
    if (G % 32 == 0) {
        const int64_t nblk = (out + 3) / 4;
        #pragma omp parallel for schedule(guided)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t o = 4 * blk;
            for (int64_t b = 0; b < nb; b++) {
                if (o + 4 <= out) {
                    float r[4];
                    tq2_rows4_dot(codes + o * row_bytes, row_bytes, scales + o * ngroups, x + b * in, ngroups, G, r);
                    for (int k = 0; k < 4; k++) y[b * out + o + k] = r[k];
                } else
                    for (int64_t k = o; k < out; k++)
                        y[b * out + k] = tq2_row_dot(codes + k * row_bytes, scales + k * ngroups, x + b * in, ngroups, G);
            }
        }
        return;
    }
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
    if (G % 32 == 0) {
        const int64_t npair = (out + 1) / 2;
        #pragma omp parallel for schedule(guided)
        for (int64_t pr = 0; pr < npair; pr++) {
            const int64_t o = 2 * pr;
            for (int64_t b = 0; b < nb; b++) {
                if (o + 2 <= out) {
                    float r[2];
                    tq2_rows2_dot(codes + o * row_bytes, row_bytes, scales + o * ngroups, x + b * in, ngroups, G, r);
                    y[b * out + o] = r[0];
                    y[b * out + o + 1] = r[1];
                } else
                    y[b * out + o] = tq2_row_dot(codes + o * row_bytes, scales + o * ngroups, x + b * in, ngroups, G);
            }
        }
        return;
    }
#endif
    #pragma omp parallel for schedule(guided)
    for (int64_t o = 0; o < out; o++)
        for (int64_t b = 0; b < nb; b++)
            y[b * out + o] = tq2_row_dot(codes + o * row_bytes, scales + o * ngroups, x + b * in, ngroups, G);
}

// Dequantize a whole tq2 matrix into w (out, in) fp32: w = t * s, bit-identical to the fake-quant weight.
void tq2_dequant(const uint8_t *codes, const float *scales, float *w, int64_t out, int64_t in, int64_t G) {
    const int64_t row_bytes = in / 4, ngroups = in / G, gbytes = G / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = codes + o * row_bytes;
        float *wr = w + o * in;
        for (int64_t g = 0; g < ngroups; g++) {
            const float s = scales[o * ngroups + g];
            const uint8_t *p = row + g * gbytes;
            float *d = wr + g * G;
            int64_t j = 0;
#ifdef __AVX512F__
            const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            const __m512 tbl = _mm512_setr_ps(-1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f,
                                              -1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f);
            const __m512 vs = _mm512_set1_ps(s);
            for (; j + 4 <= gbytes; j += 4)        // 16 weights
                _mm512_storeu_ps(d + 4 * j, _mm512_mul_ps(_mm512_permutexvar_ps(
                    _mm512_srlv_epi32(_mm512_set1_epi32(load_u32(p + j)), sh), tbl), vs));
#elif defined(__AVX2__)
            const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
            const __m256 tbl = _mm256_setr_ps(-1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f);
            const __m256 vs = _mm256_set1_ps(s);
            for (; j + 2 <= gbytes; j += 2)        // 8 weights
                _mm256_storeu_ps(d + 4 * j, _mm256_mul_ps(_mm256_permutevar8x32_ps(
                    tbl, _mm256_srlv_epi32(_mm256_set1_epi32(p[j] | (p[j + 1] << 8)), sh)), vs));
#endif
            for (; j < gbytes; j++) {
                const float *l = LUT[p[j]];
                d[4 * j] = l[0] * s; d[4 * j + 1] = l[1] * s; d[4 * j + 2] = l[2] * s; d[4 * j + 3] = l[3] * s;
            }
        }
    }
}

// ---- 8-bit-activation variant (opt-in; what llama.cpp's TQ2_0 does): x is quantized per row to int8 with one
// absmax scale, then sum_i t_i x_i = sum_i (t_i + 1) q_i - sum_i q_i is computed in integers per group.
// Requires G % 128 == 0.  xq (nb, in) int8 in the "deinterleaved" order below, xs (nb) scales, qsum (nb, in/G).
// Within each 128-element chunk, byte i of a 32-byte code block holds elements 4i+0..4i+3 (2 bits each), so
// xq stores the chunk as [x[4i] for i<32] [x[4i+1] ...] [x[4i+2] ...] [x[4i+3] ...].
void tq2_quantize_x(const float *x, int8_t *xq, float *xs, int32_t *qsum, int64_t in, int64_t G, int64_t nb) {
    for (int64_t b = 0; b < nb; b++) {
        const float *xr = x + b * in;
        const float m = absmax_f32(xr, in);
        const float inv = m > 0.f ? 127.f / m : 0.f;
        xs[b] = m / 127.f;
        int8_t *q = xq + b * in;
        for (int64_t c = 0; c < in; c += 128)
            for (int64_t i = 0; i < 32; i++)
                for (int64_t j = 0; j < 4; j++)
                    q[c + 32 * j + i] = (int8_t)lrintf(xr[c + 4 * i + j] * inv);
        for (int64_t g = 0; g < in / G; g++) {
            int32_t s = 0;
            for (int64_t i = 0; i < G; i++) s += q[g * G + i];
            qsum[b * (in / G) + g] = s;
        }
    }
}

void tq2_gemv_a8(const uint8_t *codes, const float *scales, const int8_t *xq, const float *xs, const int32_t *qsum,
                 float *y, int64_t out, int64_t in, int64_t G, int64_t nb) {
    const int64_t row_bytes = in / 4, ngroups = in / G, chunks = G / 128;
    #pragma omp parallel for schedule(guided)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = codes + o * row_bytes;
        const float *srow = scales + o * ngroups;
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *q = xq + b * in;
            const int32_t *qs = qsum + b * ngroups;
#ifdef __AVX2__
            // per group: int16 sums of 4 maddubs (|.| <= 4 * 2 * 2 * 127), widened once per chunk; the group's
            // integer total (minus qsum, in lane 0) is scaled in 8 float lanes; one horizontal sum per row.
            const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
            __m256 accf = _mm256_setzero_ps();
            for (int64_t g = 0; g < ngroups; g++) {
                if (b == 0) _mm_prefetch((const char *)row + g * (G / 4) + CODE_PREFETCH, _MM_HINT_T1);
                __m256i acc = _mm256_castsi128_si256(_mm_cvtsi32_si128(-qs[g]));
                acc = _mm256_permute2x128_si256(acc, acc, 0x08);   // keep lane 0 of the low half only
                for (int64_t c = 0; c < chunks; c++) {
                    const int64_t e0 = (g * chunks + c) * 128;
                    const __m256i packed = _mm256_loadu_si256((const __m256i *)(row + e0 / 4));
                    const int8_t *qc = q + e0;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                    // VNNI: u8 x s8 dot products of 4 accumulated straight into int32 lanes
                    acc = _mm256_dpbusd_epi32(acc, _mm256_and_si256(packed, m3), _mm256_loadu_si256((const __m256i *)qc));
                    acc = _mm256_dpbusd_epi32(acc, _mm256_and_si256(_mm256_srli_epi16(packed, 2), m3),
                                              _mm256_loadu_si256((const __m256i *)(qc + 32)));
                    acc = _mm256_dpbusd_epi32(acc, _mm256_and_si256(_mm256_srli_epi16(packed, 4), m3),
                                              _mm256_loadu_si256((const __m256i *)(qc + 64)));
                    acc = _mm256_dpbusd_epi32(acc, _mm256_and_si256(_mm256_srli_epi16(packed, 6), m3),
                                              _mm256_loadu_si256((const __m256i *)(qc + 96)));
                    (void)ones;
#else
                    const __m256i s0 = _mm256_maddubs_epi16(_mm256_and_si256(packed, m3),
                                                            _mm256_loadu_si256((const __m256i *)qc));
                    const __m256i s1 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(packed, 2), m3),
                                                            _mm256_loadu_si256((const __m256i *)(qc + 32)));
                    const __m256i s2 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(packed, 4), m3),
                                                            _mm256_loadu_si256((const __m256i *)(qc + 64)));
                    const __m256i s3 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(packed, 6), m3),
                                                            _mm256_loadu_si256((const __m256i *)(qc + 96)));
                    const __m256i s16 = _mm256_add_epi16(_mm256_add_epi16(s0, s1), _mm256_add_epi16(s2, s3));
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s16, ones));
#endif
                }
                accf = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(srow[g]), accf);
            }
            y[b * out + o] = hsum8(accf) * xs[b];
#else
            float acc = 0.f;
            for (int64_t g = 0; g < ngroups; g++) {
                int32_t s = 0;
                for (int64_t c = 0; c < chunks; c++) {
                    const int64_t e0 = (g * chunks + c) * 128;
                    const uint8_t *p = row + e0 / 4;
                    const int8_t *qc = q + e0;
                    for (int64_t i = 0; i < 32; i++)
                        for (int j = 0; j < 4; j++) s += (int32_t)((p[i] >> (2 * j)) & 3) * qc[32 * j + i];
                }
                acc += srow[g] * (float)(s - qs[g]);
            }
            y[b * out + o] = acc * xs[b];
#endif
        }
    }
}

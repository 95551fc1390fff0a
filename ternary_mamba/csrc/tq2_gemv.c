// Ternary matrix x vector products straight from 2-bit packed codes (tq2 layout, see quant/packing.py).
//   y[b, o] = sum_g s[o, g] * sum_{i in g} t[o, i] * x[b, i],   t in {-1, 0, +1}
// Codes of row o occupy in/4 bytes; each byte holds 4 codes (code + 1, 2 bits each, low bits first).
// A 256-entry table turns one byte into 4 floats; with AVX2 two bytes make one 8-wide FMA operand.
// Rows are split across OpenMP threads; the packed weights are read once per call for all b rows of x.
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static float LUT[256][4] __attribute__((aligned(16)));
static int lut_ready = 0;

static void init_lut(void) {
    if (lut_ready) return;
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < 4; j++) LUT[b][j] = (float)(((b >> (2 * j)) & 3) - 1);
    lut_ready = 1;
}

int tq2_has_avx2(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

#define MAXB 8

// codes (out, in/4) uint8; scales (out, in/G) fp32; x (nb, in); y (nb, out).  Requires in % G == 0, G % 8 == 0.
void tq2_gemv(const uint8_t *codes, const float *scales, const float *x, float *y,
              int64_t out, int64_t in, int64_t G, int64_t nb) {
    init_lut();
    const int64_t row_bytes = in / 4, ngroups = in / G, gbytes = G / 4;
    for (int64_t b0 = 0; b0 < nb; b0 += MAXB) {
        const int64_t bn = nb - b0 < MAXB ? nb - b0 : MAXB;
        #pragma omp parallel for schedule(static)
        for (int64_t o = 0; o < out; o++) {
            const uint8_t *row = codes + o * row_bytes;
            const float *srow = scales + o * ngroups;
            float res[MAXB] = {0};
#ifdef __AVX2__
            __m256 acc_row[MAXB];
            for (int64_t k = 0; k < bn; k++) acc_row[k] = _mm256_setzero_ps();
            for (int64_t g = 0; g < ngroups; g++) {
                __m256 acc[MAXB];
                for (int64_t k = 0; k < bn; k++) acc[k] = _mm256_setzero_ps();
                const uint8_t *p = row + g * gbytes;
                const int64_t i0 = g * G;
                for (int64_t j = 0; j < gbytes; j += 2) {
                    __m256 w = _mm256_set_m128(_mm_load_ps(LUT[p[j + 1]]), _mm_load_ps(LUT[p[j]]));
                    for (int64_t k = 0; k < bn; k++)
                        acc[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (b0 + k) * in + i0 + 4 * j), acc[k]);
                }
                __m256 s = _mm256_set1_ps(srow[g]);
                for (int64_t k = 0; k < bn; k++) acc_row[k] = _mm256_fmadd_ps(acc[k], s, acc_row[k]);
            }
            for (int64_t k = 0; k < bn; k++) {
                __m128 lo = _mm256_castps256_ps128(acc_row[k]), hi = _mm256_extractf128_ps(acc_row[k], 1);
                lo = _mm_add_ps(lo, hi);
                lo = _mm_hadd_ps(lo, lo);
                lo = _mm_hadd_ps(lo, lo);
                res[k] = _mm_cvtss_f32(lo);
            }
#else
            for (int64_t g = 0; g < ngroups; g++) {
                float acc[MAXB] = {0};
                const uint8_t *p = row + g * gbytes;
                const int64_t i0 = g * G;
                for (int64_t j = 0; j < gbytes; j++) {
                    const float *w = LUT[p[j]];
                    for (int64_t k = 0; k < bn; k++) {
                        const float *xx = x + (b0 + k) * in + i0 + 4 * j;
                        acc[k] += w[0] * xx[0] + w[1] * xx[1] + w[2] * xx[2] + w[3] * xx[3];
                    }
                }
                for (int64_t k = 0; k < bn; k++) res[k] += acc[k] * srow[g];
            }
#endif
            for (int64_t k = 0; k < bn; k++) y[(b0 + k) * out + o] = res[k];
        }
    }
}

// Dequantize a whole tq2 matrix into w (out, in) fp32: w = t * s, bit-identical to the fake-quant weight.
void tq2_dequant(const uint8_t *codes, const float *scales, float *w, int64_t out, int64_t in, int64_t G) {
    init_lut();
    const int64_t row_bytes = in / 4, ngroups = in / G;
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = codes + o * row_bytes;
        float *wr = w + o * in;
        for (int64_t i = 0; i < in; i += 4) {
            const float s = scales[o * ngroups + i / G];
            const float *l = LUT[row[i / 4]];
            wr[i] = l[0] * s; wr[i + 1] = l[1] * s; wr[i + 2] = l[2] * s; wr[i + 3] = l[3] * s;
        }
    }
}

// One recurrent SSD step, in place on the state, one pass over it:
//   state[b,h,p,:] = state * dA[b,h] + (dt[b,h] * x[b,h,p]) * B[b,g(h),:];   y[b,h,p] = state[b,h,p,:] . C[b,g(h),:]
void ssd_step_inplace(float *state, const float *x, const float *dt, const float *dA, const float *B, const float *C,
                      float *y, int64_t nb, int64_t nh, int64_t hp, int64_t ng, int64_t n) {
    const int64_t heads_per_group = nh / ng;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t h = 0; h < nh; h++) {
            const int64_t g = h / heads_per_group;
            const float *Bv = B + (b * ng + g) * n, *Cv = C + (b * ng + g) * n;
            const float a = dA[b * nh + h], d = dt[b * nh + h];
            for (int64_t p = 0; p < hp; p++) {
                float *s = state + ((b * nh + h) * hp + p) * n;
                const float u = d * x[(b * nh + h) * hp + p];
                float acc = 0.f;
                for (int64_t k = 0; k < n; k++) {
                    const float v = s[k] * a + u * Bv[k];
                    s[k] = v;
                    acc += v * Cv[k];
                }
                y[(b * nh + h) * hp + p] = acc;
            }
        }
    }
}

// y (nb, out) = x (nb, in) . (w int8 (out, in) * scale[out])^T : the 8-bit embedding/head at inference.
void i8_gemv(const int8_t *w, const float *scale, const float *x, float *y, int64_t out, int64_t in, int64_t nb) {
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const int8_t *row = w + o * in;
        for (int64_t b = 0; b < nb; b++) {
            const float *xx = x + b * in;
            float acc = 0.f;
#ifdef __AVX2__
            __m256 a = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 8 <= in; i += 8) {
                __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + i))));
                a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xx + i), a);
            }
            __m128 lo = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            lo = _mm_hadd_ps(lo, lo);
            lo = _mm_hadd_ps(lo, lo);
            acc = _mm_cvtss_f32(lo);
            for (; i < in; i++) acc += row[i] * xx[i];
#else
            for (int64_t i = 0; i < in; i++) acc += row[i] * xx[i];
#endif
            y[b * out + o] = acc * scale[o];
        }
    }
}

// One recurrent step of a Mamba-2 mixer between its two projections, fused (reference: Mamba2Mixer.step):
//   zxbcdt (nb, d_inner + conv_dim + nh) -> z | xBC | dt;  causal depthwise conv over [conv_state, xBC] (+ bias),
//   silu;  x | B | C;  dt = softplus(dt + dt_bias);  S = exp(dt A) S + dt x B^T;  y = S C + D x;
//   y = rmsnorm_per_group(y * silu(z)) * norm_w.  conv_state (nb, conv_dim, K-1) and ssm_state
//   (nb, nh, P, N) are updated in place; y (nb, d_inner) is written.  conv_b may be NULL.
static inline float silu_f(float v) { return v / (1.f + expf(-v)); }
static inline float softplus_f(float v) { return v > 20.f ? v : log1pf(expf(v)); }

void mixer_step_inplace(const float *zxbcdt, float *conv_state, const float *conv_w, const float *conv_b,
                        const float *dt_bias, const float *A_log, const float *Dp, const float *norm_w,
                        float *ssm_state, float *y, float *work,
                        int64_t nb, int64_t d_inner, int64_t ng, int64_t n, int64_t nh, int64_t hp, int64_t K,
                        float eps) {
    const int64_t conv_dim = d_inner + 2 * ng * n, d_in = d_inner + conv_dim + nh, heads_per_group = nh / ng;
    for (int64_t b = 0; b < nb; b++) {
        const float *row = zxbcdt + b * d_in, *z = row, *xbc = row + d_inner, *dtr = row + d_inner + conv_dim;
        float *cs = conv_state + b * conv_dim * (K - 1), *u = work;      // u: conv output after silu
        for (int64_t c = 0; c < conv_dim; c++) {
            float *s = cs + c * (K - 1);
            const float *w = conv_w + c * K;
            float acc = conv_b ? conv_b[c] : 0.f;
            for (int64_t k = 0; k < K - 1; k++) acc += w[k] * s[k];
            acc += w[K - 1] * xbc[c];
            for (int64_t k = 0; k + 1 < K - 1; k++) s[k] = s[k + 1];
            if (K > 1) s[K - 2] = xbc[c];
            u[c] = silu_f(acc);
        }
        const float *x = u, *B = u + d_inner, *C = u + d_inner + ng * n;
        float *yb = y + b * d_inner;
        #pragma omp parallel for schedule(static)
        for (int64_t h = 0; h < nh; h++) {
            const int64_t g = h / heads_per_group;
            const float dt = softplus_f(dtr[h] + dt_bias[h]);
            const float a = expf(-expf(A_log[h]) * dt);
            const float *Bv = B + g * n, *Cv = C + g * n;
            for (int64_t p = 0; p < hp; p++) {
                float *s = ssm_state + ((b * nh + h) * hp + p) * n;
                const float xv = x[h * hp + p], uu = dt * xv;
                float acc = 0.f;
                for (int64_t k = 0; k < n; k++) {
                    const float v = s[k] * a + uu * Bv[k];
                    s[k] = v;
                    acc += v * Cv[k];
                }
                yb[h * hp + p] = (acc + Dp[h] * xv) * silu_f(z[h * hp + p]);
            }
        }
        const int64_t gs = d_inner / ng;
        for (int64_t g = 0; g < ng; g++) {
            float ss = 0.f;
            for (int64_t i = 0; i < gs; i++) ss += yb[g * gs + i] * yb[g * gs + i];
            const float r = 1.f / sqrtf(ss / (float)gs + eps);
            for (int64_t i = 0; i < gs; i++) yb[g * gs + i] *= r * norm_w[g * gs + i];
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
        float m = 0.f;
        for (int64_t i = 0; i < in; i++) m = fmaxf(m, fabsf(xr[i]));
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
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = codes + o * row_bytes;
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *q = xq + b * in;
            float acc = 0.f;
            for (int64_t g = 0; g < ngroups; g++) {
                int32_t s = 0;
                for (int64_t c = 0; c < chunks; c++) {
                    const int64_t e0 = (g * chunks + c) * 128;           // first element of this chunk
                    const uint8_t *p = row + e0 / 4;
                    const int8_t *qc = q + e0;
#ifdef __AVX2__
                    const __m256i packed = _mm256_loadu_si256((const __m256i *)p), m3 = _mm256_set1_epi8(3);
                    const __m256i ones = _mm256_set1_epi16(1);
                    __m256i sum = _mm256_setzero_si256();
                    for (int j = 0; j < 4; j++) {
                        const __m256i u = _mm256_and_si256(_mm256_srli_epi16(packed, 2 * j), m3);
                        const __m256i xv = _mm256_loadu_si256((const __m256i *)(qc + 32 * j));
                        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), ones));
                    }
                    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
                    t = _mm_hadd_epi32(t, t);
                    t = _mm_hadd_epi32(t, t);
                    s += _mm_cvtsi128_si32(t);
#else
                    for (int64_t i = 0; i < 32; i++)
                        for (int j = 0; j < 4; j++) s += (int32_t)((p[i] >> (2 * j)) & 3) * qc[32 * j + i];
#endif
                }
                acc += scales[o * ngroups + g] * (float)(s - qsum[b * ngroups + g]);
            }
            y[b * out + o] = acc * xs[b];
        }
    }
}

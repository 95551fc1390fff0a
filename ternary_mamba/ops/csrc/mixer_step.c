// A Mamba-2 mixer's whole recurrent step between its projections, in one call (conv, SSM step, gated norm).
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#include "vec16.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

// One recurrent step of a Mamba-2 mixer between its two projections, fused (reference: Mamba2Mixer.step):
//   zxbcdt (nb, d_inner + conv_dim + nh) -> z | xBC | dt;  causal depthwise conv over [conv_state, xBC] (+ bias),
//   silu;  x | B | C;  dt = softplus(dt + dt_bias);  S = exp(dt A) S + dt x B^T;  y = S C + D x;
//   y = rmsnorm_per_group(y * silu(z)) * norm_w.  conv_state (nb, conv_dim, K-1) and ssm_state
//   (nb, nh, P, N) are updated in place; y (nb, d_inner) is written.  conv_b may be NULL.
static inline float silu_f(float v) { return v / (1.f + expf(-v)); }
static inline float softplus_f(float v) { return v > 20.f ? v : log1pf(expf(v)); }

// silu of n values: VW lanes at a time through vec16.h's exp (~1 ulp from expf), the tail by silu_f.  At 1.3B a
// step takes ~400 k silu (conv outputs and gates): 1.2 ms per token one value at a time through libm's expf.
static void silu_span(const float *in, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + VW <= n; i += VW) {
        const vw v = vwload(in + i);
        vwstore(out + i, v / (1.f + vwexp(-v)));
    }
    for (; i < n; i++) out[i] = silu_f(in[i]);
}

#ifdef __AVX2__
// fp32 bit patterns b -> b rounded to nearest even at bit 16 (finite values): the bf16 value is the high half.
static inline __m256i bf16_rne_bits(__m256i b) {
    return _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1))));
}
#endif

// s = s * a + u * B (in place), returns s . C — one pass over a state row of n floats.
static inline float state_update_dot(float *s, float a, float u, const float *B, const float *C, int64_t n) {
    float acc = 0.f;
    int64_t k = 0;
#ifdef __AVX2__
    const __m256 va = _mm256_set1_ps(a), vu = _mm256_set1_ps(u);
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    for (; k + 16 <= n; k += 16) {
        const __m256 v0 = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(s + k), va), _mm256_mul_ps(vu, _mm256_loadu_ps(B + k)));
        const __m256 v1 = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(s + k + 8), va),
                                        _mm256_mul_ps(vu, _mm256_loadu_ps(B + k + 8)));
        _mm256_storeu_ps(s + k, v0);
        _mm256_storeu_ps(s + k + 8, v1);
        c0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(C + k), c0);
        c1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(C + k + 8), c1);
    }
    const __m256 c = _mm256_add_ps(c0, c1);
    acc = hsum8(c);
#endif
    for (; k < n; k++) {
        const float v = s[k] * a + u * B[k];
        s[k] = v;
        acc += v * C[k];
    }
    return acc;
}

// The same with the state stored in bf16 (opt-in, decode only: half the state's bytes, the largest read after the
// weights at 1.3B).  The arithmetic stays fp32 in registers; each updated value is rounded to nearest even once,
// when written back: s_bf16 <- bf16(fp32(s_bf16) * a + u * B), y = the fp32 values' dot with C (before rounding).
static inline float state_update_dot_bf16(uint16_t *s, float a, float u, const float *B, const float *C, int64_t n) {
    float acc = 0.f;
    int64_t k = 0;
#ifdef __AVX512F__
    const __m512 va = _mm512_set1_ps(a), vu = _mm512_set1_ps(u);
    __m512 c0 = _mm512_setzero_ps();
    for (; k + 16 <= n; k += 16) {
        const __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + k))), 16));
        const __m512 v = _mm512_add_ps(_mm512_mul_ps(sv, va), _mm512_mul_ps(vu, _mm512_loadu_ps(B + k)));
#if defined(__AVX512BF16__)
        _mm256_storeu_si256((__m256i *)(s + k), (__m256i)_mm512_cvtneps_pbh(v));
#else   // round to nearest even in integers (finite values; a NaN state is already lost)
        const __m512i b = _mm512_castps_si512(v);
        const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                               _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
        _mm256_storeu_si256((__m256i *)(s + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
#endif
        c0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(C + k), c0);
    }
    acc = _mm512_reduce_add_ps(c0);
#elif defined(__AVX2__)
    // 8 values per step: widen by a shift, round to nearest even in integers, pack back (packus per 128-bit lane,
    // then one 64-bit permute puts the 8 results in order)
    const __m256 va = _mm256_set1_ps(a), vu = _mm256_set1_ps(u);
    __m256 c0 = _mm256_setzero_ps();
    for (; k + 8 <= n; k += 8) {
        const __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + k))), 16));
        const __m256 v = _mm256_add_ps(_mm256_mul_ps(sv, va), _mm256_mul_ps(vu, _mm256_loadu_ps(B + k)));
        const __m256i r = _mm256_srli_epi32(bf16_rne_bits(_mm256_castps_si256(v)), 16);
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
        _mm_storeu_si128((__m128i *)(s + k), _mm256_castsi256_si128(p));
        c0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(C + k), c0);
    }
    acc = hsum8(c0);
#endif
    for (; k < n; k++) {
        const float v = bf2f(s[k]) * a + u * B[k];
        s[k] = f2bf(v);
        acc += v * C[k];
    }
    return acc;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define BF16_EO 1
#define BF16_EO4 1
// vcvtne2ps2bf16's [16 even | 16 odd] words back to element order (vpermw indices)
static const uint16_t EO_ORDER[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
// The bf16 state row with B and C split into even and odd elements ([B0 B2 ... | B1 B3 ...], split_eo): 32 state
// values per load, widened by one shift (even) and one mask (odd) instead of a zero-extension per 16, rounded
// back by one vcvtne2ps2bf16 and re-interleaved by one vpermw.  The same values as state_update_dot_bf16 (each
// new state value rounded to nearest even once); only the dot product's summation order differs.  n % 32 == 0.
static inline float state_update_dot_bf16_eo(uint16_t *s, float a, float u, const float *Bs, const float *Cs,
                                             int64_t n) {
    const __m512 va = _mm512_set1_ps(a), vu = _mm512_set1_ps(u);
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512i inter = _mm512_loadu_si512((const void *)EO_ORDER);
    __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
    const int64_t h = n / 2;
    for (int64_t k = 0; k < n; k += 32) {
        const __m512i raw = _mm512_loadu_si512((const void *)(s + k));
        const __m512 se = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)), so = _mm512_castsi512_ps(_mm512_and_si512(raw, hi));
        const __m512 ve = _mm512_fmadd_ps(se, va, _mm512_mul_ps(vu, _mm512_loadu_ps(Bs + k / 2)));
        const __m512 vo = _mm512_fmadd_ps(so, va, _mm512_mul_ps(vu, _mm512_loadu_ps(Bs + h + k / 2)));
        const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(vo, ve);        // [bf16(ve) x16 | bf16(vo) x16]
        _mm512_storeu_si512((void *)(s + k), _mm512_permutexvar_epi16(inter, packed));
        c0 = _mm512_fmadd_ps(ve, _mm512_loadu_ps(Cs + k / 2), c0);
        c1 = _mm512_fmadd_ps(vo, _mm512_loadu_ps(Cs + h + k / 2), c1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(c0, c1));
}

// Four consecutive state rows of one head at once (rows s, s + n, s + 2n, s + 3n; u[r] per row): each B and C
// load serves four rows and the four dot products are reduced together.  Every state value is computed and rounded
// exactly as in state_update_dot_bf16_eo; y[r] = row r's dot with C (another summation order).  n % 32 == 0.
static inline void state_update_dot4_bf16_eo(uint16_t *s, float a, const float *u, const float *Bs,
                                             const float *Cs, int64_t n, float *y) {
    const __m512 va = _mm512_set1_ps(a);
    const __m512 vu[4] = {_mm512_set1_ps(u[0]), _mm512_set1_ps(u[1]), _mm512_set1_ps(u[2]), _mm512_set1_ps(u[3])};
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512i inter = _mm512_loadu_si512((const void *)EO_ORDER);
    __m512 c[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const int64_t h = n / 2;
    for (int64_t k = 0; k < n; k += 32) {
        const __m512 be = _mm512_loadu_ps(Bs + k / 2), bo = _mm512_loadu_ps(Bs + h + k / 2);
        const __m512 ce = _mm512_loadu_ps(Cs + k / 2), co = _mm512_loadu_ps(Cs + h + k / 2);
        for (int r = 0; r < 4; r++) {
            uint16_t *sr = s + r * n + k;
            const __m512i raw = _mm512_loadu_si512((const void *)sr);
            const __m512 se = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
            const __m512 so = _mm512_castsi512_ps(_mm512_and_si512(raw, hi));
            const __m512 ve = _mm512_fmadd_ps(se, va, _mm512_mul_ps(vu[r], be));
            const __m512 vo = _mm512_fmadd_ps(so, va, _mm512_mul_ps(vu[r], bo));
            _mm512_storeu_si512((void *)sr, _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(vo, ve)));
            c[r] = _mm512_fmadd_ps(vo, co, _mm512_fmadd_ps(ve, ce, c[r]));
        }
    }
    // 4 x 16 partial sums -> 4 sums: pairwise interleave, then the four 128-bit lanes
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
    const __m512 q = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, 0x44), _mm512_shuffle_ps(t01, t23, 0xEE));
    const __m256 q8 = _mm256_add_ps(_mm512_castps512_ps256(q), _mm512_extractf32x8_ps(q, 1));
    _mm_storeu_ps(y, _mm_add_ps(_mm256_castps256_ps128(q8), _mm256_extractf128_ps(q8, 1)));
}

#elif defined(__AVX2__) && !defined(__AVX512F__)
#define BF16_EO 1
// AVX2 (no AVX-512): the same even / odd split, 16 state values per load.  Widened by one shift (even) and one mask
// (odd); each new value rounded to nearest even in integers as state_update_dot_bf16 does, and the two halves put
// back in order by one word blend (even results shifted into the low half of each dword, odd ones kept in the high
// half): no pack and no lane permute per 8 values.  The same values; only the dot product's summation order differs.
static inline float state_update_dot_bf16_eo(uint16_t *s, float a, float u, const float *Bs, const float *Cs,
                                             int64_t n) {
    const __m256 va = _mm256_set1_ps(a), vu = _mm256_set1_ps(u);
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    const int64_t h = n / 2;
    for (int64_t k = 0; k < n; k += 16) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(const void *)(s + k));
        const __m256 se = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
        const __m256 so = _mm256_castsi256_ps(_mm256_and_si256(raw, hi));
        const __m256 ve = _mm256_fmadd_ps(se, va, _mm256_mul_ps(vu, _mm256_loadu_ps(Bs + k / 2)));
        const __m256 vo = _mm256_fmadd_ps(so, va, _mm256_mul_ps(vu, _mm256_loadu_ps(Bs + h + k / 2)));
        const __m256i re = bf16_rne_bits(_mm256_castps_si256(ve)), ro = bf16_rne_bits(_mm256_castps_si256(vo));
        _mm256_storeu_si256((__m256i *)(void *)(s + k), _mm256_blend_epi16(_mm256_srli_epi32(re, 16), ro, 0xAA));
        c0 = _mm256_fmadd_ps(ve, _mm256_loadu_ps(Cs + k / 2), c0);
        c1 = _mm256_fmadd_ps(vo, _mm256_loadu_ps(Cs + h + k / 2), c1);
    }
    return hsum8(_mm256_add_ps(c0, c1));
}
#endif

#ifdef BF16_EO
static void split_eo(float *v, int64_t n) {      // in place: [v0 v2 v4 ... | v1 v3 v5 ...], n <= 512
    float t[512];
    for (int64_t i = 0; i < n; i++) t[(i % 2) * (n / 2) + i / 2] = v[i];
    memcpy(v, t, sizeof(float) * n);
}
#endif

// Channels c0..c1 of the causal depthwise conv: u[c] = conv_b[c] + sum_k w[c, k] * window[k] over the window
// [conv_state[c], x[c]], the window then shifted by one in place.
static void conv_span(const float *xbc, float *cs, const float *conv_w, const float *conv_b, float *u, int64_t c0,
                      int64_t c1, int64_t K) {
    for (int64_t c = c0; c < c1; c++) {
        float *s = cs + c * (K - 1);
        const float *w = conv_w + c * K;
        float acc = conv_b ? conv_b[c] : 0.f;
        for (int64_t k = 0; k < K - 1; k++) acc += w[k] * s[k];
        acc += w[K - 1] * xbc[c];
        for (int64_t k = 0; k + 1 < K - 1; k++) s[k] = s[k + 1];
        if (K > 1) s[K - 2] = xbc[c];
        u[c] = acc;
    }
}

// The same for K = 4 (Mamba-2's width), unrolled: the same sums in the same order.  The loop above with its run-time
// K took 0.7-1.0 ms of a 1.3B token (48 layers x 4,352 channels, 2 threads), this one 0.27-0.34 (AMD EPYC kind).
static void conv4_span(const float *xbc, float *cs, const float *conv_w, const float *conv_b, float *u, int64_t c0,
                       int64_t c1) {
    for (int64_t c = c0; c < c1; c++) {
        float *s = cs + c * 3;
        const float *w = conv_w + c * 4;
        const float s0 = s[0], s1 = s[1], s2 = s[2], xv = xbc[c];
        float acc = conv_b ? conv_b[c] : 0.f;
        acc += w[0] * s0;
        acc += w[1] * s1;
        acc += w[2] * s2;
        acc += w[3] * xv;
        s[0] = s1;
        s[1] = s2;
        s[2] = xv;
        u[c] = acc;
    }
}

// The SSM state streams through once per step (1.3B: 100 MB in bf16, 201 MB in fp32) in 64-head-row blocks the
// hardware prefetcher restarts on; prefetching 2 KB ahead took the 1.3B step from 5.4-6.3 to 4.5-6.0 ms per token
// in bf16, 8.2-8.9 to 7.5-8.8 in fp32 (best of 5, 48 layers, 2 threads, Xeon with AVX-512, a noisy VM: 1, 3 and
// 4 KB alike, 8 KB worse).
#define STATE_PREFETCH 2048

static void mixer_step_any(const float *zxbcdt, float *conv_state, const float *conv_w, const float *conv_b,
                           const float *dt_bias, const float *A_log, const float *Dp, const float *norm_w,
                           void *ssm_state, int state_bf16, float *y, float *work,
                           int64_t nb, int64_t d_inner, int64_t ng, int64_t n, int64_t nh, int64_t hp, int64_t K,
                           float eps) {
    const int64_t conv_dim = d_inner + 2 * ng * n, d_in = d_inner + conv_dim + nh, heads_per_group = nh / ng;
    for (int64_t b = 0; b < nb; b++) {
        const float *row = zxbcdt + b * d_in, *z = row, *xbc = row + d_inner, *dtr = row + d_inner + conv_dim;
        float *cs = conv_state + b * conv_dim * (K - 1), *u = work;      // u: conv output after silu
        #pragma omp parallel for schedule(static)
        for (int64_t c0 = 0; c0 < conv_dim; c0 += 64) {          // 64 channels, then their silu at once
            const int64_t c1 = c0 + 64 < conv_dim ? c0 + 64 : conv_dim;
            if (K == 4) conv4_span(xbc, cs, conv_w, conv_b, u, c0, c1);
            else conv_span(xbc, cs, conv_w, conv_b, u, c0, c1, K);
            silu_span(u + c0, u + c0, c1 - c0);
        }
        const float *x = u, *B = u + d_inner, *C = u + d_inner + ng * n;
        int eo = 0;
#ifdef BF16_EO
        if (state_bf16 && n % 32 == 0 && n <= 512) {      // u is this step's scratch: B and C may be reordered
            eo = 1;
            for (int64_t g = 0; g < 2 * ng; g++) split_eo(u + d_inner + g * n, n);
        }
#endif
        (void)eo;
        float *yb = y + b * d_inner;
        #pragma omp parallel for schedule(static)
        for (int64_t h = 0; h < nh; h++) {
            const int64_t g = h / heads_per_group;
            const float dt = softplus_f(dtr[h] + dt_bias[h]);
            const float a = expf(-expf(A_log[h]) * dt);
            const float *Bv = B + g * n, *Cv = C + g * n;
            silu_span(z + h * hp, yb + h * hp, hp);               // the gates first, into y
            int64_t p = 0;
#ifdef BF16_EO4
            for (; eo && p + 4 <= hp; p += 4) {                       // four rows at a time (the same values)
                const int64_t off = ((b * nh + h) * hp + p) * n;
                const char *pf = (const char *)ssm_state + off * 2 + STATE_PREFETCH;
                for (int64_t q = 0; q < 8 * n; q += 64) __builtin_prefetch(pf + q, 0, 3);
                float uu[4], sy[4];
                for (int r = 0; r < 4; r++) uu[r] = dt * x[h * hp + p + r];
                state_update_dot4_bf16_eo((uint16_t *)ssm_state + off, a, uu, Bv, Cv, n, sy);
                for (int r = 0; r < 4; r++) yb[h * hp + p + r] *= sy[r] + Dp[h] * x[h * hp + p + r];
            }
#endif
            for (; p < hp; p++) {
                const int64_t off = ((b * nh + h) * hp + p) * n;
                {   // software prefetch STATE_PREFETCH bytes ahead: the rows after this one (near the end, the
                    // next head's), one row's lines per row
                    const int64_t rb = state_bf16 ? 2 * n : 4 * n;
                    const char *pf = (const char *)ssm_state + off * (state_bf16 ? 2 : 4) + STATE_PREFETCH;
                    for (int64_t q = 0; q < rb; q += 64) __builtin_prefetch(pf + q, 0, 3);
                }
                const float xv = x[h * hp + p], uu = dt * xv;
                float sy;
#ifdef BF16_EO
                if (eo) sy = state_update_dot_bf16_eo((uint16_t *)ssm_state + off, a, uu, Bv, Cv, n);
                else
#endif
                sy = state_bf16 ? state_update_dot_bf16((uint16_t *)ssm_state + off, a, uu, Bv, Cv, n)
                                : state_update_dot((float *)ssm_state + off, a, uu, Bv, Cv, n);
                yb[h * hp + p] *= sy + Dp[h] * xv;
            }
        }
        const int64_t gs = d_inner / ng;
        for (int64_t g = 0; g < ng; g++) {             // VW lanes at a time (the sum in another order than 1-by-1)
            float *yg = yb + g * gs;
            const float *wg = norm_w + g * gs;
            const float r = 1.f / sqrtf(dot(yg, yg, gs) / (float)gs + eps);
            int64_t i = 0;
            for (; i + VW <= gs; i += VW) vwstore(yg + i, vwload(yg + i) * r * vwload(wg + i));
            for (; i < gs; i++) yg[i] *= r * wg[i];
        }
    }
}

void mixer_step_inplace(const float *zxbcdt, float *conv_state, const float *conv_w, const float *conv_b,
                        const float *dt_bias, const float *A_log, const float *Dp, const float *norm_w,
                        float *ssm_state, float *y, float *work,
                        int64_t nb, int64_t d_inner, int64_t ng, int64_t n, int64_t nh, int64_t hp, int64_t K,
                        float eps) {
    mixer_step_any(zxbcdt, conv_state, conv_w, conv_b, dt_bias, A_log, Dp, norm_w, ssm_state, 0, y, work,
                   nb, d_inner, ng, n, nh, hp, K, eps);
}

// ssm_state (nb, nh, P, N) in bf16 (uint16 bit patterns); everything else as mixer_step_inplace.
void mixer_step_inplace_bf16state(const float *zxbcdt, float *conv_state, const float *conv_w, const float *conv_b,
                                  const float *dt_bias, const float *A_log, const float *Dp, const float *norm_w,
                                  uint16_t *ssm_state, float *y, float *work,
                                  int64_t nb, int64_t d_inner, int64_t ng, int64_t n, int64_t nh, int64_t hp,
                                  int64_t K, float eps) {
    mixer_step_any(zxbcdt, conv_state, conv_w, conv_b, dt_bias, A_log, Dp, norm_w, ssm_state, 1, y, work,
                   nb, d_inner, ng, n, nh, hp, K, eps);
}

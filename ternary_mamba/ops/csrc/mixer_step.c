// A Mamba-2 mixer's whole recurrent step between its projections, in one call (conv, SSM step, gated norm).
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
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

void mixer_step_inplace(const float *zxbcdt, float *conv_state, const float *conv_w, const float *conv_b,
                        const float *dt_bias, const float *A_log, const float *Dp, const float *norm_w,
                        float *ssm_state, float *y, float *work,
                        int64_t nb, int64_t d_inner, int64_t ng, int64_t n, int64_t nh, int64_t hp, int64_t K,
                        float eps) {
    const int64_t conv_dim = d_inner + 2 * ng * n, d_in = d_inner + conv_dim + nh, heads_per_group = nh / ng;
    for (int64_t b = 0; b < nb; b++) {
        const float *row = zxbcdt + b * d_in, *z = row, *xbc = row + d_inner, *dtr = row + d_inner + conv_dim;
        float *cs = conv_state + b * conv_dim * (K - 1), *u = work;      // u: conv output after silu
        #pragma omp parallel for schedule(static)
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
        #pragma omp parallel for schedule(dynamic, 2)
        for (int64_t h = 0; h < nh; h++) {
            const int64_t g = h / heads_per_group;
            const float dt = softplus_f(dtr[h] + dt_bias[h]);
            const float a = expf(-expf(A_log[h]) * dt);
            const float *Bv = B + g * n, *Cv = C + g * n;
            for (int64_t p = 0; p < hp; p++) {
                float *s = ssm_state + ((b * nh + h) * hp + p) * n;
                const float xv = x[h * hp + p], uu = dt * xv;
                yb[h * hp + p] = (state_update_dot(s, a, uu, Bv, Cv, n) + Dp[h] * xv) * silu_f(z[h * hp + p]);
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

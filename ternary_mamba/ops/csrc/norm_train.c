// The gated RMSNorm of the mixer for training, forward and backward (reference: model.GatedRMSNorm).
//   v = y * silu(z);  per group of G = d/ng channels: r = 1/sqrt(mean(v^2) + eps);  out = v * r * w
// Backward, with a = dout * w and per group S = sum(a * v):
//   dv = r * a - r^3 * v * S / G,   dy = dv * silu(z),   dz = dv * y * s (1 + z (1 - s)),   dw = sum_rows dout * v * r
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "vec16.h"

static inline float silu_f(float z) { return z / (1.f + expf(-z)); }

// y (rows, d) contiguous, z rows at stride z_rs -> out (rows, d), rstd (rows, ng)
void gated_norm_fwd(const float *y, const float *z, int64_t z_rs, const float *w, float *out, float *rstd,
                    int64_t rows, int64_t d, int64_t ng, float eps) {
    const int64_t G = d / ng;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *yr = y + r * d, *zr = z + r * z_rs;
        float *o = out + r * d;
        int64_t i = 0;
        for (; i + VW <= d; i += VW) {
            const vw zz = vwload(zr + i);
            vwstore(o + i, vwload(yr + i) * (zz / (1.f + vwexp(-zz))));
        }
        for (; i < d; i++) o[i] = yr[i] * silu_f(zr[i]);
        for (int64_t g = 0; g < ng; g++) {
            float *v = o + g * G;
            const float inv = 1.f / sqrtf(dot(v, v, G) / (float)G + eps);
            rstd[r * ng + g] = inv;
            const float *wg = w + g * G;
            for (int64_t q = 0; q < G; q++) v[q] *= inv * wg[q];
        }
    }
}

// -> dy (rows, d), dz (rows, d), dw (d)
// Returns 0, or -2 when memory could not be allocated.
int gated_norm_bwd(const float *y, const float *z, int64_t z_rs, const float *w, const float *rstd,
                   const float *dout, float *dy, float *dz, float *dw, int64_t rows, int64_t d, int64_t ng) {
    const int64_t G = d / ng;
    const int nt = omp_get_max_threads();
    float *part = calloc((size_t)nt * d, sizeof(float));
    float *vs = malloc(sizeof(float) * (size_t)nt * 2 * d);              // per thread: v and s rows
    if (!part || !vs) {
        free(part); free(vs);
        return -2;
    }
    #pragma omp parallel
    {
        float *pw = part + (size_t)omp_get_thread_num() * d;
        float *v = vs + (size_t)omp_get_thread_num() * 2 * d, *s = v + d;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *yr = y + r * d, *zr = z + r * z_rs, *go = dout + r * d;
            float *dyr = dy + r * d, *dzr = dz + r * d;
            int64_t i = 0;
            for (; i + VW <= d; i += VW) {                       // s = sigmoid(z), v = y silu(z)
                const vw zz = vwload(zr + i), sg = 1.f / (1.f + vwexp(-zz));
                vwstore(s + i, sg);
                vwstore(v + i, vwload(yr + i) * zz * sg);
            }
            for (; i < d; i++) {
                s[i] = 1.f / (1.f + expf(-zr[i]));
                v[i] = yr[i] * zr[i] * s[i];
            }
            for (int64_t g = 0; g < ng; g++) {
                const int64_t o = g * G;
                const float rs = rstd[r * ng + g];
                float S = 0.f;
                for (int64_t q = o; q < o + G; q++) {
                    S += go[q] * w[q] * v[q];
                    pw[q] += go[q] * v[q] * rs;
                }
                const float c = rs * rs * rs * S / (float)G;
                for (int64_t q = o; q < o + G; q++) {
                    const float dv = rs * go[q] * w[q] - c * v[q];
                    dyr[q] = dv * zr[q] * s[q];
                    dzr[q] = dv * yr[q] * s[q] * (1.f + zr[q] * (1.f - s[q]));
                }
            }
        }
    }
    for (int64_t q = 0; q < d; q++) {
        float acc = 0.f;
        for (int i = 0; i < nt; i++) acc += part[(size_t)i * d + q];
        dw[q] = acc;
    }
    free(part);
    free(vs);
    return 0;
}

// The block RMSNorm for training (reference: model.RMSNorm): out = x r w, r = 1/sqrt(mean(x^2) + eps).
// Backward with a = dout w, S = sum(a x):  dx = r a - r^3 x S / d,  dw = sum_rows dout x r.
void rms_norm_fwd(const float *x, const float *w, float *out, float *rstd, int64_t rows, int64_t d, float eps) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *o = out + r * d;
        const float inv = 1.f / sqrtf(dot(xr, xr, d) / (float)d + eps);
        rstd[r] = inv;
        for (int64_t i = 0; i < d; i++) o[i] = xr[i] * inv * w[i];
    }
}

// Returns 0, or -2 when memory could not be allocated.
int rms_norm_bwd(const float *x, const float *w, const float *rstd, const float *dout, float *dx, float *dw,
                 int64_t rows, int64_t d) {
    const int nt = omp_get_max_threads();
    float *part = calloc((size_t)nt * d, sizeof(float));
    if (!part) return -2;
    #pragma omp parallel
    {
        float *pw = part + (size_t)omp_get_thread_num() * d;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * d, *go = dout + r * d;
            float *o = dx + r * d;
            const float rs = rstd[r];
            float S = 0.f;
            for (int64_t i = 0; i < d; i++) {
                S += go[i] * w[i] * xr[i];
                pw[i] += go[i] * xr[i] * rs;
            }
            const float c = rs * rs * rs * S / (float)d;
            for (int64_t i = 0; i < d; i++) o[i] = rs * go[i] * w[i] - c * xr[i];
        }
    }
    for (int64_t i = 0; i < d; i++) {
        float acc = 0.f;
        for (int t = 0; t < nt; t++) acc += part[(size_t)t * d + i];
        dw[i] = acc;
    }
    free(part);
    return 0;
}

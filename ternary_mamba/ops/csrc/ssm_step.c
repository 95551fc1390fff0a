// The SSM's recurrent step alone (decode with the module-by-module step; the whole mixer step is mixer_step.c).
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

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

// Backward pass of the causal depthwise conv + SiLU (the forward is conv_silu_prefill in ssd_prefill.c).
// Reference: autograd through the conv of Mamba2Mixer.forward followed by F.silu.
//   pre[t, c] = bias[c] + sum_q w[c, q] in[t - (K-1) + q, c]      (in[-1], in[-2], ... come from prev)
//   out = silu(pre)  ->  dpre = dout * s (1 + pre (1 - s)),  s = sigmoid(pre)
//   din[t, c] = sum_q w[c, q] dpre[t + (K-1) - q, c],   dw[c, q] = sum_{b,t} dpre[t, c] in[t - (K-1) + q, c]
// The pre-activation is recomputed (K multiply-adds per element) instead of being kept from the forward.
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "vec16.h"

// x rows (b, l) at stride in_rs; prev (b, cd, K-1) or NULL; w (cd, K); bias (cd) or NULL; dout (b, l, cd).
// Writes dx (b, l, cd), dw (cd, K), dbias (cd) unless NULL, dprev (b, cd, K-1) unless NULL.
// Returns 0, or -2 when memory could not be allocated (nothing written then).
int conv_silu_backward(const float *x, int64_t in_rs, const float *prev, const float *w, const float *bias,
                       const float *dout, float *dx, float *dw, float *dbias, float *dprev,
                       int64_t nb, int64_t l, int64_t cd, int64_t K) {
    if (K < 1 || K > 16) return -1;
    const int nt = omp_get_max_threads();
    float *wt = malloc(sizeof(float) * K * cd);                          // (K, cd): taps contiguous in c
    float *dpre = malloc(sizeof(float) * nb * l * cd);
    float *part = calloc((size_t)nt * (K + 1) * cd, sizeof(float));      // per thread: dw^T (K, cd), dbias (cd)
    float *prebuf = malloc(sizeof(float) * (size_t)nt * cd);             // per thread: one row of pre-activations
    if (!wt || !dpre || !part || !prebuf) {
        free(wt); free(dpre); free(part); free(prebuf);
        return -2;
    }
    for (int64_t c = 0; c < cd; c++)
        for (int64_t q = 0; q < K; q++) wt[q * cd + c] = w[c * K + q];
    #pragma omp parallel
    {
        float *pw = part + (size_t)omp_get_thread_num() * (K + 1) * cd, *pb = pw + K * cd;
        float *pre = prebuf + (size_t)omp_get_thread_num() * cd;
        #pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t t = 0; t < l; t++) {
                // the K inputs of position t (NULL where they are zeros before a NULL prev)
                const float *in[16];
                int64_t pstride[16];
                for (int64_t q = 0; q < K; q++) {
                    const int64_t src = t - (K - 1) + q;
                    in[q] = src >= 0 ? x + (b * l + src) * in_rs : prev ? prev + b * cd * (K - 1) + (K - 1 + src) : NULL;
                    pstride[q] = src >= 0 ? 1 : K - 1;
                }
                for (int64_t c = 0; c < cd; c++) pre[c] = bias ? bias[c] : 0.f;
                for (int64_t q = 0; q < K; q++) {
                    if (!in[q]) continue;
                    const float *wq = wt + q * cd;
                    if (pstride[q] == 1) for (int64_t c = 0; c < cd; c++) pre[c] += wq[c] * in[q][c];
                    else for (int64_t c = 0; c < cd; c++) pre[c] += wq[c] * in[q][c * pstride[q]];
                }
                const float *go = dout + (b * l + t) * cd;
                float *dp = dpre + (b * l + t) * cd;
                int64_t c = 0;
                for (; c + VW <= cd; c += VW) {
                    const vw v = vwload(pre + c), s = 1.f / (1.f + vwexp(-v));
                    vwstore(dp + c, vwload(go + c) * s * (1.f + v * (1.f - s)));
                }
                for (; c < cd; c++) {
                    const float s = 1.f / (1.f + expf(-pre[c]));
                    dp[c] = go[c] * s * (1.f + pre[c] * (1.f - s));
                }
                for (int64_t q = 0; q < K; q++) {
                    if (!in[q]) continue;
                    float *pq = pw + q * cd;
                    if (pstride[q] == 1) for (int64_t c2 = 0; c2 < cd; c2++) pq[c2] += dp[c2] * in[q][c2];
                    else for (int64_t c2 = 0; c2 < cd; c2++) pq[c2] += dp[c2] * in[q][c2 * pstride[q]];
                }
                for (int64_t c2 = 0; c2 < cd; c2++) pb[c2] += dp[c2];
            }
        // din[t] = sum_q w[q] dpre[t + (K-1) - q]
        #pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t t = 0; t < l; t++) {
                float *o = dx + (b * l + t) * cd;
                memset(o, 0, sizeof(float) * cd);
                for (int64_t q = 0; q < K; q++) {
                    const int64_t src = t + (K - 1) - q;
                    if (src >= l) continue;
                    const float *wq = wt + q * cd, *g = dpre + (b * l + src) * cd;
                    for (int64_t c = 0; c < cd; c++) o[c] += wq[c] * g[c];
                }
            }
    }
    for (int64_t c = 0; c < cd; c++) {
        for (int64_t q = 0; q < K; q++) {
            float s = 0.f;
            for (int i = 0; i < nt; i++) s += part[(size_t)i * (K + 1) * cd + q * cd + c];
            dw[c * K + q] = s;
        }
        if (dbias) {
            float s = 0.f;
            for (int i = 0; i < nt; i++) s += part[(size_t)i * (K + 1) * cd + K * cd + c];
            dbias[c] = s;
        }
    }
    if (dprev)   // prev[j] is the input at position j - (K-1): dprev[j] = sum_q w[q] dpre[j - q]
        for (int64_t b = 0; b < nb; b++)
            for (int64_t c = 0; c < cd; c++)
                for (int64_t j = 0; j < K - 1; j++) {
                    float s = 0.f;
                    for (int64_t q = 0; q <= j; q++)
                        if (j - q < l) s += w[c * K + q] * dpre[(b * l + j - q) * cd + c];
                    dprev[(b * cd + c) * (K - 1) + j] = s;
                }
    free(part);
    free(dpre);
    free(wt);
    free(prebuf);
    return 0;
}

// Token-level losses over logits rows (N rows of V at row stride ld), forward and backward, one pass per row
// where PyTorch makes several over (N, V) temporaries.  References: F.cross_entropy and distill.kl_div.
//   cross-entropy: loss_i = lse(x_i) - x_i[t_i]            d/dx_ij = g (softmax(x_i)_j - [j == t_i])
//   KL(p_t || p_s) at temperature tau, p = softmax(logits / tau):
//     kl_i = sum_j p_t,ij (t_ij - s_ij) / tau - lse_t,i + lse_s,i      d/ds_ij = g (p_s,ij - p_t,ij) / tau
// Rows with a negative target (ignore index) contribute nothing to the cross-entropy.
#include <math.h>
#include <stdlib.h>
#include "kernels.h"
#include "vec16.h"

// log-sum-exp of v / tau over n entries (vw: the widest vector the CPU keeps in registers, vec16.h)
static float row_lse(const float *v, int64_t n, float inv_tau) {
    vw mv = (vw){0} - INFINITY;
    int64_t j = 0;
    for (; j + VW <= n; j += VW) {
        const vw a = vwload(v + j);
        mv = (vw)(((viw)a & (viw)(a > mv)) | ((viw)mv & ~(viw)(a > mv)));
    }
    float m = -INFINITY;
    for (int q = 0; q < VW; q++) m = mv[q] > m ? mv[q] : m;
    for (; j < n; j++) m = v[j] > m ? v[j] : m;
    m *= inv_tau;
    vw sv = {0};
    for (j = 0; j + VW <= n; j += VW) sv += vwexp(vwload(v + j) * inv_tau - m);
    float s = vwsum(sv);
    for (; j < n; j++) s += expf(v[j] * inv_tau - m);
    return m + logf(s);
}

void ce_forward(const float *x, int64_t ld, const int64_t *tgt, float *lse, float *loss, int64_t N, int64_t V) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *r = x + i * ld;
        lse[i] = row_lse(r, V, 1.f);
        loss[i] = tgt[i] >= 0 ? lse[i] - r[tgt[i]] : 0.f;
    }
}

// dx (N, V) contiguous = g * (softmax - onehot); g is the gradient of each row's loss
void ce_backward(const float *x, int64_t ld, const int64_t *tgt, const float *lse, float g, float *dx,
                 int64_t N, int64_t V) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *r = x + i * ld;
        float *o = dx + i * V;
        const float gi = tgt[i] >= 0 ? g : 0.f, li = lse[i];
        int64_t j = 0;
        for (; j + VW <= V; j += VW) vwstore(o + j, gi * vwexp(vwload(r + j) - li));
        for (; j < V; j++) o[j] = gi * expf(r[j] - li);
        if (tgt[i] >= 0) o[tgt[i]] -= gi;
    }
}

void kl_forward(const float *t, int64_t ldt, const float *s, int64_t lds, float tau, float *lse_t, float *lse_s,
                float *kl, int64_t N, int64_t V) {
    const float inv = 1.f / tau;
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *tr = t + i * ldt, *sr = s + i * lds;
        const float lt = row_lse(tr, V, inv), ls = row_lse(sr, V, inv);
        vw av = {0};
        int64_t j = 0;
        for (; j + VW <= V; j += VW) {
            const vw tv = vwload(tr + j);
            av += vwexp(tv * inv - lt) * (tv - vwload(sr + j));
        }
        float a = vwsum(av);
        for (; j < V; j++) a += expf(tr[j] * inv - lt) * (tr[j] - sr[j]);
        lse_t[i] = lt;
        lse_s[i] = ls;
        kl[i] = a * inv - lt + ls;
    }
}

// ds (N, V) contiguous = g (p_s - p_t) / tau
void kl_backward(const float *t, int64_t ldt, const float *s, int64_t lds, float tau, const float *lse_t,
                 const float *lse_s, float g, float *ds, int64_t N, int64_t V) {
    const float inv = 1.f / tau, gt = g * inv;
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *tr = t + i * ldt, *sr = s + i * lds;
        float *o = ds + i * V;
        const float lt = lse_t[i], ls = lse_s[i];
        int64_t j = 0;
        for (; j + VW <= V; j += VW)
            vwstore(o + j, gt * (vwexp(vwload(sr + j) * inv - ls) - vwexp(vwload(tr + j) * inv - lt)));
        for (; j < V; j++) o[j] = gt * (expf(sr[j] * inv - ls) - expf(tr[j] * inv - lt));
    }
}

// The chunked SSD scan for inference (no autograd), fused per (batch, head).  Reference: ssd.ssd_chunked.
//   x (b,l,h,p), dt (b,l,h) after softplus, A (h), B/C (b,l,g,n), init (b,h,p,n) or NULL
//   -> y (b,l,h,p) (without the D skip) and the final state (b,h,p,n).
// Per chunk of k positions, with a = cumsum(dt A) inside the chunk and the entering state S (kept as S^T, n x p):
//   y_i   = exp(a_i) C_i S^T  +  sum_{j<=i} exp(a_i - a_j) (C_i . B_j) dt_j x_j
//   S^T  <- exp(a_end) S^T   +  sum_j B_j^T (exp(a_end - a_j) dt_j x_j)
// The three products are small GEMMs done by one register-blocked kernel; nothing of size (chunks x p x n) or
// (heads x k x k) is materialised, which is where the PyTorch version spends its time on a CPU.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "vec16.h"

// Causal depthwise conv + SiLU over a whole sequence (reference: the conv1d + silu of Mamba2Mixer.forward).
//   xbc rows (b, l) at stride in_rs, conv_dim channels each; prev (b, conv_dim, K-1) = the inputs before
//   position 0 (NULL: zeros); w (conv_dim, K), bias (conv_dim) or NULL
//   -> out (b, l, conv_dim) = silu(conv), and new_state (b, conv_dim, K-1) = the last K-1 inputs.
// Returns 0, or -2 when memory could not be allocated.
int conv_silu_prefill(const float *xbc, int64_t in_rs, const float *prev, const float *w, const float *bias,
                      float *out, float *new_state, int64_t nb, int64_t l, int64_t cd, int64_t K) {
    if (K < 1 || K > 16) return -1;
    float *wt = malloc(sizeof(float) * (K * cd + 16));                 // (K, conv_dim): taps contiguous in c
    if (!wt) return -2;
    for (int64_t c = 0; c < cd; c++)
        for (int64_t q = 0; q < K; q++) wt[q * cd + c] = w[c * K + q];
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; b++)
        for (int64_t t = 0; t < l; t++) {
            float *o = out + (b * l + t) * cd;
            for (int64_t c = 0; c < cd; c++) o[c] = bias ? bias[c] : 0.f;
            for (int64_t q = 0; q < K; q++) {
                const int64_t src = t - (K - 1) + q;
                const float *wq = wt + q * cd;
                if (src >= 0) {
                    const float *in = xbc + (b * l + src) * in_rs;
                    for (int64_t c = 0; c < cd; c++) o[c] += wq[c] * in[c];
                } else if (prev) {
                    const float *pv = prev + b * cd * (K - 1) + (K - 1 + src);
                    for (int64_t c = 0; c < cd; c++) o[c] += wq[c] * pv[c * (K - 1)];
                }
            }
            int64_t c = 0;
            for (; c + VW <= cd; c += VW) {
                const vw v = vwload(o + c);
                vwstore(o + c, v / (1.f + vwexp(-v)));
            }
            for (; c < cd; c++) o[c] = o[c] / (1.f + expf(-o[c]));
        }
    for (int64_t b = 0; b < nb; b++)
        for (int64_t c = 0; c < cd; c++)
            for (int64_t q = 0; q < K - 1; q++) {
                const int64_t src = l - (K - 1) + q;
                new_state[(b * cd + c) * (K - 1) + q] = src >= 0 ? xbc[(b * l + src) * in_rs + c]
                    : prev ? prev[(b * cd + c) * (K - 1) + (K - 1 + src)] : 0.f;
            }
    free(wt);
    return 0;
}


// x_rs / bc_rs: elements between consecutive positions of x and of B/C (x may be a view into xBC).
// Returns 0, or -1 if p is not a multiple of 16 (the caller then uses the PyTorch scan).
// D: the skip y += D_h x (NULL: none).  Training (ssd_train.c) also passes chunk_states (b,h,chunks,p,n): the
// state entering every chunk, which the backward pass starts from.
int ssd_prefill(const float *x, const float *dt, const float *A, const float *B, const float *C, const float *init,
                float *y, float *final_state, int64_t nb, int64_t l, int64_t nh, int64_t p, int64_t ng, int64_t n,
                int64_t k, int64_t x_rs, int64_t bc_rs, float *chunk_states, const float *D) {
    if (p % 16 || k < 1 || k > 4096) return -1;
    const int64_t nc = (l + k - 1) / k, r = nh / ng;
    const int nt = omp_get_max_threads();
    const size_t st_len = (size_t)(n * p + 2 * k * p + k * k + 2 * k);
    // C_i . B_j for every chunk and group (lower triangle), shared by the heads of a group
    float *CB = malloc(sizeof(float) * nb * nc * ng * k * k);
    float *bt_all = k % 16 == 0 ? malloc(sizeof(float) * (size_t)nt * n * k) : NULL;   // per thread: B^T (n x k)
    float *st_all = malloc(sizeof(float) * (size_t)nt * st_len);                      // per thread: scan scratch
    if (!CB || (k % 16 == 0 && !bt_all) || !st_all) {
        free(CB); free(bt_all); free(st_all);
        return -2;
    }
    #pragma omp parallel for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < nb; b++)
        for (int64_t c = 0; c < nc; c++) {
            const int64_t t0 = c * k, kk = l - t0 < k ? l - t0 : k;
            float *BT = bt_all ? bt_all + (size_t)omp_get_thread_num() * n * k : NULL;   // B^T of the chunk (n x k)
            if (BT) memset(BT, 0, sizeof(float) * n * k);
            for (int64_t gi = 0; gi < ng; gi++) {
                float *M = CB + ((b * nc + c) * ng + gi) * k * k;
                const float *Cc = C + (b * l + t0) * bc_rs + gi * n, *Bc = B + (b * l + t0) * bc_rs + gi * n;
                if (BT) {   // one small GEMM (the lower triangle, rounded up to 16 columns; the rest is unused)
                    transpose(Bc, kk, n, bc_rs, BT, k);
                    gemm_tri(C_LOWER, 0, kk, k, n, Cc, bc_rs, 1, BT, k, M, k);
                } else
                    for (int64_t i = 0; i < kk; i++)
                        for (int64_t j = 0; j <= i; j++) M[i * k + j] = dot(Cc + i * bc_rs, Bc + j * bc_rs, n);
            }
        }
    #pragma omp parallel for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < nb; b++)
        for (int64_t h = 0; h < nh; h++) {
            const int64_t gi = h / r;
            float *ST = st_all + (size_t)omp_get_thread_num() * st_len;
            float *xdt = ST + n * p, *xw = xdt + k * p, *M = xw + k * p, *acum = M + k * k, *drow = acum + k;
            const float *S0 = init ? init + (b * nh + h) * p * n : NULL;
            if (S0) transpose(S0, p, n, n, ST, p);
            else memset(ST, 0, sizeof(float) * n * p);
            const float Ah = A[h];
            for (int64_t c = 0; c < nc; c++) {
                const int64_t t0 = c * k, kk = l - t0 < k ? l - t0 : k;
                if (chunk_states) transpose(ST, n, p, p, chunk_states + ((b * nh + h) * nc + c) * p * n, n);
                float run = 0.f;
                for (int64_t j = 0; j < kk; j++) {
                    const float d = dt[(b * l + t0 + j) * nh + h];
                    run += d * Ah;
                    acum[j] = run;
                    const float *xj = x + (b * l + t0 + j) * x_rs + h * p;
                    for (int64_t pp = 0; pp < p; pp++) xdt[j * p + pp] = xj[pp] * d;
                }
                // y rows of this chunk, written in place (row stride nh * p)
                float *yc = y + ((b * l + t0) * nh + h) * p;
                const int64_t ldy = nh * p;
                const float *Cc = C + (b * l + t0) * bc_rs + gi * n, *Bc = B + (b * l + t0) * bc_rs + gi * n;
                gemm_tri(DENSE, 0, kk, p, n, Cc, bc_rs, 1, ST, p, yc, ldy);            // C_i S^T (overwrites)
                const float *CBc = CB + ((b * nc + c) * ng + gi) * k * k;
                // decay row i: D[i][j] = exp(a_i - a_j) = exp(dt_i A) * D[i-1][j]  (one exp per row; values
                // below 1e-30 are flushed to zero so that long products never reach slow denormals)
                for (int64_t i = 0; i < kk; i++) {
                    const float e = expf(acum[i]);
                    float *yi = yc + i * ldy;
                    for (int64_t pp = 0; pp < p; pp++) yi[pp] *= e;
                    const float step = expf(acum[i] - (i ? acum[i - 1] : 0.f));
                    for (int64_t j = 0; j < i; j++) {
                        const float v = drow[j] * step;
                        drow[j] = v < 1e-30f ? 0.f : v;
                    }
                    drow[i] = 1.f;
                    for (int64_t j = 0; j <= i; j++) M[i * k + j] = drow[j] * CBc[i * k + j];
                    for (int64_t j = i + 1; j < kk; j++) M[i * k + j] = 0.f;
                }
                gemm_tri(A_LOWER, 1, kk, p, kk, M, k, 1, xdt, p, yc, ldy);                          // intra-chunk
                if (D)
                    for (int64_t i = 0; i < kk; i++) {
                        const float *xi = x + (b * l + t0 + i) * x_rs + h * p;
                        for (int64_t pp = 0; pp < p; pp++) yc[i * ldy + pp] += D[h] * xi[pp];
                    }
                const float a_end = acum[kk - 1], e_end = expf(a_end);
                for (int64_t j = 0; j < kk; j++) {
                    const float w = expf(a_end - acum[j]);
                    for (int64_t pp = 0; pp < p; pp++) xw[j * p + pp] = xdt[j * p + pp] * w;
                }
                for (int64_t q = 0; q < n * p; q++) ST[q] *= e_end;
                gemm_acc(n, p, kk, Bc, 1, bc_rs, xw, p, ST, p);                         // state update
            }
            transpose(ST, n, p, p, final_state + (b * nh + h) * p * n, n);
        }
    free(CB);
    free(bt_all);
    free(st_all);
    return 0;
}

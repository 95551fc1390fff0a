// Backward pass of the chunked SSD scan with the D skip (the forward is ssd_prefill with chunk_states and D).
// Reference: autograd through ssd.ssd_chunked plus y += D x.  Per (batch, head), chunks in reverse order, with
// a = cumsum(dt A) inside the chunk, u_j = dt_j x_j, S the state entering the chunk (saved by the forward),
// L_ij = exp(a_i - a_j) (i >= j), e_i = exp(a_i), w_j = exp(a_end - a_j), and dS the gradient of the state
// leaving the chunk:
//   y_i  = e_i S C_i + sum_{j<=i} L_ij (C_i . B_j) u_j            S' = e_end S + sum_j w_j u_j B_j^T
//   du_j = sum_i L_ij (C_i . B_j) dy_i + w_j dS B_j               dC_i = sum_j L_ij (dy_i . u_j) B_j + e_i S^T dy_i
//   dB_j = sum_i L_ij (dy_i . u_j) C_i + w_j dS^T u_j             dS_in = e_end dS + sum_i e_i dy_i C_i^T
//   da_i = sum_j M_ij - sum_i' M_i'i + C_i . (e_i S^T dy_i) - B_i . (w_i dS^T u_i) [+ terms of a_end]
//          with M_ij = L_ij (C_i . B_j)(dy_i . u_j)
// then d(dt_t A) = sum_{i>=t} da_i (a reverse cumsum), ddt_t = A d(dt_t A) + x_t . du_t, dx_t = dt_t du_t + D dy_t.
// Work items are (batch, group, slice of the group's heads); an item walks the chunks backwards and runs every
// head of its slice on a chunk, so B, C and C.B are gathered once per chunk and dB / dC are summed over heads in
// place.  Every product is a small GEMM in cache.
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "vec16.h"

// xbc (b, l, rs): x = columns [0, h*p), B = [h*p, h*p + g*n), C = the next g*n.  dy (b,l,h,p) contiguous;
// states (b,h,chunks,p,n) from the forward; dfinal (b,h,p,n) or NULL.  Writes dxbc (b, l, h*p + 2*g*n) (all of
// its columns), ddt (b,l,h), dA (h), dD (h), and dinit (b,h,p,n) unless NULL.  Returns -1 on unsupported sizes.
int ssd_backward(const float *xbc, int64_t rs, const float *dt, const float *A, const float *D, const float *states,
                 const float *dy, const float *dfinal, float *dxbc, float *ddt, float *dA, float *dD, float *dinit,
                 int64_t nb, int64_t l, int64_t nh, int64_t p, int64_t ng, int64_t n, int64_t k) {
    if (p % 16 || n % 16 || k % 16 || k < 16 || k > 4096) return -1;
    const int64_t nc = (l + k - 1) / k, r = nh / ng, di = nh * p, cd = di + 2 * ng * n;
    const float *X = xbc, *Bp = xbc + di, *Cp = xbc + di + ng * n;
    // split the heads of a group into `ns` slices when there are fewer (batch, group) pairs than threads
    const int64_t want = omp_get_max_threads(), pairs = nb * ng;
    const int64_t ns = pairs >= want ? 1 : ((want + pairs - 1) / pairs < r ? (want + pairs - 1) / pairs : r);
    const int64_t per = (r + ns - 1) / ns;
    // with several slices, each writes its dB / dC sums to its own rows here and they are added up at the end
    float *dBC = ns > 1 ? malloc(sizeof(float) * ns * nb * l * 2 * ng * n) : NULL;
    float *partial = calloc(nb * nh * 2, sizeof(float));                                     // dA, dD per (b, h)
    const int nt = omp_get_max_threads();
    const int64_t kp_ = k * p, kn_ = k * n, pn_ = p * n, kk2_ = k * k;
    const size_t buf_len = (size_t)(7 * kp_ + 8 * kn_ + 4 * kk2_ + per * pn_ + pn_ + 6 * k);
    float *buf_all = malloc(sizeof(float) * (size_t)nt * buf_len);                          // per thread scratch
    if ((ns > 1 && !dBC) || !partial || !buf_all) {
        free(dBC); free(partial); free(buf_all);
        return -2;
    }
    #pragma omp parallel for collapse(3) schedule(dynamic)
    for (int64_t b = 0; b < nb; b++)
        for (int64_t gi = 0; gi < ng; gi++)
            for (int64_t si = 0; si < ns; si++) {
                const int64_t h0 = gi * r + si * per, h1 = h0 + per < (gi + 1) * r ? h0 + per : (gi + 1) * r;
                if (h0 >= h1) continue;
                const int64_t kp = k * p, kn = k * n, pn = p * n, kk2 = k * k;
                float *buf = buf_all + (size_t)omp_get_thread_num() * buf_len;
                memset(buf, 0, sizeof(float) * (size_t)(7 * kp + 8 * kn + 4 * kk2 + (h1 - h0) * pn + pn + 6 * k));
                float *U = buf, *UT = U + kp, *dY = UT + kp, *dYe = dY + kp, *Uw = dYe + kp, *dU = Uw + kp;
                float *Cm = dU + kp, *Bm = Cm + kn, *Bw = Bm + kn, *dCa = Bw + kn, *dBa = dCa + kn, *T = dBa + kn;
                float *Q = T + kn, *Gm = Q + kk2, *Wm = Gm + kk2, *CB = Wm + kk2;
                float *dSall = CB + kk2, *dST = dSall + (h1 - h0) * pn;
                float *acum = dST + pn, *da = acum + k, *e = da + k, *w = e + k, *drow = w + k, *colsum = drow + k;
                float *BmT = colsum + k;                                                        // n x k
                for (int64_t h = h0; h < h1; h++) {
                    float *dS = dSall + (h - h0) * pn;
                    if (dfinal) memcpy(dS, dfinal + (b * nh + h) * pn, sizeof(float) * pn);
                    else memset(dS, 0, sizeof(float) * pn);
                }
                float dA_acc[h1 - h0], dD_acc[h1 - h0];
                memset(dA_acc, 0, sizeof dA_acc);
                memset(dD_acc, 0, sizeof dD_acc);
                for (int64_t c = nc - 1; c >= 0; c--) {
                    const int64_t t0 = c * k, kk = l - t0 < k ? l - t0 : k;
                    // shared by the heads of the group: B, C rows and C_i . B_j
                    for (int64_t j = 0; j < kk; j++) {
                        const int64_t row = b * l + t0 + j;
                        memcpy(Cm + j * n, Cp + row * rs + gi * n, sizeof(float) * n);
                        memcpy(Bm + j * n, Bp + row * rs + gi * n, sizeof(float) * n);
                    }
                    transpose(Bm, kk, n, n, BmT, k);                          // C_i . B_j, j <= i: one GEMM
                    gemm_tri(C_LOWER, 0, kk, k, n, Cm, n, 1, BmT, k, CB, k);
                    for (int64_t h = h0; h < h1; h++) {
                        float *dS = dSall + (h - h0) * pn;
                        const float *S = states + ((b * nh + h) * nc + c) * pn;
                        const float Ah = A[h], Dh = D ? D[h] : 0.f;
                        float run = 0.f;
                        for (int64_t j = 0; j < kk; j++) {
                            const int64_t row = b * l + t0 + j;
                            const float d = dt[row * nh + h];
                            run += d * Ah;
                            acum[j] = run;
                            const float *xj = X + row * rs + h * p, *dyj = dy + (row * nh + h) * p;
                            for (int64_t pp = 0; pp < p; pp++) { U[j * p + pp] = d * xj[pp]; dY[j * p + pp] = dyj[pp]; }
                        }
                        const float a_end = acum[kk - 1], e_end = expf(a_end);
                        for (int64_t j = 0; j < kk; j++) {
                            e[j] = expf(acum[j]);
                            w[j] = expf(a_end - acum[j]);
                            for (int64_t pp = 0; pp < p; pp += 16) {           // p, n: multiples of 16
                                vstore(dYe + j * p + pp, e[j] * vload(dY + j * p + pp));
                                vstore(Uw + j * p + pp, w[j] * vload(U + j * p + pp));
                            }
                            for (int64_t q = 0; q < n; q += 16) vstore(Bw + j * n + q, w[j] * vload(Bm + j * n + q));
                        }
                        transpose(U, kk, p, p, UT, k);
                        gemm_tri(C_LOWER, 0, kk, k, p, dY, p, 1, UT, k, Q, k);          // Q_ij = dy_i . u_j, j <= i
                        // Gm = L * CB, Wm = L * Q (lower triangles), and the row / column sums of M = Gm * Q
                        for (int64_t j = 0; j < kk; j++) colsum[j] = 0.f;
                        for (int64_t i = 0; i < kk; i++) {
                            const float step = expf(acum[i] - (i ? acum[i - 1] : 0.f));
                            float *gi_ = Gm + i * k, *wi = Wm + i * k;
                            const float *cbi = CB + i * k, *qi = Q + i * k;
                            vw rsw = {0};                                 // VW lanes: 8 on AVX2 builds
                            int64_t j = 0;
                            for (; j + VW <= i; j += VW) {                // same decay rows as the forward
                                vw dr = vwload(drow + j) * step;
                                const viw tiny = dr < 1e-30f;
                                dr = (vw)((viw)dr & ~tiny);
                                vwstore(drow + j, dr);
                                const vw g = dr * vwload(cbi + j), wq = dr * vwload(qi + j), m = g * vwload(qi + j);
                                vwstore(gi_ + j, g);
                                vwstore(wi + j, wq);
                                vwstore(colsum + j, vwload(colsum + j) + m);
                                rsw += m;
                            }
                            float rowsum = vwsum(rsw);
                            for (; j < i; j++) {
                                const float v = drow[j] * step;
                                drow[j] = v < 1e-30f ? 0.f : v;
                            }
                            drow[i] = 1.f;
                            for (j = j < i ? j : (i / VW) * VW; j <= i; j++) {
                                const float g = drow[j] * cbi[j], wq = drow[j] * qi[j], m = g * qi[j];
                                gi_[j] = g;
                                wi[j] = wq;
                                rowsum += m;
                                colsum[j] += m;
                            }
                            for (; j < kk; j++) gi_[j] = wi[j] = 0.f;
                            da[i] = rowsum;
                        }
                        for (int64_t j = 0; j < kk; j++) da[j] -= colsum[j];
                        // du = Gm^T dY + Bw dS^T
                        transpose(dS, p, n, n, dST, p);
                        gemm_tri(A_UPPER, 0, kk, p, kk, Gm, 1, k, dY, p, dU, p);
                        gemm_tri(DENSE, 1, kk, p, n, Bw, n, 1, dST, p, dU, p);
                        // dC += Wm B + (e dY) S, and da_i += C_i . (e_i S^T dy_i)
                        gemm_tri(A_LOWER, h > h0, kk, n, kk, Wm, k, 1, Bm, n, dCa, n);
                        gemm_tri(DENSE, 0, kk, n, p, dYe, p, 1, S, n, T, n);
                        for (int64_t i = 0; i < kk; i++) {
                            da[i] += dot(Cm + i * n, T + i * n, n);
                            for (int64_t q = 0; q < n; q += 16) vstore(dCa + i * n + q, vload(dCa + i * n + q) + vload(T + i * n + q));
                        }
                        // dB += Wm^T C + (w U) dS, and the a_end - a_j terms of the carried state
                        gemm_tri(A_UPPER, h > h0, kk, n, kk, Wm, 1, k, Cm, n, dBa, n);
                        gemm_tri(DENSE, 0, kk, n, p, Uw, p, 1, dS, n, T, n);
                        float end_terms = e_end * dot(dS, S, pn);
                        for (int64_t j = 0; j < kk; j++) {
                            const float v = dot(Bm + j * n, T + j * n, n);
                            da[j] -= v;
                            end_terms += v;
                            for (int64_t q = 0; q < n; q += 16) vstore(dBa + j * n + q, vload(dBa + j * n + q) + vload(T + j * n + q));
                        }
                        da[kk - 1] += end_terms;
                        // gradient of the state entering this chunk
                        for (int64_t q = 0; q < pn; q++) dS[q] *= e_end;
                        gemm_tri(DENSE, 1, p, n, kk, dYe, 1, p, Cm, n, dS, n);
                        // per position: the reverse cumsum of da, then dt, x, A and D
                        float rev = 0.f, sa = 0.f, sd = 0.f;
                        for (int64_t t = kk - 1; t >= 0; t--) {
                            const int64_t row = b * l + t0 + t;
                            rev += da[t];
                            const float d = dt[row * nh + h];
                            const float *xt = X + row * rs + h * p;
                            float *dxt = dxbc + row * cd + h * p;
                            const float *dyt = dY + t * p, *dut = dU + t * p;
                            ddt[row * nh + h] = rev * Ah + dot(xt, dut, p);
                            sa += rev * d;
                            sd += dot(dyt, xt, p);
                            for (int64_t pp = 0; pp < p; pp += 16)
                                vstore(dxt + pp, d * vload(dut + pp) + Dh * vload(dyt + pp));
                        }
                        dA_acc[h - h0] += sa;
                        dD_acc[h - h0] += sd;
                    }
                    // this chunk's dB / dC rows, summed over the slice's heads
                    for (int64_t j = 0; j < kk; j++) {
                        const int64_t row = b * l + t0 + j;
                        float *db = ns > 1 ? dBC + ((si * nb * l + row) * 2 * ng + gi) * n : dxbc + row * cd + di + gi * n;
                        float *dc = db + ng * n;
                        memcpy(db, dBa + j * n, sizeof(float) * n);
                        memcpy(dc, dCa + j * n, sizeof(float) * n);
                    }
                }
                for (int64_t h = h0; h < h1; h++) {
                    partial[(b * nh + h) * 2] = dA_acc[h - h0];
                    partial[(b * nh + h) * 2 + 1] = dD_acc[h - h0];
                    if (dinit) memcpy(dinit + (b * nh + h) * pn, dSall + (h - h0) * pn, sizeof(float) * pn);
                }
            }
    if (ns > 1) {
        #pragma omp parallel for schedule(static)
        for (int64_t row = 0; row < nb * l; row++) {
            float *o = dxbc + row * cd + di;
            memcpy(o, dBC + row * 2 * ng * n, sizeof(float) * 2 * ng * n);
            for (int64_t si = 1; si < ns; si++) {
                const float *src = dBC + (si * nb * l + row) * 2 * ng * n;
                for (int64_t q = 0; q < 2 * ng * n; q++) o[q] += src[q];
            }
        }
        free(dBC);
    }
    for (int64_t h = 0; h < nh; h++) {
        float sa = 0.f, sd = 0.f;
        for (int64_t b = 0; b < nb; b++) { sa += partial[(b * nh + h) * 2]; sd += partial[(b * nh + h) * 2 + 1]; }
        dA[h] = sa;
        dD[h] = sd;
    }
    free(partial);
    free(buf_all);
    return 0;
}

// One decoding step of the whole Mamba-2 language model in a single call (reference: Mamba2LM.step in
// model.py, which runs the same arithmetic module by module from Python):
//   h = embedding[token];  per layer: h += out_proj(mixer_step(in_proj(rmsnorm(h))));  logits = head(rmsnorm(h)).
// Each projection is one of four kinds (fp32 dense, packed ternary exact, packed ternary with int8 activations,
// int8 rows for the head); the recurrent conv/SSM states are updated in place.  Python describes the model once
// (tm_model, built by kernels.DecodeEngine) and then calls tm_step per token: no per-layer interpreter overhead.
#define _POSIX_C_SOURCE 199309L   // clock_gettime and CLOCK_MONOTONIC under -std=c11 (also without OpenMP)
#include <math.h>
#include <string.h>
#include <time.h>
#include <stddef.h>
#include "kernels.h"
#include "vec16.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif


// Mirrored by ternary_mamba/spec.py KernelKind and DECODE_MAX_BATCH; tm_abi() lets Python check both at load.
enum { TM_F32 = 0, TM_TQ2 = 1, TM_TQ2_A8 = 2, TM_I8 = 3, TM_F16 = 4, TM_Q4 = 5, TM_TQ2_BF16 = 6, TM_Q4_A8 = 7, TM_TQ2_R32 = 8, TM_TQ2_LUT = 9 };
#define TM_MAX_BATCH 64

typedef struct {
    int64_t kind, out, in, G;
    const void *w;        // fp32 (out, in) | tq2 codes (out, in/4) | int8 (out, in) | fp16 (out, in) | q4 (out, in/2)
                          // | TM_TQ2_R32: tq2r32_pack's codes | TM_TQ2_LUT: tq2lut_pack's
    const float *scales;  // tq2: (out, in/G) | int8: (out) | q4: (out, in/32) | TM_TQ2_R32 / _LUT: fp16 bits | unused
    const float *bias;    // (out) or NULL
} tm_linear;

typedef struct {
    const float *norm_w;
    tm_linear in_proj, out_proj;
    const float *conv_w, *conv_b, *dt_bias, *A_log, *D, *gnorm_w;
} tm_layer;

typedef struct {
    int64_t n_layer, d_model, d_inner, ngroups, d_state, nheads, headdim, d_conv, max_in;
    double eps, gnorm_eps;
    const void *embedding;          // (vocab, d_model) rows of kind emb_kind (TM_F32, TM_F16, TM_I8 or TM_Q4)
    const float *norm_f;
    tm_linear head;
    const tm_layer *layers;
    int64_t emb_kind;
    const float *emb_scales;        // TM_I8: (vocab) | TM_Q4: (vocab, d_model/32) | unused
    int64_t state_bf16;             // 1: every ssm state is bf16 (uint16 bit patterns), fp32 arithmetic; 0: fp32
} tm_model;

// The ABI as this build lays it out, for the Python side to compare with its ctypes mirror (ops/abi.py) at load:
// the enum values and batch limit, then sizeof and every field's offset of tm_linear, tm_layer and tm_model.
// Returns how many values it has (writes at most n of them).
#define ABI_PUT(v) do { if (k < n) out[k] = (int64_t)(v); k++; } while (0)
int64_t tm_abi(int64_t *out, int64_t n) {
    int64_t k = 0;
    ABI_PUT(TM_F32); ABI_PUT(TM_TQ2); ABI_PUT(TM_TQ2_A8); ABI_PUT(TM_I8); ABI_PUT(TM_F16); ABI_PUT(TM_Q4);
    ABI_PUT(TM_TQ2_BF16); ABI_PUT(TM_Q4_A8); ABI_PUT(TM_TQ2_R32); ABI_PUT(TM_TQ2_LUT); ABI_PUT(TM_MAX_BATCH);
    ABI_PUT(sizeof(tm_linear)); ABI_PUT(offsetof(tm_linear, kind)); ABI_PUT(offsetof(tm_linear, out));
    ABI_PUT(offsetof(tm_linear, in)); ABI_PUT(offsetof(tm_linear, G)); ABI_PUT(offsetof(tm_linear, w));
    ABI_PUT(offsetof(tm_linear, scales)); ABI_PUT(offsetof(tm_linear, bias));
    ABI_PUT(sizeof(tm_layer)); ABI_PUT(offsetof(tm_layer, norm_w)); ABI_PUT(offsetof(tm_layer, in_proj));
    ABI_PUT(offsetof(tm_layer, out_proj)); ABI_PUT(offsetof(tm_layer, conv_w)); ABI_PUT(offsetof(tm_layer, conv_b));
    ABI_PUT(offsetof(tm_layer, dt_bias)); ABI_PUT(offsetof(tm_layer, A_log)); ABI_PUT(offsetof(tm_layer, D));
    ABI_PUT(offsetof(tm_layer, gnorm_w));
    ABI_PUT(sizeof(tm_model)); ABI_PUT(offsetof(tm_model, n_layer)); ABI_PUT(offsetof(tm_model, d_model));
    ABI_PUT(offsetof(tm_model, d_inner)); ABI_PUT(offsetof(tm_model, ngroups)); ABI_PUT(offsetof(tm_model, d_state));
    ABI_PUT(offsetof(tm_model, nheads)); ABI_PUT(offsetof(tm_model, headdim)); ABI_PUT(offsetof(tm_model, d_conv));
    ABI_PUT(offsetof(tm_model, max_in)); ABI_PUT(offsetof(tm_model, eps)); ABI_PUT(offsetof(tm_model, gnorm_eps));
    ABI_PUT(offsetof(tm_model, embedding)); ABI_PUT(offsetof(tm_model, norm_f)); ABI_PUT(offsetof(tm_model, head));
    ABI_PUT(offsetof(tm_model, layers)); ABI_PUT(offsetof(tm_model, emb_kind)); ABI_PUT(offsetof(tm_model, emb_scales));
    ABI_PUT(offsetof(tm_model, state_bf16));
    return k;
}
#undef ABI_PUT

static int64_t d_in_proj(const tm_model *m) { return 2 * m->d_inner + 2 * m->ngroups * m->d_state + m->nheads; }

// Scratch floats tm_step needs for a batch of nb (the int8 scratch is tm_qwork_bytes).
int64_t tm_work_floats(const tm_model *m, int64_t nb) {
    const int64_t conv_dim = m->d_inner + 2 * m->ngroups * m->d_state;
    return nb * (3 * m->d_model + d_in_proj(m) + m->d_inner) + conv_dim + 2 * nb;
}
int64_t tm_qwork_bytes(const tm_model *m, int64_t nb) {
    const int64_t a = 2 * nb * m->max_in + 16 + 4 * nb * (m->max_in / 128 + 1), z = a8z_work_bytes(m->max_in, nb);
    const int64_t r = tq2r32_work_bytes(m->max_in, nb), t = tq2lut_work_bytes(m->max_in, nb), az = a > z ? a : z;
    const int64_t rt = r > t ? r : t;
    return az > rt ? az : rt;
}

static void linear(const tm_linear *L, const float *x, float *y, int64_t nb, int8_t *qwork) {
    switch (L->kind) {
    case TM_F32: f32_gemv((const float *)L->w, x, y, L->out, L->in, nb); break;
    case TM_TQ2: tq2_gemv((const uint8_t *)L->w, L->scales, x, y, L->out, L->in, L->G, nb); break;
    case TM_TQ2_R32:                                // built only where the kernel exists (tq2r32_available)
        tq2r32_gemv_auto((const uint8_t *)L->w, (const uint16_t *)(const void *)L->scales, x, y, qwork, L->out,
                        L->in, L->G, nb);
        break;
    case TM_TQ2_LUT:                                // built only where the kernel exists (tq2lut_available)
        tq2lut_gemv((const uint8_t *)L->w, (const uint16_t *)(const void *)L->scales, x, y, qwork, L->out, L->in,
                    L->G, nb);
        break;
    case TM_TQ2_A8: {
        if (tq2_gemv_a8z_auto((const uint8_t *)L->w, L->scales, x, y, qwork, L->out, L->in, L->G, nb) == 0) break;
        int8_t *xq = qwork;
        int32_t *qsum = (int32_t *)(qwork + ((nb * L->in + 15) & ~(int64_t)15));
        float xs[TM_MAX_BATCH];                     // nb <= TM_MAX_BATCH (checked by the caller)
        tq2_quantize_x(x, xq, xs, qsum, L->in, L->G, nb);
        tq2_gemv_a8((const uint8_t *)L->w, L->scales, xq, xs, qsum, y, L->out, L->in, L->G, nb);
        break;
    }
    case TM_I8: i8_gemv((const int8_t *)L->w, L->scales, x, y, L->out, L->in, nb); break;
    case TM_F16: f16_gemv((const uint16_t *)L->w, x, y, L->out, L->in, nb); break;
    case TM_TQ2_BF16:
        f32_to_bf16(x, (uint16_t *)qwork, nb * L->in);
        tq2_gemv_bf16((const uint8_t *)L->w, L->scales, (const uint16_t *)qwork, y, L->out, L->in, L->G, nb);
        break;
    case TM_Q4_A8:
        if (q4_gemv_a8_auto((const uint8_t *)L->w, L->scales, x, y, qwork, L->out, L->in, nb) == 0) break;
        /* fall through: the fp32-activation kernel where VNNI or the shape is missing */
    case TM_Q4: q4_gemv((const uint8_t *)L->w, L->scales, x, y, (float *)qwork, L->out, L->in, nb); break;
    }
    if (L->bias)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t o = 0; o < L->out; o++) y[b * L->out + o] += L->bias[o];
}

static void rmsnorm(const float *x, const float *w, float *y, int64_t nb, int64_t d, float eps) {
    for (int64_t b = 0; b < nb; b++) {
        const float *xr = x + b * d;
        const float ss = dot(xr, xr, d);                // VW lanes at a time: no serial chain of d adds
        const float r = 1.f / sqrtf(ss / (float)d + eps);
        for (int64_t i = 0; i < d; i++) y[b * d + i] = xr[i] * r * w[i];
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
#define TM_MARK(i) if (prof) { const double t_ = now(); prof[i] += t_ - t0; t0 = t_; }

// Everything up to the head: embedding, the layers (states updated in place), the final norm -> u (nb, d_model)
// inside work, which is returned.
static float *tm_trunk(const tm_model *m, const int64_t *tokens, int64_t nb, float *const *conv_states,
                       void *const *ssm_states, float *work, int8_t *qwork, double *prof, double *t0p) {
    double t0 = *t0p;
    const int64_t D = m->d_model;
    float *h = work, *u = h + nb * D, *o = u + nb * D, *zx = o + nb * D, *y = zx + nb * d_in_proj(m);
    float *cwork = y + nb * m->d_inner;
    table_rows(m->emb_kind, m->embedding, m->emb_scales, tokens, nb, D, h);
    for (int64_t l = 0; l < m->n_layer; l++) {
        const tm_layer *L = m->layers + l;
        rmsnorm(h, L->norm_w, u, nb, D, (float)m->eps);
        TM_MARK(0)
        linear(&L->in_proj, u, zx, nb, qwork);
        TM_MARK(1)
        if (m->state_bf16)
            mixer_step_inplace_bf16state(zx, conv_states[l], L->conv_w, L->conv_b, L->dt_bias, L->A_log, L->D,
                                         L->gnorm_w, (uint16_t *)ssm_states[l], y, cwork, nb, m->d_inner,
                                         m->ngroups, m->d_state, m->nheads, m->headdim, m->d_conv,
                                         (float)m->gnorm_eps);
        else
            mixer_step_inplace(zx, conv_states[l], L->conv_w, L->conv_b, L->dt_bias, L->A_log, L->D, L->gnorm_w,
                               (float *)ssm_states[l], y, cwork, nb, m->d_inner, m->ngroups, m->d_state,
                               m->nheads, m->headdim, m->d_conv, (float)m->gnorm_eps);
        TM_MARK(2)
        linear(&L->out_proj, y, o, nb, qwork);
        TM_MARK(3)
        for (int64_t i = 0; i < nb * D; i++) h[i] += o[i];
    }
    rmsnorm(h, m->norm_f, u, nb, D, (float)m->eps);
    TM_MARK(0)
    *t0p = t0;
    return u;
}

// tokens (nb), states per layer: conv (nb, conv_dim, K-1) fp32, ssm (nb, nh, P, N) contiguous fp32 (bf16 when
// state_bf16), updated in place;
// logits (nb, head.out).  Returns 0, or -1 for nb outside 1..64.
// prof (or NULL) accumulates seconds per phase: [embed+norms+residual, in_proj, mixer, out_proj, head].
int tm_step(const tm_model *m, const int64_t *tokens, int64_t nb, float *const *conv_states,
            void *const *ssm_states, float *logits, float *work, int8_t *qwork, double *prof) {
    if (nb < 1 || nb > TM_MAX_BATCH) return -1;
    double t0 = prof ? now() : 0.0;
    const float *u = tm_trunk(m, tokens, nb, conv_states, ssm_states, work, qwork, prof, &t0);
    linear(&m->head, u, logits, nb, qwork);
    TM_MARK(4)
    return 0;
}

// The head's own product for one row (bit-identical to what linear(&m->head, ...) writes for that row).
static float head_row(const tm_linear *H, int64_t j, const float *u) {
    const float v = H->kind == TM_F32 ? dot((const float *)H->w + j * H->in, u, H->in)
                                      : f16_dot((const uint16_t *)H->w + j * H->in, u, H->in);
    return H->bias ? v + H->bias[j] : v;
}

// Greedy decoding with a certified 8-bit pre-pass over the head (fp32 or fp16 heads).  `pre` is the head rounded
// to int8 per row (w = s q + e, |e| <= s/2), so |u.w - s (q.u)| <= s/2 |u|_1; with both products' fp32
// rounding (<= in * 2^-24 * 127 s |u|_1 each, doubled for margin) every row j gets an interval around its
// approximate logit.  Rows whose interval reaches the best lower bound are rescored with the head's exact
// arithmetic; the first row with the largest exact logit is the next token, exactly argmax(logits[:n_valid]) of
// tm_step.  next (nb) gets the tokens; rescored (nb) how many rows each needed.  approx: nb * head.out floats.
int tm_step_greedy(const tm_model *m, const tm_linear *pre, const int64_t *tokens, int64_t nb,
                   float *const *conv_states, void *const *ssm_states, int64_t n_valid, int64_t *next,
                   int64_t *rescored, float *approx, float *work, int8_t *qwork, double *prof) {
    if (nb < 1 || nb > TM_MAX_BATCH || (m->head.kind != TM_F32 && m->head.kind != TM_F16) || pre->kind != TM_I8
            || pre->out != m->head.out || n_valid < 1 || n_valid > m->head.out) return -1;
    double t0 = prof ? now() : 0.0;
    const float *u = tm_trunk(m, tokens, nb, conv_states, ssm_states, work, qwork, prof, &t0);
    linear(pre, u, approx, nb, qwork);
    const int64_t in = m->head.in, V = m->head.out;
    const float factor = 0.5f + 2.f * (float)in * 127.f * 5.9604645e-8f;
    for (int64_t b = 0; b < nb; b++) {
        const float *ub = u + b * in, *a = approx + b * V;
        float l1 = 0.f;
        for (int64_t i = 0; i < in; i++) l1 += fabsf(ub[i]);
        l1 *= 1.0001f;                                  // the sum itself was rounded
        float lower = -INFINITY;
        int ok = isfinite(l1);
        for (int64_t j = 0; j < n_valid && ok; j++) {
            const float lo = a[j] - factor * pre->scales[j] * l1 - 1e-30f;
            ok = isfinite(a[j]);
            if (lo > lower) lower = lo;
        }
        int64_t best = -1, count = 0;
        float best_v = -INFINITY;
        for (int64_t j = 0; j < n_valid; j++) {
            if (ok && a[j] + factor * pre->scales[j] * l1 + 1e-30f < lower) continue;   // certainly not the max
            const float v = head_row(&m->head, j, ub);
            count++;
            if (best < 0 || v > best_v) { best = j; best_v = v; }       // first index of the maximum (argmax)
        }
        next[b] = best;
        rescored[b] = count;
    }
    TM_MARK(4)
    return 0;
}

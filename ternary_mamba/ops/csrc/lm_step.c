// One decoding step of the whole Mamba-2 language model in a single call (reference: Mamba2LM.step in
// model.py, which runs the same arithmetic module by module from Python):
//   h = embedding[token];  per layer: h += out_proj(mixer_step(in_proj(rmsnorm(h))));  logits = head(rmsnorm(h)).
// Each projection is one of four kinds (fp32 dense, packed ternary exact, packed ternary with int8 activations,
// int8 rows for the head); the recurrent conv/SSM states are updated in place.  Python describes the model once
// (tm_model, built by kernels.DecodeEngine) and then calls tm_step per token: no per-layer interpreter overhead.
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
enum { TM_F32 = 0, TM_TQ2 = 1, TM_TQ2_A8 = 2, TM_I8 = 3, TM_F16 = 4, TM_Q4 = 5, TM_TQ2_BF16 = 6 };
#define TM_MAX_BATCH 64

typedef struct {
    int64_t kind, out, in, G;
    const void *w;        // fp32 (out, in) | tq2 codes (out, in/4) | int8 (out, in) | fp16 (out, in) | q4 (out, in/2)
    const float *scales;  // tq2: (out, in/G) | int8: (out) | q4: (out, in/32) | unused
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
} tm_model;

// The ABI as this build lays it out, for the Python side to compare with its ctypes mirror (ops/abi.py) at load:
// the enum values and batch limit, then sizeof and every field's offset of tm_linear, tm_layer and tm_model.
// Returns how many values it has (writes at most n of them).
#define ABI_PUT(v) do { if (k < n) out[k] = (int64_t)(v); k++; } while (0)
int64_t tm_abi(int64_t *out, int64_t n) {
    int64_t k = 0;
    ABI_PUT(TM_F32); ABI_PUT(TM_TQ2); ABI_PUT(TM_TQ2_A8); ABI_PUT(TM_I8); ABI_PUT(TM_F16); ABI_PUT(TM_Q4);
    ABI_PUT(TM_TQ2_BF16); ABI_PUT(TM_MAX_BATCH);
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
    return k;
}
#undef ABI_PUT

static int64_t d_in_proj(const tm_model *m) { return 2 * m->d_inner + 2 * m->ngroups * m->d_state + m->nheads; }

// Scratch floats tm_step needs for a batch of nb (the int8 scratch is tm_qwork_bytes).
int64_t tm_work_floats(const tm_model *m, int64_t nb) {
    const int64_t conv_dim = m->d_inner + 2 * m->ngroups * m->d_state;
    return nb * (3 * m->d_model + d_in_proj(m) + m->d_inner) + conv_dim + 2 * nb;
}
int64_t tm_qwork_bytes(const tm_model *m, int64_t nb) { return 2 * nb * m->max_in + 16 + 4 * nb * (m->max_in / 128 + 1); }

// y (nb, out) = x (nb, in) . w^T for a few tokens (decode, short prompts).  Rows go in blocks of four: four
// independent weight streams per thread keep more memory requests in flight than one row at a time (+5-15 % of
// bandwidth on this class of machine, measured in a C harness), blocks of 64 rows keep each thread's reads
// sequential, and the four rows (in L1 after the first token) are reused for every token, four tokens at a time,
// so the weights are read from memory once whatever nb is.
// Software prefetch of the four rows 8 KB ahead into L2 (T1): streaming 360 MB of 130m fp32 projections went
// from 25-28 GB/s (none) to ~30 (4 KB) and 35-39 (8 KB) in a C harness (2 threads, AVX-512 EPYC); in the engine the
// 130m fp32 decode went from 49-54 to 58-63 tok/s.  Past a row's end the prefetch continues in the same row of the
// next block (rows of 8 KB, as at 1.3B, would otherwise prefetch the neighbour row being read right now).
// Prefetching past the matrix end is harmless.
#ifdef __AVX2__
#define PREFETCH4_L2(i) { int64_t o_ = (i) * 4 + 8192; const int64_t s_ = in * 4; \
    if (o_ >= s_) o_ += 3 * s_;   /* past the row's end: the same row of the next block of four */ \
    const char *p_ = (const char *)r0 + o_; \
    _mm_prefetch(p_, _MM_HINT_T1); _mm_prefetch(p_ + s_, _MM_HINT_T1); \
    _mm_prefetch(p_ + 2 * s_, _MM_HINT_T1); _mm_prefetch(p_ + 3 * s_, _MM_HINT_T1); }
#else
#define PREFETCH4_L2(i) {}
#endif
static void f32_rows4(const float *w, const float *x, float *y, int64_t out, int64_t in, int64_t nb, int64_t o) {
    const float *r0 = w + o * in, *r1 = r0 + in, *r2 = r1 + in, *r3 = r2 + in;
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        const float *x0 = x + b * in, *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;
        // sixteen named accumulators (an array of vectors is kept on the stack by GCC)
        v16 a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
        v16 a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
        for (int64_t i = 0; i < in; i += 16) {
            if (b == 0) PREFETCH4_L2(i)
            const v16 w0 = vload(r0 + i), w1 = vload(r1 + i), w2 = vload(r2 + i), w3 = vload(r3 + i);
            v16 xv = vload(x0 + i);
            a00 += w0 * xv; a01 += w1 * xv; a02 += w2 * xv; a03 += w3 * xv;
            xv = vload(x1 + i);
            a10 += w0 * xv; a11 += w1 * xv; a12 += w2 * xv; a13 += w3 * xv;
            xv = vload(x2 + i);
            a20 += w0 * xv; a21 += w1 * xv; a22 += w2 * xv; a23 += w3 * xv;
            xv = vload(x3 + i);
            a30 += w0 * xv; a31 += w1 * xv; a32 += w2 * xv; a33 += w3 * xv;
        }
        float *y0 = y + b * out + o, *y1 = y0 + out, *y2 = y1 + out, *y3 = y2 + out;
        y0[0] = hsum16(a00); y0[1] = hsum16(a01); y0[2] = hsum16(a02); y0[3] = hsum16(a03);
        y1[0] = hsum16(a10); y1[1] = hsum16(a11); y1[2] = hsum16(a12); y1[3] = hsum16(a13);
        y2[0] = hsum16(a20); y2[1] = hsum16(a21); y2[2] = hsum16(a22); y2[3] = hsum16(a23);
        y3[0] = hsum16(a30); y3[1] = hsum16(a31); y3[2] = hsum16(a32); y3[3] = hsum16(a33);
    }
#if defined(__AVX2__) && !defined(__AVX512F__)
    // AVX2: explicit ymm accumulators (GCC keeps 64-byte generic vectors on the stack when the CPU has only
    // 32-byte registers: the generic loop below streamed at half the speed of this one)
    for (; b < nb; b++) {
        const float *xb = x + b * in;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        for (int64_t i = 0; i < in; i += 16) {
            if (b == 0) PREFETCH4_L2(i)
            const __m256 xl = _mm256_loadu_ps(xb + i), xh = _mm256_loadu_ps(xb + i + 8);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + i), xl, a0); c0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + i + 8), xh, c0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + i), xl, a1); c1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + i + 8), xh, c1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + i), xl, a2); c2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + i + 8), xh, c2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + i), xl, a3); c3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + i + 8), xh, c3);
        }
        float *yb = y + b * out + o;
        yb[0] = hsum8(_mm256_add_ps(a0, c0));
        yb[1] = hsum8(_mm256_add_ps(a1, c1));
        yb[2] = hsum8(_mm256_add_ps(a2, c2));
        yb[3] = hsum8(_mm256_add_ps(a3, c3));
    }
#endif
    for (; b < nb; b++) {
        const float *xb = x + b * in;
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t i = 0; i < in; i += 16) {
            if (b == 0) PREFETCH4_L2(i)
            const v16 xv = vload(xb + i);
            a0 += vload(r0 + i) * xv;
            a1 += vload(r1 + i) * xv;
            a2 += vload(r2 + i) * xv;
            a3 += vload(r3 + i) * xv;
        }
        float *yb = y + b * out + o;
        yb[0] = hsum16(a0);
        yb[1] = hsum16(a1);
        yb[2] = hsum16(a2);
        yb[3] = hsum16(a3);
    }
}

void f32_gemv(const float *w, const float *x, float *y, int64_t out, int64_t in, int64_t nb) {
    if (in % 16 == 0) {
        // each thread streams one contiguous range of rows (static split): the hardware prefetchers follow one
        // sequential stream per thread, and no scheduling traffic: +17 % on a 154 MB head and 1.7x on matrices
        // in L3 against dynamic blocks of 64 rows (C harness, 2 threads, AVX-512 EPYC)
        const int64_t nblk = (out + 3) / 4;
        #pragma omp parallel for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t o = blk * 4;
            if (o + 4 <= out) f32_rows4(w, x, y, out, in, nb, o);
            else
                for (int64_t r = o; r < out; r++)
                    for (int64_t b = 0; b < nb; b++) y[b * out + r] = dot(w + r * in, x + b * in, in);
        }
        return;
    }
    #pragma omp parallel for schedule(guided)
    for (int64_t o = 0; o < out; o++) {
        const float *row = w + o * in;
        for (int64_t b = 0; b < nb; b++) y[b * out + o] = dot(row, x + b * in, in);
    }
}

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, mant = h & 1023;
    uint32_t bits;
    if (e == 0) {                                       // zero / subnormal: mant * 2^-24
        float f = (float)mant * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((e + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// y (nb, out) = x (nb, in) . w^T with w stored as fp16 (converted exactly to fp32 on the fly; F16C when present).
// One fp16 row . x (the arithmetic of every f16_gemv product, also used to rescore single rows exactly).
// Prefetch: 8 KB ahead into L2 (T1); the former T0 prefetch four rows ahead read the 154 MB 130m head at 26-28 GB/s,
// 4 KB ahead at 30-37 (C harness, 2 threads, AVX-512 EPYC).
static inline float f16_dot(const uint16_t *row, const float *xx, int64_t in) {
    float acc = 0.f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    for (; i + 32 <= in; i += 32) {
        _mm_prefetch((const char *)(row + i) + 8192, _MM_HINT_T1);
        b0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + i))), _mm512_loadu_ps(xx + i), b0);
        b1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + i + 16))),
                             _mm512_loadu_ps(xx + i + 16), b1);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
#elif defined(__AVX2__) && defined(__F16C__)
#define F16W(off) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i + (off))))
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= in; i += 32) {
        _mm_prefetch((const char *)(row + i) + 8192, _MM_HINT_T1);
        a0 = _mm256_fmadd_ps(F16W(0), _mm256_loadu_ps(xx + i), a0);
        a1 = _mm256_fmadd_ps(F16W(8), _mm256_loadu_ps(xx + i + 8), a1);
        a2 = _mm256_fmadd_ps(F16W(16), _mm256_loadu_ps(xx + i + 16), a2);
        a3 = _mm256_fmadd_ps(F16W(24), _mm256_loadu_ps(xx + i + 24), a3);
    }
#undef F16W
    const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    acc = hsum8(a);
#endif
    for (; i < in; i++) acc += half_to_float(row[i]) * xx[i];
    return acc;
}

void f16_gemv(const uint16_t *w, const float *x, float *y, int64_t out, int64_t in, int64_t nb) {
    #pragma omp parallel for schedule(guided)
    for (int64_t o = 0; o < out; o++)
        for (int64_t b = 0; b < nb; b++) y[b * out + o] = f16_dot(w + o * in, x + b * in, in);
}

static void linear(const tm_linear *L, const float *x, float *y, int64_t nb, int8_t *qwork) {
    switch (L->kind) {
    case TM_F32: f32_gemv((const float *)L->w, x, y, L->out, L->in, nb); break;
    case TM_TQ2: tq2_gemv((const uint8_t *)L->w, L->scales, x, y, L->out, L->in, L->G, nb); break;
    case TM_TQ2_A8: {
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
    case TM_Q4: q4_gemv((const uint8_t *)L->w, L->scales, x, y, (float *)qwork, L->out, L->in, nb); break;
    }
    if (L->bias)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t o = 0; o < L->out; o++) y[b * L->out + o] += L->bias[o];
}

static void rmsnorm(const float *x, const float *w, float *y, int64_t nb, int64_t d, float eps) {
    for (int64_t b = 0; b < nb; b++) {
        const float *xr = x + b * d;
        float ss = 0.f;
        for (int64_t i = 0; i < d; i++) ss += xr[i] * xr[i];
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
                       float *const *ssm_states, float *work, int8_t *qwork, double *prof, double *t0p) {
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
        mixer_step_inplace(zx, conv_states[l], L->conv_w, L->conv_b, L->dt_bias, L->A_log, L->D, L->gnorm_w,
                           ssm_states[l], y, cwork, nb, m->d_inner, m->ngroups, m->d_state, m->nheads,
                           m->headdim, m->d_conv, (float)m->gnorm_eps);
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

// tokens (nb), states per layer: conv (nb, conv_dim, K-1), ssm (nb, nh, P, N) contiguous fp32, updated in place;
// logits (nb, head.out).  Returns 0, or -1 for nb outside 1..64.
// prof (or NULL) accumulates seconds per phase: [embed+norms+residual, in_proj, mixer, out_proj, head].
int tm_step(const tm_model *m, const int64_t *tokens, int64_t nb, float *const *conv_states,
            float *const *ssm_states, float *logits, float *work, int8_t *qwork, double *prof) {
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
                   float *const *conv_states, float *const *ssm_states, int64_t n_valid, int64_t *next,
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

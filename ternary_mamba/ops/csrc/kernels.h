// Prototypes shared by the C sources of the ternary-mamba kernel library (all built into one .so).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>

// Sum of the 8 lanes of an AVX register.
static inline float hsum8(__m256 a) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}
#endif

// bf16 <-> fp32.  Round to nearest even (what vcvtneps2bf16 does for finite values); a NaN stays a NaN.
static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float bf2f(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 64 floats x * inv -> 64 int8 in order (cvtps_epi32 rounds to nearest even, as lrintf; saturating narrow), their
// int32 values added into *sum: the int8 decode quantizers' inner step (decode_a8.c).
static inline __m512i q8_64(const float *x, __m512 inv, __m512i *sum) {
    __m128i part[4];
    for (int k = 0; k < 4; k++) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * k), inv));
        *sum = _mm512_add_epi32(*sum, v);
        part[k] = _mm512_cvtsepi32_epi8(v);
    }
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(part[1], part[0])),
                              _mm256_set_m128i(part[3], part[2]), 1);
}
#endif

// max |x[i]| over n values (the int8 quantizers' absmax).
static inline float absmax_f32(const float *x, int64_t n) {
    float m = 0.f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 vm = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) vm = _mm512_max_ps(vm, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    m = _mm512_reduce_max_ps(vm);
#elif defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 vm = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    m = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++) m = fmaxf(m, fabsf(x[i]));
    return m;
}

// A row's int8 scale (absmax / 127) and its inverse (0 for an all-zero row): the decode quantizers' per-row step.
static inline float i8_row_scale(const float *x, int64_t n, float *inv) {
    const float m = absmax_f32(x, n);
    *inv = m > 0.f ? 127.f / m : 0.f;
    return m / 127.f;
}

void tq2_gemv(const uint8_t *codes, const float *scales, const float *x, float *y,
              int64_t out, int64_t in, int64_t G, int64_t nb);
void tq2_quantize_x(const float *x, int8_t *xq, float *xs, int32_t *qsum, int64_t in, int64_t G, int64_t nb);
void tq2_gemv_a8(const uint8_t *codes, const float *scales, const int8_t *xq, const float *xs, const int32_t *qsum,
                 float *y, int64_t out, int64_t in, int64_t G, int64_t nb);
void i8_gemv(const int8_t *w, const float *scale, const float *x, float *y, int64_t out, int64_t in, int64_t nb);
void f16_gemv(const uint16_t *w, const float *x, float *y, int64_t out, int64_t in, int64_t nb);
float f16_dot(const uint16_t *row, const float *xx, int64_t in);   // one fp16 row . x, exactly f16_gemv's
void q4_gemv(const uint8_t *q, const float *scale, const float *x, float *y, float *xsum,
             int64_t out, int64_t in, int64_t nb);
void table_rows(int64_t kind, const void *w, const float *scale, const int64_t *ids, int64_t n, int64_t d, float *out);
void tq2_gemv_bf16(const uint8_t *codes, const float *scales, const uint16_t *xb, float *y,
                   int64_t out, int64_t in, int64_t G, int64_t nb);
void f32_to_bf16(const float *x, uint16_t *xb, int64_t n);
void tq2_dequant_bf16(const uint8_t *codes, const float *scales, uint16_t *w, int64_t out, int64_t in, int64_t G);
int tq2_has_bf16(void);
float stream_read(const float *buf, int64_t n);
float vector_probe(int64_t iters);
int64_t stream_ranges(uint8_t *const *ptrs, const int64_t *nbytes, const uint8_t *flags, int64_t n, int64_t zero);
int tq2_gemm_a8(const uint8_t *codes, const float *scales, const float *x, float *y,
                int64_t out, int64_t in, int64_t G, int64_t nt);
int tq2_has_vnni512(void);
int q4_a8_kernel(void);
void f32_gemv(const float *w, const float *x, float *y, int64_t out, int64_t in, int64_t nb);
void ssd_step_inplace(float *state, const float *x, const float *dt, const float *dA, const float *B, const float *C,
                      float *y, int64_t nb, int64_t nh, int64_t hp, int64_t ng, int64_t n);
void mixer_step_inplace(const float *zxbcdt, float *conv_state, const float *conv_w, const float *conv_b,
                        const float *dt_bias, const float *A_log, const float *Dp, const float *norm_w,
                        float *ssm_state, float *y, float *work,
                        int64_t nb, int64_t d_inner, int64_t ng, int64_t n, int64_t nh, int64_t hp, int64_t K,
                        float eps);
void mixer_step_inplace_bf16state(const float *zxbcdt, float *conv_state, const float *conv_w, const float *conv_b,
                                  const float *dt_bias, const float *A_log, const float *Dp, const float *norm_w,
                                  uint16_t *ssm_state, float *y, float *work,
                                  int64_t nb, int64_t d_inner, int64_t ng, int64_t n, int64_t nh, int64_t hp,
                                  int64_t K, float eps);
int ssd_prefill(const float *x, const float *dt, const float *A, const float *B, const float *C, const float *init,
                float *y, float *final_state, int64_t nb, int64_t l, int64_t nh, int64_t p, int64_t ng, int64_t n,
                int64_t k, int64_t x_rs, int64_t bc_rs, float *chunk_states, const float *D);
int conv_silu_prefill(const float *xbc, int64_t in_rs, const float *prev, const float *w, const float *bias,
                       float *out, float *new_state, int64_t nb, int64_t l, int64_t cd, int64_t K);
int ssd_backward(const float *xbc, int64_t rs, const float *dt, const float *A, const float *D, const float *states,
                 const float *dy, const float *dfinal, float *dxbc, float *ddt, float *dA, float *dD, float *dinit,
                 int64_t nb, int64_t l, int64_t nh, int64_t p, int64_t ng, int64_t n, int64_t k);
int conv_silu_backward(const float *x, int64_t in_rs, const float *prev, const float *w, const float *bias,
                        const float *dout, float *dx, float *dw, float *dbias, float *dprev,
                        int64_t nb, int64_t l, int64_t cd, int64_t K);
void ce_forward(const float *x, int64_t ld, const int64_t *tgt, float *lse, float *loss, int64_t N, int64_t V);
void ce_backward(const float *x, int64_t ld, const int64_t *tgt, const float *lse, float g, float *dx,
                 int64_t N, int64_t V);
void kl_forward(const float *t, int64_t ldt, const float *s, int64_t lds, float tau, float *lse_t, float *lse_s,
                float *kl, int64_t N, int64_t V);
void kl_backward(const float *t, int64_t ldt, const float *s, int64_t lds, float tau, const float *lse_t,
                 const float *lse_s, float g, float *ds, int64_t N, int64_t V);
void gated_norm_fwd(const float *y, const float *z, int64_t z_rs, const float *w, float *out, float *rstd,
                    int64_t rows, int64_t d, int64_t ng, float eps);
int gated_norm_bwd(const float *y, const float *z, int64_t z_rs, const float *w, const float *rstd,
                    const float *dout, float *dy, float *dz, float *dw, int64_t rows, int64_t d, int64_t ng);
void rms_norm_fwd(const float *x, const float *w, float *out, float *rstd, int64_t rows, int64_t d, float eps);
int rms_norm_bwd(const float *x, const float *w, const float *rstd, const float *dout, float *dx, float *dw,
                  int64_t rows, int64_t d);

// decode_a8.c: int8-activation decode GEMVs on AVX512-VNNI (-1: not in this build / not this shape)
int64_t a8z_work_bytes(int64_t in, int64_t nb);
int tq2r32_available(void);
int tq2lut_available(void);
int tq2lut_pack(const uint8_t *codes, const float *scales, uint8_t *dst, uint16_t *dst_scales, int64_t out,
                int64_t in, int64_t G);
int64_t tq2lut_block_bytes(int64_t in, int64_t G);
int64_t tq2lut_work_bytes(int64_t in, int64_t nb);
int tq2lut_gemv(const uint8_t *codes, const uint16_t *scales, const float *x, float *y, void *work, int64_t out,
                int64_t in, int64_t G, int64_t nb);
int tq2r32_pack(const uint8_t *codes, const float *scales, uint8_t *dst, uint16_t *dst_scales, int64_t out,
                int64_t in, int64_t G);
int64_t tq2r32_work_bytes(int64_t in, int64_t nb);
int tq2r32_gemv_auto(const uint8_t *codes, const uint16_t *scales, const float *x, float *y, int8_t *work,
                     int64_t out, int64_t in, int64_t G, int64_t nb);
int tq2_gemv_a8z_auto(const uint8_t *codes, const float *scales, const float *x, float *y, int8_t *work,
                      int64_t out, int64_t in, int64_t G, int64_t nb);
int q4_gemv_a8_auto(const uint8_t *w, const float *scale, const float *x, float *y, int8_t *work,
                    int64_t out, int64_t in, int64_t nb);

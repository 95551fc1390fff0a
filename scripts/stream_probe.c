// How the `fast` decode GEMV reads memory against reads that compute nothing: a probe, not a shipped kernel
// (docs/SPEED.md, "The GEMV reads at the one-stream rate").  48 matrices of the 1.3B in_proj shape (8512 x 2048,
// G = 128: 4.4 MB of r32 codes + fp16 scales each, 222 MB in all) are streamed on every core, per round in turn:
//   r32      the shipped kernel (ops/csrc/decode_r32.c r32_gemv, included below): one code stream per thread;
//   r16x4    the same arithmetic on 16-row blocks, four blocks at once from the four quarters of each thread's
//            rows: four code streams per thread touched every 64 bytes, as the bandwidth probe reads
//            (checked equal to r32, bit for bit, before timing; exit 1 if not);
//   read x1  the same bytes (codes, then scales), nothing computed: one stream per thread, prefetch 16 KB ahead;
//   read x4  the same bytes read by the benchmarks' probe itself (csrc/bandwidth.c stream_read, included below: four
//            streams per thread, prefetch 8 KB ahead) -- the roofline's denominator.
// Prints each variant's best and median GB/s and, per round, its rate over `read x4` of the same round (median):
// what each read pattern gives, and whether the four-stream gain survives the arithmetic.
// Run: bash scripts/stream_probe.sh [rounds] [matrices, default 48] (AVX512-VNNI builds only).
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <omp.h>
#include "decode_r32.c"
#include "bandwidth.c"
#if !defined(DECODE_R32) || defined(R32_AVX2)
#error "the stream probe needs AVX512-VNNI (the r32 kernel's 512-bit build)"
#endif

enum { LAYERS = 48, OUT = 8512, IN = 2048, G = 128, NS = IN / 16, NG = IN / G, NB32 = (OUT + 31) / 32 };
static const int64_t CODE_BYTES = (int64_t)NB32 * NS * 128, SCALE_BYTES = (int64_t)NB32 * NG * 32 * 2;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

// One 16-row block's plane sums for group g (codes c: NS steps of 64 bytes), combined as r32_gemv combines them.
#define R16_STEP(acc, w, x0, x1, x2, x3)                                                           \
    acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_and_si512(w, m0), x0);                             \
    acc[1] = _mm512_dpbusd_epi32(acc[1], _mm512_and_si512(w, m1), x1);                             \
    acc[2] = _mm512_dpbusd_epi32(acc[2], _mm512_and_si512(w, m2), x2);                             \
    acc[3] = _mm512_dpbusd_epi32(acc[3], _mm512_and_si512(w, m3), x3);
static inline __m512 r16_combine(const __m512i *a, __m512i sg) {
    const __m512i A = _mm512_add_epi32(_mm512_add_epi32(a[0], _mm512_srai_epi32(a[1], 2)),
                                       _mm512_add_epi32(_mm512_srai_epi32(a[2], 4), _mm512_srai_epi32(a[3], 6)));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(A, sg));
}

// r16 layout: block j (rows 16j..16j+15), per k 64 bytes (= r32 block j/2's half j%2); scales (j, g, 16).
// Each thread's blocks in four quarters, visited together (four streams); a remainder one block at a time.
static void r16x4(const uint8_t *codes, const uint16_t *scales, const int8_t *xa, const int32_t *S, float xs,
                  float *y) {
    const int64_t nblk = 2 * NB32;
    #pragma omp parallel
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t b0 = nblk * t / nt, b1 = nblk * (t + 1) / nt, q = (b1 - b0) / 4;
        const __m512i m0 = _mm512_set1_epi8(3), m1 = _mm512_set1_epi8(12), m2 = _mm512_set1_epi8(48);
        const __m512i m3 = _mm512_set1_epi8((char)192);
        const int32_t *xd = (const int32_t *)(const void *)xa;
        for (int64_t i = 0; i < q + (b1 - b0 - 4 * q); i++) {
            const int four = i < q, n = four ? 4 : 1;
            int64_t blk[4];
            for (int s = 0; s < 4; s++) blk[s] = four ? b0 + s * q + i : b0 + 4 * q + (i - q);
            const uint8_t *p[4];
            for (int s = 0; s < 4; s++) p[s] = codes + blk[s] * NS * 64;
            __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t g = 0; g < NG; g++) {
                __m512i a[4][4];
                for (int s = 0; s < 4; s++)
                    for (int j = 0; j < 4; j++) a[s][j] = _mm512_setzero_si512();
                for (int64_t k = g * (G / 16); k < (g + 1) * (G / 16); k++) {
                    const int32_t *xk = xd + 4 * k;
                    const __m512i x0 = _mm512_set1_epi32(xk[0]), x1 = _mm512_set1_epi32(xk[1]);
                    const __m512i x2 = _mm512_set1_epi32(xk[2]), x3 = _mm512_set1_epi32(xk[3]);
                    if (four) {
                        for (int s = 0; s < 4; s++) _mm_prefetch((const char *)p[s] + 64 * k + 8192, _MM_HINT_T1);
                        __m512i w0 = _mm512_loadu_si512(p[0] + 64 * k), w1 = _mm512_loadu_si512(p[1] + 64 * k);
                        __m512i w2 = _mm512_loadu_si512(p[2] + 64 * k), w3 = _mm512_loadu_si512(p[3] + 64 * k);
                        __asm__("" : "+v"(w0), "+v"(w1), "+v"(w2), "+v"(w3));
                        R16_STEP(a[0], w0, x0, x1, x2, x3)
                        R16_STEP(a[1], w1, x0, x1, x2, x3)
                        R16_STEP(a[2], w2, x0, x1, x2, x3)
                        R16_STEP(a[3], w3, x0, x1, x2, x3)
                    } else {
                        _mm_prefetch((const char *)p[0] + 64 * k + 16384, _MM_HINT_T1);
                        __m512i w0 = _mm512_loadu_si512(p[0] + 64 * k);
                        __asm__("" : "+v"(w0));
                        R16_STEP(a[0], w0, x0, x1, x2, x3)
                    }
                }
                const __m512i sg = _mm512_set1_epi32(S[g]);
                for (int s = 0; s < n; s++) {
                    const __m256i sc = _mm256_loadu_si256((const __m256i *)(const void *)(scales + (blk[s] * NG + g) * 16));
                    f[s] = _mm512_fmadd_ps(r16_combine(a[s], sg), _mm512_cvtph_ps(sc), f[s]);
                }
            }
            for (int s = 0; s < n; s++)
                if (16 * blk[s] < OUT) _mm512_storeu_ps(y + 16 * blk[s], _mm512_mul_ps(f[s], _mm512_set1_ps(xs)));
        }
    }
}

// The bytes split over the threads, each part read as one stream prefetched 16 KB ahead (as r32 reads), nothing
// computed; returns a checksum so the loads stay.
static int64_t read_one_stream(const uint8_t *base, int64_t lines) {
    int64_t sum = 0;
    #pragma omp parallel reduction(^ : sum)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t lo = lines * t / nt, hi = lines * (t + 1) / nt;
        __m512i acc = _mm512_setzero_si512();
        for (int64_t j = lo; j < hi; j++) {
            _mm_prefetch((const char *)base + 64 * j + 16384, _MM_HINT_T1);
            acc = _mm512_xor_si512(acc, _mm512_loadu_si512(base + 64 * j));
        }
        sum ^= _mm512_reduce_add_epi64(acc);
    }
    return sum;
}

static int cmp(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    const int rounds = argc > 1 ? atoi(argv[1]) : 12, layers = argc > 2 ? atoi(argv[2]) : LAYERS;
    if (rounds < 1 || rounds > 1000 || layers < 1 || layers > LAYERS) {
        fprintf(stderr, "usage: stream_probe [rounds 1..1000] [matrices 1..%d]\n", LAYERS);
        return 2;
    }
    uint8_t *c32[LAYERS], *c16[LAYERS];
    uint16_t *s32[LAYERS], *s16[LAYERS];
    srand(1);
    for (int l = 0; l < layers; l++) {
        c32[l] = aligned_alloc(64, CODE_BYTES); c16[l] = aligned_alloc(64, CODE_BYTES);
        s32[l] = aligned_alloc(64, SCALE_BYTES); s16[l] = aligned_alloc(64, SCALE_BYTES);
        for (int64_t i = 0; i < CODE_BYTES; i++) {               // fields 0..2 (weight -1, 0, +1); rows >= OUT: zero
            uint8_t v = 0;
            for (int f = 0; f < 4; f++) v |= (uint8_t)((rand() % 3) << (2 * f));
            c32[l][i] = v;
        }
        for (int64_t i = 0; i < SCALE_BYTES / 2; i++) s32[l][i] = (uint16_t)_cvtss_sh(0.01f + 0.001f * (rand() % 64), 0);
        for (int64_t j = 0; j < 2 * NB32; j++)                   // r32 -> r16 (block j = half j % 2 of block j / 2)
            for (int64_t k = 0; k < NS; k++) {
                memcpy(c16[l] + (j * NS + k) * 64, c32[l] + ((j / 2) * NS + k) * 128 + 64 * (j % 2), 64);
                if (k < NG) memcpy(s16[l] + (j * NG + k) * 16, s32[l] + ((j / 2) * NG + k) * 32 + 16 * (j % 2), 32);
            }
    }
    float x[IN], *y32 = malloc(NB32 * 32 * 4), *y16 = malloc(NB32 * 32 * 4);
    for (int i = 0; i < IN; i++) x[i] = (float)(rand() % 2001 - 1000) / 1000.f;
    int8_t *work = aligned_alloc(64, 1 << 16);
    tq2r32_gemv_auto(c32[0], s32[0], x, y32, work, OUT, IN, G, 1);     // quantizes x into work (xa, S, xs)
    int8_t *xa = (int8_t *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    int32_t *S = (int32_t *)(void *)(xa + ((IN + 63) & ~(int64_t)63));
    const float xs = *(float *)(void *)(S + NG);
    for (int l = 0; l < layers; l += layers > 1 ? layers - 1 : 1) {
        r32_gemv(c32[l], s32[l], xa, S, &xs, y32, OUT, IN, G, 1);
        r16x4(c16[l], s16[l], xa, S, xs, y16);
        if (memcmp(y32, y16, OUT * 4)) { fprintf(stderr, "r16x4 differs from r32 (layer %d)\n", l); return 1; }
    }
    const char *names[] = {"r32 (shipped)", "r16x4", "read x1", "read x4"};
    enum { NV = 4 };
    double gbs[NV][1000];
    int64_t sink = 0;
    const double gb = (double)layers * (CODE_BYTES + SCALE_BYTES) / 1e9;
    printf("threads %d, %d rounds, %.3f GB per pass (%d x in_proj 8512 x 2048 of a 1.3B)\n", omp_get_max_threads(),
           rounds, gb, layers);
    for (int r = 0; r < rounds; r++)
        for (int v = 0; v < NV; v++) {
            const double t0 = now();
            for (int l = 0; l < layers; l++) {
                if (v == 0) r32_gemv(c32[l], s32[l], xa, S, &xs, y32, OUT, IN, G, 1);
                else if (v == 1) r16x4(c16[l], s16[l], xa, S, xs, y16);
                else if (v == 2)
                    sink ^= read_one_stream(c32[l], CODE_BYTES / 64) ^ read_one_stream((uint8_t *)s32[l], SCALE_BYTES / 64);
                else sink ^= (int64_t)(stream_read((const float *)c32[l], CODE_BYTES / 4)
                                       + stream_read((const float *)s32[l], SCALE_BYTES / 4) == 42.f);
            }
            gbs[v][r] = gb / (now() - t0);
        }
    for (int v = 0; v < NV; v++) {
        double sorted[1000], ratio[1000], best = 0;
        for (int r = 0; r < rounds; r++) {
            sorted[r] = gbs[v][r];
            ratio[r] = 100 * gbs[v][r] / gbs[NV - 1][r];
            best = gbs[v][r] > best ? gbs[v][r] : best;
        }
        qsort(sorted, rounds, sizeof(double), cmp);
        qsort(ratio, rounds, sizeof(double), cmp);
        printf("%-14s best %5.1f GB/s  median %5.1f  of read x4 in its round (median) %4.0f %%\n", names[v], best,
               sorted[rounds / 2], ratio[rounds / 2]);
    }
    return sink == 42 ? 3 : 0;          // never 42 in practice; keeps the reads
}

/* Fused per-token layer ops for the CPU: what torch runs as 4-8 small ops (each a dispatch and a
 * pass over memory) done in one pass. At decode batch sizes these ops are all overhead; fusing
 * them is what keeps the per-step glue small next to the matmuls.
 *
 * All tensors are float32 and row-major, except that the KV cache may be fp16. Numerics follow HF
 * Llama: RMSNorm normalises then scales by the weight; RoPE is x * cos + rotate_half(x) * sin
 * without fused multiply-adds.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(__F16C__)
#error "layer_ops.c needs F16C (an x86-64 CPU, built with -march=native)"
#endif

#pragma GCC optimize("fp-contract=off")

/* residual += delta (if delta is not NULL); out = rms_norm(residual) * weight.  x: [T, N]. */
void add_rms_norm(float *residual, const float *delta, const float *weight, float *out, int64_t T,
                  int64_t N, float eps) {
#pragma omp parallel for if (T > 16)
    for (int64_t t = 0; t < T; ++t) {
        float *x = residual + t * N;
        if (delta) {
            const float *dx = delta + t * N;
#pragma omp simd
            for (int64_t i = 0; i < N; ++i) x[i] += dx[i];
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < N; ++i) ss += x[i] * x[i];
        const float r = 1.f / sqrtf(ss / (float)N + eps);
        float *o = out + t * N;
#pragma omp simd
        for (int64_t i = 0; i < N; ++i) o[i] = weight[i] * (x[i] * r);
    }
}

/* Stores n floats at element `slot_offset` of a cache, converted to fp16 (round to nearest even,
 * as torch's .half()) when `fp16`, else copied. */
static void store_kv(void *cache, int64_t slot_offset, const float *x, int64_t n, int64_t fp16) {
    if (!fp16) {
        memcpy((float *)cache + slot_offset, x, sizeof(float) * (size_t)n);
        return;
    }
    uint16_t *dst = (uint16_t *)cache + slot_offset;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) dst[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

/* qkv: [T, (H + 2 KVH) * D] rows of the fused projection. Rotates the H query and KVH key heads in
 * place with the tables' rows at each token's position (cos and rotate-half-signed sin, [*, D]),
 * then writes the key and value heads to the cache slot of each token ([slots, KVH * D] caches of
 * fp16 when kv_fp16, else float32). */
void rope_and_cache(float *qkv, const int64_t *positions, const float *cos_table, const float *sin_table,
                    const int64_t *slots, void *k_cache, void *v_cache, int64_t kv_fp16, int64_t T, int64_t H,
                    int64_t KVH, int64_t D) {
    const int64_t row = (H + 2 * KVH) * D, half = D / 2;
#pragma omp parallel for if (T > 16)
    for (int64_t t = 0; t < T; ++t) {
        float *x = qkv + t * row;
        const float *c = cos_table + positions[t] * D, *s = sin_table + positions[t] * D;
        for (int64_t h = 0; h < H + KVH; ++h) {
            float *v = x + h * D;
            float rotated[512];
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                rotated[i] = v[i] * c[i] + v[i + half] * s[i];
                rotated[i + half] = v[i + half] * c[i + half] + v[i] * s[i + half];
            }
            memcpy(v, rotated, sizeof(float) * (size_t)D);
        }
        store_kv(k_cache, slots[t] * KVH * D, x + H * D, KVH * D, kv_fp16);
        store_kv(v_cache, slots[t] * KVH * D, x + (H + KVH) * D, KVH * D, kv_fp16);
    }
}

/* gate_up: [T, 2I] (gate then up); out[t, i] = silu(gate) * up. */
void silu_and_mul(const float *gate_up, float *out, int64_t T, int64_t I) {
#pragma omp parallel for if (T * I > 65536)
    for (int64_t t = 0; t < T; ++t) {
        const float *g = gate_up + t * 2 * I, *u = g + I;
        float *o = out + t * I;
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

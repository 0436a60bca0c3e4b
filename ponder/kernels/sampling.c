/* The sampler's draw for the CPU: argmax over tokens of p[t] / E[t], the exponential race, where
 * E[t] = -log(u) and u is a hash of (the row's seed, the index of the token being generated, t).
 * See `ponder/layers/sampler.py`: this computes exactly what its torch path does (the same hash,
 * the same float64 log, the same float32 division, the first index on ties) without
 * materialising the [B, V] noise: the torch path builds a dozen int64 temporaries of that size,
 * which on a 150k vocabulary cost more than the model's forward pass at batch 200.
 *
 * Most tokens cannot win, and that is cheap to prove: E >= 1 - u, so p / E <= p / (1 - u). A token
 * needs its log only if p / (1 - u) could exceed the best value so far (with a wide margin for
 * rounding). Starting from the most probable token, almost every other token is ruled out by the
 * vectorised hash and one comparison, and the log is taken a handful of times per row.
 */
#include <math.h>
#include <stdint.h>

#define CHUNK 64

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    return x ^ (x >> 16);
}

static inline float race_value(float p, uint32_t bits) {
    const double u = ((double)bits + 0.5) * (1.0 / 4294967296.0);
    const float e = (float)(-log(u));
    return p / e;
}

/* probs [B, V] float32 rows (non-negative), seeds / steps [B] (uint32 values in int64) -> tokens [B]. */
void race_argmax(const float *probs, const int64_t *seeds, const int64_t *steps, int64_t *tokens, int64_t B,
                 int64_t V) {
#pragma omp parallel for schedule(dynamic, 1) if (B > 1)
    for (int64_t b = 0; b < B; ++b) {
        const float *p = probs + b * V;
        const uint32_t row_key = mix32(mix32((uint32_t)seeds[b]) ^ (uint32_t)steps[b]);
        int64_t top = 0;
        for (int64_t t = 1; t < V; ++t)
            if (p[t] > p[top]) top = t;
        int64_t best_t = top;
        float best = race_value(p[top], mix32(row_key ^ ((uint32_t)top * 0x9E3779B9u)));
        for (int64_t t0 = 0; t0 < V; t0 += CHUNK) {
            const int64_t len = V - t0 < CHUNK ? V - t0 : CHUNK;
            uint32_t bits[CHUNK];
            unsigned char maybe[CHUNK];
            unsigned any = 0;
            const float bound = best;
            for (int64_t j = 0; j < len; ++j) {
                bits[j] = mix32(row_key ^ ((uint32_t)(t0 + j) * 0x9E3779B9u));
                /* a lower bound of 1 - u, off by far more than float rounding */
                const float one_minus_u = 1.0f - (float)bits[j] * (1.0f / 4294967296.0f) - 1e-6f;
                maybe[j] = 4.0f * p[t0 + j] > one_minus_u * bound;
                any |= maybe[j];
            }
            if (!any) continue;
            for (int64_t j = 0; j < len; ++j) {
                if (!maybe[j]) continue;
                const float v = race_value(p[t0 + j], bits[j]);
                if (v > best || (v == best && t0 + j < best_t)) {
                    best = v;
                    best_t = t0 + j;
                }
            }
        }
        tokens[b] = best_t;
    }
}

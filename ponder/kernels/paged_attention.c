/* Paged decode attention for the CPU: one query token per sequence, reading K/V straight from
 * the block pool (no gather, no padding to the longest context).
 *
 * Layouts (all float32, row-major, contiguous):
 *   q        [B, H, D]             the step's decode queries (rows q_stride floats apart)
 *   k_cache  [blocks, BS, KVH, D]  one layer's keys;  v_cache the same for values
 *   tables   [B, max_blocks]       int64 block ids of each sequence's context, in order
 *   ctx_lens [B]                   int64 tokens of context each query attends to
 *   out      [B, H, D]
 *
 * Work is split over (sequence, kv head) pairs with OpenMP (the runtime torch already loaded, so
 * the two share one thread pool). Each pair computes the scores of its G = H / KVH query heads
 * against every context token, a softmax, and the weighted sum of values. A sequence's result
 * depends only on its own query and context, never on what else is in the batch. The head size
 * is a compile-time constant in the hot loops (64 and 128 are specialised) so they unroll fully.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 64

static inline void attend_one(const float *restrict qb, const float *restrict k_cache,
                              const float *restrict v_cache, const int64_t *restrict table, int64_t n,
                              float *restrict ob, int64_t G, const int64_t D, int64_t BS,
                              int64_t token_stride, int64_t block_stride, int64_t head_offset,
                              float scale, float *restrict scores) {
    const int64_t nblocks = (n + BS - 1) / BS;
    /* scores[g, t] = scale * q_g . k_t */
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        const float *kb = k_cache + table[blk] * block_stride + head_offset;
        const int64_t t0 = blk * BS;
        const int64_t len = n - t0 < BS ? n - t0 : BS;
        for (int64_t j = 0; j < len; ++j) {
            const float *k = kb + j * token_stride;
            for (int64_t g = 0; g < G; ++g) {
                const float *qg = qb + g * D;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < D; ++d) s += qg[d] * k[d];
                scores[g * n + t0 + j] = s * scale;
            }
        }
    }
    /* softmax over t, per head (normalisation folded into the output) */
    float inv[MAX_GROUP];
    for (int64_t g = 0; g < G; ++g) {
        float *row = scores + g * n;
        float m = row[0];
        for (int64_t t = 1; t < n; ++t) m = row[t] > m ? row[t] : m;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
            row[t] = expf(row[t] - m);
            sum += row[t];
        }
        inv[g] = 1.f / sum;
    }
    /* out_g = sum_t p[g, t] * v_t / sum_g */
    float acc[MAX_GROUP * 128];
    memset(acc, 0, sizeof(float) * (size_t)(G * D));
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        const float *vb = v_cache + table[blk] * block_stride + head_offset;
        const int64_t t0 = blk * BS;
        const int64_t len = n - t0 < BS ? n - t0 : BS;
        for (int64_t j = 0; j < len; ++j) {
            const float *v = vb + j * token_stride;
            for (int64_t g = 0; g < G; ++g) {
                const float p = scores[g * n + t0 + j];
                float *a = acc + g * D;
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
            }
        }
    }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) ob[g * D + d] = acc[g * D + d] * inv[g];
}

/* Returns 0, or -1 if the shapes are outside what the kernel supports. */
int paged_decode_attention(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                           const int64_t *tables, int64_t max_blocks, const int64_t *ctx_lens,
                           float *out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS,
                           float scale) {
    const int64_t G = H / KVH;
    if (G > MAX_GROUP || D > 128 || H % KVH) return -1;
    const int64_t token_stride = KVH * D;
    const int64_t block_stride = BS * token_stride;

#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t kvh = 0; kvh < KVH; ++kvh) {
            const int64_t n = ctx_lens[b];
            float *scores = (float *)malloc(sizeof(float) * (size_t)(G * n));
            const float *qb = q + b * q_stride + kvh * G * D;   /* G consecutive query heads */
            float *ob = out + (b * H + kvh * G) * D;
            const int64_t *table = tables + b * max_blocks;
            if (D == 64)
                attend_one(qb, k_cache, v_cache, table, n, ob, G, 64, BS, token_stride, block_stride,
                           kvh * D, scale, scores);
            else if (D == 128)
                attend_one(qb, k_cache, v_cache, table, n, ob, G, 128, BS, token_stride, block_stride,
                           kvh * D, scale, scores);
            else
                attend_one(qb, k_cache, v_cache, table, n, ob, G, D, BS, token_stride, block_stride,
                           kvh * D, scale, scores);
            free(scores);
        }
    }
    return 0;
}

/* Paged attention for the CPU: every query token attends to the first n_t tokens of its
 * sequence's context, reading K/V straight from the block pool (no gather, no padding to the
 * longest context). Prefill-chunk tokens and decode tokens are the same kind of work here: token t
 * at position p attends causally to n_t = p + 1 keys, so a whole mixed step is one call.
 *
 * Layouts (row-major, contiguous unless a stride is given):
 *   q        [T, H, D] float32        the step's queries (rows q_stride floats apart)
 *   k_cache  [blocks, BS, KVH, D]     one layer's keys, fp16 or fp32; v_cache the same for values
 *   tables   [S, table_stride] int64  block ids of each sequence's context, in order
 *   seq_of   [T] int64                the row of `tables` that query t reads
 *   ctx_lens [T] int64                n_t, the keys query t attends to (itself included)
 *   tail_from [T] int64, tail_pos [T, tail_stride] int64 (both NULL for plain causal queries):
 *            key j >= tail_from[t] of query t is not table position j but table position
 *            tail_pos[t, j - tail_from[t]] — a token tree's query attends to the committed context
 *            and then to its own ancestors, wherever in the table they were written
 *   out      [T, H, D] float32
 *
 * Batch invariance (a token's output is bitwise the same alone, among 64 decodes or inside a
 * prefill chunk): the arithmetic of query t depends only on q_t, n_t and the cached K/V. Its
 * context is cut into chunks of CHUNK keys counted from position 0 — a constant, never derived
 * from the batch or the thread count. Each chunk yields (max, sum of exponentials, unnormalised
 * output) per query head, and the chunks are merged in chunk order. Threads take (token, kv head,
 * chunk) items in any order; which thread computes an item never changes its bits. The hot loops
 * A tree query's keys are counted the same way (key j of its path is key j of the decode that
 * computes the same path), so a tree-verified token is bitwise the token decoded alone.
 * The hot loops
 * are written with explicit AVX2/FMA intrinsics (fixed lane order, unaligned loads) and the file
 * is built without -ffast-math, so no reassociation, alignment peeling or library exp variant can
 * make two calls differ.
 *
 * The G = H / KVH query heads that share a kv head are computed together, so each K/V row is
 * read (and converted from fp16) once per group. The head size is a compile-time constant in the
 * hot loops for 64 and 128, so they unroll fully; other sizes up to MAX_DIM take the generic path.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "paged_attention.c needs AVX2, FMA and F16C (an x86-64 CPU, built with -march=native)"
#endif

#define CHUNK 256     /* keys per unit of work: fixed, so splitting never depends on the batch */
#define KEYS 8        /* keys whose dot products run interleaved */
#define VALUES 32     /* value rows converted per pass of the weighted sum */
#define MAX_GROUP 64
#define MAX_DIM 256

typedef struct {
    const float *q;
    int64_t q_stride;
    const void *k_cache, *v_cache;
    int fp16;                      /* cache element type: fp16 (1) or fp32 (0) */
    const int64_t *tables;
    int64_t table_stride;
    const int64_t *seq_of, *ctx_lens;
    const int64_t *tail_from, *tail_pos;
    int64_t tail_stride;
    int64_t H, KVH, G, D, BS;
    float scale;
} Attention;

/* Eight cache elements from element index i, as float32. With `fp16` a constant at each inlined
 * call site, the branch folds away: one kernel body serves both cache types. */
static inline __m256 load8(const void *cache, int64_t i, const int fp16) {
    if (fp16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i)));
    return _mm256_loadu_ps((const float *)cache + i);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Lane k = the sum of the 8 lanes of v[k] (a transpose by pairwise adds: one pass for 8 keys
 * instead of 8 horizontal sums). */
static inline __m256 sums8(const __m256 v[8]) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* e^x for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-7 polynomial in r, times 2^n; about
 * 1 ulp). Lanes below -87 (-inf included) give 0. Ours rather than libm's so the vector loop
 * computes the same bits on every build. */
static inline __m256 exp8(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.f);
    const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lowest);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

/* Element index of key j's head `kvh` row, for the `len` keys of the chunk starting at c0 of
 * query t: runs of table positions through the block table, then a tree query's tail one by one. */
static void chunk_rows(const Attention *a, int64_t t, int64_t c0, int64_t len, int64_t kvh, int64_t *rows) {
    const int64_t token_stride = a->KVH * a->D;
    const int64_t *table = a->tables + a->seq_of[t] * a->table_stride;
    const int64_t tail = a->tail_from ? a->tail_from[t] : c0 + len;
    const int64_t plain_end = tail < c0 + len ? (tail > c0 ? tail : c0) : c0 + len;
    for (int64_t pos = c0; pos < plain_end;) {
        const int64_t block = pos / a->BS, off = pos % a->BS;
        const int64_t run = a->BS - off < plain_end - pos ? a->BS - off : plain_end - pos;
        const int64_t base = (table[block] * a->BS + off) * token_stride + kvh * a->D;
        for (int64_t i = 0; i < run; ++i) rows[pos - c0 + i] = base + i * token_stride;
        pos += run;
    }
    for (int64_t pos = plain_end; pos < c0 + len; ++pos) {
        const int64_t at = a->tail_pos[t * a->tail_stride + pos - tail];
        rows[pos - c0] = (table[at / a->BS] * a->BS + at % a->BS) * token_stride + kvh * a->D;
    }
}

/* A partial result is [m[G], l[G], acc[G, D]]: per query head the chunk's largest score, the sum
 * of exp(score - m), and the exp-weighted sum of values. */
static inline int64_t partial_size(const Attention *a) { return a->G * (a->D + 2); }

/* Chunk c of query t's context against kv head kvh, for its G query heads. */
static inline __attribute__((always_inline)) void attend_chunk(const Attention *a, int64_t t, int64_t kvh,
                                                               int64_t c, float *partial, const int64_t D,
                                                               const int fp16) {
    const int64_t G = a->G, c0 = c * CHUNK;
    const int64_t len = a->ctx_lens[t] - c0 < CHUNK ? a->ctx_lens[t] - c0 : CHUNK;
    const int64_t len8 = (len + 7) & ~(int64_t)7;
    const float *q = a->q + t * a->q_stride + kvh * G * D;       /* G consecutive query heads */
    int64_t rows[CHUNK];
    float s[MAX_GROUP * CHUNK];                                  /* s[g * CHUNK + j] */
    __m256 vals[VALUES][MAX_DIM / 8];                            /* VALUES V rows, as float32 */
    __m256 keys[KEYS][MAX_DIM / 8];                              /* KEYS K rows, as float32 */
    float *m = partial, *l = partial + G, *acc = partial + 2 * G;

    chunk_rows(a, t, c0, len, kvh, rows);
    /* s[g, j] = scale * q_g . k_j: one FMA chain over the head per (g, j), KEYS = 8 keys at a time
     * so their chains overlap (a single chain waits on the FMA latency) and their 8 sums come out
     * as one vector; keys converted once. Past the chunk's end the lanes are overwritten below. */
    for (int64_t j0 = 0; j0 < len; j0 += KEYS) {
        const int64_t nk = len - j0 < KEYS ? len - j0 : KEYS;
        for (int64_t k = 0; k < nk; ++k)
            for (int64_t i = 0; i < D / 8; ++i) keys[k][i] = load8(a->k_cache, rows[j0 + k] + 8 * i, fp16);
        for (int64_t g = 0; g < G; ++g) {
            __m256 dot[KEYS];
            for (int64_t k = 0; k < KEYS; ++k) dot[k] = _mm256_setzero_ps();
            for (int64_t i = 0; i < D / 8; ++i) {
                const __m256 qv = _mm256_loadu_ps(q + g * D + 8 * i);
                for (int64_t k = 0; k < KEYS; ++k) dot[k] = _mm256_fmadd_ps(qv, keys[k][i], dot[k]);
            }
            _mm256_storeu_ps(s + g * CHUNK + j0, _mm256_mul_ps(sums8(dot), _mm256_set1_ps(a->scale)));
        }
    }
    for (int64_t g = 0; g < G; ++g) {             /* scores -> exp(score - max), padded to 8 with 0 */
        float *sg = s + g * CHUNK;
        for (int64_t j = len; j < len8; ++j) sg[j] = -INFINITY;
        __m256 mx = _mm256_set1_ps(-INFINITY);
        for (int64_t j = 0; j < len8; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sg + j));
        m[g] = hmax8(mx);
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < len8; j += 8) {
            const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), _mm256_set1_ps(m[g])));
            _mm256_storeu_ps(sg + j, p);
            sum = _mm256_add_ps(sum, p);
        }
        l[g] = hsum8(sum);
    }
    /* acc[g] = sum_j p[g, j] v_j in key order, VALUES keys at a time: their rows converted once
     * into `vals`, each 8-float slice of acc kept in a register across them. */
    memset(acc, 0, sizeof(float) * (size_t)(G * D));
    for (int64_t j0 = 0; j0 < len; j0 += VALUES) {
        const int64_t nv = len - j0 < VALUES ? len - j0 : VALUES;
        for (int64_t k = 0; k < nv; ++k)
            for (int64_t i = 0; i < D / 8; ++i) vals[k][i] = load8(a->v_cache, rows[j0 + k] + 8 * i, fp16);
        for (int64_t g = 0; g < G; ++g) {
            const float *pg = s + g * CHUNK + j0;
            float *ag = acc + g * D;
            for (int64_t i = 0; i < D / 8; ++i) {
                __m256 sum = _mm256_loadu_ps(ag + 8 * i);
                for (int64_t k = 0; k < nv; ++k) sum = _mm256_fmadd_ps(_mm256_set1_ps(pg[k]), vals[k][i], sum);
                _mm256_storeu_ps(ag + 8 * i, sum);
            }
        }
    }
}

/* The head size as a constant where it is 64 or 128, so the loops over it unroll fully. */
static inline __attribute__((always_inline)) void attend_chunk_kv(const Attention *a, int64_t t, int64_t kvh,
                                                                  int64_t c, float *partial, const int fp16) {
    if (a->D == 64) attend_chunk(a, t, kvh, c, partial, 64, fp16);
    else if (a->D == 128) attend_chunk(a, t, kvh, c, partial, 128, fp16);
    else attend_chunk(a, t, kvh, c, partial, a->D, fp16);
}

static void run_chunk(const Attention *a, int64_t t, int64_t kvh, int64_t c, float *partial) {
    if (a->fp16) attend_chunk_kv(a, t, kvh, c, partial, 1);
    else attend_chunk_kv(a, t, kvh, c, partial, 0);
}

/* out[g] = sum_c acc_c[g] e^(m_c - M) / sum_c l_c e^(m_c - M), M the largest m_c, over the nc
 * partials of one (query, kv head) in chunk order. */
static void merge_chunks(const Attention *a, const float *partials, int64_t nc, float *out) {
    const int64_t G = a->G, D = a->D, size = partial_size(a);
    float w[nc];
    for (int64_t g = 0; g < G; ++g) {
        float M = -INFINITY, L = 0.f;
        for (int64_t c = 0; c < nc; ++c) M = fmaxf(M, partials[c * size + g]);
        for (int64_t c = 0; c < nc; ++c) {
            w[c] = expf(partials[c * size + g] - M);
            L += partials[c * size + G + g] * w[c];
        }
        const __m256 inv = _mm256_set1_ps(1.f / L);
        for (int64_t i = 0; i < D; i += 8) {
            __m256 o = _mm256_setzero_ps();
            for (int64_t c = 0; c < nc; ++c)
                o = _mm256_fmadd_ps(_mm256_set1_ps(w[c]), _mm256_loadu_ps(partials + c * size + 2 * G + g * D + i), o);
            _mm256_storeu_ps(out + g * D + i, _mm256_mul_ps(o, inv));
        }
    }
}

static inline int64_t num_chunks(int64_t n) { return (n + CHUNK - 1) / CHUNK; }

/* The token whose items include `item`: the last t with first_item[t] <= item. */
static int64_t token_of_item(const int64_t *first_item, int64_t T, int64_t item) {
    int64_t lo = 0, hi = T - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (first_item[mid] <= item) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

int paged_attention_supports(int64_t H, int64_t KVH, int64_t D) {
    return KVH > 0 && H % KVH == 0 && H / KVH <= MAX_GROUP && D > 0 && D % 8 == 0 && D <= MAX_DIM;
}

/* Returns 0; -1 if the shapes are outside what the kernel supports; -2 if out of memory. */
int paged_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int64_t kv_fp16,
                    const int64_t *tables, int64_t table_stride, const int64_t *seq_of, const int64_t *ctx_lens,
                    const int64_t *tail_from, const int64_t *tail_pos, int64_t tail_stride,
                    float *out, int64_t T, int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale) {
    if (!paged_attention_supports(H, KVH, D)) return -1;
    if (T == 0) return 0;
    const Attention a = {q, q_stride, k_cache, v_cache, kv_fp16 != 0, tables, table_stride, seq_of, ctx_lens,
                         tail_from, tail_pos, tail_stride, H, KVH, H / KVH, D, BS, scale};
    /* Items of token t are first_item[t] .. first_item[t + 1] - 1, kv head major, then chunk. */
    int64_t *first_item = malloc(sizeof(int64_t) * (size_t)(T + 1));
    if (!first_item) return -2;
    first_item[0] = 0;
    for (int64_t t = 0; t < T; ++t) first_item[t + 1] = first_item[t] + KVH * num_chunks(ctx_lens[t]);
    const int64_t items = first_item[T], size = partial_size(&a);
    float *partials = malloc(sizeof(float) * (size_t)(items * size));
    if (!partials) {
        free(first_item);
        return -2;
    }
#pragma omp parallel if (items > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t t = token_of_item(first_item, T, item), r = item - first_item[t];
            const int64_t nc = num_chunks(ctx_lens[t]);
            run_chunk(&a, t, r / nc, r % nc, partials + item * size);
        }
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < T * KVH; ++pair) {
            const int64_t t = pair / KVH, kvh = pair % KVH;
            const int64_t nc = num_chunks(ctx_lens[t]);
            merge_chunks(&a, partials + (first_item[t] + kvh * nc) * size, nc, out + (t * H + kvh * a.G) * D);
        }
    }
    free(partials);
    free(first_item);
    return 0;
}

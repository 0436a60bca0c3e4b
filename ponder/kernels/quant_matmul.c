/* y = x @ W^T with W held in GGUF's 4-8-bit block formats, on integer dot products.
 *
 * Weights are repacked once at load (ponder/model/repack.py) into row groups of R = 8 output
 * rows. Within a group, every 32-element block of the 8 rows is stored so that one 32-byte
 * register holds 4 consecutive elements of each of the 8 rows: lane r of an int32 dot product is
 * then row r's partial sum, and the float accumulation runs with one lane per output row. The
 * repacking is lossless: each row keeps its quants and scales bit for bit, in as many bytes as
 * the file's own format (K-quants' 6-bit scales become bytes: +3%).
 *
 * Every format is "unsigned quants u, a per-block scale, an optional per-block min":
 *     w = (D * S) * (u - offset) + DM * MN
 * where D (and DM) are fp16 per super-group of G blocks and S, MN small integers per block (absent
 * for the 32-blocks formats, where G = 1). Q6_K has two scales per block (one per 16 elements).
 *
 * Activations are quantized once per call into 8-bit blocks of 32 (llama.cpp's Q8_0 scheme:
 * d = max|x| / 127, q = round(x / d)) with their per-16 sums. For each block:
 *     isum = sum(u * q) - offset * sum(q)              (exact, int32)
 *     acc  = fma((D * S) * d, isum, acc)               (then + DM * MN * d * sum(q) with mins)
 * in block order. Every (row, column) of y is computed by exactly this sequence of float
 * operations whatever M, the tiling, the thread count or the instruction set, so a token's
 * output never depends on the batch it is in (bitwise), and `qlinear_ref` (plain C, one element
 * at a time) gives bit-identical results: it is what the tests compare against.
 *
 * Instruction sets: AVX-512 VNNI (two row groups per 512-bit register) or AVX-VNNI (vpdpbusd)
 * where the compiler targets them, else AVX2 (vpmaddubsw + vpmaddwd; 8-bit weights take the sign trick, as their u would saturate it).
 * Without AVX2 the scalar reference runs. Built without -ffast-math (see kernels/__init__.py):
 * the exactness is tested.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_AVX2 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_VNNI 1
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define HAVE_VNNI 1
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#else
#define HAVE_VNNI 0
#endif
#else
#define HAVE_AVX2 0
#define HAVE_VNNI 0
#endif
/* AVX-512 with VNNI: two row groups per 512-bit register (see pair_tile). */
#if HAVE_VNNI && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_PAIRS 1
#else
#define HAVE_PAIRS 0
#endif

#define R 8      /* rows per group (lanes of a 256-bit float vector) */
#define QK 32    /* elements per block */
/* Activation rows per tile: a decode batch of up to MT rows reads each weight block once. AVX-512
 * has 32 vector registers (8 accumulators + 8 weight registers fit); AVX2 has 16. */
#if defined(__AVX512VL__)
#define MT 8
#else
#define MT 4
#endif

enum { Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, NUM_FORMATS };

typedef struct {
    int bits, group, has_scale, has_min, offset, half_scales;
} Format;

static const Format FORMATS[NUM_FORMATS] = {
    [Q8_0] = {8, 1, 0, 0, 128, 0}, [Q4_0] = {4, 1, 0, 0, 8, 0}, [Q4_1] = {4, 1, 0, 1, 0, 0},
    [Q5_0] = {5, 1, 0, 0, 16, 0},  [Q5_1] = {5, 1, 0, 1, 0, 0}, [Q4_K] = {4, 8, 1, 1, 0, 0},
    [Q5_K] = {5, 8, 1, 1, 0, 0},   [Q6_K] = {6, 8, 1, 0, 32, 1},
};

/* One segment of a (possibly fused) linear layer: rows [col, col + n) of y come from `w`. */
typedef struct {
    int64_t format, n, col;
    const uint8_t *w;
} Segment;

/* Activations quantized to 8-bit blocks: q [M, K], d and ds = d * sum(q) [M, K/32], sums per 16. */
typedef struct {
    int8_t *q;
    float *d, *ds;
    int32_t *sum16;
    int64_t K;
} Act;

/* ---- layout -------------------------------------------------------------------------------- */

static inline int64_t scale_bytes(const Format f) { return f.has_scale ? R * (f.half_scales ? 2 : 1) : 0; }
static inline int64_t min_bytes(const Format f) { return f.has_min && f.group > 1 ? R : 0; }
static inline int64_t block_bytes(const Format f) { return scale_bytes(f) + min_bytes(f) + QK * f.bits; }
static inline int64_t header_bytes(const Format f) { return 2 * R * (f.has_min ? 2 : 1); }

static inline int64_t group_bytes(const Format f, int64_t K) {
    return K / (QK * f.group) * (header_bytes(f) + f.group * block_bytes(f));
}

int64_t qmm_group_bytes(int64_t format, int64_t K) {
    if (format < 0 || format >= NUM_FORMATS) return -1;
    return group_bytes(FORMATS[format], K);
}

/* The instruction set this build runs: 3 AVX-512 VNNI (pairs), 2 256-bit VNNI, 1 AVX2, 0 plain C. */
int64_t qmm_isa(void) { return HAVE_PAIRS ? 3 : HAVE_VNNI ? 2 : HAVE_AVX2 ? 1 : 0; }

/* ---- scalar building blocks (shared by the reference and the dequantizer) ------------------ */

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {   /* subnormal: normalise */
        uint32_t e = 113, m = man;
        while (!(m & 0x400)) { m <<= 1; --e; }
        bits = sign | (e << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float load_half(const uint8_t *p, int r) {
    uint16_t h;
    memcpy(&h, p + 2 * r, 2);
    return half_to_float(h);
}

/* Quant e (0..31) of lane r in a block's quants `qb`. 4-bit: chunk c = g mod 4 holds group g in
 * its low (g < 4) or high nibbles; 5/6-bit: bit g of byte j of the next 32-byte plane(s). */
static inline int quant_at(const uint8_t *qb, int bits, int r, int e) {
    const int g = e >> 2, j = r * 4 + (e & 3);
    if (bits == 8) return qb[32 * g + j];
    int u = (qb[32 * (g & 3) + j] >> (4 * (g >> 2))) & 0xF;
    if (bits >= 5) u |= ((qb[128 + j] >> g) & 1) << 4;
    if (bits == 6) u |= ((qb[160 + j] >> g) & 1) << 5;
    return u;
}

/* Walks one lane of a row group block by block: the block's scales and quants. */
typedef struct {
    float scale[2], min;
    const uint8_t *quants;
} LaneBlock;

static inline LaneBlock lane_block(const Format f, const uint8_t *group, int64_t b, int r) {
    const int64_t sg = b / f.group, blk = b % f.group;
    const uint8_t *p = group + sg * (header_bytes(f) + f.group * block_bytes(f));
    const float D = load_half(p, r), DM = f.has_min ? load_half(p + 2 * R, r) : 0.f;
    p += header_bytes(f) + blk * block_bytes(f);
    LaneBlock lb;
    lb.scale[0] = lb.scale[1] = D;
    if (f.has_scale) {
        lb.scale[0] = D * (float)(int8_t)p[r];
        lb.scale[1] = f.half_scales ? D * (float)(int8_t)p[R + r] : lb.scale[0];
    }
    lb.min = f.group > 1 && f.has_min ? DM * (float)p[scale_bytes(f) + r] : DM;
    lb.quants = p + scale_bytes(f) + min_bytes(f);
    return lb;
}

/* ---- activations --------------------------------------------------------------------------- */

static void quantize_row(const float *x, int64_t K, int8_t *q, float *d, float *ds, int32_t *sum16) {
    for (int64_t b = 0; b < K / QK; ++b) {
        const float *xb = x + b * QK;
        float amax = 0.f;
#pragma omp simd reduction(max : amax)
        for (int i = 0; i < QK; ++i) amax = fmaxf(amax, fabsf(xb[i]));
        const float scale = amax / 127.f, inv = scale != 0.f ? 1.f / scale : 0.f;
        int32_t s[2] = {0, 0};
        for (int i = 0; i < QK; ++i) {
            const int v = (int)nearbyintf(xb[i] * inv);
            q[b * QK + i] = (int8_t)v;
            s[i >> 4] += v;
        }
        d[b] = scale;
        ds[b] = scale * (float)(s[0] + s[1]);
        sum16[2 * b] = s[0];
        sum16[2 * b + 1] = s[1];
    }
}

static Act act_alloc(int64_t M, int64_t K) {
    Act a;
    a.K = K;
    a.q = (int8_t *)malloc((size_t)(M * K));
    a.d = (float *)malloc(sizeof(float) * (size_t)(M * K / QK));
    a.ds = (float *)malloc(sizeof(float) * (size_t)(M * K / QK));
    a.sum16 = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * K / 16));
    return a;
}

static void act_free(Act a) {
    free(a.q);
    free(a.d);
    free(a.ds);
    free(a.sum16);
}

static inline void act_quantize_row(const Act a, const float *x, int64_t m) {
    const int64_t K = a.K;
    quantize_row(x + m * K, K, a.q + m * K, a.d + m * K / QK, a.ds + m * K / QK, a.sum16 + m * K / 16);
}

/* Exposed for tests: q [M, K], d and ds [M, K/32], sum16 [M, K/16]. */
void qmm_quantize(const float *x, int64_t M, int64_t K, int8_t *q, float *d, float *ds, int32_t *sum16) {
    for (int64_t m = 0; m < M; ++m)
        quantize_row(x + m * K, K, q + m * K, d + m * K / QK, ds + m * K / QK, sum16 + m * K / 16);
}

/* ---- reference: one output element at a time ---------------------------------------------- */

static float dot_ref(const Format f, const uint8_t *group, int r, const Act a, int64_t m) {
    const int64_t K = a.K;
    float acc = 0.f;
    for (int64_t b = 0; b < K / QK; ++b) {
        const LaneBlock lb = lane_block(f, group, b, r);
        const int8_t *q = a.q + m * K + b * QK;
        const float d = a.d[m * K / QK + b];
        const int32_t *s16 = a.sum16 + m * K / 16 + 2 * b;
        int32_t isum[2] = {0, 0};
        for (int e = 0; e < QK; ++e) isum[e >> 4] += quant_at(lb.quants, f.bits, r, e) * q[e];
        if (f.half_scales) {
            for (int h = 0; h < 2; ++h)
                acc = fmaf(lb.scale[h] * d, (float)(isum[h] - f.offset * s16[h]), acc);
        } else {
            acc = fmaf(lb.scale[0] * d, (float)(isum[0] + isum[1] - f.offset * (s16[0] + s16[1])), acc);
        }
        if (f.has_min) acc = fmaf(lb.min, a.ds[m * K / QK + b], acc);
    }
    return acc;
}

static void segment_ref(const Segment s, const Act a, int64_t M, float *y, int64_t ldy, const float *bias) {
    const Format f = FORMATS[s.format];
    const int64_t gb = group_bytes(f, a.K);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < s.n; ++n) {
            const float v = dot_ref(f, s.w + (n / R) * gb, (int)(n % R), a, m);
            y[m * ldy + s.col + n] = bias ? v + bias[s.col + n] : v;
        }
}

/* ---- SIMD kernel --------------------------------------------------------------------------- */
#if HAVE_AVX2

static inline __m256 load_halves(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 load_i8s(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline __m256 load_u8s(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* The block's quants as 8 registers: W[g] = elements 4g..4g+3 of the 8 rows, unsigned bytes. */
static inline __attribute__((always_inline)) void unpack(const uint8_t *qb, const int bits, __m256i W[8]) {
    if (bits == 8) {
        for (int g = 0; g < 8; ++g) W[g] = _mm256_loadu_si256((const __m256i *)(qb + 32 * g));
        return;
    }
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(qb + 32 * c));
        W[c] = _mm256_and_si256(x, low);
        W[c + 4] = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
    }
    /* plane bit g of each byte moves to bit 4 (or 5): 16-bit shifts never carry across bytes
     * into the bit that the mask keeps. */
    for (int p = 0; p < bits - 4; ++p) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)(qb + 128 + 32 * p));
        const int target = 4 + p;
        const __m256i mask = _mm256_set1_epi8((char)(1 << target));
        for (int g = 0; g < 8; ++g) {
            const __m256i moved = g <= target ? _mm256_slli_epi16(h, target - g) : _mm256_srli_epi16(h, g - target);
            W[g] = _mm256_or_si256(W[g], _mm256_and_si256(moved, mask));
        }
    }
}

/* int32 lane r = sum over groups g0..g0+3 (and g0+4..g0+7 when `count` is 8) of row r's
 * quants times the activations. 8-bit weights on AVX2 give sum((u - 128) * q) directly. */
static inline __attribute__((always_inline)) __m256i dot_groups(const __m256i *W, const int8_t *q, const int bits,
                                                                int g0, int count) {
    __m256i acc = _mm256_setzero_si256();
    for (int g = g0; g < g0 + count; ++g) {
        int32_t word;
        memcpy(&word, q + 4 * g, 4);
        const __m256i a = _mm256_set1_epi32(word);
#if HAVE_VNNI
        (void)bits;
        acc = DPBUSD(acc, W[g], a);
#else
        __m256i prod;
        if (bits == 8) {
            const __m256i w = _mm256_xor_si256(W[g], _mm256_set1_epi8((char)0x80));
            prod = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w));
        } else {
            prod = _mm256_maddubs_epi16(W[g], a);
        }
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod, _mm256_set1_epi16(1)));
#endif
    }
    return acc;
}

/* Offset correction is skipped where dot_groups already returned the centred sum. */
#define CENTRED_BY_DOT(bits) (!HAVE_VNNI && (bits) == 8)

static inline __attribute__((always_inline)) void group_tile(const Format f, const uint8_t *group, const Act a,
                                                             int64_t m0, int mt, float out[MT][R]) {
    const int64_t K = a.K, nsg = K / (QK * f.group);
    __m256 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
    const uint8_t *p = group;
    for (int64_t sg = 0; sg < nsg; ++sg) {
        const __m256 D = load_halves(p);
        const __m256 DM = f.has_min ? load_halves(p + 2 * R) : _mm256_setzero_ps();
        p += header_bytes(f);
        for (int blk = 0; blk < f.group; ++blk, p += block_bytes(f)) {
            const int64_t b = sg * f.group + blk;
            __m256 s0 = D, s1 = D;
            if (f.has_scale) {
                s0 = _mm256_mul_ps(D, load_i8s(p));
                if (f.half_scales) s1 = _mm256_mul_ps(D, load_i8s(p + R));
            }
            const __m256 mn = f.has_min && f.group > 1 ? _mm256_mul_ps(DM, load_u8s(p + scale_bytes(f))) : DM;
            __m256i W[8];
            unpack(p + scale_bytes(f) + min_bytes(f), f.bits, W);
#pragma GCC unroll 8
            for (int i = 0; i < MT; ++i) {   /* unrolled, so acc[] stays in registers */
                if (i >= mt) break;
                const int64_t m = m0 + i;
                const int8_t *q = a.q + m * K + b * QK;
                const __m256 d = _mm256_set1_ps(a.d[m * K / QK + b]);
                const int32_t *s16 = a.sum16 + m * K / 16 + 2 * b;
                const int correct = f.offset && !CENTRED_BY_DOT(f.bits);
                if (f.half_scales) {
                    __m256i lo = dot_groups(W, q, f.bits, 0, 4), hi = dot_groups(W, q, f.bits, 4, 4);
                    if (correct) {
                        lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(f.offset * s16[0]));
                        hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(f.offset * s16[1]));
                    }
                    acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(s0, d), _mm256_cvtepi32_ps(lo), acc[i]);
                    acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(s1, d), _mm256_cvtepi32_ps(hi), acc[i]);
                } else {
                    __m256i sum = dot_groups(W, q, f.bits, 0, 8);
                    if (correct) sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(f.offset * (s16[0] + s16[1])));
                    acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(s0, d), _mm256_cvtepi32_ps(sum), acc[i]);
                }
                if (f.has_min) acc[i] = _mm256_fmadd_ps(mn, _mm256_set1_ps(a.ds[m * K / QK + b]), acc[i]);
            }
        }
    }
    for (int i = 0; i < mt; ++i) _mm256_storeu_ps(out[i], acc[i]);
}

#if HAVE_PAIRS
/* Two row groups at once in 512-bit registers (lanes 0-7: group A's rows, 8-15: group B's): the
 * same operations lane for lane as group_tile, on twice the rows per instruction. */
static inline __m512i load_pair(const uint8_t *pa, const uint8_t *pb) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)pa)),
                              _mm256_loadu_si256((const __m256i *)pb), 1);
}
static inline __m512 halves_pair(const uint8_t *pa, const uint8_t *pb) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)pa)),
                                                   _mm_loadu_si128((const __m128i *)pb), 1));
}
static inline __m512 ints_pair(const uint8_t *pa, const uint8_t *pb, const int is_signed) {
    const __m128i b = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)pa), _mm_loadl_epi64((const __m128i *)pb));
    return _mm512_cvtepi32_ps(is_signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
}

static inline __attribute__((always_inline)) void unpack_pair(const uint8_t *qa, const uint8_t *qb, const int bits,
                                                              __m512i W[8]) {
    if (bits == 8) {
        for (int g = 0; g < 8; ++g) W[g] = load_pair(qa + 32 * g, qb + 32 * g);
        return;
    }
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
        const __m512i x = load_pair(qa + 32 * c, qb + 32 * c);
        W[c] = _mm512_and_si512(x, low);
        W[c + 4] = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);
    }
    for (int p = 0; p < bits - 4; ++p) {
        const __m512i h = load_pair(qa + 128 + 32 * p, qb + 128 + 32 * p);
        const int target = 4 + p;
        const __m512i mask = _mm512_set1_epi8((char)(1 << target));
        for (int g = 0; g < 8; ++g) {
            const __m512i moved = g <= target ? _mm512_slli_epi16(h, target - g) : _mm512_srli_epi16(h, g - target);
            W[g] = _mm512_ternarylogic_epi32(W[g], moved, mask, 0xF8);   /* W | (moved & mask) */
        }
    }
}

static inline __attribute__((always_inline)) __m512i dot_pair(const __m512i *W, const int8_t *q, int g0, int count) {
    __m512i acc = _mm512_setzero_si512();
    for (int g = g0; g < g0 + count; ++g) {
        int32_t word;
        memcpy(&word, q + 4 * g, 4);
        acc = _mm512_dpbusd_epi32(acc, W[g], _mm512_set1_epi32(word));
    }
    return acc;
}

static inline __attribute__((always_inline)) void pair_tile(const Format f, const uint8_t *ga, const uint8_t *gb,
                                                            const Act a, int64_t m0, int mt, float out[MT][2 * R]) {
    const int64_t K = a.K, nsg = K / (QK * f.group);
    __m512 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
    int64_t off = 0;
    for (int64_t sg = 0; sg < nsg; ++sg) {
        const __m512 D = halves_pair(ga + off, gb + off);
        const __m512 DM = f.has_min ? halves_pair(ga + off + 2 * R, gb + off + 2 * R) : _mm512_setzero_ps();
        off += header_bytes(f);
        for (int blk = 0; blk < f.group; ++blk, off += block_bytes(f)) {
            const int64_t b = sg * f.group + blk;
            __m512 s0 = D, s1 = D;
            if (f.has_scale) {
                s0 = _mm512_mul_ps(D, ints_pair(ga + off, gb + off, 1));
                if (f.half_scales) s1 = _mm512_mul_ps(D, ints_pair(ga + off + R, gb + off + R, 1));
            }
            const int64_t mo = off + scale_bytes(f);
            const __m512 mn = f.has_min && f.group > 1 ? _mm512_mul_ps(DM, ints_pair(ga + mo, gb + mo, 0)) : DM;
            __m512i W[8];
            unpack_pair(ga + mo + min_bytes(f), gb + mo + min_bytes(f), f.bits, W);
#pragma GCC unroll 8
            for (int i = 0; i < MT; ++i) {   /* unrolled, so acc[] stays in registers */
                if (i >= mt) break;
                const int64_t m = m0 + i;
                const int8_t *q = a.q + m * K + b * QK;
                const __m512 d = _mm512_set1_ps(a.d[m * K / QK + b]);
                const int32_t *s16 = a.sum16 + m * K / 16 + 2 * b;
                if (f.half_scales) {
                    __m512i lo = dot_pair(W, q, 0, 4), hi = dot_pair(W, q, 4, 4);
                    if (f.offset) {
                        lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(f.offset * s16[0]));
                        hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(f.offset * s16[1]));
                    }
                    acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(s0, d), _mm512_cvtepi32_ps(lo), acc[i]);
                    acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(s1, d), _mm512_cvtepi32_ps(hi), acc[i]);
                } else {
                    __m512i sum = dot_pair(W, q, 0, 8);
                    if (f.offset) sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(f.offset * (s16[0] + s16[1])));
                    acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(s0, d), _mm512_cvtepi32_ps(sum), acc[i]);
                }
                if (f.has_min) acc[i] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.ds[m * K / QK + b]), acc[i]);
            }
        }
    }
    for (int i = 0; i < mt; ++i) _mm512_storeu_ps(out[i], acc[i]);
}
#endif

static inline void store_rows(const Segment s, int64_t n0, const float *out, int64_t m, float *y, int64_t ldy,
                              const float *bias) {
    const int64_t rows = s.n - n0 < R ? s.n - n0 : R;
    float *yr = y + m * ldy + s.col + n0;
    for (int64_t r = 0; r < rows; ++r) yr[r] = bias ? out[r] + bias[s.col + n0 + r] : out[r];
}

/* Rows [g0, g1) groups of one segment, all M activation rows. */
static inline __attribute__((always_inline)) void segment_rows(const Format f, const Segment s, const Act a,
                                                               int64_t M, int64_t g0, int64_t g1, float *y,
                                                               int64_t ldy, const float *bias) {
    const int64_t gb = group_bytes(f, a.K);
    int64_t g = g0;
#if HAVE_PAIRS
    for (; g + 1 < g1; g += 2)
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = M - m0 < MT ? (int)(M - m0) : MT;
            float out[MT][2 * R];
            pair_tile(f, s.w + g * gb, s.w + (g + 1) * gb, a, m0, mt, out);
            for (int i = 0; i < mt; ++i) {
                store_rows(s, g * R, out[i], m0 + i, y, ldy, bias);
                store_rows(s, (g + 1) * R, out[i] + R, m0 + i, y, ldy, bias);
            }
        }
#endif
    for (; g < g1; ++g)
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = M - m0 < MT ? (int)(M - m0) : MT;
            float out[MT][R];
            group_tile(f, s.w + g * gb, a, m0, mt, out);
            for (int i = 0; i < mt; ++i) store_rows(s, g * R, out[i], m0 + i, y, ldy, bias);
        }
}

static void segment_simd(const Segment s, const Act a, int64_t M, int64_t g0, int64_t g1, float *y, int64_t ldy,
                         const float *bias) {
    switch (s.format) {   /* one specialised copy of the loops per format */
#define CASE(F) case F: segment_rows(FORMATS[F], s, a, M, g0, g1, y, ldy, bias); break;
        CASE(Q8_0) CASE(Q4_0) CASE(Q4_1) CASE(Q5_0) CASE(Q5_1) CASE(Q4_K) CASE(Q5_K) CASE(Q6_K)
#undef CASE
    }
}
#endif

/* ---- entry points -------------------------------------------------------------------------- */

static int valid(const Segment *segs, int64_t nseg, int64_t K) {
    for (int64_t i = 0; i < nseg; ++i) {
        if (segs[i].format < 0 || segs[i].format >= NUM_FORMATS) return 0;
        if (K % (QK * FORMATS[segs[i].format].group)) return 0;
    }
    return K > 0 && K % QK == 0;
}

/* y[M, ldy] (columns given by the segments) = x[M, K] @ W^T (+ bias). Returns 0, or -1 for a
 * format or K the kernel does not support. */
int qlinear(const float *x, int64_t M, int64_t K, const Segment *segs, int64_t nseg, const float *bias, float *y,
            int64_t ldy) {
    if (!valid(segs, nseg, K)) return -1;
    const Act a = act_alloc(M, K);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) act_quantize_row(a, x, m);
        const int64_t id = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int64_t i = 0; i < nseg; ++i) {
            /* contiguous stretches of row groups per thread: each streams its weights front to back */
            const int64_t groups = (segs[i].n + R - 1) / R;
            const int64_t g0 = groups * id / nt, g1 = groups * (id + 1) / nt;
#if HAVE_AVX2
            segment_simd(segs[i], a, M, g0, g1, y, ldy, bias);
#else
            Segment part = segs[i];
            part.w += g0 * group_bytes(FORMATS[part.format], K);
            part.col += g0 * R;
            part.n = (g1 * R < part.n ? g1 * R : part.n) - g0 * R;
            if (part.n > 0) segment_ref(part, a, M, y, ldy, bias);
#endif
        }
    }
    act_free(a);
    return 0;
}

/* The same result, one element at a time in plain C (the tests' reference). */
int qlinear_ref(const float *x, int64_t M, int64_t K, const Segment *segs, int64_t nseg, const float *bias, float *y,
                int64_t ldy) {
    if (!valid(segs, nseg, K)) return -1;
    const Act a = act_alloc(M, K);
    for (int64_t m = 0; m < M; ++m) act_quantize_row(a, x, m);
    for (int64_t i = 0; i < nseg; ++i) segment_ref(segs[i], a, M, y, ldy, bias);
    act_free(a);
    return 0;
}

/* Rows `rows` of one segment's matrix (N rows) as float32 (embedding lookup): out [n, K].
 * Returns 0, -1 for a format or K the kernel does not support, -2 for a row outside [0, N). */
int qdequant_rows(int64_t format, const uint8_t *w, int64_t N, int64_t K, const int64_t *rows, int64_t n,
                  float *out) {
    if (format < 0 || format >= NUM_FORMATS || K % (QK * FORMATS[format].group)) return -1;
    for (int64_t i = 0; i < n; ++i)
        if (rows[i] < 0 || rows[i] >= N) return -2;
    const Format f = FORMATS[format];
    const int64_t gb = group_bytes(f, K);
#pragma omp parallel for if (n > 16)
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t *group = w + (rows[i] / R) * gb;
        const int r = (int)(rows[i] % R);
        float *o = out + i * K;
        for (int64_t b = 0; b < K / QK; ++b) {
            const LaneBlock lb = lane_block(f, group, b, r);
            for (int e = 0; e < QK; ++e) {
                const float v = lb.scale[e >> 4] * (float)(quant_at(lb.quants, f.bits, r, e) - f.offset);
                o[b * QK + e] = f.has_min ? v + lb.min : v;
            }
        }
    }
    return 0;
}

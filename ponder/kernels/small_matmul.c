/* y = x @ W (+ bias) for the few rows of a decode step: x [M, K], W [K, N] row-major, y [M, N].
 *
 * With one to a few rows a matmul is one pass over W, and its speed is memory bandwidth. The
 * threads split the K rows of W, so each reads one contiguous stretch of memory front to back
 * (the access pattern hardware prefetchers serve best), accumulating into its own copy of y
 * (M x N floats, which stays in cache); the copies are summed at the end. Past a handful of rows
 * the work is compute-bound and MKL's sgemm wins: the caller sends only small M here.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void accumulate_rows(const float *x, const float *W, float *acc, int64_t M, int64_t K, int64_t N,
                            int64_t k_begin, int64_t k_end) {
    int64_t k = k_begin;
    for (; k + 4 <= k_end; k += 4) {   /* four rows of W per pass over the accumulator */
        const float *w0 = W + k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
        for (int64_t m = 0; m < M; ++m) {
            const float *xm = x + m * K + k;
            const float a0 = xm[0], a1 = xm[1], a2 = xm[2], a3 = xm[3];
            float *am = acc + m * N;
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) am[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
        }
    }
    for (; k < k_end; ++k) {
        const float *w = W + k * N;
        for (int64_t m = 0; m < M; ++m) {
            const float a = x[m * K + k];
            float *am = acc + m * N;
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) am[j] += a * w[j];
        }
    }
}

void small_matmul(const float *x, const float *W, const float *bias, float *y, int64_t M, int64_t K,
                  int64_t N) {
    const int64_t threads = omp_get_max_threads();
    float *partial = threads > 1 ? (float *)calloc((size_t)((threads - 1) * M * N), sizeof(float)) : NULL;
#pragma omp parallel num_threads(threads)
    {
        const int64_t id = omp_get_thread_num(), used = omp_get_num_threads();
        float *acc = id == 0 ? y : partial + (id - 1) * M * N;
        if (id == 0)
            for (int64_t m = 0; m < M; ++m) {
                if (bias)
                    memcpy(y + m * N, bias, sizeof(float) * (size_t)N);
                else
                    memset(y + m * N, 0, sizeof(float) * (size_t)N);
            }
        const int64_t per = (K + used - 1) / used;
        const int64_t begin = id * per, end = begin + per < K ? begin + per : K;
        if (begin < end) accumulate_rows(x, W, acc, M, K, N, begin, end);
#pragma omp barrier
        /* sum the other threads' partials into y, split over columns */
        const int64_t cols = (N + used - 1) / used;
        const int64_t c0 = id * cols, c1 = c0 + cols < N ? c0 + cols : N;
        for (int64_t t = 1; t < used; ++t)
            for (int64_t m = 0; m < M; ++m) {
                const float *p = partial + ((t - 1) * M + m) * N;
                float *ym = y + m * N;
#pragma omp simd
                for (int64_t j = c0; j < c1; ++j) ym[j] += p[j];
            }
    }
    free(partial);
}

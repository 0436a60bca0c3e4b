/* Structured output's token mask, applied to the logits of the constrained rows: a token whose bit
 * is clear in the row's bitmask (llguidance's layout: 32 tokens per int32 word, lowest bit first)
 * gets -inf. A grammar usually allows few tokens (most words are 0) or, inside a string, almost
 * all (most words are all ones), so whole words are settled at once and bits are read only in the
 * mixed ones. Torch's version expands the mask to one bool per token first, which costs more
 * than a tenth of a decode step at batch 16.
 */
#include <math.h>
#include <stdint.h>

void apply_token_mask(float *logits, const int32_t *mask, const int64_t *rows, int64_t num_rows,
                      int64_t vocab, int64_t words) {
    for (int64_t r = 0; r < num_rows; r++) {
        float *row = logits + rows[r] * vocab;
        const uint32_t *bits = (const uint32_t *)(mask + rows[r] * words);
        for (int64_t w = 0; w < words; w++) {
            const uint32_t word = bits[w];
            if (word == 0xFFFFFFFFu)
                continue;
            const int64_t start = w * 32, end = start + 32 < vocab ? start + 32 : vocab;
            if (word == 0 && end - start == 32) {
                for (int t = 0; t < 32; t++)
                    row[start + t] = -INFINITY;
                continue;
            }
            for (int64_t t = start; t < end; t++)
                if (!((word >> (t - start)) & 1u))
                    row[t] = -INFINITY;
        }
    }
}

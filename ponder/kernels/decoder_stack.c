/* The whole decoder stack of one step in one native call.
 *
 * Per layer, exactly what LlamaForCausalLM.forward does op by op from Python:
 *     normed  = rms_norm(residual)          (fused with the previous layer's residual add)
 *     qkv     = normed @ Wqkv^T (+ bias);   rope + K/V cache write;   attn = paged_attention(q)
 *     normed  = rms_norm(residual += attn @ Wo^T)
 *     residual += down(silu(gate) * up)
 * calling the same kernels (their addresses come from their own libraries, so each keeps its own
 * build flags and the two paths give bit-identical results). At decode batch sizes the Python
 * path spends more time in dispatch — a dozen ctypes calls, tensor allocations and views per
 * layer — than the matmuls take to stream the weights; here a step is one call, with every
 * pointer prepared at load.
 */
#include <stdint.h>

typedef int (*linear_fn)(const float *x, int64_t M, int64_t K, const void *segments, int64_t nseg,
                         const float *bias, float *y, int64_t ldy);
typedef void (*norm_fn)(float *residual, const float *delta, const float *weight, float *out, int64_t T, int64_t N,
                        float eps);
typedef void (*rope_fn)(float *qkv, const int64_t *positions, const float *cos_table, const float *sin_table,
                        const int64_t *slots, void *k_cache, void *v_cache, int64_t kv_fp16, int64_t T, int64_t H,
                        int64_t KVH, int64_t D);
typedef int (*attention_fn)(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                            int64_t kv_fp16, const int64_t *tables, int64_t table_stride, const int64_t *seq_of,
                            const int64_t *ctx_lens, const int64_t *tail_from, const int64_t *tail_pos,
                            int64_t tail_stride, float *out, int64_t T, int64_t H, int64_t KVH, int64_t D,
                            int64_t BS, float scale);
typedef void (*silu_fn)(const float *gate_up, float *out, int64_t T, int64_t I);

typedef struct {
    const void *segments;   /* the QuantLinear's segment array */
    int64_t nseg, in, out;
    const float *bias;
} Linear;

typedef struct {
    const float *input_norm, *post_norm;
    Linear qkv, o, gate_up, down;
    void *k_cache, *v_cache;
} Layer;

typedef struct {
    linear_fn linear;
    norm_fn norm;
    rope_fn rope;
    attention_fn attention;
    silu_fn silu;
    int64_t num_layers, hidden, heads, kv_heads, head_dim, inter, kv_fp16, block_size;
    float eps, scale;
    const float *cos_table, *sin_table;
    const Layer *layers;
} Stack;

typedef struct {
    int64_t T, table_stride;
    const int64_t *positions, *slots, *tables, *seq_of, *ctx_lens;
    const int64_t *tail_from, *tail_pos;   /* token trees' ancestor keys (paged_attention.c); NULL if none */
    int64_t tail_stride;
} Step;

int64_t decoder_stack_work_floats(const Stack *s, int64_t T) {
    const int64_t qkv = (s->heads + 2 * s->kv_heads) * s->head_dim;
    return T * (2 * s->hidden + qkv + s->heads * s->head_dim + 3 * s->inter);
}

static inline int linear(const Stack *s, const Linear *l, const float *x, int64_t T, float *y) {
    return s->linear(x, T, l->in, l->segments, l->nseg, l->bias, y, l->out);
}

/* residual [T, hidden] in, the last layer's output (before the final norm) out. `work` holds
 * decoder_stack_work_floats() floats. Returns 0, or the first failing kernel's status. */
int decoder_stack_forward(const Stack *s, const Step *st, float *residual, float *work) {
    const int64_t T = st->T, hidden = s->hidden, qkv_width = (s->heads + 2 * s->kv_heads) * s->head_dim;
    float *normed = work, *qkv = normed + T * hidden, *attn = qkv + T * qkv_width;
    float *delta = attn + T * s->heads * s->head_dim, *gate_up = delta + T * hidden, *act = gate_up + 2 * T * s->inter;
    int rc;
    s->norm(residual, 0, s->layers[0].input_norm, normed, T, hidden, s->eps);
    for (int64_t i = 0; i < s->num_layers; ++i) {
        const Layer *l = s->layers + i;
        if ((rc = linear(s, &l->qkv, normed, T, qkv))) return rc;
        s->rope(qkv, st->positions, s->cos_table, s->sin_table, st->slots, l->k_cache, l->v_cache, s->kv_fp16, T,
                s->heads, s->kv_heads, s->head_dim);
        if ((rc = s->attention(qkv, qkv_width, l->k_cache, l->v_cache, s->kv_fp16, st->tables, st->table_stride,
                               st->seq_of, st->ctx_lens, st->tail_from, st->tail_pos, st->tail_stride, attn, T,
                               s->heads, s->kv_heads, s->head_dim,
                               s->block_size, s->scale)))
            return rc;
        if ((rc = linear(s, &l->o, attn, T, delta))) return rc;
        s->norm(residual, delta, l->post_norm, normed, T, hidden, s->eps);
        if ((rc = linear(s, &l->gate_up, normed, T, gate_up))) return rc;
        s->silu(gate_up, act, T, s->inter);
        if ((rc = linear(s, &l->down, act, T, delta))) return rc;
        if (i + 1 < s->num_layers) {
            s->norm(residual, delta, s->layers[i + 1].input_norm, normed, T, hidden, s->eps);
        } else {
            for (int64_t j = 0; j < T * hidden; ++j) residual[j] += delta[j];
        }
    }
    return 0;
}

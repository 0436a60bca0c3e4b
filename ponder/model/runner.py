"""ModelRunner: owns the KV cache tensors; turns scheduled chunks into one flat batch and runs it.

Per step it builds token ids, positions, the slot each token writes, and for attention either or
both of: per query token of the native kernel its sequence and context length (every token with
an fp16 cache, the decodes with an fp32 one), and for the padded SDPA group(s) the query rows, the
context slots and the causal mask — with numpy/torch ops over the batch, not Python loops over
tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from ponder.layers.attention import AttentionGroup, AttentionMetadata, PagedQueries, native_attention_supports
from ponder.model.llama import LlamaForCausalLM
from ponder.model.native_stack import NativeStack


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages the OS maps on first touch (numpy allocates with calloc): a 2 GB KV pool
    costs nothing at start-up, where torch.zeros writes every byte (1.8 s)."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype if dtype != torch.bfloat16 else None
    if np_dtype is None:
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(np.zeros(shape, dtype=np_dtype))


def _range_rows(chunks, ranges) -> torch.Tensor:
    """Rows of the flat batch at the chunk offsets `ranges` names ((chunk index, first, end))."""
    first = np.cumsum([0] + [len(toks) for toks, _, _ in chunks])
    return torch.from_numpy(np.concatenate([np.arange(first[i] + lo, first[i] + hi) for i, lo, hi in ranges]))


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32):
        """kv_dtype: the KV cache's element type (fp16 or float32); dtype: the model's compute dtype."""
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        # [layers, k/v, blocks, block_size, kv_heads, head_dim]; one tensor so a block copy covers all layers.
        self.kv_cache = _lazy_zeros((cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim),
                                    kv_dtype)
        self.kv_caches = [self.kv_cache[i] for i in range(cfg.num_layers)]
        self.native_attention = dtype == torch.float32 and native_attention_supports(cfg.num_heads, cfg.num_kv_heads,
                                                                                       cfg.head_dim)
        # An fp16 cache sends every query through the native kernel; an fp32 one only the decodes
        # (prefill stays on SDPA, the path checked token for token against transformers).
        self.native_prefill = self.native_attention and kv_dtype == torch.float16
        # A quantized model runs its decoder stack as one native call whenever the step's attention
        # is all native (bit-identical to the op-by-op path, minus the per-layer dispatch).
        self.native_stack = (NativeStack(model, self.kv_caches, block_size)
                             if self.native_attention and NativeStack.applies(model, self.kv_caches) else None)

    @staticmethod
    def bytes_per_block(model_config, block_size: int, kv_dtype: torch.dtype = torch.float32) -> int:
        elem = torch.empty((), dtype=kv_dtype).element_size()
        return model_config.num_layers * 2 * block_size * model_config.num_kv_heads * model_config.head_dim * elem

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies])
        dst = torch.tensor([d for _, d in copies])
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    @torch.inference_mode()
    def execute(self, chunks: list[tuple[list[int], int, list[int]]], sample_rows: list[int],
                score_ranges: list[tuple[int, int, int]] = ()) -> torch.Tensor:
        """Run one step.

        chunks: per sequence (tokens to compute, position of the first of them, block table).
        sample_rows: indices into `chunks` whose last token's logits are wanted.
        score_ranges: (chunk index, first, end) offsets within a chunk whose every position's
        logits are wanted too (prompt logprobs); the LM head runs on those rows only, and on none
        more when there are none.
        Returns logits [len(sample_rows) + rows of score_ranges, vocab]: the sampled rows, then
        each range's rows in order.
        """
        input_ids, positions, meta, last_rows = self.prepare(chunks)
        if self.native_stack is not None and meta.native is not None and meta.native.all_rows:
            hidden = self.native_stack.forward(self.model.embed_tokens(input_ids), positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        rows = last_rows[sample_rows]
        if score_ranges:
            rows = torch.cat([rows, _range_rows(chunks, score_ranges)])
        return self.model.compute_logits(hidden[rows])

    def prepare(self, chunks):
        bs = self.block_size
        lengths = np.array([len(toks) for toks, _, _ in chunks], dtype=np.int64)
        starts = np.array([start for _, start, _ in chunks], dtype=np.int64)
        input_ids = torch.tensor([t for toks, _, _ in chunks for t in toks], dtype=torch.long)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        seq_of_token = np.repeat(np.arange(len(chunks)), lengths)
        pos = starts[seq_of_token] + (np.arange(offsets[-1]) - offsets[seq_of_token])
        max_blocks = max(len(bt) for _, _, bt in chunks)
        tables = np.zeros((len(chunks), max_blocks), dtype=np.int64)
        for i, (_, _, bt) in enumerate(chunks):
            tables[i, :len(bt)] = bt
        slot_mapping = tables[seq_of_token, pos // bs] * bs + pos % bs
        decode = np.flatnonzero(lengths == 1)
        prefill = np.flatnonzero(lengths > 1)
        if self.native_prefill:
            native_seqs, padded = np.arange(len(chunks)), ()
        elif self.native_attention:
            native_seqs, padded = decode, (prefill,)
        else:
            native_seqs, padded = decode[:0], (decode, prefill)
        groups = [self._group(members, lengths, starts, offsets, tables) for members in padded if len(members)]
        native = self._queries(native_seqs, seq_of_token, pos, tables) if len(native_seqs) else None
        meta = AttentionMetadata(torch.from_numpy(slot_mapping), groups, native)
        last_rows = torch.from_numpy(offsets[1:] - 1)
        return input_ids, torch.from_numpy(pos), meta, last_rows

    @staticmethod
    def _queries(seqs, seq_of_token, pos, tables) -> PagedQueries:
        """Every token of the sequences `seqs`, each attending causally to its position + 1 keys."""
        chosen = np.zeros(len(tables), dtype=bool)
        chosen[seqs] = True
        rows = np.flatnonzero(chosen[seq_of_token])
        return PagedQueries(rows=torch.from_numpy(rows), seq_index=torch.from_numpy(seq_of_token[rows]),
                            block_tables=torch.from_numpy(tables), context_lens=torch.from_numpy(pos[rows] + 1),
                            all_rows=len(rows) == len(pos))

    def _group(self, members, lengths, starts, offsets, tables) -> AttentionGroup:
        bs = self.block_size
        lq = int(lengths[members].max())
        ctx = starts[members] + lengths[members]                  # context length after this step
        nb = int(-(-ctx.max() // bs))
        q_off = np.arange(lq)[None, :]
        q_valid = q_off < lengths[members][:, None]
        query_index = offsets[members][:, None] + np.where(q_valid, q_off, 0)
        key_pos = np.arange(nb * bs)
        q_pos = starts[members][:, None] + q_off                  # [B, Lq]
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & (key_pos[None, None, :] < ctx[:, None, None])
        flat_valid = np.flatnonzero(q_valid.reshape(-1))
        return AttentionGroup(
            query_index=torch.from_numpy(query_index.reshape(-1)),
            block_tables=torch.from_numpy(np.ascontiguousarray(tables[members][:, :nb]).reshape(-1)),
            mask=torch.from_numpy(mask[:, None]),
            out_index=torch.from_numpy(query_index.reshape(-1)[flat_valid]),
            out_select=torch.from_numpy(flat_valid),
        )

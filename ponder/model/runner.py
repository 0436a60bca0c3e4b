"""ModelRunner: owns the KV cache tensors; turns scheduled chunks into one flat batch and runs it.

Per step it builds token ids, positions, the slot each token writes, and for attention either or
both of: per query token of the native kernel its sequence and context length (every token with
an fp16 cache, the decodes with an fp32 one), and for the padded SDPA group(s) the query rows, the
context slots and the causal mask — with numpy/torch ops over the batch, not Python loops over
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class TokenTree:
    """A chunk whose tokens form a tree (speculative decoding's token trees), not a sequence:
    token i attends to the first `base` table positions of its sequence, then to `paths[i]` — the
    table positions of its ancestors past `base` and its own, root first. Its position (RoPE) is
    its depth: `base + len(paths[i]) - 1`. Token i is still written at table position start + i."""

    base: int
    paths: list[list[int]]


def _range_rows(chunks, ranges) -> torch.Tensor:
    """Rows of the flat batch at the chunk offsets `ranges` names ((chunk index, first, end))."""
    first = np.cumsum([0] + [len(c[0]) for c in chunks])
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

    def move_tokens(self, block_table: list[int], moves: list[tuple[int, int]]) -> None:
        """Copy the K/V of a sequence's table positions to others, every layer ((from, to) pairs;
        all sources are read before any is written): an accepted tree path moves to sit where
        decoding would have written it."""
        if not moves:
            return
        bs, table = self.block_size, np.asarray(block_table, dtype=np.int64)
        src = np.array([m[0] for m in moves], dtype=np.int64)
        dst = np.array([m[1] for m in moves], dtype=np.int64)
        blocks, offs = torch.from_numpy(table[src // bs]), torch.from_numpy(src % bs)
        self.kv_cache[:, :, torch.from_numpy(table[dst // bs]), torch.from_numpy(dst % bs)] = \
            self.kv_cache[:, :, blocks, offs]

    def read_kv(self, block_table: list[int], start: int, end: int) -> np.ndarray:
        """A copy of the KV of positions start..end of the sequence with `block_table`, token-major:
        [layers, 2, end - start, kv_heads, head_dim], whatever the block size (a KV hand-off)."""
        return np.take(self._kv_by_slot(), self._slots(block_table, start, end), axis=2)

    def write_kv(self, block_table: list[int], start: int, values: np.ndarray) -> None:
        """Write `values` ([layers, 2, tokens, kv_heads, head_dim], as `read_kv` gives) as the KV
        of positions start.. of the sequence with `block_table`."""
        self._kv_by_slot()[:, :, self._slots(block_table, start, start + values.shape[2])] = values

    def _kv_by_slot(self) -> np.ndarray:
        """The cache as [layers, 2, slots, kv_heads, head_dim] (a view: slot = block * block_size + offset)."""
        layers, kv, blocks, bs, heads, dim = self.kv_cache.shape
        return self.kv_cache.numpy().reshape(layers, kv, blocks * bs, heads, dim)

    def _slots(self, block_table: list[int], start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        return np.asarray(block_table, dtype=np.int64)[pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def execute(self, chunks: list[tuple[list[int], int, list[int]]], sample_rows: list[int],
                score_ranges: list[tuple[int, int, int]] = ()) -> torch.Tensor:
        """Run one step.

        chunks: per sequence (tokens to compute, position of the first of them, block table), and
        optionally a fourth item, a `TokenTree` the tokens form.
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
        lengths = np.array([len(c[0]) for c in chunks], dtype=np.int64)
        starts = np.array([c[1] for c in chunks], dtype=np.int64)
        input_ids = torch.tensor([t for c in chunks for t in c[0]], dtype=torch.long)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        seq_of_token = np.repeat(np.arange(len(chunks)), lengths)
        stored = starts[seq_of_token] + (np.arange(offsets[-1]) - offsets[seq_of_token])   # table positions
        max_blocks = max(len(c[2]) for c in chunks)
        tables = np.zeros((len(chunks), max_blocks), dtype=np.int64)
        for i, c in enumerate(chunks):
            tables[i, :len(c[2])] = c[2]
        slot_mapping = tables[seq_of_token, stored // bs] * bs + stored % bs
        trees = {i: c[3] for i, c in enumerate(chunks) if len(c) > 3 and c[3] is not None}
        pos, tails = self._tree_positions(trees, offsets, stored)
        decode = np.flatnonzero(lengths == 1)
        prefill = np.array([i for i in np.flatnonzero(lengths > 1) if i not in trees], dtype=np.int64)
        tree_seqs = np.array(sorted(trees), dtype=np.int64)
        if trees and not self.native_attention:
            raise ValueError("token trees need the native attention kernel (a C compiler and a supported shape)")
        if self.native_prefill:
            native_seqs, padded = np.arange(len(chunks)), ()
        elif self.native_attention:     # trees always take the kernel: only it reads their ancestors' keys
            native_seqs, padded = np.union1d(decode, tree_seqs), (prefill,)
        else:
            native_seqs, padded = decode[:0], (decode, prefill)
        groups = [self._group(members, lengths, starts, offsets, tables) for members in padded if len(members)]
        native = self._queries(native_seqs, seq_of_token, pos, tables, tails) if len(native_seqs) else None
        meta = AttentionMetadata(torch.from_numpy(slot_mapping), groups, native)
        last_rows = torch.from_numpy(offsets[1:] - 1)
        return input_ids, torch.from_numpy(pos), meta, last_rows

    @staticmethod
    def _tree_positions(trees: dict, offsets, stored):
        """Each token's position (a tree token's is its depth past its tree's base) and, if the
        step has trees, per token (tail_from, path) for the kernel; plain tokens' tails never start."""
        if not trees:
            return stored, None
        pos = stored.copy()
        depth = max(len(p) for tree in trees.values() for p in tree.paths)
        tail_from = stored + 1                        # past a plain token's last key: no tail
        tail_pos = np.zeros((len(stored), depth), dtype=np.int64)
        for i, tree in trees.items():
            for j, path in enumerate(tree.paths):
                row = offsets[i] + j
                pos[row], tail_from[row] = tree.base + len(path) - 1, tree.base
                tail_pos[row, :len(path)] = path
        return pos, (tail_from, tail_pos)

    @staticmethod
    def _queries(seqs, seq_of_token, pos, tables, tails=None) -> PagedQueries:
        """Every token of the sequences `seqs`, each attending causally to its position + 1 keys
        (a tree's tokens: to their ancestors, `tails`)."""
        chosen = np.zeros(len(tables), dtype=bool)
        chosen[seqs] = True
        rows = np.flatnonzero(chosen[seq_of_token])
        tail_from = tail_pos = None
        if tails is not None:
            tail_from = torch.from_numpy(np.ascontiguousarray(tails[0][rows]))
            tail_pos = torch.from_numpy(np.ascontiguousarray(tails[1][rows]))
        return PagedQueries(rows=torch.from_numpy(rows), seq_index=torch.from_numpy(seq_of_token[rows]),
                            block_tables=torch.from_numpy(tables), context_lens=torch.from_numpy(pos[rows] + 1),
                            all_rows=len(rows) == len(pos), tail_from=tail_from, tail_positions=tail_pos)

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

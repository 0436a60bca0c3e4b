"""The draft model of speculative decoding: a second, smaller ponder model with its own KV pool,
proposing tokens for the target's decoding sequences.

Each target sequence that drafts has a shadow sequence here: its tokens mirror the target's, and its
KV is kept in step with them — after a verification the shadow keeps the KV of the drafts the
target accepted and computes only what is new (the target's corrected token), so a prompt is
prefilled once per sequence (again only after the target was preempted, or the pool ran short).
The shadows of all drafting sequences advance together, one batched forward per drafted token.

Token trees (`propose_trees`, spec/tree.py): the shadows' pending tokens run first, then each
round runs the nodes each tree expands, all sequences in one forward, the nodes written past the
shadow's tokens and attending to their ancestors (a `TokenTree` chunk). The nodes' KV is dropped
afterwards; the path the target accepts is computed with the shadow's next pending tokens.

A draft token is the draft model's own draw under the request's sampling: the same seed and step
index, so the sampler's noise is the target's; where the two models agree, the target draws the same
token and accepts it (engine/speculation.py).
"""

from __future__ import annotations

import json

import torch

from ponder.engine.kv_cache import BlockPool, KVCacheManager
from ponder.engine.sequence import PrefixRow, Sequence, SequenceStatus
from ponder.layers.sampler import SamplingBatch, ranked_candidates, sample
from ponder.model.loader import LoadedModel
from ponder.model.runner import ModelRunner, TokenTree
from ponder.spec.tree import AcceptanceCalibration, DraftTree


class DraftModel:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 target: LoadedModel):
        check_compatible(loaded, target)
        self.loaded = loaded
        self.vocab_size = target.config.vocab_size
        self.eos_token_ids = list(target.tokenizer.eos_token_ids or target.config.eos_token_ids)
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching=False)
        self.kv = KVCacheManager(self.pool)
        self.runner = ModelRunner(loaded.model, num_blocks, block_size, kv_dtype)
        self.shadows: dict[int, Sequence] = {}      # target seq_id -> its shadow
        self.calibration = AcceptanceCalibration()  # what the trees' node values learn from verifications
        self._odds: dict[int, list] = {}            # target seq_id -> its tree's nodes' odds, until verified

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[list[int]]:
        """Up to budgets[i] draft tokens for each of `seqs` (running target sequences, each with
        its one new token uncomputed); [] for one the pool has no room for."""
        shadows = [self._synced(seq) for seq in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        for depth in range(max(budgets, default=0)):
            active = [i for i, shadow in enumerate(shadows)
                      if shadow is not None and depth < budgets[i] and self._room(shadows, i)]
            if not active:
                break
            chunks = [(shadows[i].token_ids[shadows[i].num_computed_tokens:], shadows[i].num_computed_tokens,
                       shadows[i].block_table) for i in active]
            logits = self.runner.execute(chunks, list(range(len(active))))
            for i in active:
                shadows[i].num_computed_tokens = shadows[i].num_tokens
            rows = [shadows[i] for i in active]
            tokens = sample(logits, SamplingBatch.build(rows, self.vocab_size, self.eos_token_ids)).token_ids
            for i, token in zip(active, tokens):
                shadows[i].token_ids.append(token)
                drafts[i].append(token)
        return drafts

    def propose_trees(self, seqs: list[Sequence], budgets: list[int], width: int) -> list[tuple[list[int], list[int]]]:
        """A token tree of up to budgets[i] nodes for each of `seqs`, as (tokens, parents);
        ([], []) for one the pool has no room for. A sequence under a grammar drafts a chain (its
        masks are built for one)."""
        shadows = [self._synced(seq) for seq in seqs]
        trees = [DraftTree(k, width if seq.matcher is None else 1, self.calibration) for seq, k in zip(seqs, budgets)]
        active = [i for i in range(len(seqs)) if self._room(shadows, i)]
        if not active:
            return [([], []) for _ in seqs]
        pending = [(shadows[i].token_ids[shadows[i].num_computed_tokens:], shadows[i].num_computed_tokens,
                    shadows[i].block_table) for i in active]
        logits = self.runner.execute(pending, list(range(len(active))))
        for i in active:
            shadows[i].num_computed_tokens = shadows[i].num_tokens
        self._offer(logits, [shadows[i] for i in active], [(trees[i], DraftTree.ROOT) for i in active])
        committed = {i: shadows[i].num_tokens for i in active}
        storage: dict[int, dict[int, int]] = {i: {} for i in active}    # node -> table position, per tree
        while plan := [(i, nodes) for i in active if (nodes := trees[i].to_expand())
                       and self.kv.allocate_slots(shadows[i], len(nodes))]:
            chunks, rows, owners = [], [], []
            for i, nodes in plan:
                shadow, tree, base = shadows[i], trees[i], committed[i]
                start = shadow.num_computed_tokens
                storage[i].update((n, start + k) for k, n in enumerate(nodes))
                paths = [tree.path(n) for n in nodes]
                chunks.append(([tree.tokens[n] for n in nodes], start, shadow.block_table,
                               TokenTree(base, [[storage[i][a] for a in path] for path in paths])))
                rows += [PrefixRow(shadow, shadow.token_ids + [tree.tokens[a] for a in path]) for path in paths]
                owners += [(tree, n) for n in nodes]
                shadow.num_computed_tokens += len(nodes)
            logits = self.runner.execute(chunks, [], [(j, 0, len(c[0])) for j, c in enumerate(chunks)])
            self._offer(logits, rows, owners)
        for i in active:                     # the nodes' KV goes; the accepted path is computed next time
            shadows[i].num_computed_tokens = committed[i]
            self.kv.trim(shadows[i])
        drafts, self._odds = [], {}
        for i, seq in enumerate(seqs):
            tokens, parents, odds = trees[i].select() if i in committed else ([], [], [])
            drafts.append((tokens, parents))
            self._odds[seq.seq_id] = odds
        return drafts

    def observe_verified(self, seq: Sequence, parents: list[int], tokens: list[int], path: list[int],
                         drawn: list[int]) -> None:
        """Teach the calibration what `seq`'s tree's verification showed (AcceptanceCalibration.
        observe_verified's arguments; a tree the step cut short is a prefix of the proposed one)."""
        odds = self._odds.pop(seq.seq_id, None)
        if odds:
            self.calibration.observe_verified(odds[:len(tokens)], parents, tokens, path, drawn)

    def _offer(self, logits, rows: list, owners: list[tuple[DraftTree, int]]) -> None:
        """Each row's best candidates under its node (`owners`: (tree, node) per row)."""
        width = max(tree.width for tree, _ in owners)
        tokens, probs = ranked_candidates(logits, SamplingBatch.build(rows, self.vocab_size, self.eos_token_ids),
                                          width)
        for (tree, node), toks, ps in zip(owners, tokens.tolist(), probs.tolist()):
            tree.offer(node, toks[:tree.width], ps[:tree.width])

    def prefill(self, seqs: list[Sequence]) -> None:
        """Compute the shadows of sequences whose prompt the target computes this step, all but
        their last token (in the prompt's step, not the first decode's: the draft's prefill is
        time to first token)."""
        shadows = [self._synced(seq) for seq in seqs]
        ready = [s for s in shadows if s.num_uncomputed > 1 and self.kv.allocate_slots(s, s.num_uncomputed - 1)]
        if not ready:
            return
        self.runner.execute([(s.token_ids[s.num_computed_tokens:-1], s.num_computed_tokens, s.block_table)
                             for s in ready], [])
        for s in ready:
            s.num_computed_tokens = s.num_tokens - 1

    def _room(self, shadows: list[Sequence | None], i: int) -> bool:
        """Blocks for shadow i's next forward; a shadow the pool cannot grow is dropped."""
        shadow = shadows[i]
        if self.kv.allocate_slots(shadow, shadow.num_uncomputed):
            return True
        self._drop(shadow)
        shadows[i] = None
        return False

    def _synced(self, seq: Sequence) -> Sequence:
        """`seq`'s shadow, its tokens now the target's (its own drafts the target did not keep
        dropped, their KV with them; what the target added since, uncomputed)."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Sequence(seq.request, [], seq.num_prompt_tokens, index=seq.index, seed=seq.seed,
                              status=SequenceStatus.RUNNING)
            self.shadows[seq.seq_id] = shadow
        target = seq.token_ids
        common = 0
        limit = min(len(shadow.token_ids), len(target))
        while common < limit and shadow.token_ids[common] == target[common]:
            common += 1
        del shadow.token_ids[common:]
        shadow.token_ids.extend(target[common:])
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, common, len(target) - 1)
        self.kv.trim(shadow)
        return shadow

    def forget_others(self, live: set[int]) -> None:
        """Free the shadows of sequences no longer running (finished, aborted, preempted, parked)."""
        for seq_id in [k for k in self.shadows if k not in live]:
            self._drop(self.shadows[seq_id])

    def _drop(self, shadow: Sequence) -> None:
        self.kv.free(shadow)
        self.shadows = {k: v for k, v in self.shadows.items() if v is not shadow}

    def stats(self) -> dict:
        return {"draft_kv_blocks_total": self.pool.num_blocks, "draft_kv_blocks_free": self.pool.num_free,
                "draft_sequences": len(self.shadows)}


def check_compatible(draft: LoadedModel, target: LoadedModel) -> None:
    """A draft must speak the target's tokens: the same vocabulary and the same special ids."""
    problems = []
    if draft.config.vocab_size != target.config.vocab_size:
        problems.append(f"vocab_size {draft.config.vocab_size} vs {target.config.vocab_size}")
    if json.loads(draft.tokenizer.to_json())["model"].get("vocab") != json.loads(target.tokenizer.to_json())["model"].get("vocab"):
        problems.append("different token vocabularies")
    for name in ("bos_token_id", "eos_token_ids"):
        mine, theirs = getattr(draft.config, name), getattr(target.config, name)
        if mine != theirs:
            problems.append(f"{name} {mine} vs {theirs}")
    if problems:
        raise ValueError("the speculative model cannot draft for this model: " + "; ".join(problems))

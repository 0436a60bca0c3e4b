"""Speculative decoding inside the engine step: draft, verify in the same forward, accept exactly.

Before scheduling, `propose` appends up to k draft tokens to each decoding sequence that can use
them (`seq.num_draft` says how many of its tokens are provisional), so the scheduler plans one chunk
of 1 + k tokens for it, mixed with ordinary decodes and prefill chunks. After scheduling, `trim`
takes back the drafts the plan could not fit (a smaller chunk, a preemption).

The runner returns logits at every position of those chunks (`ranges`), and each position is
sampled as the sequence cut there would be (`rows`): the same seed, the same step index, the same
penalty history. With the bitwise batch invariance of the kernels, the token drawn at a position is
exactly the token plain decoding would draw there — greedy or seeded — so accepting drafts while
they equal the drawn tokens changes no output (`accept`). The KV is then rolled back to the
accepted length: blocks past it are freed, and only then are full blocks registered in the prefix
index, so a block holding an unverified draft never enters it.

Token trees (method "tree"): the draft proposes a tree rather than a chain (spec/tree.py). Its
nodes are verified in the same one forward, each attending to its own ancestors (the runner's
`TokenTree`), each sampled as the sequence extended by its path; acceptance walks down from the root
taking the child that equals the drawn token, and the accepted path's KV moves to where decoding
would have written it. A chain is the tree in which every node's parent is the one before.

Adaptive: each sequence's draft length grows by one after a fully accepted draft and halves after a
fully rejected one (LLMCad's fallback); nothing is drafted when more sequences decode than
`disable_by_batch_size` (a step is then compute-bound and a draft costs what it saves).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

from ponder.engine.scheduler import ScheduledChunk
from ponder.engine.sequence import Action, PrefixRow, Sequence, SequenceStatus
from ponder.model.runner import TokenTree
from ponder.spec.ngram import propose_ngram
from ponder.spec.tree import chain_parents, tree_paths

if TYPE_CHECKING:
    from ponder.engine.draft import DraftModel


@dataclass
class SpeculationStats:
    drafted: int = 0          # draft tokens verified
    accepted: int = 0         # of those, accepted
    verified_seqs: int = 0    # sequence-steps that verified a draft (the mean accepted length's denominator)


class Speculation:
    def __init__(self, method: str | None, num_tokens: int, min_n: int, max_n: int,
                 disable_by_batch_size: int, max_model_len: int, draft: "DraftModel | None" = None,
                 tree_width: int = 2, move_tokens=None, adaptive: bool = True):
        """`move_tokens(block_table, [(from, to)])`: the runner's KV move (token trees)."""
        if method in ("draft", "tree") and draft is None:
            raise ValueError(f"speculative_method {method!r} needs a speculative_model")
        self.method, self.num_tokens, self.draft = method, num_tokens, draft
        self.tree_width, self.move_tokens, self.adaptive = tree_width, move_tokens, adaptive
        self.min_n, self.max_n = min_n, max_n
        self.disable_by_batch_size, self.max_model_len = disable_by_batch_size, max_model_len
        self.stats = SpeculationStats()
        self._drafted: list[Sequence] = []

    # -- before the forward ----------------------------------------------------------------------
    def propose(self, running: list[Sequence]) -> None:
        """Append draft tokens to the running sequences that can verify them this step."""
        self._drafted = []
        if self.method is None or len(running) > self.disable_by_batch_size:
            return
        eligible = [(seq, k) for seq in running if (k := self._budget(seq)) >= 1]
        seqs, budgets = [s for s, _ in eligible], [k for _, k in eligible]
        if self.method == "tree":
            drafts = self.draft.propose_trees(seqs, budgets, self.tree_width)
        elif self.method == "draft":
            drafts = [(d, None) for d in self.draft.propose(seqs, budgets)]
        else:
            drafts = [(propose_ngram(seq.token_ids, k, self.min_n, self.max_n), None) for seq, k in eligible]
        for seq, (draft, parents) in zip(seqs, drafts):
            if draft:
                seq.token_ids.extend(draft)
                seq.num_draft, seq.draft_parents = len(draft), parents
                self._drafted.append(seq)

    def _budget(self, seq: Sequence) -> int:
        """How many tokens `seq` may draft now: 0 unless it is decoding plainly (its one new token
        uncomputed, not forking, not a think probe or prefill), at most what its
        max_tokens and the context leave after the token the verification draws itself."""
        if (seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed != 1 or seq.self_certainty is not None
                or (seq.control is not None and seq.control.action is not Action.GENERATE)
                or (seq.params.n > 1 and len(seq.request.seqs) == 1)):
            return 0
        if seq.spec_k == 0:
            seq.spec_k = self.num_tokens
        room = self.max_model_len - seq.num_tokens - 1
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        return min(seq.spec_k, room)

    def settle(self, running: list[Sequence]) -> None:
        """After a step: a draft model lets go of the sequences that stopped running."""
        if self.draft is not None:
            self.draft.forget_others({seq.seq_id for seq in running})

    def trim(self, chunks: list[ScheduledChunk]) -> None:
        """Take back the drafts the plan did not fit: all of a sequence not scheduled (or
        preempted), the tail beyond a chunk cut short by the token budget. A draft model prefills
        the prompts the plan computes."""
        if self.method is None:
            return
        scheduled = {id(ch.seq): ch.num_tokens for ch in chunks}
        if self.draft is not None:       # prompts computed now: the draft's shadows too
            prompts = [ch.seq for ch in chunks if ch.seq.num_output_tokens == 0 and ch.seq.control is None]
            if prompts and len(chunks) <= self.disable_by_batch_size:
                self.draft.prefill(prompts)
        for seq in self._drafted:
            fits = scheduled.get(id(seq), 0) - 1 if seq.status is SequenceStatus.RUNNING else 0
            drop = seq.num_draft - max(0, min(seq.num_draft, fits))
            if drop:                 # parents precede children: the kept nodes are still a tree
                del seq.token_ids[len(seq.token_ids) - drop:]
                seq.num_draft -= drop
                if seq.draft_parents is not None:
                    del seq.draft_parents[seq.num_draft:]
        self._drafted = [s for s in self._drafted if s.num_draft]

    @staticmethod
    def token_tree(seq: Sequence) -> TokenTree | None:
        """The runner's view of a drafting sequence's chunk (its last real token, then the
        drafts): each draft attends to its ancestors. A chain is given as one too, so that its
        verification takes the same kernel as decode on either cache type."""
        if not seq.num_draft:
            return None
        root = seq.num_tokens - seq.num_draft - 1
        return TokenTree(root, [[root]] + [[root] + [root + 1 + n for n in path] for path in tree_paths(_parents(seq))])

    def ranges(self, chunks: list[ScheduledChunk]) -> list[tuple[int, int, int]]:
        """(chunk index, first, end) of the positions whose logits verify drafts: every position of
        a drafting sequence's chunk but its last (the row sampled anyway) — of a tree's, every one
        (its last node's row is its path's, not the sequence's)."""
        return [(i, ch.num_tokens - 1 - ch.seq.num_draft, ch.num_tokens - (ch.seq.draft_parents is None))
                for i, ch in enumerate(chunks) if ch.seq.num_draft]

    def rows(self, chunks: list[ScheduledChunk], ranges: list[tuple[int, int, int]]) -> list[PrefixRow]:
        """The sampler's rows for `ranges`' logits, in order: each position as the sequence
        extended by the drafts on its path only."""
        rows = []
        for i, first, end in ranges:
            seq = chunks[i].seq
            base = seq.num_tokens - seq.num_draft          # tokens up to and including the last real one
            committed, drafts = seq.token_ids[:base], seq.token_ids[base:]
            paths = [[]] + tree_paths(_parents(seq))
            rows += [PrefixRow(seq, committed + [drafts[n] for n in path]) for path in paths[:end - first]]
        return rows

    # -- after the sampler ----------------------------------------------------------------------
    @staticmethod
    def drawn(rows: list, tokens: list[int], logprobs: list) -> dict[int, list[tuple[int, object]]]:
        """Per drafting sequence (by id), the tokens drawn at its verified positions, in order."""
        found: dict[int, list[tuple[int, object]]] = {}
        for row, token, logprob in zip(rows, tokens, logprobs):
            if isinstance(row, PrefixRow):
                found.setdefault(id(row.seq), []).append((token, logprob))
        return found

    def accept(self, seq: Sequence, drawn: list[tuple[int, object]], append, kv) -> None:
        """Walk `seq`'s drafts from the root, taking the child that equals the token drawn at the
        current position, appending the drawn tokens (`append(seq, token, logprob)`: detokenize,
        check stops) up to the first no child matches — the bonus token after a leaf. `drawn` is
        per chunk position. Move the accepted path's KV where decoding would have written it, roll
        the KV back to the accepted length, then register its full blocks (`kv`)."""
        last = seq.num_tokens - seq.num_draft - 1          # position of the last real token
        parents = _parents(seq)
        draft = self.take_drafts(seq)
        children: dict[tuple[int, int], int] = {}
        for node, (token, parent) in enumerate(zip(draft, parents)):
            children.setdefault((parent, token), node)
        node, path, appended = -1, [], []
        while True:
            token, logprob = drawn[node + 1]
            append(seq, token, logprob)
            appended.append(token)
            ended = seq.finish_reason is not None or (seq.control is not None and seq.control.stop_reason is not None)
            child = children.get((node, token))
            if ended or child is None:
                break
            path.append(child)
            node = child
        if seq.matcher is not None:        # the grammar reads what was kept (its masks allowed each)
            seq.matcher.consume_tokens(appended)
        if self.method == "tree":          # what the target drew under the root and each accepted node
            self.draft.observe_verified(seq, parents, draft, path, appended)
        self.record(seq, len(draft), len(path), max((len(p) for p in tree_paths(parents)), default=0))
        moves = [(last + 1 + n, last + 1 + depth) for depth, n in enumerate(path) if n != depth]
        if moves:
            self.move_tokens(seq.block_table, moves)
        # KV holds positions up to last + accepted (the matching drafts); one token stays to compute
        seq.num_computed_tokens = min(last + 1 + len(path), seq.num_tokens - 1)
        kv.trim(seq)
        kv.commit_computed(seq)

    def take_drafts(self, seq: Sequence) -> list[int]:
        """Remove `seq`'s drafts from its tokens (they are appended again as they are accepted)."""
        draft = seq.token_ids[len(seq.token_ids) - seq.num_draft:]
        del seq.token_ids[len(seq.token_ids) - seq.num_draft:]
        seq.num_draft, seq.draft_parents = 0, None
        return draft

    def record(self, seq: Sequence, drafted: int, accepted: int, depth: int) -> None:
        """Count a verification and adapt the sequence's draft length to it (`depth`: the longest
        path drafted; a chain's length)."""
        st = self.stats
        st.drafted, st.accepted, st.verified_seqs = st.drafted + drafted, st.accepted + accepted, st.verified_seqs + 1
        seq.request.spec_drafted += drafted
        seq.request.spec_accepted += accepted
        if not self.adaptive:
            return
        if accepted == depth:
            seq.spec_k = min(seq.spec_k + 1, self.num_tokens)
        elif accepted == 0:
            seq.spec_k = max(1, seq.spec_k // 2)


def _parents(seq: Sequence) -> list[int]:
    """The parents of `seq`'s drafts: its tree's, or a chain's."""
    return seq.draft_parents if seq.draft_parents is not None else chain_parents(seq.num_draft)

"""Token trees (LLMCad, EAGLE-2 style): the draft expands its likeliest candidates at each depth
and keeps, under a budget of tokens to verify, the nodes whose paths it finds likeliest.

A node's value is the chance that the target accepts its whole path: the product, down the path, of
each token's chance of being accepted once its parent is. That chance is the draft's probability of
the token, calibrated (`AcceptanceCalibration`) by how often the target has accepted tokens of that
rank and probability so far: a confident draft's first choice is accepted less often than it
believes, its second choice more often. A child is never worth more than its parent, so the best
`budget` nodes form a tree.

Expansion is best first: each round the draft runs on the `width` likeliest nodes not yet expanded
among the best `budget - 1`, whatever their depth, and offers `width` candidates under each. Where
the draft is sure, the tree grows deep like a chain; where it hesitates, it branches, and the
target's token is more often among the branches than the chain's one guess. A sibling passed over
while the chain was likelier still grows its own continuation once the chain's deep nodes are worth
less than it (expanding the newest depth only, as EAGLE-2 does, leaves it a leaf: accepted, it adds
one token).

Nodes are numbered in the order they are offered, so a parent always precedes its children (the
order the target verifies them in, and the order a chunk cut short keeps a valid tree).
"""

from __future__ import annotations


class AcceptanceCalibration:
    """How often the target accepts a draft token of a given rank among its parent's candidates
    and a given draft probability, once its parent is accepted: counted per (rank, probability bin),
    the estimate starts at the draft's own probability and moves to the observed rate as
    observations come (`prior` of them weigh as much as the draft's belief)."""

    EDGES = (0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95, 0.99)

    def __init__(self, max_rank: int = 4, prior: float = 8.0):
        self.max_rank, self.prior = max_rank, prior
        self.offered = [[0] * (len(self.EDGES) + 1) for _ in range(max_rank)]
        self.accepted = [[0] * (len(self.EDGES) + 1) for _ in range(max_rank)]

    def _cell(self, rank: int, prob: float) -> tuple[int, int]:
        return min(rank, self.max_rank - 1), sum(prob >= edge for edge in self.EDGES)

    def estimate(self, rank: int, prob: float) -> float:
        r, b = self._cell(rank, prob)
        return (self.accepted[r][b] + self.prior * prob) / (self.offered[r][b] + self.prior)

    def observe(self, rank: int, prob: float, accepted: bool) -> None:
        r, b = self._cell(rank, prob)
        self.offered[r][b] += 1
        self.accepted[r][b] += int(accepted)

    def observe_verified(self, odds: list[tuple[int, float]], parents: list[int], tokens: list[int],
                         path: list[int], drawn: list[int]) -> None:
        """What one verification showed: the kept nodes' (rank, probability) `odds`, `parents`
        and `tokens`; the accepted `path`; the token the target drew under the root and under each
        node of the path (`drawn`, one more than the path). Each node whose parent was accepted
        was accepted if it equals the token drawn there."""
        drawn_under = dict(zip([DraftTree.ROOT] + path, drawn))
        for node, parent in enumerate(parents):
            if parent in drawn_under:
                self.observe(*odds[node], tokens[node] == drawn_under[parent])


class DraftTree:
    ROOT = -1

    def __init__(self, budget: int, width: int, calibration: AcceptanceCalibration | None = None):
        self.budget, self.width, self.calibration = budget, width, calibration
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.values: list[float] = []
        self.depths: list[int] = []
        self.odds: list[tuple[int, float]] = []   # per node: its rank among its siblings, its draft probability
        self._expanded: set[int] = set()      # the nodes the draft has run on

    def offer(self, parent: int, tokens: list[int], probs: list[float]) -> None:
        """Candidates under `parent` (ROOT or a node), best first; ones of probability 0 are dropped."""
        base = 1.0 if parent == self.ROOT else self.values[parent]
        depth = 0 if parent == self.ROOT else self.depths[parent] + 1
        for rank, (token, p) in enumerate(zip(tokens, probs)):
            if p > 0.0:
                chance = p if self.calibration is None else self.calibration.estimate(rank, p)
                self.tokens.append(token)
                self.parents.append(parent)
                self.values.append(base * chance)
                self.depths.append(depth)
                self.odds.append((rank, p))

    def to_expand(self) -> list[int]:
        """The nodes to run the draft on next: the best `width` not yet expanded among the best
        `budget - 1` (a child of a lower one could not enter the tree). The draft forwards stop when
        those are all expanded; at most `width * budget` nodes are (a bound, never a limit on depth:
        the likeliest unexpanded node, the chain's tip most often, goes first in every round)."""
        room = min(self.width, self.width * self.budget - len(self._expanded))
        chosen = [n for n in self._ranked()[:self.budget - 1] if n not in self._expanded][:room]
        self._expanded.update(chosen)
        return chosen

    def _ranked(self) -> list[int]:
        # ties: the shallower first (a parent before a child of probability 1), then the earlier
        return sorted(range(len(self.tokens)), key=lambda n: (-self.values[n], self.depths[n], n))

    def path(self, node: int) -> list[int]:
        """The nodes from the root's child down to `node`."""
        path = []
        while node != self.ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def select(self) -> tuple[list[int], list[int], list[tuple[int, float]]]:
        """The tree to verify: the best `budget` nodes, in offer order, as (tokens, parents, odds)
        with parents indexing the kept nodes (-1: the root)."""
        kept = sorted(self._ranked()[:self.budget])
        index = {node: i for i, node in enumerate(kept)}
        return ([self.tokens[n] for n in kept],
                [self.ROOT if self.parents[n] == self.ROOT else index[self.parents[n]] for n in kept],
                [self.odds[n] for n in kept])


def tree_paths(parents: list[int]) -> list[list[int]]:
    """Per node, the nodes from the root's child down to it (parents precede children)."""
    paths: list[list[int]] = []
    for i, parent in enumerate(parents):
        paths.append(([] if parent < 0 else paths[parent]) + [i])
    return paths


def chain_parents(length: int) -> list[int]:
    return list(range(-1, length - 1))

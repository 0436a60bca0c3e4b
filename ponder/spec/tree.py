"""Token trees (LLMCad, EAGLE-2 style): the draft expands its likeliest candidates at each depth
and keeps, under a budget of tokens to verify, the nodes whose paths it finds likeliest.

A node's value is the draft's probability of its whole path (the product of its tokens' sampling
probabilities), so a child is never worth more than its parent and the best `budget` nodes form a
tree. Expansion is depth by depth: each round the draft runs on up to `width` nodes of the newest
depth — those still among the best `budget` — and offers `width` candidates under each. Where the
draft is sure, the tree grows deep like a chain; where it hesitates, it branches, and the target's
token is more often among the branches than the chain's one guess.

Nodes are numbered in the order they are offered, so a parent always precedes its children (the
order the target verifies them in, and the order a chunk cut short keeps a valid tree).
"""

from __future__ import annotations


class DraftTree:
    ROOT = -1

    def __init__(self, budget: int, width: int):
        self.budget, self.width = budget, width
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.values: list[float] = []
        self.depths: list[int] = []
        self._newest: list[int] = []          # the nodes offered in the latest round

    def offer(self, parent: int, tokens: list[int], probs: list[float]) -> None:
        """Candidates under `parent` (ROOT or a node), best first; ones of probability 0 are dropped."""
        base = 1.0 if parent == self.ROOT else self.values[parent]
        depth = 0 if parent == self.ROOT else self.depths[parent] + 1
        for token, p in zip(tokens, probs):
            if p > 0.0:
                self.tokens.append(token)
                self.parents.append(parent)
                self.values.append(base * p)
                self.depths.append(depth)
                self._newest.append(len(self.tokens) - 1)

    def to_expand(self) -> list[int]:
        """The nodes of the newest round to run the draft on next: the best `width` that rank
        among the best `budget - 1` nodes (a child of a lower one could not enter the tree)."""
        ranked = self._ranked()[:self.budget - 1]
        inside = set(ranked)
        newest = sorted((n for n in self._newest if n in inside), key=lambda n: -self.values[n])[:self.width]
        self._newest = []
        return newest

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

    def select(self) -> tuple[list[int], list[int]]:
        """The tree to verify: the best `budget` nodes, in offer order, as (tokens, parents) with
        parents indexing the kept nodes (-1: the root)."""
        kept = sorted(self._ranked()[:self.budget])
        index = {node: i for i, node in enumerate(kept)}
        return ([self.tokens[n] for n in kept],
                [self.ROOT if self.parents[n] == self.ROOT else index[self.parents[n]] for n in kept])


def tree_paths(parents: list[int]) -> list[list[int]]:
    """Per node, the nodes from the root's child down to it (parents precede children)."""
    paths: list[list[int]] = []
    for i, parent in enumerate(parents):
        paths.append(([] if parent < 0 else paths[parent]) + [i])
    return paths


def chain_parents(length: int) -> list[int]:
    return list(range(-1, length - 1))

"""Which replica serves a request: prefix-aware (the default), round-robin or least-loaded.

Prefix-aware routing sends a request to the replica whose prefix cache most likely holds its prompt:
the router remembers, for the chained hash of each of a prompt's first `prefix_blocks` full blocks
(the engine's own block hash, engine/kv_cache.py), the replica it last sent that prefix to, and picks
the replica holding the longest such prefix. A miss goes to the least-loaded replica, which then
holds the prefix. A hit is overridden when the holder is overloaded: its outstanding tokens exceed
the least-loaded replica's by more than `balance_tokens` and by a factor `balance_ratio` (SGLang's
cache-aware router balances the same way), so one hot system prompt cannot pin all traffic to one
replica.

Load is outstanding tokens (prompt plus max new tokens of requests routed and not yet done), charged
at `route` and released at `done`. The router is plain Python, shared by the Ray front end and the
simulator (ponder/distributed/simulate.py), and does no I/O.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from ponder.engine.kv_cache import block_hash

POLICIES = ("prefix-aware", "round-robin", "least-loaded")


def cost_tokens(prompt_tokens: int, n: int, max_tokens: int | None, max_model_len: int) -> int:
    """A request's load: its prompt plus the most tokens its n completions may generate."""
    return prompt_tokens + n * (max_tokens or max_model_len - prompt_tokens)


def prefix_hashes(token_ids: list[int], block_size: int, limit: int) -> list[int]:
    """Chained hashes of the first `limit` full blocks of `token_ids`."""
    hashes, parent = [], None
    for start in range(0, min(len(token_ids) // block_size, limit) * block_size, block_size):
        parent = block_hash(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


class Router:
    def __init__(self, policy: str = "prefix-aware", block_size: int = 16, prefix_blocks: int = 8,
                 balance_tokens: int = 2048, balance_ratio: float = 2.0, max_prefixes: int = 100_000):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.policy, self.block_size, self.prefix_blocks = policy, block_size, prefix_blocks
        self.balance_tokens, self.balance_ratio, self.max_prefixes = balance_tokens, balance_ratio, max_prefixes
        self.load: dict[int, int] = {}                       # replica -> outstanding tokens
        self._holder: OrderedDict[int, int] = OrderedDict()  # prefix hash -> replica (least recent first)
        self._turn = itertools.count()

    # -- replicas -----------------------------------------------------------------------------
    def add_replica(self, replica: int) -> None:
        self.load.setdefault(replica, 0)

    def remove_replica(self, replica: int) -> None:
        """Out of rotation: no request goes to it again, and the prefixes it held are forgotten."""
        self.load.pop(replica, None)
        for key in [k for k, r in self._holder.items() if r == replica]:
            del self._holder[key]

    # -- requests -----------------------------------------------------------------------------
    def route(self, prompt_token_ids: list[int], cost_tokens: int, exclude: frozenset[int] = frozenset()) -> int:
        """The replica for a request, charged `cost_tokens` of load until `done`; none of `exclude`
        (replicas that already refused it, say)."""
        replicas = sorted(r for r in self.load if r not in exclude)
        if not replicas:
            raise RuntimeError("no replica is in rotation" if not self.load else "every replica is excluded")
        if self.policy == "round-robin":
            replica = replicas[next(self._turn) % len(replicas)]
        elif self.policy == "least-loaded":
            replica = self._least_loaded(replicas)
        else:
            replica = self._prefix_aware(prompt_token_ids, replicas)
        self.load[replica] += cost_tokens
        return replica

    def done(self, replica: int, cost_tokens: int) -> None:
        if replica in self.load:
            self.load[replica] = max(0, self.load[replica] - cost_tokens)

    def _least_loaded(self, replicas: list[int]) -> int:
        return min(replicas, key=lambda r: (self.load[r], r))

    def _prefix_aware(self, token_ids: list[int], replicas: list[int]) -> int:
        hashes = prefix_hashes(token_ids, self.block_size, self.prefix_blocks)
        lightest = self._least_loaded(replicas)
        holder = None
        for h in reversed(hashes):                      # the longest prefix some replica holds
            if (holder := self._holder.get(h)) is not None and holder in replicas:
                break
            holder = None
        if holder is None or self._overloaded(holder, lightest):
            holder = lightest
        for h in hashes:                                # the chosen replica now holds every prefix level
            self._holder[h] = holder
            self._holder.move_to_end(h)
        while len(self._holder) > self.max_prefixes:
            self._holder.popitem(last=False)
        return holder

    def _overloaded(self, replica: int, lightest: int) -> bool:
        mine, least = self.load[replica], self.load[lightest]
        return mine - least > self.balance_tokens and mine > self.balance_ratio * least

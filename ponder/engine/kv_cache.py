"""Block pool: ref-counted KV blocks, copy-on-write sharing, and the prefix index.

Invariant: a block's ref count equals the number of sequences holding it in their block table.
A block whose count drops to zero goes back to the free list, unless it is in the prefix index:
then it stays resident (evictable, least recently used first) so a later request with the same
prefix can take it back without recomputing.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterable


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()   # cached, unreferenced; LRU first
        self._hash_to_block: dict[int, int] = {}
        self._block_to_hash: dict[int, int] = {}

    # -- capacity ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._hash_to_block)

    # -- allocation -------------------------------------------------------------------------
    def allocate(self) -> int | None:
        """A fresh block with ref count 1, or None when the pool is exhausted."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._hash_to_block[self._block_to_hash.pop(block)]
        else:
            return None
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of `block` (fork, or a prefix-cache hit)."""
        if self.ref_counts[block] == 0:
            self._evictable.pop(block)
        self.ref_counts[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; pass a sequence's table tail-first so its prefix stays longest."""
        for block in blocks:
            count = self.ref_counts[block] - 1
            if count < 0:
                raise RuntimeError(f"block {block} released more often than held")
            self.ref_counts[block] = count
            if count == 0:
                if block in self._block_to_hash:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # -- prefix index -----------------------------------------------------------------------
    def lookup(self, block_hash: int) -> int | None:
        return self._hash_to_block.get(block_hash) if self.enable_prefix_caching else None

    def register(self, block: int, block_hash: int) -> None:
        """Record that `block` (full, computed) holds the tokens behind `block_hash`."""
        if not self.enable_prefix_caching or block_hash in self._hash_to_block or block in self._block_to_hash:
            return
        self._hash_to_block[block_hash] = block
        self._block_to_hash[block] = block_hash

    def reset_prefix_cache(self) -> None:
        for block in list(self._evictable):
            self._free.append(block)
        self._evictable.clear()
        self._hash_to_block.clear()
        self._block_to_hash.clear()

    def check_empty(self) -> None:
        """Assert every block is back (for tests and shutdown)."""
        held = [b for b, c in enumerate(self.ref_counts) if c]
        if held or self.num_free != self.num_blocks:
            raise AssertionError(f"{len(held)} blocks still referenced; {self.num_free}/{self.num_blocks} free")


def block_hash(parent: int | None, tokens: Iterable[int]) -> int:
    """Hash of a full block's tokens chained to its parent block's hash."""
    return hash((parent, tuple(tokens)))


class KVCacheManager:
    """Block tables of sequences over a BlockPool: allocate, copy-on-write, fork, prefix reuse, free."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_size = pool.block_size
        self.pending_copies: list[tuple[int, int]] = []   # (src, dst) block copies before the next forward

    def match_prefix(self, seq) -> int:
        """Take the longest run of cached full blocks of `seq`'s tokens; returns tokens reused.

        At least one token is always left to compute, since its logits are needed.
        """
        if not self.pool.enable_prefix_caching or seq.block_table:
            return 0
        bs = self.block_size
        hashes, parent = [], None
        for start in range(0, (seq.num_tokens - 1) // bs * bs, bs):
            parent = block_hash(parent, seq.token_ids[start:start + bs])
            block = self.pool.lookup(parent)
            if block is None:
                break
            self.pool.share(block)
            seq.block_table.append(block)
            hashes.append(parent)
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(hashes) * bs
        return seq.num_computed_tokens

    def next_block_hash(self, seq) -> int | None:
        """Hash of the next full block `seq` will compute and register (one `match_prefix` could
        take), or None if no full block is left to compute or prefix caching is off."""
        if not self.pool.enable_prefix_caching or len(seq.block_hashes) >= (seq.num_tokens - 1) // self.block_size:
            return None
        return self._hash_after_known(seq)

    def _hash_after_known(self, seq) -> int:
        """Hash of the block right after the ones `seq.block_hashes` already covers."""
        bs, i = self.block_size, len(seq.block_hashes)
        return block_hash(seq.block_hashes[-1] if seq.block_hashes else None, seq.token_ids[i * bs:(i + 1) * bs])

    def allocate_slots(self, seq, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens of `seq`; False (nothing changed) if the pool is short."""
        bs = self.block_size
        start = seq.num_computed_tokens
        need = -(-(start + num_new_tokens) // bs) - len(seq.block_table)
        cow = start % bs != 0 and self.pool.ref_counts[seq.block_table[start // bs]] > 1
        if need + cow > self.pool.num_free:
            return False
        if cow:   # the partial last block is shared (fork): copy before writing into it
            idx = start // bs
            old, new = seq.block_table[idx], self.pool.allocate()
            self.pending_copies.append((old, new))
            self.pool.release([old])
            seq.block_table[idx] = new
        for _ in range(need):
            seq.block_table.append(self.pool.allocate())
        return True

    def commit_computed(self, seq) -> None:
        """Register the blocks `seq` has just filled in the prefix index."""
        while len(seq.block_hashes) < seq.num_computed_tokens // self.block_size:
            h = self._hash_after_known(seq)
            seq.block_hashes.append(h)
            self.pool.register(seq.block_table[len(seq.block_hashes) - 1], h)

    def trim(self, seq) -> None:
        """Free the blocks past `seq`'s tokens (those a rejected draft was written into); a block
        past the tokens was allocated for them this step, so nothing else holds it."""
        keep = -(-seq.num_tokens // self.block_size)
        if len(seq.block_table) > keep:
            self.pool.release(reversed(seq.block_table[keep:]))
            del seq.block_table[keep:]

    def fork(self, parent, child) -> None:
        """`child` shares every block of `parent`, the partial last one included."""
        for block in parent.block_table:
            self.pool.share(block)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, seq) -> None:
        self.pool.release(reversed(seq.block_table))
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

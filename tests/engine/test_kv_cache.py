"""Block accounting: every block comes back exactly once, whatever happens."""

import random

from ponder import SamplingParams
from ponder.engine.kv_cache import BlockPool
from tests.conftest import random_operations


def test_pool_refcounts_and_lru_eviction():
    pool = BlockPool(4, block_size=2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 111)
    pool.share(a)
    assert pool.ref_counts[a] == 2
    pool.release([a, a, b])
    assert pool.num_free == 4 and pool.lookup(111) == a      # cached, evictable, still findable
    pool.share(a)                                            # a prefix hit takes it back
    assert pool.ref_counts[a] == 1 and pool.num_free == 3
    pool.release([a])
    taken = [pool.allocate() for _ in range(4)]              # the cached block is evicted last
    assert taken[-1] == a and pool.lookup(111) is None
    pool.release(taken)
    pool.check_empty()


def test_random_operations_return_every_block(make_tiny_engine):
    rng = random.Random(0)
    engine = make_tiny_engine(num_kv_blocks=48, block_size=4, max_num_seqs=8, max_num_batched_tokens=32)

    def new_request(rng):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 30))]
        return prompt, SamplingParams(n=rng.choice([1, 1, 2, 3]), temperature=rng.choice([0.0, 1.0]),
                                      max_tokens=rng.randint(1, 20), ignore_eos=True)

    random_operations(engine, rng, 2000, new_request, add=0.3, abort=0.1)
    assert engine.stats()["preemptions"] > 0
    engine.pool.check_empty()
    assert all(c == 0 for c in engine.pool.ref_counts)

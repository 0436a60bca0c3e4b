"""The router's policies, on made-up prompts (no engine, no Ray)."""

import random

import pytest

from ponder.distributed.router import Router, prefix_hashes


def _prompts(rng, systems, per_system, block_size=16, blocks=8):
    heads = [[rng.randrange(1000) for _ in range(block_size * blocks)] for _ in range(systems)]
    return [heads[i % systems] + [rng.randrange(1000) for _ in range(rng.randrange(1, 40))]
            for i in range(systems * per_system)]


def test_prefix_aware_sends_each_system_prompt_to_one_replica_and_spreads_them():
    router = Router("prefix-aware", block_size=16)
    for r in range(4):
        router.add_replica(r)
    prompts = _prompts(random.Random(0), systems=4, per_system=16)
    chosen = {}
    for p in prompts:
        chosen.setdefault(tuple(p[:128]), set()).add(router.route(p, 100))
    assert all(len(replicas) == 1 for replicas in chosen.values())
    assert len({next(iter(r)) for r in chosen.values()}) == 4      # four prefixes, four replicas


def test_round_robin_and_least_loaded():
    rr = Router("round-robin")
    ll = Router("least-loaded")
    for router in (rr, ll):
        for r in range(3):
            router.add_replica(r)
    assert [rr.route([1], 10) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert ll.route([1], 50) == 0 and ll.route([1], 10) == 1 and ll.route([1], 10) == 2
    assert ll.route([1], 10) == 1                 # 0 carries 50, 1 and 2 carry 10: the lowest id wins ties
    ll.done(0, 50)
    assert ll.route([1], 10) == 0


def test_an_overloaded_holder_gives_way_to_the_least_loaded():
    router = Router("prefix-aware", block_size=4, balance_tokens=100, balance_ratio=2.0)
    router.add_replica(0)
    router.add_replica(1)
    prompt = list(range(16))
    first = router.route(prompt, 50)
    assert router.route(prompt, 50) == first         # within balance: stays on the holder
    router.load[first] += 500
    assert router.route(prompt, 50) == 1 - first     # overloaded: the other replica takes it


def test_a_removed_replica_gets_nothing_and_its_prefixes_move():
    router = Router("prefix-aware", block_size=4)
    for r in range(2):
        router.add_replica(r)
    prompt = list(range(32))
    holder = router.route(prompt, 1)
    router.remove_replica(holder)
    assert all(router.route(prompt, 1) == 1 - holder for _ in range(5))
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router("random")


def test_prefix_hashes_cover_full_blocks_only_and_chain():
    a = prefix_hashes(list(range(40)), 16, 8)
    b = prefix_hashes(list(range(32)) + [99] * 8, 16, 8)
    assert len(a) == 2 and a == b                    # the partial third block is not hashed
    assert prefix_hashes([5] * 16 + list(range(16)), 16, 8)[1] != prefix_hashes(list(range(32)), 16, 8)[1]

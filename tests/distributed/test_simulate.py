"""The cluster simulator on small traces, priced by a made-up step cost model (no engine, no Ray)."""

import dataclasses
import math

import pytest

from ponder.bench.costmodel import StepCostModel
from ponder.distributed.request_traces import TraceRequest, random_trace, shared_prefix_trace
from ponder.distributed.simulate import SLO, ClusterSpec, simulate
from ponder.distributed.simulated_replica import Job, PrefixCache, ReplicaSpec, SimulatedReplica

COST = StepCostModel(a=0.01, b=2e-4, c=1e-3, d=1e-8, e=1e-8)
SLOS = SLO(ttft_s=1.0, tpot_s=0.05)


def _shared(seed=0, n=64, rate=20.0):
    """4 system prompts of 8 blocks (16 tokens each) and short suffixes: the issue's acceptance shape."""
    return shared_prefix_trace(n, rate, num_prefixes=4, prefix_len=128, suffix_len=(4, 40), output_len=(4, 24),
                               seed=seed)


def _rows(result):
    return [dataclasses.astuple(r) for r in result.requests]


def test_a_seed_gives_one_result():
    spec = ClusterSpec(replicas=3, policy="prefix-aware")
    a, b = simulate(_shared(seed=1), spec, COST), simulate(_shared(seed=1), spec, COST)
    assert _rows(a) == _rows(b) and a.metrics(SLOS) == b.metrics(SLOS)
    assert _rows(simulate(_shared(seed=2), spec, COST)) != _rows(a)


@pytest.mark.parametrize("spec", [ClusterSpec(replicas=3, policy="round-robin"),
                                  ClusterSpec(prefill_replicas=2, decode_replicas=2)])
def test_every_request_finishes_once_and_every_block_comes_back(spec):
    trace = random_trace(40, 30.0, prompt_len=(20, 300), output_len=(1, 30), seed=3)
    result = simulate(trace, spec, COST)
    assert sorted(r.request_id for r in result.requests) == list(range(40))
    for r in result.requests:
        assert r.arrival_s <= r.first_token_s <= r.finish_s and not math.isnan(r.finish_s)
    assert sum(result.replica_steps) > 0
    m = result.metrics(SLOS)
    assert m["requests"] == 40 and m["prompt_tokens_computed"] == m["prompt_tokens"]   # no shared prefixes


def test_replicas_release_every_block():
    replica = SimulatedReplica(ReplicaSpec(max_batched_tokens=64, num_blocks=64, block_size=16), COST)
    for r in _shared(n=12):
        replica.submit(r)
    while replica.has_work:
        replica.start_step()
        replica.finish_step()
    assert replica.cache.private == 0 and not replica.cache.refs
    assert len(replica.cache.idle) <= 64


def test_steps_stay_within_the_token_budget_and_prefill_is_chunked():
    trace = random_trace(20, 100.0, prompt_len=(200, 400), output_len=(2, 8), seed=4)
    spec = ClusterSpec(replicas=2, replica=ReplicaSpec(max_batched_tokens=96, max_seqs=8))
    result = simulate(trace, spec, COST)
    assert 0 < max(result.max_step_tokens) <= 96
    prompt_tokens = sum(r.prompt_len for r in trace)
    assert sum(result.replica_steps) >= prompt_tokens / 96      # no step computed more than its budget


def test_prefix_aware_computes_fewer_prompt_tokens_than_round_robin():
    trace = _shared(n=64)
    one = simulate(trace, ClusterSpec(replicas=1), COST).metrics(SLOS)["prompt_tokens_computed"]
    computed = {policy: simulate(trace, ClusterSpec(replicas=4, policy=policy), COST).metrics(SLOS)
                ["prompt_tokens_computed"] for policy in ("prefix-aware", "round-robin")}
    assert computed["prefix-aware"] <= 1.2 * one
    assert computed["round-robin"] >= 1.5 * one
    assert one < sum(r.prompt_len for r in trace)            # the one engine reuses the system prompts too


def test_pd_adds_the_hand_off_to_ttft():
    request = [TraceRequest(0, 0.0, tuple(range(100, 900)), output_len=10)]
    colocated = simulate(request, ClusterSpec(replicas=1), COST).requests[0]
    spec = ClusterSpec(prefill_replicas=1, decode_replicas=1, handoff_gbs=1.0, handoff_latency_s=0.005)
    split = simulate(request, spec, COST).requests[0]
    handoff = spec.kv_bytes_per_token * 800 / 1e9 + 0.005
    assert split.handoff_s == pytest.approx(handoff)
    assert split.ttft == pytest.approx(colocated.ttft + handoff)
    assert split.tpot == pytest.approx(colocated.tpot)           # alone, decode steps cost the same


def test_hand_offs_from_one_prefill_replica_queue_on_its_link():
    requests = [TraceRequest(i, 0.0, tuple(range(100 + i, 600 + i)), output_len=4) for i in range(2)]
    spec = ClusterSpec(prefill_replicas=1, decode_replicas=2, handoff_gbs=0.05, handoff_latency_s=0.0)
    first, second = simulate(requests, spec, COST).requests
    transfer = spec.kv_bytes_per_token * 500 / 0.05e9             # longer than the second's prefill step
    assert first.handoff_s == pytest.approx(transfer)
    assert second.first_token_s == pytest.approx(first.first_token_s + transfer)   # sent once the link is free
    assert second.handoff_s > transfer
    assert {first.decode_replica, second.decode_replica} == {0, 1}


def test_one_replica_is_the_same_under_every_policy():
    trace = _shared(n=40)
    results = [_rows(simulate(trace, ClusterSpec(replicas=1, policy=p), COST))
               for p in ("prefix-aware", "round-robin", "least-loaded")]
    assert results[0] == results[1] == results[2]


def test_goodput_counts_requests_within_both_slos():
    trace = random_trace(30, 5.0, prompt_len=(50, 100), output_len=(5, 10), seed=5)
    result = simulate(trace, ClusterSpec(replicas=1), COST)
    loose, strict = result.metrics(SLO(100.0, 100.0)), result.metrics(SLO(0.0, 0.0))
    assert loose["goodput_rps"] == pytest.approx(loose["throughput_rps"]) and loose["slo_attainment"] == 1.0
    assert strict["goodput_rps"] == 0.0


def test_the_prefix_cache_evicts_least_recently_used_idle_blocks():
    cache = PrefixCache(capacity=4, block_size=1)
    request = TraceRequest(0, 0.0, (1, 2, 3), 1)
    a, b = Job(request, [11, 12]), Job(request, [21, 22])
    for job in (a, b):
        assert cache.admit(job, 0, 2)
        job.computed = 2
        cache.commit(job)
        cache.release(job)
    assert list(cache.idle) == [12, 11, 22, 21] and cache.free == 0      # least recent first; tails first
    c = Job(request, [21, 99])
    assert cache.match(c.hashes) == 1 and cache.admit(c, 1, 3)    # reuses 21; evicts 12, 11 for room
    assert list(cache.idle) == [22] and cache.refs == {21: 1} and cache.private == 2
    assert not cache.admit(Job(request, []), 0, 3)                 # 1 free + 1 idle: no room for 3


def test_specs_are_checked():
    with pytest.raises(ValueError):
        ClusterSpec(replicas=0)
    with pytest.raises(ValueError):
        ClusterSpec(prefill_replicas=2, decode_replicas=0)
    with pytest.raises(ValueError, match="KV blocks"):
        simulate([TraceRequest(0, 0.0, tuple(range(100, 400)), 10)],
                 ClusterSpec(replica=ReplicaSpec(num_blocks=4)), COST)
    with pytest.raises(ValueError):
        random_trace(5, 0.0, (1, 2), (1, 2))


def test_a_prefill_replica_full_of_pending_hand_offs_waits_for_them():
    """Its pool holds one prompt; each waits on a slow link before its blocks come back."""
    trace = [TraceRequest(i, 0.0, tuple(range(100 + i, 420 + i)), output_len=3) for i in range(4)]
    spec = ClusterSpec(prefill_replicas=1, decode_replicas=1, handoff_gbs=0.01,
                       prefill_replica=ReplicaSpec(num_blocks=24, block_size=16))
    result = simulate(trace, spec, COST)
    ttfts = sorted(r.first_token_s for r in result.requests)
    transfer = spec.handoff_s(320)
    assert all(b - a >= transfer - 1e-9 for a, b in zip(ttfts, ttfts[1:]))   # one prompt in the pool at a time
    assert all(not math.isnan(r.finish_s) for r in result.requests)

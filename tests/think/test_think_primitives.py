"""The primitives on the real engine: fork, step/park/resume, append, probe, prune, resample, usage."""

from collections import Counter
import math

import pytest

from ponder import SamplingParams
from ponder.engine.sequence import SequenceStatus
from ponder.llm import LLM
from ponder.think import ThinkSession
from ponder.think.strategies import beam_search, particle_filtering, self_consistency

PROMPT = list(range(40, 70))     # 30 tokens: with block_size 4 the last block is partial
GREEDY = dict(temperature=0.0, max_tokens=200, ignore_eos=True)


def _reference(engine, prompt, params):
    return LLM.from_engine(engine).generate([prompt], params)[0].outputs[0].token_ids


def test_forked_greedy_child_continues_like_unforked(make_tiny_engine):
    engine = make_tiny_engine(enable_prefix_caching=False)
    ref = _reference(engine, PROMPT, SamplingParams(max_tokens=17, **{k: v for k, v in GREEDY.items()
                                                                          if k != "max_tokens"}))
    s = ThinkSession(engine, PROMPT, SamplingParams(**GREEDY))
    root = s.run(s.start())
    assert root.status is SequenceStatus.PARKED and root.num_computed_tokens == len(PROMPT) - 1
    [a] = s.fork(root, 1)
    s.run(s.step([a], stop=(), max_tokens=7))            # 37 tokens: a shared partial block
    assert a.status is SequenceStatus.PARKED and a.control.stop_reason == "length"
    [b] = s.fork(a, 1)
    s.run(s.step([a, b], stop=(), max_tokens=10))
    assert a.output_token_ids == ref
    assert b.output_token_ids == ref
    s.close()
    engine.pool.check_empty()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_step_then_resume_equals_uninterrupted(make_tiny_engine, temperature):
    params = SamplingParams(temperature=temperature, seed=11, max_tokens=23, ignore_eos=True)
    engine = make_tiny_engine()
    straight = ThinkSession(engine, PROMPT, params)
    [x] = straight.fork(straight.run(straight.start()), 1)
    straight.run(straight.generate([x]))
    stepped = ThinkSession(engine, PROMPT, params)
    [y] = stepped.fork(stepped.run(stepped.start()), 1)
    steps = 0
    while stepped.is_live(y):
        stepped.run(stepped.step([y], stop=(), max_tokens=3))
        steps += 1
    assert steps == 8 and y.finish_reason == "length" and x.finish_reason == "length"
    assert y.output_token_ids == x.output_token_ids and len(x.output_token_ids) == 23
    assert y.text == x.text
    straight.close()
    stepped.close()
    engine.pool.check_empty()


def test_step_stops_at_delimiter_and_keeps_it(make_bigram_engine):
    engine = make_bigram_engine({":": {"a": 1.0}, "a": {"\n": 1.0}, "\n": {"b": 0.5, "\n": 0.5},
                                 "b": {"\n": 1.0}})
    s = ThinkSession(engine, list(b"Q:"), SamplingParams(temperature=0.0, max_tokens=50))
    [seq] = s.fork(s.run(s.start()), 1)
    s.run(s.step([seq]))
    assert seq.text == "a\n\n" and seq.control.stop_reason == "\n\n" and s.step_text(seq) == "a\n\n"
    s.run(s.step([seq]))                       # the previous delimiter does not end the next step
    assert s.step_text(seq) == "\n" or s.step_text(seq).endswith("\n\n")
    s.close()
    engine.pool.check_empty()


def test_other_requests_keep_running_in_the_same_batches(make_tiny_engine):
    engine = make_tiny_engine()
    other = engine.add_request(list(range(100, 120)), SamplingParams(temperature=0.0, max_tokens=40,
                                                                      ignore_eos=True))
    s = ThinkSession(engine, PROMPT, SamplingParams(**GREEDY))
    branches = s.fork(s.run(s.start()), 3)
    s.run(s.step(branches, stop=(), max_tokens=5))
    assert other.seqs[0].num_output_tokens >= 5          # it advanced in the same engine steps
    assert engine.stats()["max_batch_seqs"] >= 4
    s.close()
    while engine.has_unfinished_requests():
        engine.step()
    engine.pool.check_empty()


def test_append_prefill_and_probe_match_a_fresh_prefill(make_tiny_engine):
    engine = make_tiny_engine()
    s = ThinkSession(engine, PROMPT, SamplingParams(**GREEDY))
    [seq] = s.fork(s.run(s.start()), 1)
    s.run(s.step([seq], stop=(), max_tokens=5))
    s.append(seq, [7, 8, 9, 10, 11, 12])
    assert seq.num_uncomputed == 7 and seq.status is SequenceStatus.PARKED
    s.run(s.prefill([seq]))
    assert seq.num_computed_tokens == seq.num_tokens - 1
    context = list(seq.token_ids)
    fresh = LLM.from_engine(make_tiny_engine()).generate(
        [context], SamplingParams(temperature=0.0, max_tokens=1, logprobs=3))[0].outputs[0]
    top = fresh.logprobs[0].top
    [probed] = s.run(s.probe([seq], list(top)))
    assert probed == pytest.approx(list(top.values()), abs=1e-4)
    assert seq.token_ids == context and seq.status is SequenceStatus.PARKED   # nothing sampled
    s.run(s.step([seq], stop=(), max_tokens=1))
    assert seq.token_ids[-1] == fresh.token_ids[0]       # sampling after the append sees the same logits
    s.close()
    engine.pool.check_empty()


def test_prune_frees_blocks_at_once(make_tiny_engine):
    engine = make_tiny_engine(enable_prefix_caching=False)
    s = ThinkSession(engine, PROMPT, SamplingParams(**GREEDY))
    branches = s.fork(s.run(s.start()), 4)
    s.run(s.step(branches, stop=(), max_tokens=9))
    held = engine.pool.num_blocks - engine.pool.num_free
    s.prune(branches[0])
    assert engine.pool.num_blocks - engine.pool.num_free < held
    assert branches[0] not in s.request.seqs
    s.close()
    engine.pool.check_empty()


def test_resample_draws_in_proportion_and_returns_every_block(make_tiny_engine):
    engine = make_tiny_engine(num_kv_blocks=2048)
    s = ThinkSession(engine, PROMPT, SamplingParams(temperature=1.0, seed=5, max_tokens=50, ignore_eos=True))
    branches = s.fork(s.run(s.start()), 4)
    s.run(s.step(branches, stop=(), max_tokens=3))
    k = 2000
    survivors, origins = s.resample(branches, [math.log(0.6), math.log(0.3), math.log(0.1), -math.inf], k)
    counts = Counter(origins)
    assert len(survivors) == k and counts[3] == 0
    for i, p in enumerate([0.6, 0.3, 0.1]):
        assert abs(counts[i] / k - p) < 4 * math.sqrt(p * (1 - p) / k)
    assert branches[3].finish_reason == "resampled-out" and not branches[3].block_table
    for seq, i in zip(survivors, origins):           # forks share the drawn branch's tokens and blocks
        assert seq.token_ids == branches[i].token_ids and seq.block_table == branches[i].block_table
    s.run(s.step(survivors[:10], stop=(), max_tokens=2))
    for seq in survivors[::3]:
        s.prune(seq)
    s.close()
    engine.pool.check_empty()


def test_self_consistency_prefills_a_shared_prompt_once(make_tiny_engine):
    block = 16
    engine = make_tiny_engine(block_size=block, num_kv_blocks=400)
    prompt = [(7 * i) % 250 for i in range(300)]
    s = ThinkSession(engine, prompt, SamplingParams(temperature=0.8, seed=1, max_tokens=12, ignore_eos=True))
    result = s.run(self_consistency(s, n=16))
    usage = s.usage()
    assert len(result.candidates) == 16
    assert usage["prompt_tokens_computed"] <= 300 + 16 * block
    assert usage["prompt_tokens_computed"] == 299 + 16         # root: all but one; each branch: one
    assert usage["prompt_tokens_cached"] >= 16 * 299           # every branch reused the prompt's KV
    assert usage["generated_tokens"] == 16 * 12
    s.close()
    engine.pool.check_empty()


def _text_score(session, seqs):
    """A free, deterministic scorer in (0, 1)."""
    return [0.05 + 0.9 * ((sum(s.output_token_ids) * 2654435761) % 1000) / 1000 for s in seqs]


@pytest.mark.parametrize("strategy", [beam_search, particle_filtering])
def test_step_searches_never_reprefill_earlier_steps(make_tiny_engine, strategy):
    engine = make_tiny_engine(block_size=4, num_kv_blocks=1024)
    s = ThinkSession(engine, PROMPT, SamplingParams(temperature=0.8, seed=2, max_tokens=40, ignore_eos=True))
    s.run(strategy(s, n=8, scorer=_text_score, step_max_tokens=5, max_steps=6))
    usage = s.usage()
    assert usage["scorer_calls"] > 8
    assert usage["generated_tokens"] >= 8 * 5 * 2
    # only the prompt (once) and each first branch's last prompt token were ever prefilled
    assert usage["prompt_tokens_computed"] == len(PROMPT) - 1 + 8
    s.close()
    engine.pool.check_empty()


def test_random_think_operations_return_every_block(make_tiny_engine):
    """Random forks, steps, appends, probes, prunes, resamples and closes of think sessions, mixed
    with plain requests and aborts, in a pool small enough to preempt: block accounting holds."""
    import random

    rng = random.Random(0)
    engine = make_tiny_engine(num_kv_blocks=60, block_size=4, max_num_seqs=8, max_num_batched_tokens=32)
    sessions, plain = [], []

    def parked(s, live=True):
        return [q for q in s.request.seqs if q.status is SequenceStatus.PARKED and (s.is_live(q) or not live)]

    for _ in range(700):
        r = rng.random()
        open_sessions = [s for s in sessions if not s.closed]
        s = rng.choice(open_sessions) if open_sessions else None
        if r < 0.06 or s is None:
            prompt = [rng.randrange(256) for _ in range(rng.randint(1, 25))]
            sessions.append(ThinkSession(engine, prompt, SamplingParams(
                temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(4, 30), ignore_eos=True, seed=1)))
        elif r < 0.16 and parked(s, live=False):
            s.fork(rng.choice(parked(s, live=False)), rng.randint(1, 3))
        elif r < 0.28 and parked(s):
            s.launch(rng.sample(parked(s), min(3, len(parked(s)))), max_tokens=rng.randint(1, 6))
        elif r < 0.34 and len(s.request.seqs) > 1:
            s.prune(rng.choice(s.request.seqs))
        elif r < 0.38 and parked(s, live=False):
            branches = parked(s, live=False)
            s.resample(branches, [rng.random() for _ in branches], rng.randint(1, 4))
        elif r < 0.42 and parked(s):
            q = rng.choice(parked(s))
            if q.num_tokens + 3 < engine.max_model_len:
                s.append(q, [rng.randrange(256) for _ in range(3)])
        elif r < 0.46 and parked(s):
            next(s.probe([rng.choice(parked(s))], [1, 2]))        # started; collected by nobody
        elif r < 0.49 and parked(s):
            next(s.prefill([rng.choice(parked(s))]))
        elif r < 0.51:
            s.close()
        elif r < 0.55:
            plain.append(engine.add_request([rng.randrange(256) for _ in range(rng.randint(1, 20))],
                                            SamplingParams(n=rng.choice([1, 2]), max_tokens=8, ignore_eos=True)))
        elif r < 0.57 and plain:
            engine.abort_request(plain.pop(rng.randrange(len(plain))).request_id)
        else:
            engine.step()
        seqs = {id(q): q for req in list(engine.requests.values()) + [x.request for x in sessions]
                for q in req.seqs}
        assert sum(engine.pool.ref_counts) == sum(len(q.block_table) for q in seqs.values())
    for s in sessions:
        s.close()
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats()["preemptions"] > 0
    engine.pool.check_empty()

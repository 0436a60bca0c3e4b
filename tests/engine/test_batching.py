"""Continuous batching: the same greedy tokens alone, together, chunked, and under preemption."""

import random

from ponder import SamplingParams
from ponder.llm import LLM


def _prompts(n=32, seed=0, low=3, high=60):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randint(low, high))] for _ in range(n)]


def _run(engine, prompts, params):
    return [o.outputs[0].token_ids for o in LLM.from_engine(engine).generate(prompts, params)]


def test_batch_invariance_tiny(make_tiny_engine):
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [_run(make_tiny_engine(max_num_seqs=1), [p], params)[0] for p in prompts]
    together = _run(make_tiny_engine(), prompts, params)
    chunked_engine = make_tiny_engine(max_num_batched_tokens=7)
    chunked = _run(chunked_engine, prompts, params)
    small = make_tiny_engine(num_kv_blocks=40)       # 40 blocks x 4 tokens: forces preemption
    preempted = _run(small, prompts, params)
    assert together == alone
    assert chunked == alone
    assert preempted == alone
    assert small.stats()["preemptions"] > 0
    assert chunked_engine.stats()["max_batch_seqs"] > 1
    small.pool.check_empty()


def test_batch_invariance_with_fp16_kv_cache(make_tiny_engine):
    """The fp16 cache's one attention kernel (prefill chunks and decodes alike) keeps greedy tokens
    the same alone, together and chunked."""
    prompts = _prompts(8, seed=2)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [_run(make_tiny_engine(max_num_seqs=1, kv_cache_dtype="fp16"), [p], params)[0] for p in prompts]
    assert _run(make_tiny_engine(kv_cache_dtype="fp16"), prompts, params) == alone
    assert _run(make_tiny_engine(kv_cache_dtype="fp16", max_num_batched_tokens=7), prompts, params) == alone


def test_seeded_sampling_is_batch_invariant(make_tiny_engine):
    prompts = _prompts(12, seed=1)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=16, ignore_eos=True)
              for i in range(len(prompts))]
    alone = [_run(make_tiny_engine(), [p], [sp])[0] for p, sp in zip(prompts, params)]
    together = _run(make_tiny_engine(num_kv_blocks=30), prompts, params)
    assert together == alone


def test_prefix_cache_reuses_blocks(make_tiny_engine):
    engine = make_tiny_engine(block_size=4)
    llm = LLM.from_engine(engine)
    prefix = list(range(40, 90))       # 50 tokens
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate([prefix + [1, 2, 3]], params)[0]
    before = engine.stats()
    second = llm.generate([prefix + [7, 8, 9, 10]], params)[0]
    after = engine.stats()
    computed = after["prompt_tokens"] - before["prompt_tokens"]
    assert computed <= 4 + engine.pool.block_size
    assert after["prompt_tokens_cached"] - before["prompt_tokens_cached"] >= 48
    assert second.usage.prompt_tokens_cached >= 48
    fresh = LLM.from_engine(make_tiny_engine(enable_prefix_caching=False))
    assert fresh.generate([prefix + [7, 8, 9, 10]], params)[0].outputs[0].token_ids == second.outputs[0].token_ids
    assert first.outputs[0].token_ids == fresh.generate([prefix + [1, 2, 3]], params)[0].outputs[0].token_ids


def test_identical_prompts_sent_together_compute_the_prompt_once(make_tiny_engine):
    """Requests admitted in the same step cannot hit each other's blocks (none is computed yet);
    the scheduler holds back a request whose next block another is computing, so n copies of a
    prompt cost one prefill, chunked or not, and generate what they would alone."""
    prompt = list(range(40, 90))       # 50 tokens: 12 full blocks of 4
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=6, ignore_eos=True) for i in range(6)]
    for budget in (1024, 16):
        engine = make_tiny_engine(block_size=4, max_num_batched_tokens=budget)
        outs = LLM.from_engine(engine).generate([prompt] * 6, params)
        stats = engine.stats()
        assert stats["prompt_tokens"] - stats["prompt_tokens_cached"] <= 50 + 6 * 4
        assert stats["prompt_tokens_cached"] >= 5 * 48
        fresh = LLM.from_engine(make_tiny_engine(block_size=4, enable_prefix_caching=False))
        assert [o.outputs[0].token_ids for o in outs] == \
            [o.outputs[0].token_ids for o in fresh.generate([prompt] * 6, params)]
        engine.pool.check_empty()


def test_fork_shares_prompt_blocks(make_tiny_engine):
    engine = make_tiny_engine(block_size=4, num_kv_blocks=200, enable_prefix_caching=False)
    prompt = list(range(10, 70))          # 60 tokens = 15 blocks
    gen = 12
    engine.add_request(prompt, SamplingParams(n=8, temperature=1.0, seed=3, max_tokens=gen, ignore_eos=True))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.pool.num_blocks - engine.pool.num_free)
    prompt_blocks = 15
    assert peak <= prompt_blocks + 8 * (-(-gen // 4)) + 8
    assert peak < 8 * prompt_blocks      # no copy of the prompt per child
    engine.pool.check_empty()


def test_n_children_differ_and_seed_reproduces(make_tiny_engine):
    llm = LLM.from_engine(make_tiny_engine())
    sp = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    a = llm.generate([[5, 6, 7]], sp)[0]
    b = llm.generate([[5, 6, 7]], sp)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    assert [o.index for o in a.outputs] == [0, 1, 2, 3]


def test_stream_yields_the_generated_text_and_an_early_stop_frees_the_request(make_tiny_engine):
    engine = make_tiny_engine()
    llm = LLM.from_engine(engine)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = llm.generate([[5, 6, 7]], params)[0].outputs[0].text
    assert "".join(llm.stream([5, 6, 7], params)) == full
    free = engine.pool.num_free
    stream = llm.stream([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
    next(stream)
    stream.close()                    # the caller stops reading: the request is aborted, its blocks freed
    assert not engine.has_unfinished_requests() and engine.pool.num_free >= free

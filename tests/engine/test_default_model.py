"""The engine's real paths on the packaged default model (SmolLM2-135M-Instruct)."""

import random

import pytest

from ponder import LLM, SamplingParams

pytestmark = pytest.mark.slow

TEXT = ("The history of computing is a story of people who wanted machines to do arithmetic for them, "
        "from the abacus to mechanical calculators, punched cards, vacuum tubes, transistors and finally "
        "integrated circuits that put billions of switches on a chip the size of a fingernail. ")


def _ids(llm, n, seed):
    rng = random.Random(seed)
    words = TEXT.split()
    ids = []
    while len(ids) < n:
        ids += llm.tokenizer.encode(" " + rng.choice(words))
    return ids[:n]


def test_batch_invariance_default_model(default_llm):
    rng = random.Random(0)
    prompts = [_ids(default_llm, rng.randint(4, 120), seed=i) for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in default_llm.generate(prompts, params)]
    alone = [default_llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone
    chunked = LLM.from_engine(default_llm.engine)
    engine = chunked.engine
    old = engine.scheduler.max_num_batched_tokens
    engine.scheduler.max_num_batched_tokens = 24
    try:
        engine.pool.reset_prefix_cache()
        assert [o.outputs[0].token_ids for o in chunked.generate(prompts, params)] == alone
    finally:
        engine.scheduler.max_num_batched_tokens = old


def test_batch_invariance_under_preemption_default_model():
    llm = LLM(num_kv_blocks=40, block_size=16)        # 640 token slots for ~32 x 70 tokens
    rng = random.Random(1)
    prompts = [_ids(llm, rng.randint(4, 60), seed=100 + i) for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert llm.stats()["preemptions"] > 0
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts[:8]]
    assert together[:8] == alone
    llm.engine.pool.check_empty()


def test_prefix_cache_200_tokens(default_llm):
    engine = default_llm.engine
    engine.pool.reset_prefix_cache()
    prefix = _ids(default_llm, 200, seed=7)
    first_q, second_q = default_llm.tokenizer.encode(" What came first?"), default_llm.tokenizer.encode(" Why?")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    default_llm.generate([prefix + first_q], params)
    before = default_llm.stats()
    cached_run = default_llm.generate([prefix + second_q], params)[0]
    after = default_llm.stats()
    computed = after["prompt_tokens"] - before["prompt_tokens"]
    assert computed <= len(second_q) + engine.pool.block_size
    assert cached_run.usage.prompt_tokens_cached >= 200 - engine.pool.block_size
    engine.pool.reset_prefix_cache()
    uncached = default_llm.generate([prefix + second_q], params)[0]
    assert uncached.outputs[0].token_ids == cached_run.outputs[0].token_ids


def test_fork_n8_block_usage(default_llm):
    engine = default_llm.engine
    engine.pool.reset_prefix_cache()
    prompt = _ids(default_llm, 100, seed=3)
    gen = 20
    engine.add_request(prompt, SamplingParams(n=8, temperature=0.8, seed=1, max_tokens=gen, ignore_eos=True))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        used = engine.pool.num_blocks - engine.pool.num_free
        peak = max(peak, used)
    bs = engine.pool.block_size
    assert peak <= -(-len(prompt) // bs) + 8 * -(-gen // bs) + 8


def test_chat_uses_the_template(default_llm):
    out = default_llm.chat([{"role": "user", "content": "Say hello."}],
                           SamplingParams(temperature=0, max_tokens=20))[0]
    assert out.prompt_token_ids[:2] == default_llm.tokenizer.encode("<|im_start|>system", add_special_tokens=False)
    assert out.outputs[0].text.strip()
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_default_model_samples_as_its_card_recommends(default_llm):
    """The GGUF carries no sampling keys: the packaged model's recommendation (SmolLM2's card:
    temperature 0.2, top-p 0.9) fills them, over ponder's own defaults."""
    defaults = default_llm.engine.sampling_defaults
    assert (defaults["temperature"], defaults["top_p"], defaults["top_k"]) == (0.2, 0.9, 40)
    params = default_llm.default_sampling_params()
    assert (params.temperature, params.top_p) == (0.2, 0.9)

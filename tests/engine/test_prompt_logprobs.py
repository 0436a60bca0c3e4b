"""Prompt logprobs (SamplingParams.prompt_logprobs) equal what the engine gives when it decodes the
same tokens one by one: whole prompts, chunked ones, with a warm prefix cache, after preemption."""

from __future__ import annotations

import pytest

from ponder import SamplingParams
from ponder.llm import LLM
from tests.conftest import decoded_logprobs

PROMPT = [(7 * i + 3) % 250 for i in range(45)]
SCORE = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)


def max_difference(prompt_logprobs, tokens: list[int], reference: list[float]) -> float:
    """Checks the shape of `prompt_logprobs` against `tokens`; the largest difference from `reference`."""
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(tokens)
    assert [lp.token_id for lp in prompt_logprobs[1:]] == tokens[1:]
    return max(abs(lp.logprob - ref) for lp, ref in zip(prompt_logprobs[1:], reference))


def check_entries(prompt_logprobs, k: int) -> None:
    """Top alternatives are the k likeliest, in order; a token among them has its rank there."""
    for lp in prompt_logprobs[1:]:
        values = list(lp.top.values())
        assert len(values) == k and values == sorted(values, reverse=True)
        assert lp.logprob <= values[0] + 1e-6
        if lp.token_id in lp.top:
            assert list(lp.top).index(lp.token_id) + 1 == lp.rank
        else:
            assert lp.rank > k


def test_prompt_logprobs_equal_one_by_one_decoding(make_tiny_engine):
    engine = make_tiny_engine()
    reference = decoded_logprobs(engine, PROMPT)
    [out] = LLM.from_engine(engine).generate([PROMPT], SCORE)
    assert max_difference(out.prompt_logprobs, PROMPT, reference) < 1e-4
    check_entries(out.prompt_logprobs, 3)
    assert len(out.outputs[0].token_ids) == 1
    engine.pool.check_empty()


def test_generated_tokens_score_as_they_were_sampled(make_tiny_engine):
    """Scoring prompt + greedy continuation gives the continuation's own sampling logprobs."""
    engine = make_tiny_engine()
    llm = LLM.from_engine(engine)
    [gen] = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, ignore_eos=True))
    tokens = PROMPT + gen.outputs[0].token_ids
    [out] = llm.generate([tokens], SCORE)
    scored = [lp.logprob for lp in out.prompt_logprobs[len(PROMPT):]]
    sampled = [lp.logprob for lp in gen.outputs[0].logprobs]
    assert scored == pytest.approx(sampled, abs=1e-4)


def test_chunked_and_batched_prompts_with_plain_requests(make_tiny_engine):
    """Prompts longer than the step's token budget are scored chunk by chunk; requests without
    prompt_logprobs in the same steps are unaffected."""
    engine = make_tiny_engine(max_num_batched_tokens=16)
    prompts = [PROMPT, PROMPT[5:38], PROMPT[:17], list(range(100, 160))]
    references = [decoded_logprobs(engine, p) for p in prompts]
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM.from_engine(engine)
    [alone] = llm.generate([PROMPT[:30]], plain)
    outs = llm.generate(prompts + [PROMPT[:30]], [SCORE] * len(prompts) + [plain])
    for out, tokens, reference in zip(outs, prompts, references):
        assert max_difference(out.prompt_logprobs, tokens, reference) < 1e-4
    assert outs[-1].prompt_logprobs is None and outs[-1].outputs[0].token_ids == alone.outputs[0].token_ids
    engine.pool.check_empty()


def test_warm_prefix_cache_is_not_reused_for_scoring(make_tiny_engine):
    engine = make_tiny_engine()
    llm = LLM.from_engine(engine)
    reference = decoded_logprobs(engine, PROMPT)
    llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1))      # the prompt's blocks cached
    [out] = llm.generate([PROMPT], SCORE)
    assert out.usage.prompt_tokens_cached == 0
    assert max_difference(out.prompt_logprobs, PROMPT, reference) < 1e-4
    [again] = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1))
    assert again.usage.prompt_tokens_cached > 0                                   # the cache still serves others
    engine.pool.check_empty()


def test_forked_and_preempted_requests_score_each_token_once(make_tiny_engine):
    engine = make_tiny_engine(num_kv_blocks=24, max_num_batched_tokens=16)
    prompts = [PROMPT[:30], PROMPT[10:40], PROMPT[3:33]]
    references = [decoded_logprobs(engine, p) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, prompt_logprobs=0, n=2)
    outs = LLM.from_engine(engine).generate(prompts, params)
    assert engine.stats()["preemptions"] > 0
    for out, tokens, reference in zip(outs, prompts, references):
        assert max_difference(out.prompt_logprobs, tokens, reference) < 1e-4
        assert all(lp.top == {} for lp in out.prompt_logprobs[1:])
    engine.pool.check_empty()


def test_preempted_mid_prompt_scores_each_token_once(make_tiny_engine):
    """A scoring request preempted while its prompt is half computed recomputes it from the start
    (no prefix reuse) and records the positions it had not scored yet, once."""
    engine = make_tiny_engine(num_kv_blocks=15, max_num_batched_tokens=8)
    long = [(3 * i + 11) % 250 for i in range(50)]
    reference = decoded_logprobs(engine, long)
    _, out = LLM.from_engine(engine).generate(
        [list(range(60, 72)), long], [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                                      SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)])
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prompt_tokens"] > 12 + 50     # prompt positions recomputed
    assert max_difference(out.prompt_logprobs, long, reference) < 1e-4
    engine.pool.check_empty()


def test_prompt_logprobs_are_validated():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


@pytest.mark.slow
def test_default_model_prompt_logprobs_equal_one_by_one_decoding(default_llm):
    tokens = default_llm.engine.tokenizer.encode("The capital of France is Paris, and the capital of "
                                                 "Italy is Rome. The capital of Spain is Madrid.")
    reference = decoded_logprobs(default_llm.engine, tokens)
    [out] = default_llm.generate([tokens], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    assert max_difference(out.prompt_logprobs, tokens, reference) < 1e-4

"""One bad request fails alone with a clear error; the rest of the batch completes."""

import pytest

from ponder import EngineConfig, SamplingParams
from ponder.llm import LLM


def test_bad_prompts_fail_alone(make_tiny_engine):
    engine = make_tiny_engine(max_model_len=64)
    llm = LLM.from_engine(engine)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate(["hi there", "", "x" * 200, [1, 2, 999_999], [3, 4, 5]], params)
    assert [o.error is None for o in outs] == [True, False, False, False, True]
    assert "empty" in outs[1].error
    assert "context" in outs[2].error and "64" in outs[2].error
    assert "token ids" in outs[3].error
    assert outs[1].outputs[0].finish_reason == "error"
    assert len(outs[0].outputs[0].token_ids) == 5 and len(outs[4].outputs[0].token_ids) == 5
    engine.pool.check_empty()


def test_generation_stops_at_context_end(make_tiny_engine):
    llm = LLM.from_engine(make_tiny_engine(max_model_len=20))
    out = llm.generate([[1] * 15], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_abort_frees_blocks(make_tiny_engine):
    engine = make_tiny_engine()
    engine.add_request([1, 2, 3] * 10, SamplingParams(n=3, max_tokens=50, ignore_eos=True), request_id="a")
    engine.add_request([4, 5] * 10, SamplingParams(max_tokens=50, ignore_eos=True), request_id="b")
    for _ in range(4):
        engine.step()
    assert engine.abort_request("a")
    assert not engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    engine.pool.check_empty()


def test_duplicate_request_id_and_unknown_option(make_tiny_engine):
    engine = make_tiny_engine()
    engine.add_request([1, 2], SamplingParams(), request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], SamplingParams(), request_id="x")
    with pytest.raises(ValueError, match="unknown engine option.*max_num_seq"):
        EngineConfig.from_options(None, max_num_seq=4)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)

"""Prefill/decode disaggregation in one process (distributed/disaggregation.py): a prefill engine
and a decode engine behind one engine API give one engine's outputs, stream the first token from
the prefill engine, and leave every block free on both however a request ends — a client that
disconnects mid-hand-off included (the fault hook makes it happen)."""

from __future__ import annotations

import pytest

from ponder import SamplingParams
from ponder.distributed.disaggregation import Disaggregated, through_object_store
from ponder.layers import quant_linear
from tests.engine.test_handoff import check_all_free, mixed_requests, on_one_engine, visible

pytestmark = pytest.mark.skipif(not quant_linear.available(), reason="needs a C compiler")

STAGES = ["held", "exported", "admitted"]   # where the fault hook is called, in order


def drive(pd: Disaggregated, requests, per_step: int = 3) -> tuple[dict, dict]:
    """Add `per_step` requests a step (ids "0", "1", …) until all are in, run dry; the last output
    of each request and every output it streamed."""
    streams: dict[str, list] = {}
    pending = list(enumerate(requests))
    while pending or pd.has_unfinished_requests():
        for i, (prompt, params) in pending[:per_step]:
            pd.add_request(prompt, params, str(i))
        del pending[:per_step]
        for out in pd.step():
            streams.setdefault(out.request_id, []).append(out)
    return {rid: outs[-1] for rid, outs in streams.items()}, streams


@pytest.fixture
def engines(make_tiny_engine):
    """Factory: (prefill, decode) engines on the quantized tiny model, the decode one with
    blocks of 8 (the prefill one's are 4)."""
    return lambda **decode_options: (make_tiny_engine(weights="q8_0"),
                                     make_tiny_engine(weights="q8_0", **{"block_size": 8, **decode_options}))


def test_prefill_and_decode_engines_give_one_engines_output(make_tiny_engine, engines):
    requests = mixed_requests()
    reference = on_one_engine(make_tiny_engine(weights="q8_0"), requests)
    prefill, decode = engines()
    pd = Disaggregated(prefill, decode)
    outs, streams = drive(pd, requests)
    assert {r: visible(o) for r, o in outs.items()} == {r: visible(o) for r, o in reference.items()}
    assert all(o.finished for o in outs.values())
    moved = [r for r, s in streams.items() if len(s) > 1]
    assert pd.stats()["handoffs"] == len(moved) >= 12 and pd.stats()["handoff_bytes"] > 0
    for rid in moved:                 # the first token comes from the prefill engine, still running
        first = streams[rid][0]
        assert not first.finished and all(len(c.token_ids) == 1 and c.finish_reason is None for c in first.outputs)
    assert decode.stats()["prompt_tokens"] == 0 and prefill.stats()["generation_tokens"] == sum(
        len(o.outputs) for o in reference.values())
    check_all_free(prefill, decode)


@pytest.mark.parametrize("stage", STAGES)
def test_a_client_that_leaves_mid_hand_off_leaves_every_block_free(make_tiny_engine, engines, stage):
    """The fault hook aborts one request at a stage of its hand-off: it ends "abort", the decode
    engine never runs it, the others complete as on one engine, and both pools are full after."""
    requests = mixed_requests(8)
    reference = on_one_engine(make_tiny_engine(weights="q8_0"), requests)
    prefill, decode = engines()
    seen = []

    def disconnect(at: str, request_id: str) -> None:
        seen.append((at, request_id))
        if at == stage and request_id == "2":
            assert pd.abort_request(request_id)

    pd = Disaggregated(prefill, decode, fault=disconnect)
    outs, streams = drive(pd, requests)
    assert [at for at, rid in seen if rid == "2"] == STAGES[:STAGES.index(stage) + 1]
    assert outs["2"].finished and outs["2"].outputs[0].finish_reason == "abort" and len(streams["2"]) == 1
    del outs["2"], reference["2"]
    assert {r: visible(o) for r, o in outs.items()} == {r: visible(o) for r, o in reference.items()}
    assert not pd.abort_request("2") and not pd.has_unfinished_requests()
    check_all_free(prefill, decode)


def test_aborts_while_prefilling_and_while_decoding_free_both_sides(engines):
    prefill, decode = engines()
    pd = Disaggregated(prefill, decode)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for rid in ("prefilling", "decoding", "done"):
        pd.add_request(list(range(20, 60)), params, rid)
    assert pd.abort_request("prefilling")
    pd.step()
    pd.step()
    assert "decoding" in decode.requests and pd.abort_request("decoding")
    while pd.has_unfinished_requests():
        pd.step()
    pd.add_request([1, 2], params, "x")
    with pytest.raises(ValueError, match="already in use"):
        pd.add_request([1, 2], params, "x")
    assert pd.abort_request("x")
    check_all_free(prefill, decode)


def test_a_refused_hand_off_ends_its_request_with_the_reason(make_tiny_engine, engines):
    """A decode engine with another KV dtype refuses: the request ends "error" saying why; no
    block is held anywhere."""
    prefill, _ = engines()
    decode = make_tiny_engine(weights="q8_0", kv_cache_dtype="fp32")
    pd = Disaggregated(prefill, decode)
    outs, _ = drive(pd, [([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))])
    assert outs["0"].outputs[0].finish_reason == "error" and "kv_cache_dtype" in outs["0"].error
    check_all_free(prefill, decode)


def test_the_object_store_trip_gives_a_read_only_copy(engines):
    """What the Ray object store gives back: an equal hand-off whose KV is a read-only copy (so
    the import never writes into it)."""
    prefill, _ = engines()
    prefill.add_request(list(range(9, 30)), SamplingParams(temperature=0, max_tokens=3), "r", prefill_only=True)
    while prefill.has_unfinished_requests():
        prefill.step()
    handoff = prefill.export_handoff("r")
    moved = through_object_store(handoff)
    assert not moved.kv.flags.writeable and moved.kv.tobytes() == handoff.kv.tobytes()
    assert moved.model == handoff.model and moved.completions == handoff.completions

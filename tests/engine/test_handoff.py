"""KV hand-off between engines (prefill/decode disaggregation, engine/handoff.py): a request
prefilled on one engine and continued on another gives one engine's output, bit for bit on the
quantized path; blocks come back on both sides however the request ends; an engine refuses a
hand-off it cannot continue exactly."""

from __future__ import annotations

import dataclasses
import pickle
import random
import string

import numpy as np
import pytest

from ponder import SamplingParams, StructuredOutputs
from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.engine.handoff import HANDOFF, HandoffError, PrefillPrompt, Warmed
from ponder.engine.programs import run_programs
from ponder.layers import quant_linear

needs_kernels = pytest.mark.skipif(not quant_linear.available(), reason="needs a C compiler")


def mixed_requests(n: int = 18, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """Greedy, seeded, logprobs, stop strings, max_tokens 1, n > 1, penalties, prompt logprobs and
    a regex constraint, half of them behind a shared 23-token prefix (prefix-cache hits)."""
    rng = random.Random(seed)
    shared = [rng.randrange(256) for _ in range(23)]
    kinds = [dict(temperature=0.0, max_tokens=12),
             dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=12),
             dict(temperature=0.0, logprobs=3, max_tokens=10),
             dict(temperature=1.0, seed=3, stop=list(string.ascii_letters), max_tokens=16),
             dict(temperature=0.0, max_tokens=1, logprobs=1),
             dict(temperature=1.0, seed=11, n=3, logprobs=2, max_tokens=8),
             dict(temperature=0.8, seed=5, repetition_penalty=1.3, presence_penalty=0.5, max_tokens=12),
             dict(temperature=0.0, prompt_logprobs=2, max_tokens=6),
             dict(temperature=1.0, seed=2, structured_outputs=StructuredOutputs(regex=r"[ab]{3}-[0-9]"),
                  max_tokens=20)]
    requests = []
    for i in range(n):
        prompt = (shared if i % 2 else []) + [rng.randrange(256) for _ in range(rng.randint(3, 40))]
        requests.append((prompt, SamplingParams(**kinds[i % len(kinds)])))
    return requests


def finish(engine: LLMEngine) -> dict:
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step())
    return outs


def on_one_engine(engine: LLMEngine, requests) -> dict:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(prompt, params, str(i))
    return finish(engine)


def handed_off(prefill: LLMEngine, decode: LLMEngine, requests) -> tuple[dict, list[str]]:
    """Prefill every request, move each hand-off through pickle (as Ray would), decode; the final
    outputs and the ids that moved."""
    for i, (prompt, params) in enumerate(requests):
        prefill.add_request(prompt, params, str(i), prefill_only=True)
    outs = finish(prefill)
    moved = [rid for rid, o in outs.items() if any(c.finish_reason == HANDOFF for c in o.outputs)]
    for rid in moved:
        decode.add_handoff(pickle.loads(pickle.dumps(prefill.export_handoff(rid), protocol=5)))
    outs.update(finish(decode))
    return outs, moved


def continued(outputs: dict) -> list[str]:
    """The requests whose first token did not end them: those a prefill engine hands off."""
    return sorted(rid for rid, o in outputs.items() if any(len(c.token_ids) > 1 for c in o.outputs))


def visible(out) -> tuple:
    """What a caller sees of an output, usage's cache counts aside."""
    return (out.error, out.prompt_token_ids, out.prompt_logprobs,
            [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in out.outputs])


def check_all_free(*engines: LLMEngine) -> None:
    for engine in engines:
        assert not engine.requests and not engine.held
        engine.pool.check_empty()


@pytest.mark.parametrize("weights", [pytest.param("q8_0", marks=needs_kernels), "fp32"])
def test_handed_off_requests_give_one_engines_output(make_tiny_engine, weights):
    """18 mixed requests: every token, text, logprob (exactly, on the quantized path), finish and
    stop reason as on one engine, the decode engine with another block size; the first-token
    finishes never move."""
    requests = mixed_requests()
    reference = on_one_engine(make_tiny_engine(weights=weights), requests)
    prefill, decode = make_tiny_engine(weights=weights), make_tiny_engine(weights=weights, block_size=8)
    outs, moved = handed_off(prefill, decode, requests)
    assert sorted(outs) == sorted(reference)
    if weights == "q8_0":
        assert {rid: visible(o) for rid, o in outs.items()} == {rid: visible(o) for rid, o in reference.items()}
    else:   # fp32 matmuls may round differently at another batch size: tokens and text agree
        assert ({rid: [(c.token_ids, c.text) for c in o.outputs] for rid, o in outs.items()}
                == {rid: [(c.token_ids, c.text) for c in o.outputs] for rid, o in reference.items()})
    finish_reasons = {c.finish_reason for o in reference.values() for c in o.outputs}
    assert {"stop", "length"} <= finish_reasons
    assert any(c.stop_reason in tuple(string.ascii_letters) and len(c.token_ids) > 1
               for o in reference.values() for c in o.outputs)
    assert sorted(moved) == continued(reference) and 12 <= len(moved) < len(requests)
    assert decode.stats()["prompt_tokens"] == 0        # the decode engine computed no prompt token
    check_all_free(prefill, decode)


def test_a_stop_string_across_the_hand_off(make_tiny_engine):
    """A stop string whose first character is the prefill engine's token and whose second is the
    decode engine's first is found there, as on one engine."""
    prompt = mixed_requests()[0][0]
    [plain] = on_one_engine(make_tiny_engine(), [(prompt, SamplingParams(temperature=0, max_tokens=8))]).values()
    stop = plain.outputs[0].text[:2]
    assert len(stop) == 2 and len(plain.outputs[0].token_ids) > 2
    requests = [(prompt, SamplingParams(temperature=0, max_tokens=8, stop=[stop], include_stop_str_in_output=inc))
                for inc in (False, True)]
    reference = on_one_engine(make_tiny_engine(), requests)
    outs, moved = handed_off(make_tiny_engine(), make_tiny_engine(), requests)
    assert {r: visible(o) for r, o in outs.items()} == {r: visible(o) for r, o in reference.items()}
    assert len(moved) == 2 and [o.outputs[0].stop_reason for o in outs.values()] == [stop, stop]
    assert sorted(o.outputs[0].text for o in outs.values()) == ["", stop]


def test_hand_off_state_and_kv(make_tiny_engine):
    """A held request keeps its blocks until export; the hand-off carries its prompt's KV as the
    prefill engine's cache holds it, and the decode engine's cache then holds the same bits."""
    prefill, decode = make_tiny_engine(), make_tiny_engine(block_size=16)
    prompt = list(range(30, 73))
    prefill.add_request(prompt, SamplingParams(temperature=0, max_tokens=5, logprobs=1), "r", prefill_only=True)
    [out] = finish(prefill).values()
    assert out.finished and out.outputs[0].finish_reason == HANDOFF and len(out.outputs[0].token_ids) == 1
    held = prefill.held["r"].seqs[0]
    assert prefill.pool.num_free == prefill.pool.num_blocks - len(held.block_table) == 256 - 11
    handoff = prefill.export_handoff("r")
    assert prefill.pool.num_free == prefill.pool.num_blocks and not prefill.held
    assert handoff.kv.shape == (2, 2, 43, 2, 16) and handoff.kv_cache_dtype == "fp32"
    assert handoff.completions[0].output_token_ids == out.outputs[0].token_ids
    assert handoff.completions[0].logprobs == out.outputs[0].logprobs and handoff.completions[0].finish_reason is None
    with pytest.raises(KeyError, match="not waiting for a hand-off"):
        prefill.export_handoff("r")
    request = decode.add_handoff(handoff, "r2")
    seq = request.seqs[0]
    assert seq.num_computed_tokens == 43 and len(seq.block_table) == 3 and len(seq.block_hashes) == 2
    np.testing.assert_array_equal(decode.runner.read_kv(seq.block_table, 0, 43), handoff.kv)
    assert decode.pool.num_cached == 2                  # its full blocks are in the prefix index
    finish(decode)
    check_all_free(prefill, decode)


def test_decode_engine_prefix_cache_takes_what_it_holds(make_tiny_engine):
    """A second hand-off of a prompt the decode engine has cached shares those blocks instead of
    writing them again; a plain request for that prompt hits them too."""
    prefill, decode = make_tiny_engine(), make_tiny_engine()
    prompt = list(range(50, 90))                       # 40 tokens: 10 full blocks of 4
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs, tables = [], []
    for rid in ("a", "b"):
        prefill.add_request(prompt, params, rid, prefill_only=True)
        finish(prefill)
        decode.add_handoff(prefill.export_handoff(rid))
        tables.append(list(decode.requests[rid].seqs[0].block_table))
        outs.append(finish(decode)[rid])
    assert tables[1] == tables[0] and len(tables[0]) == 10
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert prefill.stats()["prompt_tokens_cached"] == 36     # the prefill engine's second prefill hit too
    decode.add_request(prompt, params, "c")
    assert finish(decode)["c"].usage.prompt_tokens_cached == 36
    assert decode.stats()["prompt_tokens"] == 4
    check_all_free(prefill, decode)


def test_no_room_on_the_decode_engine_recomputes_exactly(make_tiny_engine):
    """When the decode pool cannot take a hand-off's KV now, the request queues as a preempted one
    would and recomputes its prompt there; the output does not change."""
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    requests = [(list(range(start, start + 30)), params) for start in (0, 40, 80)]
    reference = on_one_engine(make_tiny_engine(), requests)
    prefill, decode = make_tiny_engine(), make_tiny_engine(num_kv_blocks=20)
    outs, moved = handed_off(prefill, decode, requests)
    assert len(moved) == 3 and decode.stats()["prompt_tokens"] > 0
    assert {r: o.outputs[0].token_ids for r, o in outs.items()} == {r: o.outputs[0].token_ids
                                                                    for r, o in reference.items()}
    check_all_free(prefill, decode)


def test_blocks_come_back_on_abort_anywhere(make_tiny_engine):
    """Aborted while prefilling, while held, after export (the hand-off dropped), and while decoding:
    every block is free on both engines, and an abort of a request no engine knows says so."""
    prefill, decode = make_tiny_engine(max_num_batched_tokens=8), make_tiny_engine()
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for rid in ("prefilling", "held", "exported", "decoding"):
        prefill.add_request(list(range(10, 50)), params, rid, prefill_only=True)
    prefill.step()                                     # 8 tokens of the first prompt: chunked prefill
    assert prefill.abort_request("prefilling")
    finish(prefill)
    assert sorted(prefill.held) == ["decoding", "exported", "held"]
    assert prefill.abort_request("held") and "held" not in prefill.held
    dropped = prefill.export_handoff("exported")       # in transit when the client left: never imported
    decode.add_handoff(prefill.export_handoff("decoding"))
    decode.step()
    decode.step()
    assert decode.abort_request("decoding")
    assert not prefill.abort_request("held") and not decode.abort_request("exported")
    assert dropped.nbytes > 0
    check_all_free(prefill, decode)


def _prefilled(engine: LLMEngine, prompt: list[int], request_id: str = "p"):
    """A PrefillPrompt program run to its end on `engine`; its PromptKV, moved through pickle."""
    program = PrefillPrompt(prompt, request_id)(engine)
    run_programs(engine, [program])
    assert program.result.error is None
    return pickle.loads(pickle.dumps(program.result.kv, protocol=5))


def test_a_warmed_prompt_is_computed_only_past_its_last_full_block(make_tiny_engine):
    """A prompt prefilled by a PrefillPrompt program (all but its last token, no request left) and
    warmed into another engine (block size 8): no request there, every block free, the full
    blocks cached; a request for that prompt computes only the tokens past them and gives a cold
    engine's output."""
    prompt, params = list(range(20, 63)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prefill, decode, cold = make_tiny_engine(), make_tiny_engine(block_size=8), make_tiny_engine(block_size=8)
    kv = _prefilled(prefill, prompt)
    assert kv.kv.shape[2] == 42 and kv.prompt_token_ids == prompt
    assert prefill.stats()["prompt_tokens"] == 42 and prefill.stats()["generation_tokens"] == 0
    check_all_free(prefill)
    assert decode.warm_prefix(kv) == 40                   # 5 full blocks of 8 (the 43rd token is never taken)
    assert decode.pool.num_cached == 5 and decode.stats()["prompt_tokens"] == 0
    check_all_free(decode)
    assert decode.warm_prefix(kv) == 40 and decode.pool.num_cached == 5      # again: nothing new
    warm_out, cold_out = (on_one_engine(engine, [(prompt, params)])["0"] for engine in (decode, cold))
    assert visible(warm_out) == visible(cold_out) and warm_out.usage.prompt_tokens_cached == 40
    assert (decode.stats()["prompt_tokens"], decode.stats()["prompt_tokens_cached"]) == (3, 40)
    assert (cold.stats()["prompt_tokens"], cold.stats()["prompt_tokens_cached"]) == (43, 0)
    check_all_free(decode, cold)


def test_a_warmed_think_program_gives_a_cold_engines_result(make_tiny_engine):
    """Warmed: the prompt's KV cached and a think program started on it in one call; its root
    takes the full blocks from the prefix cache, and its branches come out as on a cold engine."""
    from ponder.think.run import ThinkPrompt, think_program

    prompt = list(range(30, 67))                        # 37 tokens: the root computes 36, 32 of them cached
    options = {"strategy": "self-consistency", "n": 3, "temperature": 0.8, "seed": 5, "max_tokens": 8}
    results, stats = [], []
    for warm in (True, False):
        engine = make_tiny_engine()
        factory = think_program(ThinkPrompt(prompt, None, "q"), options, "t")
        if warm:
            factory = Warmed(_prefilled(make_tiny_engine(), prompt), factory)
        run = factory(engine)
        run_programs(engine, [run])
        assert run.result.error is None
        results.append([(c.text, c.finish_reason, c.num_tokens) for c in run.result.candidates])
        stats.append((engine.stats()["prompt_tokens"], engine.stats()["prompt_tokens_cached"]))
        check_all_free(engine)
    assert results[0] == results[1] and len(results[0]) == 3
    assert stats == [(36 - 36 // 4 * 4 + 3, 36), (36 + 3, 0)]    # the branches compute the last token each


def test_an_aborted_or_failed_prefill_program_holds_no_block(make_tiny_engine):
    """Aborted mid-prefill (chunked), or refused (a prompt the pool can never hold): every block free;
    a prompt's KV from another model is refused by warm_prefix, which then leaves the engine as it was."""
    engine = make_tiny_engine(max_num_batched_tokens=8)
    program = PrefillPrompt(list(range(10, 50)), "a")(engine)
    engine.step()
    program.abort()
    assert program.result.kv is None and program.result.error == "aborted" and program.advance()
    check_all_free(engine)
    small = make_tiny_engine(num_kv_blocks=4)
    with pytest.raises(ValueError, match="needs 11 KV blocks"):
        PrefillPrompt(list(range(10, 50)), "b")(small)
    check_all_free(small)
    other = make_tiny_engine(model_overrides=dict(rope_theta=500.0))
    with pytest.raises(HandoffError, match="another model"):
        other.warm_prefix(_prefilled(make_tiny_engine(), list(range(10, 30))))
    assert other.pool.num_cached == 0
    check_all_free(other)


def test_prefill_only_is_refused_for_a_driven_request(make_tiny_engine):
    with pytest.raises(ValueError, match="cannot be prefill-only"):
        make_tiny_engine().add_request([1, 2, 3], SamplingParams(), driven=True, prefill_only=True)


def _held_handoff(engine: LLMEngine, prompt=(5, 6, 7, 8, 9)):
    engine.add_request(list(prompt), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), "x",
                       prefill_only=True)
    finish(engine)
    return engine.export_handoff("x")


@pytest.mark.parametrize("other, message", [
    (dict(kv_cache_dtype="fp16"), "KV is fp32 but this engine's cache is fp16"),
    (dict(model_overrides=dict(num_layers=3)), "num_layers"),
    (dict(model_overrides=dict(rope_theta=500.0)), "another model.*digest"),
    (dict(max_model_len=5), "context"),
])
def test_a_hand_off_it_cannot_continue_is_refused(make_tiny_engine, other, message):
    """Another KV dtype, another model or too short a context: HandoffError naming it, and the
    decode engine is left as it was."""
    decode = make_tiny_engine(**other)
    with pytest.raises(HandoffError, match=message):
        decode.add_handoff(_held_handoff(make_tiny_engine()))
    check_all_free(decode)


def test_a_malformed_hand_off_is_refused(make_tiny_engine):
    handoff, decode = _held_handoff(make_tiny_engine()), make_tiny_engine()
    with pytest.raises(HandoffError, match="KV is shaped"):
        decode.add_handoff(dataclasses.replace(handoff, kv=handoff.kv[:, :, 1:]))
    done = [dataclasses.replace(c, finish_reason="stop") for c in handoff.completions]
    with pytest.raises(HandoffError, match="nothing to continue"):
        decode.add_handoff(dataclasses.replace(handoff, completions=done))
    check_all_free(decode)


def test_a_model_of_the_same_shape_with_other_weights_is_refused(make_tiny_engine, byte_tokenizer_dir):
    from ponder.model.loader import LoadedModel
    from ponder.model.tokenizer import Tokenizer
    from tests.conftest import tiny_config, tiny_model

    cfg = tiny_config()
    other = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=64, block_size=4),
                      loaded=LoadedModel(tiny_model(cfg, seed=1), cfg, Tokenizer(byte_tokenizer_dir, cfg.eos_token_ids),
                                         "tiny"))
    with pytest.raises(HandoffError, match="another model.*digest"):
        other.add_handoff(_held_handoff(make_tiny_engine()))
    check_all_free(other)


@pytest.mark.slow
def test_default_model_hand_off_is_exact(default_llm):
    """The packaged quantized model: 16 mixed requests prefilled on one engine and decoded on
    another (block size 32) give exactly the shared engine's output."""
    loaded = default_llm.engine.loaded
    rng = random.Random(4)
    text = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "2 + 2 ="]
    kinds = [dict(temperature=0.0, max_tokens=16), dict(temperature=0.9, seed=5, top_p=0.9, max_tokens=16),
             dict(temperature=0.0, logprobs=2, max_tokens=8, stop=[" the", "\n"]), dict(temperature=0.0, max_tokens=1)]
    requests = [(text[i % 4] + " " * rng.randint(0, 2), SamplingParams(**kinds[(i // 4 + i) % 4])) for i in range(16)]
    reference = on_one_engine(default_llm.engine, requests)
    prefill = LLMEngine(EngineConfig(num_kv_blocks=256), loaded=loaded)
    decode = LLMEngine(EngineConfig(num_kv_blocks=128, block_size=32), loaded=loaded)
    outs, moved = handed_off(prefill, decode, requests)
    assert {r: visible(o) for r, o in outs.items()} == {r: visible(o) for r, o in reference.items()}
    assert sorted(moved) == continued(reference) and len(moved) >= 8
    check_all_free(prefill, decode)

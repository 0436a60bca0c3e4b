"""Speculative decoding (n-gram prompt lookup) changes no output: greedy and seeded tokens and
their logprobs are identical with and without it, under small token budgets, preemption, and
speculation switching on and off with the batch size; rejected drafts leave no KV behind."""

from __future__ import annotations

import random

import pytest

from ponder import SamplingParams
from ponder.llm import LLM
from ponder.spec.ngram import propose_ngram
from tests.conftest import random_operations


def test_ngram_proposes_what_followed_the_latest_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]
    assert propose_ngram([5, 6, 7, 5], 2) == [6, 7]                       # a one-token suffix
    assert propose_ngram([1, 2, 3, 4], 4) == []                           # nothing repeats
    assert propose_ngram([4, 4, 4, 4], 2, min_n=1, max_n=3) == [4]        # the latest match, one left after it
    assert propose_ngram([1, 2, 1, 2], 0) == []


def _prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts with repeats in them (what n-gram lookup feeds on) and without."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        piece = [rng.randrange(256) for _ in range(rng.randint(2, 8))]
        prompts.append(piece * rng.randint(1, 5) + [rng.randrange(256) for _ in range(rng.randint(0, 6))])
    return prompts


def _params(n: int, seed: int) -> list[SamplingParams]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 4
        common = dict(max_tokens=rng.randint(4, 40), logprobs=rng.choice([None, 0, 2]))
        if kind == 0:
            out.append(SamplingParams(temperature=0.0, ignore_eos=True, **common))
        elif kind == 1:
            out.append(SamplingParams(temperature=1.0, top_p=0.9, seed=1000 + i, ignore_eos=True, **common))
        elif kind == 2:
            out.append(SamplingParams(temperature=0.7, top_k=8, seed=2000 + i, repetition_penalty=1.1,
                                      presence_penalty=0.3, **common))
        else:
            out.append(SamplingParams(temperature=0.0, stop=["a"], min_tokens=2, **common))
    return out


def _outputs(engine, prompts, params):
    outs = LLM.from_engine(engine).generate(prompts, params)
    return [[(c.token_ids, c.text, c.finish_reason, [(lp.token_id, lp.logprob, lp.top) for lp in c.logprobs or []])
             for c in o.outputs] for o in outs]


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 6}, {"num_kv_blocks": 40}],
                         ids=["roomy", "tiny-budget", "preempting"])
def test_outputs_and_logprobs_are_identical_with_speculation(make_tiny_engine, options):
    prompts, params = _prompts(32, seed=1), _params(32, seed=2)
    base = dict(weights="q8_0", **options)   # the int8 kernels: a row's arithmetic never depends on the batch
    plain = make_tiny_engine(**base)
    spec = make_tiny_engine(speculative_method="ngram", num_speculative_tokens=4,
                            speculative_disable_by_batch_size=64, **base)
    assert _outputs(spec, prompts, params) == _outputs(plain, prompts, params)
    stats = spec.stats()
    assert stats["spec_draft_tokens"] > 50 and 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    if "num_kv_blocks" in options:
        assert stats["preemptions"] > 0
    spec.pool.check_empty()


def _method(method: str, draft_folders) -> dict:
    return {"speculative_method": method, **({"speculative_model": draft_folders["noisy"]} if method != "ngram" else {})}


@pytest.mark.parametrize("method", ["ngram", "tree"])
def test_switching_speculation_on_and_off_with_the_batch_changes_nothing(make_tiny_engine, draft_folders, method):
    """Requests arrive and finish over time; with a disable threshold of 3 the batch crosses it
    both ways, so sequences verify drafts in some steps and decode plainly in others."""
    prompts, params = _prompts(16, seed=5), [SamplingParams(temperature=1.0, seed=300 + i, max_tokens=10 + 3 * i,
                                                            ignore_eos=True) for i in range(16)]

    def staggered(engine):
        results, pending = {}, list(zip(prompts, params))
        while pending or engine.has_unfinished_requests():
            if pending and len(engine.scheduler.running) < 5:
                prompt, sp = pending.pop(0)
                engine.add_request(prompt, sp, request_id=str(len(prompts) - len(pending)))
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out.outputs[0].token_ids
        return [results[k] for k in sorted(results, key=int)]

    plain = make_tiny_engine(weights="q8_0")
    spec = make_tiny_engine(weights="q8_0", speculative_disable_by_batch_size=3, **_method(method, draft_folders))
    assert staggered(spec) == staggered(plain)
    assert spec.stats()["spec_verified_seqs"] > 0


@pytest.mark.parametrize("method", ["ngram", "draft", "tree"])
def test_random_add_abort_speculate_preempt_returns_every_block(make_tiny_engine, draft_folders, method):
    rng = random.Random(3)
    draft = {"speculative_model": draft_folders["noisy"]} if method != "ngram" else {}
    engine = make_tiny_engine(num_kv_blocks=24, block_size=4, max_num_seqs=6, max_num_batched_tokens=24,
                              speculative_method=method, speculative_disable_by_batch_size=6, weights="q8_0", **draft)

    def new_request(rng):
        piece = [rng.randrange(256) for _ in range(rng.randint(1, 4))]
        return piece * rng.randint(1, 6), SamplingParams(n=rng.choice([1, 1, 2]), temperature=rng.choice([0.0, 1.0]),
                                                         max_tokens=rng.randint(1, 24), ignore_eos=True)

    def no_draft_or_stray_block_left(engine):
        for req in engine.requests.values():
            for s in req.seqs:
                assert s.num_draft == 0 and len(s.block_table) <= -(-s.num_tokens // 4) + 1

    random_operations(engine, rng, 1500, new_request, add=0.25, abort=0.08, check=no_draft_or_stray_block_left)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    engine.pool.check_empty()
    if method != "ngram":
        engine.speculation.draft.pool.check_empty()


@pytest.mark.parametrize("method", ["ngram", "tree"])
def test_rollback_across_a_block_boundary_leaves_the_shared_prefix_intact(make_tiny_engine, draft_folders, method):
    """n = 3 siblings share the prompt's blocks; each drafts and is rejected across block
    boundaries; their tokens equal those without speculation, and a later request for the same
    prompt reuses the (untouched) prefix blocks and generates the same again."""
    prompt = [7, 8, 9, 10, 11] * 5
    params = SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=30, ignore_eos=True)
    plain = make_tiny_engine(weights="q8_0", block_size=4)
    spec = make_tiny_engine(weights="q8_0", block_size=4, num_speculative_tokens=6,
                            speculative_disable_by_batch_size=8, **_method(method, draft_folders))
    want = _outputs(plain, [prompt], params)
    assert _outputs(spec, [prompt], params) == want
    drafted, accepted = spec.stats()["spec_draft_tokens"], spec.stats()["spec_accepted_tokens"]
    assert drafted > accepted
    assert _outputs(spec, [prompt], params) == want      # again, on the cached prefix
    assert spec.stats()["prompt_tokens_cached"] > 0
    spec.pool.check_empty()


def test_each_request_reports_its_drafts(make_tiny_engine):
    engine = make_tiny_engine(weights="q8_0", speculative_method="ngram")
    outs = LLM.from_engine(engine).generate([[5, 6, 7] * 6, [9, 1] * 8],
                                            SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    stats = engine.stats()
    assert sum(o.usage.spec_draft_tokens for o in outs) == stats["spec_draft_tokens"] > 0
    assert sum(o.usage.spec_accepted_tokens for o in outs) == stats["spec_accepted_tokens"]


# -- a draft model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def draft_folders(tmp_path_factory):
    """Tiny drafts in the target's vocabulary: the target's own weights (it agrees with every token),
    the target's weights with noise added (it agrees often, not always) and other random weights
    (it rarely does)."""
    import torch

    from tests.conftest import tiny_config, tiny_model, write_hf_folder

    cfg = tiny_config()
    noisy = tiny_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1 * p.std())
    return {"same": write_hf_folder(tiny_model(cfg, seed=0), cfg, str(tmp_path_factory.mktemp("draft_same"))),
            "noisy": write_hf_folder(noisy, cfg, str(tmp_path_factory.mktemp("draft_noisy"))),
            "other": write_hf_folder(tiny_model(cfg, seed=7), cfg, str(tmp_path_factory.mktemp("draft_other")))}


@pytest.mark.parametrize("method", ["draft", "tree"])
@pytest.mark.parametrize("which", ["same", "noisy", "other"])
@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 6}, {"num_kv_blocks": 40},
                                     {"kv_cache_dtype": "fp32"}],
                         ids=["roomy", "tiny-budget", "preempting", "fp32-cache"])
def test_a_draft_model_changes_no_output(make_tiny_engine, draft_folders, method, which, options):
    prompts, params = _prompts(32, seed=11), _params(32, seed=12)
    plain = make_tiny_engine(weights="q8_0", **options)
    spec = make_tiny_engine(weights="q8_0", speculative_method=method, speculative_model=draft_folders[which],
                            speculative_disable_by_batch_size=64, **options)
    assert _outputs(spec, prompts, params) == _outputs(plain, prompts, params)
    stats = spec.stats()
    assert stats["spec_draft_tokens"] > 50
    if which == "same":          # the target's own weights: it draws what the target draws (a tree's
        # siblings of the drawn path are the only drafts rejected)
        assert stats["spec_accepted_tokens"] > (0.9 if method == "draft" else 0.5) * stats["spec_draft_tokens"]
    spec.pool.check_empty()
    spec.speculation.draft.pool.check_empty()
    assert stats["draft_kv_blocks_total"] == stats["kv_blocks_total"]


def test_a_draft_with_another_vocabulary_is_refused(make_tiny_engine, tmp_path):
    from tests.conftest import tiny_config, tiny_model, write_hf_folder

    cfg = tiny_config(vocab_size=300)
    folder = write_hf_folder(tiny_model(cfg), cfg, str(tmp_path / "draft"))
    with pytest.raises(ValueError, match="cannot draft for this model.*vocab_size 300"):
        make_tiny_engine(weights="q8_0", speculative_method="draft", speculative_model=folder)
    with pytest.raises(ValueError, match="speculative_model"):
        make_tiny_engine(weights="q8_0", speculative_method="draft")


def test_a_tree_accepts_more_per_verification_than_a_chain_of_as_many_tokens(make_tiny_engine, draft_folders):
    """A draft that agrees with the target often but not always: at the same number of tokens
    verified, branching where it hesitates accepts more of them, and the output is the same."""
    prompts = _prompts(16, seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    accepted = {}
    outputs = {}
    for method in ("draft", "tree"):
        engine = make_tiny_engine(weights="q8_0", speculative_method=method, speculative_model=draft_folders["noisy"],
                                  num_speculative_tokens=6, speculative_tree_width=2, speculative_adaptive=False,
                                  speculative_disable_by_batch_size=64)
        outputs[method] = _outputs(engine, prompts, params)
        st = engine.stats()
        accepted[method] = st["spec_accepted_tokens"] / st["spec_verified_seqs"]
        assert st["spec_draft_tokens"] > 5.5 * st["spec_verified_seqs"]    # 6 a verification, bar the context's end
        engine.pool.check_empty()
        if method == "tree":                 # the trees' calibration learned from the verifications
            calibration = engine.speculation.draft.calibration
            assert sum(map(sum, calibration.offered)) >= st["spec_verified_seqs"]
    assert outputs["tree"] == outputs["draft"]
    assert accepted["tree"] > 1.1 * accepted["draft"], accepted


@pytest.mark.parametrize("strategy, options", [("self-consistency", {"n": 4}),
                                               ("beam-search", {"n": 4, "width": 2, "max_steps": 3})])
@pytest.mark.parametrize("method", ["ngram", "tree"])
def test_think_branches_speculate_without_changing_the_result(make_tiny_engine, draft_folders, method, strategy,
                                                              options):
    """Forked think branches draft and verify like any sequence (and stop at their step limits);
    a seeded think run gives the same candidates."""
    def run(engine):
        result = LLM.from_engine(engine).think([5, 6, 7, 5, 6, 7, 5, 6], strategy, chat=False, temperature=1.0,
                                               top_p=1.0, top_k=-1, min_p=0.0, seed=4, max_tokens=24, **options)
        return [(c.text, c.finish_reason, c.num_tokens, c.score) for c in result.candidates]

    spec = make_tiny_engine(weights="q8_0", speculative_disable_by_batch_size=8, **_method(method, draft_folders))
    assert run(spec) == run(make_tiny_engine(weights="q8_0"))
    assert spec.stats()["spec_verified_seqs"] > 0


@pytest.mark.parametrize("method", ["ngram", "tree"])
def test_constrained_outputs_speculate_without_changing(make_tiny_engine, draft_folders, method):
    """Under a grammar, each verified position is masked by the matcher walked through the drafts
    before it; a draft the grammar refuses is simply rejected. Outputs are the same."""
    from ponder import StructuredOutputs

    constraints = [StructuredOutputs(regex=r"(ab|cd){1,20}"), StructuredOutputs(choice=["abab", "abcd"]),
                   StructuredOutputs(json={"type": "object", "properties": {"k": {"enum": ["ab", "abab"]},
                                                                            "n": {"type": "integer", "maximum": 99}},
                                           "required": ["k", "n"], "additionalProperties": False},
                                     disable_any_whitespace=True)]
    prompts = [[97, 98, 97, 98, 99, 100] * 3, [1, 2, 3] * 4, [123, 34, 107, 34] * 3]
    params = [SamplingParams(temperature=t, seed=s, max_tokens=40, structured_outputs=c)
              for c in constraints for t, s in ((0.0, None), (1.0, 5))]
    all_prompts = [p for p in prompts for _ in range(2)]
    plain = make_tiny_engine(weights="q8_0")
    spec = make_tiny_engine(weights="q8_0", speculative_disable_by_batch_size=16, **_method(method, draft_folders))
    assert _outputs(spec, all_prompts, params) == _outputs(plain, all_prompts, params)
    assert spec.stats()["spec_verified_seqs"] > 0
    if method == "ngram":     # copies of the prompt pass the grammar; a draft model's own proposals are unmasked
        assert spec.stats()["spec_accepted_tokens"] > 0

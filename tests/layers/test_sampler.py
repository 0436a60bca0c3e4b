"""Each sampling parameter does what its name says (unit tests on synthetic logits)."""

import math

import pytest
import torch

from ponder import SamplingParams
from ponder.engine.sequence import Request, Sequence
from ponder.layers import sampler as sampler_module
from ponder.layers.sampler import SamplingBatch, apply_penalties, sample, sampling_probs

V = 50


def _rows(params_list, outputs=None, seeds=None):
    rows = []
    for i, p in enumerate(params_list):
        prompt = [1, 2, 3]
        out = (outputs or {}).get(i, [])
        req = Request(str(i), None, prompt, p)
        rows.append(Sequence(req, prompt + out, len(prompt), index=0, seed=(seeds or {}).get(i, 1234 + i)))
    return rows


def _batch(params_list, **kw):
    return SamplingBatch.build(_rows(params_list, **kw), V, eos_token_ids=[0])


def _logits(rows=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3


def test_top_k_1_equals_greedy():
    logits = _logits(8)
    sp = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(8)]
    assert sample(logits, _batch(sp)).token_ids == logits.argmax(-1).tolist()


def test_greedy_is_argmax():
    logits = _logits(4)
    assert sample(logits, _batch([SamplingParams(temperature=0)] * 4)).token_ids == logits.argmax(-1).tolist()


def test_logit_bias_minus_100_never_appears():
    logits = torch.zeros(1, V)
    logits[0, 7] = 10.0      # by far the most likely token
    for seed in range(50):
        sp = SamplingParams(temperature=1.0, seed=seed, logit_bias={7: -100})
        assert sample(logits, _batch([sp])).token_ids[0] != 7
    forced = SamplingParams(temperature=1.0, seed=1, logit_bias={3: 100})
    assert sample(torch.zeros(1, V), _batch([forced])).token_ids[0] == 3


def test_seed_reproduces_and_differs():
    logits = _logits(1) / 3
    draws = lambda s: [sample(logits, _batch([SamplingParams(temperature=1.0, seed=s)], seeds={0: s})).token_ids[0]
                       for _ in range(3)]
    assert len(set(draws(5))) == 1
    many = {sample(logits, _batch([SamplingParams(temperature=1.0)], seeds={0: s})).token_ids[0] for s in range(40)}
    assert len(many) > 3


def test_sampling_matches_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * (V - 3)]))
    counts = torch.zeros(V)
    for s in range(3000):
        tok = sample(logits, _batch([SamplingParams(temperature=1.0)], seeds={0: s})).token_ids[0]
        counts[tok] += 1
    freq = counts[:3] / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_top_p_limits_support():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4)) + 1e-12
    logits = probs.log()[None]
    p = sampling_probs(logits, _batch([SamplingParams(temperature=1.0, top_p=0.65)]))
    support = set(torch.nonzero(p[0] > 0).flatten().tolist())
    assert support == {0, 1}          # 0.4 + 0.3 reaches 0.65; the rest is cut
    p = sampling_probs(logits, _batch([SamplingParams(temperature=1.0, top_p=0.75)]))
    assert set(torch.nonzero(p[0] > 0).flatten().tolist()) == {0, 1, 2}


def test_min_p_limits_support():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06] + [0.04 / (V - 4)] * (V - 4))
    p = sampling_probs(probs.log()[None], _batch([SamplingParams(temperature=1.0, min_p=0.25)]))
    assert set(torch.nonzero(p[0] > 0).flatten().tolist()) == {0, 1}   # >= 0.25 * 0.5


def test_top_k_limits_support():
    p = sampling_probs(_logits(1), _batch([SamplingParams(temperature=1.0, top_k=5)]))
    assert int((p[0] > 0).sum()) == 5


def test_frequency_and_presence_penalties_follow_openai_rule():
    logits = _logits(1)
    out = [4, 4, 4, 9]
    sp = SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_penalties(logits.clone(), _batch([sp], outputs={0: out}))   # (edited in place)
    expect = logits.clone()
    expect[0, 4] -= 3 * 0.5 + 0.25
    expect[0, 9] -= 1 * 0.5 + 0.25
    torch.testing.assert_close(got, expect)


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.zeros(1, V)
    logits[0, 2], logits[0, 5] = 2.0, -2.0        # 2 is in the prompt, 5 in the output
    got = apply_penalties(logits, _batch([SamplingParams(repetition_penalty=2.0)], outputs={0: [5]}))
    assert got[0, 2] == 1.0 and got[0, 5] == -4.0 and got[0, 10] == 0.0


def test_min_tokens_masks_eos():
    logits = torch.zeros(1, V)
    logits[0, 0] = 50.0     # eos is overwhelmingly likely
    sp = SamplingParams(temperature=0, min_tokens=3)
    assert sample(logits, _batch([sp])).token_ids[0] != 0
    assert sample(logits, _batch([sp], outputs={0: [5, 6, 7]})).token_ids[0] == 0


def test_logprobs_with_top_alternatives():
    logits = _logits(2)
    out = sample(logits, _batch([SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)]))
    lp = out.logprobs[0]
    ref = torch.log_softmax(logits[0], -1)
    assert lp.token_id == out.token_ids[0]
    assert math.isclose(lp.logprob, ref[lp.token_id].item(), rel_tol=1e-5)
    assert list(lp.top) == ref.topk(3).indices.tolist()
    assert out.logprobs[1] is None


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0), ("n", 0),
    ("max_tokens", 0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("logprobs", 21), ("seed", "x"), ("stop", [""]), ("logit_bias", {"a": 1}), ("min_tokens", -1),
    ("temperature", float("nan")), ("ignore_eos", "yes"),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        SamplingParams(**{field: value})


@pytest.mark.skipif(sampler_module._native_race() is None, reason="no C compiler for the native kernels")
@pytest.mark.parametrize("vocab,scale,filtered", [(50, 0.5, False), (1000, 3.0, True), (151_936, 10.0, False),
                                                  (151_936, 1.0, True)])
def test_native_draw_equals_torch_draw(vocab, scale, filtered):
    """The native race computes the very tokens of the torch formula (same hash, same rounding),
    so a seed draws the same text whichever path runs."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(32, vocab, generator=g) * scale
    if filtered:
        logits[:, ::3] = float("-inf")
    probs = logits.softmax(-1)
    seeds = torch.randint(0, 2**32, (32,), generator=g)
    steps = torch.randint(0, 10_000, (32,), generator=g)
    expected = (probs / sampler_module.exponential_noise(seeds, steps, vocab)).argmax(dim=-1)
    assert sampler_module.race_argmax(probs, seeds, steps).tolist() == expected.tolist()


class _AllowOnly:
    """A test extension: rows whose seed is in `allowed` may only draw tokens in that set, and every
    row reports the logprob of token 7 under the raw distribution."""

    name = "allow"

    def __init__(self, allowed: dict[int, list[int]]):
        self.allowed = allowed

    def prepare(self, rows):
        masks = {i: self.allowed[s.seed] for i, s in enumerate(rows) if s.seed in self.allowed}
        return _AllowRows(masks) if masks else None


class _AllowRows:
    name = "allow"
    reads_distribution = True

    def __init__(self, masks):
        self.masks = masks

    def edit_logits(self, logits):
        out = logits.clone()
        for row, ids in self.masks.items():
            keep = torch.full((logits.shape[1],), float("-inf"))
            keep[ids] = 0.0
            out[row] += keep
        return out

    def observe(self, logprobs, tokens):
        return {row: logprobs[row, 7].item() for row in range(logprobs.shape[0])}


def test_extension_edits_its_rows_before_penalties_and_observes_the_raw_distribution():
    logits = _logits(3, seed=5)
    rows = _rows([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=9),
                  SamplingParams(temperature=0.0, presence_penalty=2.0)],
                 outputs={2: [11, 12]}, seeds={0: 100, 1: 101, 2: 102})
    ext = _AllowOnly({100: [3, 4], 102: [11, 12]})
    batch = SamplingBatch.build(rows, V, eos_token_ids=[0], extensions=(ext,))
    out = sample(logits, batch)
    assert out.token_ids[0] == max((3, 4), key=lambda t: logits[0, t].item())
    assert out.token_ids[1] == sample(logits[1:2], SamplingBatch.build(rows[1:2], V, [0])).token_ids[0]
    # with penalties on, the mask still holds (both allowed tokens carry the same presence penalty)
    assert out.token_ids[2] == max((11, 12), key=lambda t: logits[2, t].item())
    raw = torch.log_softmax(logits, dim=-1)[:, 7].tolist()
    assert out.extras["allow"] == pytest.approx({0: raw[0], 1: raw[1], 2: raw[2]})
    # no row needs it: the extension is not part of the step
    assert SamplingBatch.build(rows[1:2], V, [0], extensions=(ext,)).extensions == []


@pytest.mark.parametrize("vocab, top_k, top_p", [(50, 5, 1.0), (50, -1, 0.9), (5000, 20, 0.8), (5000, -1, 0.95),
                                                 (5000, 2000, 0.99), (5000, -1, 1.0)])
def test_truncation_among_the_top_candidates_equals_a_full_sort(vocab, top_k, top_p):
    from ponder.layers.sampler import _truncate_by_sort, truncate

    g = torch.Generator().manual_seed(vocab + top_k)
    logits = torch.randn(6, vocab, generator=g) * torch.tensor([0.1, 1.0, 3.0, 6.0, 10.0, 0.01])[:, None]
    k = torch.full((6,), top_k if top_k > 0 else vocab)
    p = torch.full((6,), top_p)
    fast = truncate(logits, k, p, use_top_p=top_p < 1.0)
    if top_k <= 0 and top_p >= 1.0:
        assert torch.equal(fast, logits)
        return
    slow = _truncate_by_sort(logits, k, p)
    assert torch.equal(torch.isinf(fast), torch.isinf(slow))           # the same tokens kept
    kept = ~torch.isinf(slow)
    assert torch.equal(fast[kept], slow[kept])


def test_a_race_among_the_top_candidates_draws_what_the_full_race_draws():
    """Tokens outside a row's cut have probability 0 and cannot win; a token's noise is the same
    wherever it is computed: the short race and the full one agree (on untied logits)."""
    from ponder.layers.sampler import draw, race_argmax

    g = torch.Generator().manual_seed(4)
    vocab = 3000
    logits = torch.randn(12, vocab, generator=g) * 4
    params = [SamplingParams(temperature=0.7, top_k=20, top_p=0.8, seed=i) for i in range(4)] + \
             [SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, seed=10 + i) for i in range(4)] + \
             [SamplingParams(temperature=1.2, seed=20 + i) for i in range(2)] + \
             [SamplingParams(temperature=0.9, top_k=2000, seed=30 + i) for i in range(2)]
    rows = []
    for i, p in enumerate(params):
        req = Request(str(i), None, [1], p)
        rows.append(Sequence(req, [1, 2], 1, index=0, seed=p.seed))
    batch = SamplingBatch.build(rows, vocab, [0])
    full = race_argmax(sampling_probs(logits, batch), batch.seeds, batch.steps)
    assert draw(logits, batch).tolist() == full.tolist()


def test_sparse_penalties_equal_the_dense_rule():
    """The penalties touch only seen tokens; every value equals the dense formula's."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, V, generator=g) * 2
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2),
              SamplingParams(repetition_penalty=0.8), SamplingParams()]
    batch = _batch(params, outputs={0: [4, 4, 9, 30], 1: [7]})
    counts = torch.zeros(3, V)
    for row, toks in enumerate(batch.output_tokens):
        for t in toks:
            counts[row, t] += 1
    seen = counts > 0
    for row, toks in enumerate(batch.prompt_tokens):
        seen[row, toks] = True
    rep = batch.repetition[:, None]
    dense = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    dense = dense - batch.frequency[:, None] * counts - batch.presence[:, None] * (counts > 0)
    assert torch.equal(apply_penalties(logits.clone(), batch), dense)

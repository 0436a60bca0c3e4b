"""Strategy logic on controllable cases: scripted bigram models and scripted scorers."""

from collections import Counter

import numpy as np
import pytest

from ponder import SamplingParams
from ponder.sampling_params import InvalidOption
from ponder.think import ThinkSession, exact_match, extract_answer
from ponder.think.confidence import trace_confidence
from ponder.think.scorers import RewardModelScorer, SelfEvalScorer, evaluation_suffix
from ponder.think.strategies import (beam_search, best_of_n, deepconf, parallel, particle_filtering,
                                     self_consistency)
from ponder.think.voting import pass_at_k

from .conftest import EOS

# answers "1" spelt four ways, "2", or nothing
VOTES_SCRIPT = {">": {"1": 0.3, "$": 0.2, "2": 0.3, "w": 0.2}, "$": {"1": 1.0}, "1": {"EOS": 0.5, ".": 0.5},
                ".": {"0": 1.0}, "0": {"EOS": 1.0}, "2": {"EOS": 1.0}, "w": {"EOS": 1.0},
                ":": {"Y": 0.8, "N": 0.2}}
PROMPT = list(b"Q>")


def _session(engine, **params):
    params = {"temperature": 0.8, "seed": 3, "max_tokens": 20, **params}
    return ThinkSession(engine, PROMPT, SamplingParams(**params))


def _finish(s, engine):
    s.close()
    engine.pool.check_empty()


class Recorder:
    """A scorer from a function of the output token ids, remembering what it saw."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, session, seqs):
        scores = [self.fn(tuple(s.output_token_ids)) for s in seqs]
        self.calls.append([(tuple(s.output_token_ids), score, s.finish_reason) for s, score in zip(seqs, scores)])
        return scores


def _hash_score(ids):
    return 0.05 + 0.9 * ((hash(ids) * 2654435761) % 10007) / 10007


def test_majority_vote_counts_normalised_answers(make_bigram_engine):
    engine = make_bigram_engine(VOTES_SCRIPT)
    s = _session(engine)
    result = s.run(self_consistency(s, n=24))
    answers = [extract_answer(c.text) for c in result.candidates]
    expected = Counter(a for a in answers if a is not None)
    assert result.votes == dict(expected)
    assert result.final_answer == expected.most_common(1)[0][0]
    spellings_of_one = {c.text for c in result.candidates if c.answer == "1"}
    assert len(spellings_of_one) >= 3                  # "1", "1.0", "$1", "$1.0" vote together
    assert result.answer in spellings_of_one or result.final_answer != "1"
    _finish(s, engine)


def test_weighted_vote_follows_scores(make_bigram_engine):
    engine = make_bigram_engine(VOTES_SCRIPT)
    s = _session(engine)
    heavy_two = lambda session, seqs: [10.0 if extract_answer(q.text) == "2" else 1.0 for q in seqs]
    result = s.run(self_consistency(s, n=24, vote="weighted", scorer=heavy_two))
    counts = Counter(c.answer for c in result.candidates)
    assert counts["1"] > counts["2"] > 0                # majority would pick "1"
    assert result.final_answer == "2" and result.votes["2"] == 10.0 * counts["2"]
    _finish(s, engine)


def test_best_of_n_with_a_verifier_and_parallel_pass_at_k(make_bigram_engine):
    engine = make_bigram_engine(VOTES_SCRIPT)
    s = _session(engine)
    result = s.run(best_of_n(s, n=8, scorer=exact_match("2")))
    assert result.final_answer == "2" and max(c.score for c in result.candidates) == 1.0
    assert s.usage()["scorer_calls"] == 8
    _finish(s, engine)
    s = _session(engine)
    result = s.run(parallel(s, n=8, reference="1"))
    correct = sum(c.answer == "1" for c in result.candidates)
    assert result.metrics["num_correct"] == correct
    assert result.metrics["pass@1"] == pytest.approx(correct / 8)
    assert result.metrics["pass@8"] == (1.0 if correct else 0.0)
    assert result.metrics["pass@2"] == pytest.approx(pass_at_k(8, correct, 2))
    _finish(s, engine)


def test_self_eval_reads_label_probabilities_and_frees_its_forks(make_bigram_engine):
    engine = make_bigram_engine(VOTES_SCRIPT)             # after "Answer:" the model says Y 0.8 / N 0.2
    s = _session(engine)
    result = s.run(best_of_n(s, n=4, scorer="self-eval"))
    assert [c.score for c in result.candidates] == pytest.approx([0.8] * 4, abs=1e-4)
    usage = s.usage()
    question_tokens = len(evaluation_suffix(engine.tokenizer, None, SelfEvalScorer().question).encode())
    assert usage["scorer_calls"] == 4
    assert usage["prompt_tokens_computed"] >= 4 * question_tokens      # only the question is prefilled
    assert usage["prompt_tokens_computed"] <= len(PROMPT) + 4 * (question_tokens + 2)
    assert len(s.request.seqs) == 1 + 4                                # forks of the judge are gone
    _finish(s, engine)


def test_a_second_model_judges_as_a_reward_model(make_bigram_engine):
    engine = make_bigram_engine(VOTES_SCRIPT)
    judge = make_bigram_engine({"\n": {"Y": 0.3, "N": 0.7}})    # it reads a chat: "...assistant\n"
    s = _session(engine)
    result = s.run(best_of_n(s, n=3, scorer=RewardModelScorer(judge)))
    assert [c.score for c in result.candidates] == pytest.approx([0.3] * 3, abs=1e-4)
    assert s.usage()["prompt_tokens_computed"] > 3 * 40                # the judge's prefill is counted
    judge.pool.check_empty()
    _finish(s, engine)
    s = _session(engine)
    result = s.run(best_of_n(s, n=3, scorer=RewardModelScorer(lambda q, outs: [len(o) for o in outs])))
    assert [c.score for c in result.candidates] == [len(c.text) for c in result.candidates]
    _finish(s, engine)


def test_evaluation_suffix_closes_the_turn_once(make_bigram_engine):
    engine = make_bigram_engine({})
    tok = engine.tokenizer
    suffix = evaluation_suffix(tok, [{"role": "user", "content": "Q"}], "Right?")
    assert suffix == "<|im_end|>\n<|im_start|>user\nRight?<|im_end|>\n<|im_start|>assistant\n"
    from ponder.think.scorers import _drop_repeated_end
    ids = tok.encode(suffix, add_special_tokens=False)
    assert ids[0] == EOS
    assert _drop_repeated_end([5, EOS], ids, [EOS]) == ids[1:]
    assert _drop_repeated_end([5, 6], ids, [EOS]) == ids


def test_beam_search_keeps_the_top_n_over_m(make_tiny_engine):
    engine = make_tiny_engine(num_kv_blocks=1024)
    s = ThinkSession(engine, list(range(40, 70)),
                     SamplingParams(temperature=1.0, seed=4, max_tokens=60, ignore_eos=True))
    n, width, step = 8, 4, 4
    scorer = Recorder(_hash_score)
    result = s.run(beam_search(s, n=n, width=width, scorer=scorer, step_max_tokens=step, max_steps=5))
    assert len(scorer.calls) == 5
    for before, after in zip(scorer.calls, scorer.calls[1:]):
        assert len(before) == n and len(after) == n
        ranked = sorted(before, key=lambda entry: -entry[1])
        kept = Counter(ids for ids, _, _ in ranked[:n // width])
        length = len(before[0][0])
        parents = Counter(ids[:length] for ids, _, _ in after)
        assert parents == Counter({ids: c * width for ids, c in kept.items()})
    best = max(result.candidates, key=lambda c: c.score)
    assert best.score == max(score for _, score, _ in scorer.calls[-1]) and result.answer == best.text
    _finish(s, engine)


def test_particle_filtering_resamples_by_weight(make_tiny_engine):
    engine = make_tiny_engine(num_kv_blocks=1024)
    s = ThinkSession(engine, list(range(40, 70)),
                     SamplingParams(temperature=1.0, seed=6, max_tokens=60, ignore_eos=True))
    best_of_call = {}

    def reward(ids):               # the best-hashed particle of each step gets almost all the weight
        return 0.999 if best_of_call.get(len(ids)) == ids else 0.001

    class Picker(Recorder):
        def __call__(self, session, seqs):
            ids = [tuple(q.output_token_ids) for q in seqs]
            best_of_call[len(ids[0])] = max(ids, key=_hash_score)
            return super().__call__(session, seqs)

    scorer = Picker(reward)
    result = s.run(particle_filtering(s, n=8, scorer=scorer, step_max_tokens=3, max_steps=4))
    for before, after in zip(scorer.calls, scorer.calls[1:]):
        winner = best_of_call[len(before[0][0])]
        assert all(ids[:len(winner)] == winner for ids, _, _ in after)
    best = max(result.candidates, key=lambda c: c.score)      # the final step's winner is chosen
    assert best.score == pytest.approx(np.log(0.999 / 0.001)) and result.answer == best.text
    _finish(s, engine)


def test_particle_filtering_stopped_particles_keep_their_weight(make_bigram_engine):
    engine = make_bigram_engine({">": {"a": 0.5, "b": 0.5}, "b": {"b": 1.0}})   # "a" ends at once
    s = _session(engine, max_tokens=12)
    scorer = Recorder(lambda ids: 0.9 if ids[0] == ord("a") else 0.5)
    result = s.run(particle_filtering(s, n=8, scorer=scorer, step_max_tokens=2, max_steps=6))
    assert any(ids[0] == ord("a") for ids, _, _ in scorer.calls[0])
    for call in scorer.calls[1:]:                       # finished particles are never stepped or rescored
        assert all(ids[0] == ord("b") for ids, _, _ in call)
    finished = [c for c in result.candidates if c.text == "a"]
    assert len(finished) >= 6                           # weight logit(0.9) beats logit(0.5) at every draw
    assert all(c.score == pytest.approx(np.log(9)) for c in finished)
    assert result.answer == "a"
    _finish(s, engine)


DEEPCONF_SCRIPT = {">": {"a": 0.5, "b": 0.5},
                   "a": {"a": 0.6, "1": 0.3, "2": 0.1}, "1": {"EOS": 1.0}, "2": {"EOS": 1.0},
                   **{c: {d: 0.1 for d in "bcdefghijk"} for c in "bcdefghijk"}}   # flat: low confidence


def _warmup_threshold(result, warmup, window, keep_top):
    return float(np.percentile([c.score for c in result.candidates[:warmup]], 100 * (1 - keep_top)))


@pytest.mark.parametrize("given_window", [4, None])
def test_deepconf_stops_low_confidence_traces(make_bigram_engine, given_window):
    """With no window given it is max_tokens / 4 (here 4): the paper's 2048 would never fill."""
    engine = make_bigram_engine(DEEPCONF_SCRIPT)
    s = _session(engine, max_tokens=16, seed=2)
    window = 4
    result = s.run(deepconf(s, n=24, warmup=8, keep_top=0.5, window=given_window, consensus=1.0, top_logprobs=5))
    threshold = result.metrics["threshold"]
    assert threshold == pytest.approx(_warmup_threshold(result, 8, window, 0.5))
    assert 2.5 < threshold < 8                          # warm-up mixed confident "a" and flat "b" traces
    low = [c for c in result.candidates if c.finish_reason == "low-confidence"]
    assert low and all(c.text.startswith("b") and c.num_tokens == window for c in low)
    online_kept = result.candidates[8:len(result.candidates) - len(low)]
    assert online_kept and all(c.text.startswith("a") for c in online_kept)
    assert result.final_answer == "1"
    assert s.usage()["generated_tokens"] < 24 * 16
    _finish(s, engine)


def test_deepconf_stops_everything_at_consensus(make_bigram_engine):
    engine = make_bigram_engine(DEEPCONF_SCRIPT)
    s = _session(engine, max_tokens=16, seed=8)
    result = s.run(deepconf(s, n=24, warmup=8, keep_top=0.5, window=4, consensus=0.5, top_logprobs=5))
    stopped = [c for c in result.candidates if c.finish_reason == "consensus"]
    assert len(stopped) == 16 and all(c.num_tokens == 0 for c in stopped)
    assert result.final_answer == "1"
    _finish(s, engine)


def test_confidence_kinds():
    from ponder.outputs import Logprob

    lps = [Logprob(0, -0.1, {0: -0.1, 1: -3.0}), Logprob(0, -1.0, {0: -1.0, 1: -1.0}),
           Logprob(0, -0.1, {0: -0.1, 1: -5.0})]
    confs = [1.55, 1.0, 2.55]
    assert trace_confidence(lps, "mean") == pytest.approx(sum(confs) / 3)
    assert trace_confidence(lps, "min-window", window=2) == pytest.approx(min(1.275, 1.775))
    assert trace_confidence(lps, "tail", window=1) == pytest.approx(2.55)


# -- adaptive consistency ----------------------------------------------------------------------------
def test_beta_stopping_rule():
    from ponder.think.stopping import majority_settled

    assert not majority_settled({}, 0.95)
    assert not majority_settled({"1": 3}, 0.95)          # P(Bin(4, 1/2) <= 3) = 15/16
    assert majority_settled({"1": 4}, 0.95)              # 31/32
    assert not majority_settled({"1": 6, "2": 4}, 0.95)
    assert majority_settled({"1": 12, "2": 2}, 0.95)


def test_dirichlet_rule_counts_every_answer_seen_and_one_not_yet_seen():
    import random

    from ponder.think.stopping import dirichlet_settled, leader_probability, majority_settled

    for a in range(6):                    # one answer: Dirichlet(a + 1, 1), so P = 1 - 2^-(a + 1), as Beta's
        assert leader_probability((a,)) == pytest.approx(1 - 0.5 ** (a + 1), abs=1e-5)
    rng, draws, wins = random.Random(0), 100_000, 0
    for _ in range(draws):                # (5, 3, 2, 1) against a Monte Carlo estimate of the same posterior
        x = [rng.gammavariate(alpha, 1.0) for alpha in (6, 4, 3, 2, 1)]
        wins += x[0] > max(x[1:])
    assert leader_probability((5, 3, 2, 1)) == pytest.approx(wins / draws, abs=0.01)
    assert leader_probability((2, 2)) < 0.5                   # a tie never leads
    spread = {"7": 3, "1": 1}
    assert majority_settled(spread, 0.8) and dirichlet_settled(spread, 0.6) and not dirichlet_settled(spread, 0.8)
    assert not dirichlet_settled({}, 0.5)


def test_window_rule_stops_on_a_wave_that_agrees_entirely():
    from ponder.think.stopping import settled

    assert settled("window", ["3", "7", "7", "7"], 2, 0.95)
    assert not settled("window", ["7", "7", "3", "7"], 2, 0.95)
    assert not settled("window", ["7", None], 2, 0.95)        # a sample without a vote breaks agreement
    assert not settled("window", ["7"], 2, 0.95)
    with pytest.raises(ValueError, match="stopping rule"):
        settled("vibes", ["7"], 1, 0.95)


UNANIMOUS = {">": {"4": 1.0}, "4": {"EOS": 1.0}}


def test_adaptive_consistency_stops_early_on_agreement_and_spends_what_sc_would(make_bigram_engine):
    from ponder.think.strategies import adaptive_consistency

    engine = make_bigram_engine(UNANIMOUS)
    s = _session(engine)
    result = s.run(adaptive_consistency(s, n=16, wave=2))
    assert result.final_answer == "4" and len(result.candidates) == 4   # 2 agree: 7/8; 4 agree: 31/32 >= 0.95
    _finish(s, engine)
    s = _session(engine)
    result = s.run(adaptive_consistency(s, n=16, wave=2, stopping="window"))
    assert result.final_answer == "4" and len(result.candidates) == 2   # the first wave agrees: ESC stops
    _finish(s, engine)
    s = _session(engine)
    with pytest.raises(InvalidOption, match="stopping"):
        s.run(adaptive_consistency(s, n=16, stopping="vibes"))
    _finish(s, engine)


def test_adaptive_consistency_samples_are_the_self_consistency_pool_in_order(make_bigram_engine):
    from ponder.think.strategies import adaptive_consistency

    engine = make_bigram_engine(VOTES_SCRIPT)
    s = _session(engine)
    adaptive = s.run(adaptive_consistency(s, n=12, wave=3))
    _finish(s, engine)
    s = _session(engine)
    pool = s.run(self_consistency(s, n=12))
    _finish(s, engine)
    k = len(adaptive.candidates)
    assert [c.text for c in adaptive.candidates] == [c.text for c in pool.candidates[:k]]
    if k == 12:
        assert adaptive.final_answer == pool.final_answer


# -- program of thought ------------------------------------------------------------------------------
# print(6*7) -> 42, print(6+7) -> 13, print(x) -> NameError (no vote)
PROGRAMS = {">": {"p": 1.0}, "p": {"r": 1.0}, "r": {"i": 1.0}, "i": {"n": 1.0}, "n": {"t": 1.0}, "t": {"(": 1.0},
            "(": {"6": 0.8, "x": 0.2}, "6": {"*": 0.6, "+": 0.4}, "*": {"7": 1.0}, "+": {"7": 1.0},
            "7": {")": 1.0}, "x": {")": 1.0}, ")": {"EOS": 1.0}}


def test_program_of_thought_votes_with_what_the_programs_print(make_bigram_engine):
    from ponder.think.execution import program_of_thought

    engine = make_bigram_engine(PROGRAMS)
    s = _session(engine)
    result = s.run(program_of_thought(s, n=12, timeout=5.0))
    by_text = {"print(6*7)": "42", "print(6+7)": "13", "print(x)": None}
    assert all(c.answer == by_text[c.text] for c in result.candidates)
    expected = Counter(by_text[c.text] for c in result.candidates if by_text[c.text] is not None)
    assert result.votes == dict(expected) and result.final_answer == expected.most_common(1)[0][0]
    assert s.usage()["sandbox_runs"] == 12
    _finish(s, engine)


def test_program_of_thought_scores_each_program_and_still_votes_one_each(make_bigram_engine):
    from ponder.think.execution import program_of_thought

    engine = make_bigram_engine(PROGRAMS)
    s = _session(engine)
    # the score: 1 for the programs that multiply; the vote must not follow it
    scorer = Recorder(lambda ids: float("*" in engine.tokenizer.decode(list(ids))))
    result = s.run(program_of_thought(s, n=12, timeout=5.0, scorer=scorer))
    assert [c.score for c in result.candidates] == [float("*" in c.text) for c in result.candidates]
    assert len(scorer.calls) == 1 and s.usage()["scorer_calls"] == 12
    assert result.votes == dict(Counter(c.answer for c in result.candidates if c.answer is not None))
    _finish(s, engine)


def test_program_of_thought_in_waves_stops_once_settled_on_the_pool_s_first_programs(make_bigram_engine):
    from ponder.think.execution import program_of_thought
    from ponder.think.stopping import majority_settled

    engine = make_bigram_engine(PROGRAMS)
    s = _session(engine)
    waves = s.run(program_of_thought(s, n=16, wave=2, confidence=0.8))
    _finish(s, engine)
    s = _session(engine)
    pool = s.run(program_of_thought(s, n=16))
    _finish(s, engine)
    k = len(waves.candidates)
    assert k % 2 == 0 and [c.text for c in waves.candidates] == [c.text for c in pool.candidates[:k]]
    votes = lambda cands: Counter(c.answer for c in cands if c.answer is not None)     # noqa: E731
    assert majority_settled(votes(waves.candidates), 0.8) or k == 16
    assert not any(majority_settled(votes(pool.candidates[:j]), 0.8) for j in range(2, k, 2))
    assert waves.votes == dict(votes(waves.candidates))


def test_program_text_takes_the_last_fenced_block():
    from ponder.think.execution import program_text

    reply = "First:\n```python\nprint(1)\n```\nBetter:\n```python\nx = 2\nprint(x * 21)\n```\nDone."
    assert program_text(reply) == "x = 2\nprint(x * 21)\n"
    assert program_text("print(5)") == "print(5)"
    assert program_text("Here:\n```python\nprint(6 * 7)\n") == "print(6 * 7)\n"     # the fence never closed


# -- self-certainty ----------------------------------------------------------------------------------
def test_self_certainty_is_the_kl_of_uniform_from_the_distribution():
    import math

    import torch

    from ponder.engine.token_stats import _CertaintyRows

    logprobs = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]), dim=-1)
    values = _CertaintyRows([0, 1]).observe(logprobs, torch.tensor([0, 0]))
    p = torch.softmax(torch.tensor([5.0, 0.0, 0.0, 0.0]), dim=-1)
    assert values[0] == pytest.approx(0.0, abs=1e-6)                      # uniform: no certainty
    assert values[1] == pytest.approx(sum(0.25 * math.log(0.25 / q) for q in p.tolist()), rel=1e-5)


CERTAIN_OR_NOT = {">": {"a": 0.5, "b": 0.5}, "a": {"c": 1.0}, "c": {"EOS": 1.0},
                  "b": {"d": 0.34, "e": 0.33, "f": 0.33}, "d": {"EOS": 1.0}, "e": {"EOS": 1.0}, "f": {"EOS": 1.0}}


def test_best_of_n_by_self_certainty_picks_the_confident_trace(make_bigram_engine):
    engine = make_bigram_engine(CERTAIN_OR_NOT)
    s = _session(engine)
    result = s.run(best_of_n(s, n=8, scorer="self-certainty"))
    texts = {c.text for c in result.candidates}
    assert "ac" in texts and texts - {"ac"}                            # both kinds were sampled
    assert result.answer == "ac"
    by_text = {c.text: c.score for c in result.candidates}
    assert all(by_text["ac"] > score for text, score in by_text.items() if text != "ac")
    _finish(s, engine)


def test_weighted_vote_with_a_softmax_temperature(make_bigram_engine):
    """CISC: a low temperature lets the best-scored answer win against more votes, a high one
    falls back to counting."""
    engine = make_bigram_engine(VOTES_SCRIPT)
    favour_two = Recorder(lambda ids: 1.0 if ids[:1] == (ord("2"),) else 0.0)
    s = _session(engine)
    sharp = s.run(self_consistency(s, n=24, vote="weighted", scorer=favour_two, vote_temperature=0.01))
    _finish(s, engine)
    s = _session(engine)
    flat = s.run(self_consistency(s, n=24, vote="weighted", scorer=favour_two, vote_temperature=1000.0))
    _finish(s, engine)
    counts = Counter(c.answer for c in flat.candidates if c.answer)
    assert sharp.final_answer == "2"
    assert flat.final_answer == counts.most_common(1)[0][0]
    assert sum(sharp.votes.values()) == pytest.approx(1.0)


# -- execution-based selection -----------------------------------------------------------------------
CODE_PROMPT = 'def f(x):\n    """Twice x.\n    >>> f(2)\n    4\n    >>> f(3)\n    6\n    """\n    return '
BODIES = {" ": {"x": 1.0}, "x": {"*": 0.3, "+": 0.5, "-": 0.2}, "*": {"2": 1.0}, "+": {"2": 1.0}, "-": {"1": 1.0},
          "2": {"EOS": 1.0}, "1": {"EOS": 1.0}}


def test_docstring_examples_in_the_arrows_humaneval_uses():
    from ponder.think.execution import docstring_examples, examples_passed

    prompt = ('def fly(q, w):\n    """Example:\n    fly([1, 2], 5) \u279e False\n    fly([3], 5) ==> true\n'
              '    * fly([], 1) => True\n    other(1) == 2\n    """\n')
    assert docstring_examples(prompt) == [("fly([1, 2], 5)", "False"), ("fly([3], 5)", "true"), ("fly([], 1)", "True")]
    # compared as values where both sides are literals: 6.00 is 6.0, `true` is True; else as text
    examples = [("a()", "6.00"), ("b()", "true"), ("c()", "[1, 2]"), ("d()", "hello")]
    assert examples_passed(("6.0", "True", "[1,2]", "hello"), examples) == 4
    assert examples_passed(("6.01", "False", "[2, 1]", "'hello'"), examples) == 0


def test_execution_selection_prefers_what_passes_the_docstring_examples(make_bigram_engine):
    from ponder.think.execution import docstring_examples, execution_selection

    assert docstring_examples(CODE_PROMPT) == [("f(2)", "4"), ("f(3)", "6")]
    engine = make_bigram_engine(BODIES)
    s = ThinkSession(engine, list(CODE_PROMPT.encode()), SamplingParams(temperature=0.8, seed=5, max_tokens=8))
    result = s.run(execution_selection(s, n=12, style="completion"))
    texts = [c.text for c in result.candidates]
    assert "x*2" in texts and "x+2" in texts and texts.count("x+2") > texts.count("x*2")   # outnumbered ...
    assert result.answer == "x*2"                                                      # ... yet it passes both
    passes = {"x*2": 2.0, "x+2": 1.0, "x-1": 0.0}                     # examples each body passes
    assert {c.text: c.score for c in result.candidates} == {t: passes[t] for t in texts}
    assert s.usage()["sandbox_runs"] == 12
    _finish(s, engine)

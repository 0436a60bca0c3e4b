"""`ponder bench think`: the pool, its report (Wilson intervals, pass@k, maj@k, paired differences)
and resuming."""

from __future__ import annotations

import argparse
import json

import pytest

from ponder.bench import pool_stats, think_eval
from ponder.bench.pool_stats import Sample, paired_difference, summarize, wilson
from ponder.bench.think_eval import run_problems
from ponder.llm import LLM
from ponder.think.answers import extract_answer


def test_wilson_interval_matches_the_formula():
    low, high = wilson(5, 30)
    assert (round(low, 3), round(high, 3)) == (0.073, 0.336)       # the 7-34% around 5/30
    assert wilson(0, 0) == (0.0, 1.0)


def _row(reference, greedy_right, samples):
    return {"reference": reference, "greedy": {"answer": None, "finish_reason": "stop", "tokens": 1,
                                               "correct": greedy_right},
            "samples": [{"answer": a, "finish_reason": f, "tokens": 10, "correct": a == reference}
                        for a, f in samples]}


def test_report_counts_votes_from_the_pool_in_order():
    rows = [_row("7", False, [("7", "length"), ("7", "length"), ("3", "stop"), ("7", "stop")]),
            _row("5", True, [("5", "stop"), ("2", "stop"), ("2", "stop"), (None, "stop")])]
    report = summarize(rows, 4)
    assert report["maj@k"][1]["correct"] == 1            # problem 1's first sample was cut: no vote
    assert report["maj@k"][2]["correct"] == 1            # problem 2: 5 and 2 tie, the first seen (5) wins
    assert report["maj@k"][4]["correct"] == 0            # 3 and 7 tie (the cut 7s do not vote); 2 beats 5
    assert report["pass@k"][4] == 1.0 and report["pass@k"][1] == round((3 / 4 + 1 / 4) / 2, 4)
    assert report["truncated_samples"] == 2 and report["no_answer_samples"] == 1
    assert report["maj@k_vs_greedy"][4]["only_first_right"] == 0 and report["maj@k_vs_greedy"][4]["only_second_right"] == 1
    assert report["greedy"]["generated_tokens_per_problem"] == 1 and report["maj@k"][2]["generated_tokens_per_problem"] == 20


def test_the_plot_of_accuracy_against_tokens_is_written(tmp_path):
    rows = [_row("7", False, [("7", "stop"), ("3", "stop")]), _row("5", True, [("5", "stop"), ("2", "stop")])]
    path = pool_stats.plot_accuracy_vs_tokens(summarize(rows, 2), str(tmp_path / "think.png"))
    assert (tmp_path / "think.png").stat().st_size > 1000 and path.endswith("think.png")


def test_paired_difference():
    diff = paired_difference([True] * 8 + [False] * 2, [True] * 5 + [False] * 5)
    assert diff["difference"] == 0.3 and diff["ci95"][0] > 0


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"... #### {2 * i}"}) + "\n"
                            for i in range(3)))
    return think_eval.load_split(str(path), "dev", None)


def _args(**kw):
    return argparse.Namespace(**{"system": think_eval.QWEN_MATH_PROMPT, "samples": 4, "max_tokens": 6, "seed": 3,
                                 **kw})


def test_a_problem_s_pool_does_not_depend_on_its_batch(make_tiny_engine, problems):
    llm = LLM.from_engine(make_tiny_engine(weights="q8_0"))
    together = run_problems(llm, problems, _args(), {"temperature": 1.0})
    alone = run_problems(llm, problems[1:2], _args(), {"temperature": 1.0})
    assert [len(r["samples"]) for r in together] == [4, 4, 4]
    assert together[1]["samples"] == alone[0]["samples"]
    assert together[1]["greedy"] == alone[0]["greedy"]


def test_greedy_is_the_argmax_even_where_the_model_recommends_a_repetition_penalty(make_tiny_engine, problems):
    from ponder import SamplingParams

    engine = make_tiny_engine()
    engine.sampling_defaults = {**engine.sampling_defaults, "repetition_penalty": 3.0}    # as Qwen's (1.05), larger
    llm = LLM.from_engine(engine)
    args = _args(max_tokens=12)
    [greedy] = think_eval.run_greedy(llm, problems[:1], args)
    prompt = llm.chat_prompt(think_eval._messages(problems[:1], args)[0])
    argmax = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0]
    penalized = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12,
                                                      repetition_penalty=3.0))[0].outputs[0]
    assert argmax.token_ids != penalized.token_ids               # the penalty matters on this model
    assert greedy["tokens"] == len(argmax.token_ids) and greedy["repetition_penalty"] == 1.0
    assert greedy["answer"] == extract_answer(argmax.text)


def test_a_saved_row_with_the_old_greedy_gets_its_greedy_again_and_keeps_its_pool(make_tiny_engine, problems):
    llm = LLM.from_engine(make_tiny_engine(weights="q8_0"))
    saved = {p["index"]: {"index": p["index"], "reference": p["reference"],
                          "greedy": {"answer": "?", "finish_reason": "stop", "tokens": 1, "correct": False},
                          "samples": [{"answer": "9", "finish_reason": "stop", "tokens": 5, "correct": False}]}
             for p in problems}
    assert not think_eval._greedy_current(saved[0])
    rows = think_eval.with_greedy_again(llm, problems[:2], saved, _args())
    fresh = run_problems(llm, problems[:2], _args(), {"temperature": 1.0})
    assert [r["samples"] for r in rows] == [saved[0]["samples"], saved[1]["samples"]]
    assert [r["greedy"] for r in rows] == [r["greedy"] for r in fresh] and think_eval._greedy_current(rows[0])


def test_weighted_votes_from_the_pool_sharpen_with_the_temperature():
    samples = [("3", 0.9), ("7", 0.5), ("7", 0.5), ("7", 0.5)]
    row = {"reference": "3", "greedy": {"answer": "7", "finish_reason": "stop", "tokens": 1, "correct": False},
           "samples": [{"answer": a, "finish_reason": "stop", "tokens": 10, "correct": a == "3", "score": c}
                       for a, c in samples]}
    report = summarize([row], 4)
    table = report["weighted@k"]
    assert report["maj@k"][4]["correct"] == 0                    # three 7s outvote the 3
    assert table[0.1][4]["correct"] == 1                         # e^9 beats 3 e^5: the confident 3 wins
    assert table[1.0][4]["correct"] == 0                         # e^0.9 loses to 3 e^0.5
    assert report["best_vote_temperature"] == 0.2                # the flattest that still gets it
    chosen = summarize([row], 4, vote_temperature=0.1)
    assert list(chosen["weighted@k"]) == [0.1] and chosen["weighted_vs_maj"][4]["only_first_right"] == 1
    assert "weighted@k" not in summarize([_row("3", False, [("3", "stop")])], 1)    # no scores, no weights


def test_the_live_strategies_give_what_the_pool_says(make_tiny_engine, problems):
    llm = LLM.from_engine(make_tiny_engine(weights="q8_0"))
    args = _args(samples=8, score="confidence")
    rows = run_problems(llm, problems[:2], args, {"temperature": 1.0})
    assert all(s["score"] is not None for r in rows for s in r["samples"])
    checks = think_eval.live_check(llm, problems[:2], rows, args, {"temperature": 1.0})
    for name in ("self-consistency", "adaptive"):
        assert checks[name] == {"problems": 2, "same_answer": 2, "same_tokens": 2}, checks


def test_resume_skips_what_was_saved(tmp_path, problems):
    path = tmp_path / "progress.jsonl"
    settings = {"model": "m", "split": "dev"}
    path.write_text(json.dumps({"settings": settings, "index": 1, "samples": []}) + "\n"
                    + json.dumps({"settings": {"model": "other"}, "index": 2, "samples": []}) + "\n")
    assert set(think_eval.resume(str(path), settings, "index")) == {1}


def test_sample_votes_only_when_finished_with_an_answer():
    assert Sample("1", "stop", 3, True).votes and not Sample("1", "length", 3, True).votes
    assert not Sample(None, "stop", 3, False).votes


# -- HumanEval ------------------------------------------------------------------------------------
def test_humaneval_checks_candidates_in_the_sandbox():
    from ponder.bench import humaneval

    problem = humaneval.load_problems(1)[0]              # has_close_elements
    body = ("    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n"
            "            if i != j and abs(a - b) < threshold:\n                return True\n    return False\n")
    assert humaneval.passes(problem, body + "\n\ndef unrelated():\n    pass\n", "completion", 10.0)
    assert not humaneval.passes(problem, "    return True\n", "completion", 10.0)
    reply = "Here:\n```python\n" + problem["prompt"] + body + "```\nDone."
    assert humaneval.passes(problem, reply, "instruct", 10.0)
    assert humaneval.cut_completion("    return 1\n\nprint(f())\n") == "    return 1\n"


def test_humaneval_report():
    from ponder.bench.humaneval import summarize

    report = summarize([{"greedy": True, "samples": [True, False, False, False]},
                        {"greedy": False, "samples": [False] * 4}], 4)
    assert report["greedy_pass@1"]["correct"] == 1
    assert report["pass@k"][1] == 0.125 and report["pass@k"][4] == 0.5


def test_humaneval_report_selects_by_behaviour_on_the_docstring_examples():
    from ponder.bench.humaneval import summarize

    # HumanEval/0's docstring has two examples, expecting False then True
    wrong, right = ["True", "True"], ["False", "True"]
    row = {"task_id": "HumanEval/0", "greedy": False, "samples": [False, False, True, False],
           "behaviours": [wrong, wrong, wrong, right, []]}        # the greedy candidate's first
    report = summarize([row], 4)
    selected = report["execution_selected@k"]
    assert selected[1]["correct"] == 0 and selected[2]["correct"] == 0   # only wrong ones seen yet
    assert selected[4]["correct"] == 1                  # outnumbered 2 to 1, but passes both examples
    assert selected[4]["vs_greedy"]["only_first_right"] == 1


def test_adaptive_consistency_replayed_on_the_pool_stops_where_the_strategy_would():
    from ponder.bench.pool_stats import adaptive_on_pool

    agree = [Sample("7", "stop", 10, True)] * 16
    assert adaptive_on_pool(agree, "7") == (True, 40)                  # the first wave of 4 settles it
    split = [Sample(a, "stop", 10, a == "7") for a in ["7", "3"] * 8]
    assert adaptive_on_pool(split, "7") == (True, 160)                 # never settled: all 16, 7 seen first


def test_adaptive_settings_table_names_the_cheapest_within_a_point_and_a_chosen_one_is_reported_alone():
    # problem 1: 3 of the first 4 agree (posterior 0.81), then all vote 7; problem 2: a 2-2 split, then
    # 6-2 after 8 (posterior 0.91)
    first = _row("7", True, [("7", "stop")] * 3 + [("3", "stop")] + [("7", "stop")] * 12)
    second = _row("5", False, [("5", "stop"), ("5", "stop"), ("2", "stop"), ("2", "stop")] + [("5", "stop")] * 12)
    report = summarize([first, second], 16)
    table = report["adaptive@"]
    assert table["wave4@0.8"]["tokens_vs_maj@all"] == round((40 + 80) / 320, 4)
    assert table["wave4@0.95"]["tokens_vs_maj@all"] < 1 and report["adaptive_consistency"] == table["wave4@0.95"]
    assert table["wave2@0.5"]["correct"] == 2 and table["wave2@0.5"]["tokens_vs_maj@all"] == round(40 / 320, 4)
    assert report["best_adaptive"] == "wave2@0.5"                    # the cheapest that loses nothing here
    assert table["window-wave2"]["tokens_vs_maj@all"] == round(40 / 320, 4)      # ESC: both first waves agree
    assert table["window-wave4"]["tokens_vs_maj@all"] == round(160 / 320, 4)     # neither first wave of 4 does
    assert table["dirichlet-wave4@0.8"]["tokens_vs_maj@all"] == round((80 + 80) / 320, 4)  # 3-1: 0.75 < 0.8
    assert report["best_adaptive_under_share"] == "wave2@0.5"        # right on both, cheapest, listed first
    chosen = summarize([first, second], 16, adaptive=("beta", 4, 0.8))
    assert "adaptive@" not in chosen and chosen["adaptive_consistency"]["wave"] == 4
    assert chosen["adaptive_consistency"]["vs_maj@all"]["difference"] == 0.0


def test_a_pool_against_another_is_paired_on_the_problems_both_hold():
    ours = [{"index": i, **_row("7", False, [("7", "stop")] * 2)} for i in (1, 2, 3)]
    theirs = [{"index": i, **_row("7", False, [("3", "stop")] * 2 if i == 2 else [("7", "stop")] * 2)} for i in (2, 3, 4)]
    diff = pool_stats.compare_pools(ours, theirs, [1, 2, 4])
    assert diff["problems"] == 2 and set(diff) == {"problems", "maj@1", "maj@2"}       # no pool holds 4 samples
    assert diff["maj@2"]["difference"] == 0.5 and diff["maj@2"]["only_first_right"] == 1
    with pytest.raises(ValueError, match="no problem"):
        pool_stats.compare_pools(ours, [{"index": 9, **_row("7", False, [])}], [1])

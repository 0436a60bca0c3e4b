"""`ponder bench think --style pal`: each pool sample is a program the sandbox ran, and its vote is
what the program printed (a scripted bigram model writes the programs)."""

from __future__ import annotations

import argparse
import json

from ponder.bench import pool_stats, think_eval
from ponder.llm import LLM
from ponder.think.execution import extract_last_number_answer, program_text
from ponder.think.sandbox import run_python

# after the template's "assistant\n": print(6*7) -> 42, print(6+7) -> 13, print(x) -> NameError
SCRIPT = {"\n": {"p": 1.0}, "p": {"r": 1.0}, "r": {"i": 1.0}, "i": {"n": 1.0}, "n": {"t": 1.0}, "t": {"(": 1.0},
          "(": {"6": 0.7, "x": 0.3}, "6": {"*": 0.6, "+": 0.4}, "*": {"7": 1.0}, "+": {"7": 1.0},
          "7": {")": 1.0}, "x": {")": 1.0}, ")": {"EOS": 1.0}}


def test_the_pal_pool_votes_with_what_each_program_prints(make_bigram_engine, tmp_path):
    llm = LLM.from_engine(make_bigram_engine(SCRIPT))
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "What is 6 * 7?", "answer": "#### 42"}) + "\n")
    problems = think_eval.load_split(str(path), "dev", None)
    args = argparse.Namespace(style="pal", system=think_eval.PAL_PROMPT, samples=8, max_tokens=20, seed=3,
                              score="confidence")
    [row] = think_eval.run_problems(llm, problems, args, {"temperature": 1.0})
    assert row["greedy"]["text"] == "print(6*7)" and row["greedy"]["answer"] == "42" and row["greedy"]["correct"]
    texts = [s["text"] for s in row["samples"]]
    assert set(texts) <= {"print(6*7)", "print(6+7)", "print(x)"} and len(set(texts)) > 1
    for sample in row["samples"]:
        run = run_python(program_text(sample["text"]))
        assert sample["answer"] == (extract_last_number_answer(run.stdout) if run.ok else None)
        assert sample["correct"] == (sample["answer"] == "42") and sample["score"] is not None
    assert row["usage"]["sandbox_runs"] == 8
    checks = think_eval.live_check(llm, problems, [row], args, {"temperature": 1.0})
    assert checks == {name: {"problems": 1, "same_answer": 1, "same_tokens": 1} for name in ("program-of-thought", "adaptive")}
    report = pool_stats.summarize([row], 8)
    assert report["maj@k"][8]["correct"] == int(pool_stats.majority_correct(
        [pool_stats.Sample(**s) for s in row["samples"]], "42"))

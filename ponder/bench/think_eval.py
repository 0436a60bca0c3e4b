"""`ponder bench think`: GSM8K measured as the papers do, from one seeded pool of samples.

For each problem: a greedy answer and a pool of `--samples` seeded samples (one think run, so all
branches share the prompt's KV): chain of thought with Qwen's math system prompt (`--style cot`) or
programs the sandbox runs (`--style pal`), the model's recommended sampling unless set, and ≥ 1024
new tokens. Every vote-based selection is computed from the pool in its order (pool_stats.py:
maj@k, weighted votes, adaptive consistency), so they are compared on the same samples; a sample cut
at max_tokens, or without an answer, casts no vote. Problems 1–200 of the data are the reported
split ("dev"), 201–800 the tuning split ("tune"): choose thresholds and prompts on the second only.

Runs are resumable: each problem's pool is appended to `--progress` (JSONL) as it completes, and a
rerun with the same settings continues after the last saved problem.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict

from ponder.bench.pool_stats import (ADAPTIVE_SETTINGS, VOTE_TEMPERATURES, Sample, adaptive_stop, ballots,
                                     compare_pools, plot_accuracy_vs_tokens, summarize)
from ponder.think.answers import answers_equal, extract_after_hashes
from ponder.think.stopping import STOPPING_RULES
from ponder.think.voting import tally, winner

QWEN_MATH_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
PAL_PROMPT = ("Solve the problem by writing a Python program that computes the answer and prints it. Reply with the "
              "program in one ```python block.")
PAL_USER = ("{question}\n\nWrite a Python program that solves this problem and prints the final answer as a number. "
            "Reply with only the program, in one ```python block.")
# each style's (system prompt, user turn); pal's chosen on the tuning split
# (benchmarks/results/think-pal-prompt-tune-qwen0.5b.json)
STYLES = {"cot": (QWEN_MATH_PROMPT, "{question}"), "pal": (PAL_PROMPT, PAL_USER)}
SPLITS = {"dev": (0, 200), "tune": (200, 800)}
# greedy is the argmax at every step: no repetition penalty (the model's recommended sampling, Qwen's
# generation_config, has one; it lowers what the question's own numbers score). A saved row whose
# greedy lacks this key was decoded with the recommended penalty, and its greedy is decoded again.
GREEDY_REPETITION_PENALTY = 1.0
GSM8K_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "gsm8k", "test_dev.jsonl")


def add_parser(cmds) -> argparse.ArgumentParser:
    p = cmds.add_parser("think", help="GSM8K from one seeded pool: greedy, pass@k, maj@k with intervals")
    p.add_argument("--data", default=GSM8K_DATA)
    p.add_argument("--split", choices=sorted(SPLITS), default="dev")
    p.add_argument("--limit", type=int, default=None, help="first N problems of the split")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="problems run together (their branches batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--style", choices=sorted(STYLES), default="cot",
                   help="cot: chain of thought, the boxed answer votes; pal: program of thought, the sandbox runs "
                        "each sample's program and the number it prints votes")
    p.add_argument("--system", default=None, help="the system prompt (default: the style's; Qwen's math prompt "
                                                  "for cot)")
    p.add_argument("--user", default=None, help="the user turn, a template of {question} (default: the style's; "
                                                "choose it on the tuning split)")
    p.add_argument("--score", choices=["confidence", "self-certainty", "none"], default="confidence",
                   help="each sample's trace score, for confidence-weighted votes (DeepConf's mean confidence, "
                        "or Self-Certainty)")
    p.add_argument("--vote-temperature", type=float, default=None,
                   help="the weighted vote to report against the plain one (softmax of score / T); choose it "
                        "on the tuning split (default: each of %s)" % (VOTE_TEMPERATURES,))
    p.add_argument("--adaptive", type=float, nargs=2, default=None, metavar=("WAVE", "CONFIDENCE"),
                   help="adaptive consistency's wave and stopping confidence to report against maj@all; choose "
                        "them on the tuning split (default: the paper's 4 and 0.95, and the table over %s)"
                        % (ADAPTIVE_SETTINGS,))
    p.add_argument("--stopping", choices=STOPPING_RULES, default="beta",
                   help="the stopping rule of --adaptive (think/stopping.py; window ignores the confidence)")
    p.add_argument("--against", default=None, metavar="PROGRESS",
                   help="another pool's progress file (other settings: a style, a prompt) to compare maj@k with, "
                        "paired on the problems both hold")
    p.add_argument("--live-check", type=int, default=0, metavar="N",
                   help="also run self-consistency and adaptive consistency live on the first N problems and "
                        "check they give what the pool says (answer and tokens)")
    p.add_argument("--progress", default=None, help="JSONL of finished problems (resumes from it)")
    p.add_argument("--output", default=None, help="the report, JSON")
    p.set_defaults(bench_func=cmd_think)
    return p


def load_split(path: str, split: str, limit: int | None) -> list[dict]:
    first, end = SPLITS[split]
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()][first:end]
    rows = rows[:limit] if limit is not None else rows
    return [{"index": first + i, "question": r["question"], "reference": extract_after_hashes(r["answer"])}
            for i, r in enumerate(rows)]


def cmd_think(args) -> int:
    from ponder import LLM
    from ponder.config import engine_options

    problems = load_split(args.data, args.split, args.limit)
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
                if v is not None}
    system, user = STYLES[args.style]
    args.system = system if args.system is None else args.system
    args.user = user if args.user is None else args.user
    settings = {"model": args.model, "split": args.split, "samples": args.samples, "max_tokens": args.max_tokens,
                "seed": args.seed, "system": args.system, **sampling, **({"style": "pal"} if args.style == "pal" else {}),
                **({"user": args.user} if args.user != "{question}" else {}),
                **({"score": args.score} if args.score != "none" else {})}
    done = resume(args.progress, settings, "index")
    todo = [p for p in problems if p["index"] not in done]
    stale = [p for p in problems if p["index"] in done and not _greedy_current(done[p["index"]])]
    # (a finished pool is reported without loading the model, unless the live check needs it)
    llm = LLM(args.model, **engine_options(args)) if todo or stale or args.live_check else None
    for start in range(0, len(stale), 4 * args.batch):
        for row in with_greedy_again(llm, stale[start:start + 4 * args.batch], done, args):
            keep(done, row, "index", args.progress, settings)
        print(f"greedy decoded again: {min(start + 4 * args.batch, len(stale))}/{len(stale)}", flush=True)
    for start in range(0, len(todo), args.batch):
        for row in run_problems(llm, todo[start:start + args.batch], args, sampling):
            keep(done, row, "index", args.progress, settings)
        print(f"{len(done)}/{len(problems)} problems", flush=True)
    report = summarize([done[p["index"]] for p in problems], args.samples, args.vote_temperature,
                       _adaptive_setting(args))
    if args.against:
        with open(args.against) as f:
            report["against"] = {"pool": args.against, **compare_pools(
                [done[p["index"]] for p in problems], [json.loads(line) for line in f if line.strip()],
                list(report["maj@k"]))}
    if args.live_check:
        report["live_check"] = live_check(llm, problems[:args.live_check], [done[p["index"]] for p in problems],
                                          args, sampling)
    report["greedy"]["repetition_penalty"] = GREEDY_REPETITION_PENALTY
    write_report({**report, "settings": settings}, args.output)
    if args.output:
        plot_accuracy_vs_tokens(report, os.path.splitext(args.output)[0] + ".png")
    return 0


def _adaptive_setting(args) -> tuple[str, int, float] | None:
    """(stopping rule, wave, confidence) from --stopping and --adaptive, or None."""
    if getattr(args, "adaptive", None) is None:
        return None
    wave, confidence = args.adaptive
    if wave != int(wave) or wave < 1 or not 0.5 <= confidence < 1:
        raise SystemExit(f"--adaptive: a wave >= 1 (an integer) and a confidence in [0.5, 1), got {args.adaptive}")
    return getattr(args, "stopping", "beta"), int(wave), confidence


def keep(done: dict, row: dict, key: str, path: str | None, settings: dict) -> None:
    """A finished problem: into `done`, and appended to the progress file (what `resume` reads)."""
    done[row[key]] = row
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"settings": settings, **row}) + "\n")


def write_report(report: dict, path: str | None) -> None:
    print(json.dumps(report, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def _greedy_current(row: dict) -> bool:
    return row["greedy"].get("repetition_penalty") == GREEDY_REPETITION_PENALTY


def run_greedy(llm, problems: list[dict], args) -> list[dict]:
    """Each problem's greedy row (the argmax at every step; pal: the program it writes, run)."""
    prompts = _messages(problems, args)
    pal = getattr(args, "style", "cot") == "pal"
    argmax = {"temperature": 0.0, "repetition_penalty": GREEDY_REPETITION_PENALTY, "max_tokens": args.max_tokens}
    results = (llm.think(prompts, "program-of-thought", n=1, **argmax) if pal
               else llm.think(prompts, "greedy", **argmax))
    return [{**_row(Sample(g.final_answer, g.candidates[0].finish_reason if g.candidates else None,
                           g.usage.get("generated_tokens", 0), answers_equal(g.final_answer, p["reference"]),
                           text=g.candidates[0].text if pal and g.candidates else None)),
             "repetition_penalty": GREEDY_REPETITION_PENALTY}
            for p, g in zip(problems, results)]


def with_greedy_again(llm, problems: list[dict], done: dict, args) -> list[dict]:
    """The saved rows of these problems with their greedy decoded again (the pool kept as drawn)."""
    return [{**done[p["index"]], "greedy": greedy} for p, greedy in zip(problems, run_greedy(llm, problems, args))]


def run_problems(llm, problems: list[dict], args, sampling: dict) -> list[dict]:
    """Greedy and the seeded pool of each problem (the problems of a batch run together)."""
    prompts = _messages(problems, args)
    pal = getattr(args, "style", "cot") == "pal"
    start = time.perf_counter()
    greedy = run_greedy(llm, problems, args)
    # one seed for all: a problem's pool depends only on (seed, prompt), whatever it runs beside
    score = getattr(args, "score", "none")
    pools = llm.think(prompts, "program-of-thought" if pal else "parallel", n=args.samples,
                      max_tokens=args.max_tokens, seed=args.seed, scorer=None if score == "none" else score,
                      **sampling)
    wall = (time.perf_counter() - start) / len(problems)
    rows = []
    for p, g, pool in zip(problems, greedy, pools):
        samples = [Sample(c.answer, c.finish_reason, c.num_tokens, answers_equal(c.answer, p["reference"]),
                          None if c.score is None else round(float(c.score), 5), c.text if pal else None)
                   for c in pool.candidates]
        rows.append({"index": p["index"], "reference": p["reference"], "greedy": g,
                     "samples": [_row(s) for s in samples], "usage": pool.usage, "wall_s": round(wall, 2)})
    return rows


def _row(sample: Sample) -> dict:
    return {k: v for k, v in asdict(sample).items() if k != "text" or v is not None}


def chat_messages(question: str, system: str, user: str = "{question}") -> list[dict]:
    """How a GSM8K question is asked: the system prompt, then the user turn (a template of {question})."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user.format(question=question)}]


def _messages(problems: list[dict], args) -> list[list[dict]]:
    return [chat_messages(p["question"], args.system, getattr(args, "user", "{question}")) for p in problems]


def live_check(llm, problems: list[dict], rows: list[dict], args, sampling: dict) -> dict:
    """Self-consistency and adaptive consistency run live (same seed and sampling) on `problems`,
    against what the pool (`rows`, the same problems first) says they give: the answer and the
    generated tokens of each."""
    prompts = _messages(problems, args)
    stopping, wave, confidence = _adaptive_setting(args) or ("beta", 4, 0.95)
    options = {"n": args.samples, "max_tokens": args.max_tokens, "seed": args.seed, **sampling}
    waves = {"wave": wave, "confidence": confidence, "stopping": stopping}
    if getattr(args, "style", "cot") == "pal":
        live = {"program-of-thought": llm.think(prompts, "program-of-thought", **options),
                "adaptive": llm.think(prompts, "program-of-thought", **waves, **options)}
    else:
        live = {"self-consistency": llm.think(prompts, "self-consistency", **options),
                "adaptive": llm.think(prompts, "adaptive-consistency", **waves, **options)}
    checks = {}
    for name, results in live.items():
        same = []
        for result, row in zip(results, rows):
            pool = [Sample(**s) for s in row["samples"]]
            taken = adaptive_stop(pool, wave, confidence, stopping) if name == "adaptive" else len(pool)
            expected = winner(tally(ballots(pool[:taken])))
            same.append({"answer": result.final_answer == expected,
                         "tokens": result.usage.get("generated_tokens") == sum(s.tokens for s in pool[:taken])})
        checks[name] = {"problems": len(same), "same_answer": sum(c["answer"] for c in same),
                        "same_tokens": sum(c["tokens"] for c in same)}
    return checks


def resume(path: str | None, settings: dict, key: str) -> dict:
    """The rows a progress file holds for these settings, by `key` (a run with other settings
    sharing the file is ignored)."""
    if not path or not os.path.exists(path):
        return {}
    done = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.pop("settings") == settings:
                done[row[key]] = row
    return done

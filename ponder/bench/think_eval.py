"""`ponder bench think`: GSM8K measured as the papers do, from one seeded pool of samples.

For each problem: a greedy answer and a pool of `--samples` seeded samples (one think run of
`parallel`, so all branches share the prompt's KV), with Qwen's math system prompt, the model's
recommended sampling unless set, and ≥ 1024 new tokens. Every vote-based selection is computed from
the pool in its order — maj@k for k = 1, 2, 4, … — so they are compared on the same samples; a sample
cut at max_tokens, or without an extractable answer, casts no vote. Reported with Wilson 95%
intervals: greedy, per-sample accuracy, pass@k (unbiased), maj@k, and maj@k against greedy paired
per problem; tokens and wall time. Problems 1–200 of the data are the reported split ("dev"),
201–800 the tuning split ("tune"): choose thresholds and prompts on the second only.

Runs are resumable: each problem's pool is appended to `--progress` (JSONL) as it completes, and a
rerun with the same settings continues after the last saved problem.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

from ponder.think.answers import answers_equal, extract_after_hashes
from ponder.think.voting import pass_at_k, tally, winner

QWEN_MATH_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
PAL_PROMPT = ("Solve the problem by writing a Python program that computes the answer and prints it. Reply with the "
              "program in one ```python block.")
PAL_USER = ("{question}\n\nWrite a Python program that solves this problem and prints the final answer as a number. "
            "Reply with only the program, in one ```python block.")
# each style's (system prompt, user turn); pal's chosen on the tuning split
# (benchmarks/results/think-pal-prompt-tune-qwen0.5b.json)
STYLES = {"cot": (QWEN_MATH_PROMPT, "{question}"), "pal": (PAL_PROMPT, PAL_USER)}
SPLITS = {"dev": (0, 200), "tune": (200, 800)}


VOTE_TEMPERATURES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)    # the weighted votes' softmax temperatures tried
# adaptive consistency's (wave, confidence) tried; (4, 0.95) is the paper's
ADAPTIVE_SETTINGS = tuple((w, c) for w in (2, 4) for c in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95))


@dataclass
class Sample:
    answer: str | None
    finish_reason: str | None
    tokens: int
    correct: bool
    score: float | None = None          # its trace's score (`--score`), what weighted votes weigh
    text: str | None = None             # the program (pal style: what the logs show about failures)

    @property
    def votes(self) -> bool:
        return self.answer is not None and self.finish_reason != "length"


def add_parser(cmds) -> argparse.ArgumentParser:
    p = cmds.add_parser("think", help="GSM8K from one seeded pool: greedy, pass@k, maj@k with intervals")
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                                                 "gsm8k", "test_dev.jsonl"))
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

    llm = LLM(args.model, **engine_options(args))
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
    for start in range(0, len(todo), args.batch):
        for row in run_problems(llm, todo[start:start + args.batch], args, sampling):
            keep(done, row, "index", args.progress, settings)
        print(f"{len(done)}/{len(problems)} problems", flush=True)
    report = summarize([done[p["index"]] for p in problems], args.samples, args.vote_temperature,
                       _adaptive_setting(args))
    if args.live_check:
        report["live_check"] = live_check(llm, problems[:args.live_check], [done[p["index"]] for p in problems],
                                          args, sampling)
    write_report({**report, "settings": settings}, args.output)
    if args.output:
        plot_accuracy_vs_tokens(report, os.path.splitext(args.output)[0] + ".png")
    return 0


def _adaptive_setting(args) -> tuple[int, float] | None:
    if getattr(args, "adaptive", None) is None:
        return None
    wave, confidence = args.adaptive
    if wave != int(wave) or wave < 1 or not 0.5 <= confidence < 1:
        raise SystemExit(f"--adaptive: a wave >= 1 (an integer) and a confidence in [0.5, 1), got {args.adaptive}")
    return int(wave), confidence


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


def run_problems(llm, problems: list[dict], args, sampling: dict) -> list[dict]:
    """Greedy and the seeded pool of each problem (the problems of a batch run together)."""
    prompts = _messages(problems, args)
    pal = getattr(args, "style", "cot") == "pal"
    start = time.perf_counter()
    greedy = (llm.think(prompts, "program-of-thought", n=1, temperature=0.0, max_tokens=args.max_tokens) if pal
              else llm.think(prompts, "greedy", max_tokens=args.max_tokens))
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
        rows.append({"index": p["index"], "reference": p["reference"],
                     "greedy": _row(Sample(g.final_answer, g.candidates[0].finish_reason if g.candidates else None,
                                           g.usage.get("generated_tokens", 0),
                                           answers_equal(g.final_answer, p["reference"]),
                                           text=g.candidates[0].text if pal and g.candidates else None)),
                     "samples": [_row(s) for s in samples], "usage": pool.usage, "wall_s": round(wall, 2)})
    return rows


def _row(sample: Sample) -> dict:
    return {k: v for k, v in asdict(sample).items() if k != "text" or v is not None}


def _messages(problems: list[dict], args) -> list[list[dict]]:
    user = getattr(args, "user", "{question}")
    return [[{"role": "system", "content": args.system}, {"role": "user", "content": user.format(question=p["question"])}]
            for p in problems]


def live_check(llm, problems: list[dict], rows: list[dict], args, sampling: dict) -> dict:
    """Self-consistency and adaptive consistency run live (same seed and sampling) on `problems`,
    against what the pool (`rows`, the same problems first) says they give: the answer and the
    generated tokens of each."""
    prompts = _messages(problems, args)
    wave, confidence = _adaptive_setting(args) or (4, 0.95)
    options = {"n": args.samples, "max_tokens": args.max_tokens, "seed": args.seed, **sampling}
    if getattr(args, "style", "cot") == "pal":
        live = {"program-of-thought": llm.think(prompts, "program-of-thought", **options),
                "adaptive": llm.think(prompts, "program-of-thought", wave=wave, confidence=confidence, **options)}
    else:
        live = {"self-consistency": llm.think(prompts, "self-consistency", **options),
                "adaptive": llm.think(prompts, "adaptive-consistency", wave=wave, confidence=confidence, **options)}
    checks = {}
    for name, results in live.items():
        same = []
        for result, row in zip(results, rows):
            pool = [Sample(**s) for s in row["samples"]]
            taken = adaptive_stop(pool, wave, confidence) if name == "adaptive" else len(pool)
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


# -- the report -------------------------------------------------------------------------------------
def summarize(rows: list[dict], samples: int, vote_temperature: float | None = None,
              adaptive: tuple[int, float] | None = None) -> dict:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= samples]
    pools = [[Sample(**s) for s in row["samples"]] for row in rows]
    greedy = [row["greedy"]["correct"] for row in rows]
    n = len(rows)
    report = {"problems": n, "greedy": _rate(sum(greedy), n),
              "per_sample": _rate(sum(s.correct for pool in pools for s in pool), sum(len(p) for p in pools)),
              "pass@k": {k: round(sum(pass_at_k(len(p), sum(s.correct for s in p), k) for p in pools) / n, 4)
                         for k in ks},
              "maj@k": {}, "maj@k_vs_greedy": {},
              "truncated_samples": sum(s.finish_reason == "length" for pool in pools for s in pool),
              "no_answer_samples": sum(s.answer is None for pool in pools for s in pool),
              "generated_tokens_per_sample": round(sum(s.tokens for p in pools for s in p) /
                                                   max(1, sum(len(p) for p in pools)), 1)}
    report["greedy"]["generated_tokens_per_problem"] = round(sum(row["greedy"]["tokens"] for row in rows) / max(n, 1), 1)
    for k in ks:
        correct = [majority_correct(pool[:k], row["reference"]) for pool, row in zip(pools, rows)]
        report["maj@k"][k] = {**_rate(sum(correct), n), "generated_tokens_per_problem":
                              round(sum(s.tokens for pool in pools for s in pool[:k]) / max(n, 1), 1)}
        report["maj@k_vs_greedy"][k] = paired_difference(correct, greedy)
    if pools and all(s.score is not None for pool in pools for s in pool):
        report.update(weighted_votes(pools, rows, ks, vote_temperature))
    report.update(adaptive_report(pools, rows, adaptive))
    return report


def adaptive_report(pools: list[list[Sample]], rows: list[dict], chosen: tuple[int, float] | None) -> dict:
    """Adaptive consistency replayed on the pool: with `chosen` (wave, confidence), picked on the
    tuning split, that one against maj@all, paired; without, the paper's (4, 0.95) and the table
    over ADAPTIVE_SETTINGS, with the cheapest setting within a point of maj@all."""
    full = [majority_correct(p, r["reference"]) for p, r in zip(pools, rows)]
    full_tokens = sum(s.tokens for p in pools for s in p)

    def replay(wave: int, confidence: float) -> dict:
        runs = [adaptive_on_pool(pool, row["reference"], wave, confidence) for pool, row in zip(pools, rows)]
        tokens = sum(t for _, t in runs)
        return {**_rate(sum(c for c, _ in runs), len(rows)), "wave": wave, "confidence": confidence,
                "generated_tokens_per_problem": round(tokens / max(len(rows), 1), 1),
                "tokens_vs_maj@all": round(tokens / max(full_tokens, 1), 4),
                "vs_maj@all": paired_difference([c for c, _ in runs], full)}

    if chosen is not None:
        return {"adaptive_consistency": replay(*chosen)}
    table = {f"wave{w}@{c}": replay(w, c) for w, c in ADAPTIVE_SETTINGS}
    near = [key for key, r in table.items() if r["correct"] >= sum(full) - 0.01 * len(rows)]
    return {"adaptive_consistency": table["wave4@0.95"], "adaptive@": table,
            "best_adaptive": min(near, key=lambda key: table[key]["tokens_vs_maj@all"]) if near else None}


def weighted_votes(pools: list[list[Sample]], rows: list[dict], ks: list[int],
                   vote_temperature: float | None) -> dict:
    """Confidence-weighted votes (CISC) from the pool: for each softmax temperature, each k, the
    first k samples vote with weights softmax(score / T); against the plain vote, paired. With
    `vote_temperature` (chosen on the tuning split) that one is reported against maj@k."""
    from ponder.think.primitives import softmax

    def correct(pool: list[Sample], reference, temperature: float) -> bool:
        # (the softmax's normaliser is the same for every answer: the samples that cast no vote may share it)
        weights = softmax([s.score / temperature for s in pool])
        return answers_equal(winner(tally(ballots(pool), weights)), reference)

    temperatures = [vote_temperature] if vote_temperature is not None else list(VOTE_TEMPERATURES)
    right = {(t, k): [correct(p[:k], r["reference"], t) for p, r in zip(pools, rows)]
             for t in temperatures for k in ks}
    table = {t: {k: _rate(sum(right[t, k]), len(rows)) for k in ks} for t in temperatures}
    out = {"weighted@k": table}
    if vote_temperature is not None:
        out["weighted_vs_maj"] = {k: paired_difference(right[vote_temperature, k],
                                                       [majority_correct(p[:k], r["reference"])
                                                        for p, r in zip(pools, rows)]) for k in ks}
        out["vote_temperature"] = vote_temperature
    else:                                   # (what the tuning split is for; ties: the flatter)
        out["best_vote_temperature"] = max(temperatures, key=lambda t: (table[t][ks[-1]]["correct"], t))
    return out


def adaptive_stop(pool: list[Sample], wave: int = 4, confidence: float = 0.95) -> int:
    """How many of the pool's samples adaptive consistency draws (in waves) before it stops."""
    from ponder.think.strategies import majority_settled

    for end in range(wave, len(pool) + 1, wave):
        if majority_settled(tally(ballots(pool[:end])), confidence):
            return end
    return len(pool)


def adaptive_on_pool(pool: list[Sample], reference: str | None, wave: int = 4,
                     confidence: float = 0.95) -> tuple[bool, int]:
    """Adaptive consistency replayed on the pool in order (the strategy draws the same samples):
    whether its answer is right, and the tokens it generated before stopping."""
    taken = adaptive_stop(pool, wave, confidence)
    return majority_correct(pool[:taken], reference), sum(s.tokens for s in pool[:taken])


def ballots(pool: list[Sample]) -> list[str | None]:
    """What each sample votes for: its answer, or None (cut at max_tokens, or no answer)."""
    return [s.answer if s.votes else None for s in pool]


def majority_correct(pool: list[Sample], reference: str | None) -> bool:
    """Whether the majority of the voting samples is right (no vote at all: wrong)."""
    top = winner(tally(ballots(pool)))
    return answers_equal(top, reference)


def plot_accuracy_vs_tokens(report: dict, path: str) -> str:
    """Accuracy (with its 95% interval) against generated tokens per problem: greedy, maj@k for
    each k, adaptive consistency."""
    from ponder.bench.report import finish_axes, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [("greedy", report["greedy"])] + [(f"maj@{k}", r) for k, r in report["maj@k"].items()]
    points.append(("adaptive", report["adaptive_consistency"]))
    for label, r in points:
        x, y = r["generated_tokens_per_problem"], 100 * r["accuracy"]
        ax.errorbar([x], [y], yerr=[[y - 100 * r["ci95"][0]], [100 * r["ci95"][1] - y]], fmt="o", capsize=3,
                    label=label)
    ax.set_xscale("log")
    finish_axes(ax, "generated tokens per problem", "accuracy (%)", f"GSM8K, {report['problems']} problems")
    return save_figure(plt, fig, path)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, center - half), min(1.0, center + half))


def paired_difference(a: list[bool], b: list[bool], z: float = 1.96) -> dict:
    """Mean per-problem difference a - b with its 95% interval (normal approximation over the
    paired differences), and the discordant counts."""
    n = len(a)
    diffs = [int(x) - int(y) for x, y in zip(a, b)]
    mean = sum(diffs) / n if n else 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n) if n else 0.0
    return {"difference": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)],
            "only_first_right": sum(d > 0 for d in diffs), "only_second_right": sum(d < 0 for d in diffs)}


def _rate(successes: int, n: int) -> dict:
    low, high = wilson(successes, n)
    return {"correct": successes, "n": n, "accuracy": round(successes / n, 4) if n else 0.0,
            "ci95": [round(low, 4), round(high, 4)]}

"""Statistics of a pool of samples (`ponder bench think`, `ponder bench humaneval`): Wilson intervals,
paired per-problem differences, pass@k, maj@k, confidence-weighted votes and adaptive consistency
replayed on the pool in order, and a pool against another on the same problems."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ponder.think.answers import answers_equal
from ponder.think.voting import pass_at_k, tally, winner

VOTE_TEMPERATURES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)    # the weighted votes' softmax temperatures tried
# adaptive consistency's (stopping rule, wave, confidence) tried; ("beta", 4, 0.95) is the paper's. The
# window rule (ESC) has no confidence.
ADAPTIVE_SETTINGS = (tuple((rule, w, c) for rule in ("beta", "dirichlet") for w in (2, 4)
                           for c in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95))
                     + tuple(("window", w, None) for w in (2, 3, 4)))
TOKEN_SHARE = 0.5          # the share of maj@all's tokens the most accurate cheap setting is chosen under


def setting_name(rule: str, wave: int, confidence: float | None) -> str:
    """A setting's key in the reports ("wave4@0.6" is the Beta rule's, as it always was)."""
    if rule == "window":
        return f"window-wave{wave}"
    return f"{'' if rule == 'beta' else rule + '-'}wave{wave}@{confidence}"


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


def summarize(rows: list[dict], samples: int, vote_temperature: float | None = None,
              adaptive: tuple[str, int, float | None] | None = None) -> dict:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= samples]
    pools = [[Sample(**s) for s in row["samples"]] for row in rows]
    greedy = [row["greedy"]["correct"] for row in rows]
    n = len(rows)
    report = {"problems": n, "greedy": rate(sum(greedy), n),
              "per_sample": rate(sum(s.correct for pool in pools for s in pool), sum(len(p) for p in pools)),
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
        report["maj@k"][k] = {**rate(sum(correct), n), "generated_tokens_per_problem":
                              round(sum(s.tokens for pool in pools for s in pool[:k]) / max(n, 1), 1)}
        report["maj@k_vs_greedy"][k] = paired_difference(correct, greedy)
    if pools and all(s.score is not None for pool in pools for s in pool):
        report.update(weighted_votes(pools, rows, ks, vote_temperature))
    report.update(adaptive_report(pools, rows, adaptive))
    return report


def adaptive_report(pools: list[list[Sample]], rows: list[dict],
                    chosen: tuple[str, int, float | None] | None) -> dict:
    """Adaptive consistency replayed on the pool: with `chosen` (rule, wave, confidence), picked on
    the tuning split, that one against maj@all, paired; without, the paper's setting and the table
    over ADAPTIVE_SETTINGS, naming the cheapest setting within a point of maj@all (`best_adaptive`)
    and the most accurate one under TOKEN_SHARE of its tokens (`best_adaptive_under_share`; ties:
    the cheaper)."""
    full = [majority_correct(p, r["reference"]) for p, r in zip(pools, rows)]
    full_tokens = sum(s.tokens for p in pools for s in p)

    def replay(rule: str, wave: int, confidence: float | None) -> dict:
        runs = [adaptive_on_pool(pool, row["reference"], wave, confidence, rule) for pool, row in zip(pools, rows)]
        tokens = sum(t for _, t in runs)
        return {**rate(sum(c for c, _ in runs), len(rows)), "stopping": rule, "wave": wave, "confidence": confidence,
                "generated_tokens_per_problem": round(tokens / max(len(rows), 1), 1),
                "tokens_vs_maj@all": round(tokens / max(full_tokens, 1), 4),
                "vs_maj@all": paired_difference([c for c, _ in runs], full)}

    if chosen is not None:
        return {"adaptive_consistency": replay(*chosen)}
    table = {setting_name(*setting): replay(*setting) for setting in ADAPTIVE_SETTINGS}
    near = [key for key, r in table.items() if r["correct"] >= sum(full) - 0.01 * len(rows)]
    cheap = [key for key, r in table.items() if r["tokens_vs_maj@all"] <= TOKEN_SHARE]
    return {"adaptive_consistency": table["wave4@0.95"], "adaptive@": table,
            "best_adaptive": min(near, key=lambda key: table[key]["tokens_vs_maj@all"]) if near else None,
            "best_adaptive_under_share": max(cheap, key=lambda key: (table[key]["correct"],
                                                                     -table[key]["tokens_vs_maj@all"]))
            if cheap else None}


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
    table = {t: {k: rate(sum(right[t, k]), len(rows)) for k in ks} for t in temperatures}
    out = {"weighted@k": table}
    if vote_temperature is not None:
        out["weighted_vs_maj"] = {k: paired_difference(right[vote_temperature, k],
                                                       [majority_correct(p[:k], r["reference"])
                                                        for p, r in zip(pools, rows)]) for k in ks}
        out["vote_temperature"] = vote_temperature
    else:                                   # (what the tuning split is for; ties: the flatter)
        out["best_vote_temperature"] = max(temperatures, key=lambda t: (table[t][ks[-1]]["correct"], t))
    return out


def adaptive_stop(pool: list[Sample], wave: int = 4, confidence: float | None = 0.95, stopping: str = "beta") -> int:
    """How many of the pool's samples adaptive consistency draws (in waves) before it stops."""
    from ponder.think.stopping import settled

    for end in range(wave, len(pool) + 1, wave):
        if settled(stopping, ballots(pool[:end]), wave, confidence):
            return end
    return len(pool)


def adaptive_on_pool(pool: list[Sample], reference: str | None, wave: int = 4,
                     confidence: float | None = 0.95, stopping: str = "beta") -> tuple[bool, int]:
    """Adaptive consistency replayed on the pool in order (the strategy draws the same samples):
    whether its answer is right, and the tokens it generated before stopping."""
    taken = adaptive_stop(pool, wave, confidence, stopping)
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


def rate(successes: int, n: int) -> dict:
    low, high = wilson(successes, n)
    return {"correct": successes, "n": n, "accuracy": round(successes / n, 4) if n else 0.0,
            "ci95": [round(low, 4), round(high, 4)]}


def compare_pools(rows: list[dict], other: list[dict], ks: list[int]) -> dict:
    """This pool's maj@k against another pool's on the same problems (by "index"), paired per
    problem, for each k both pools hold: e.g. program of thought against chain of thought."""
    theirs = {row["index"]: row for row in other}
    common = [row for row in rows if row["index"] in theirs]
    if not common:
        raise ValueError("the pools share no problem")

    def right(row: dict, k: int) -> bool:
        return majority_correct([Sample(**s) for s in row["samples"][:k]], row["reference"])

    ks = [k for k in ks if all(len(r["samples"]) >= k and len(theirs[r["index"]]["samples"]) >= k for r in common)]
    return {"problems": len(common),
            **{f"maj@{k}": paired_difference([right(r, k) for r in common], [right(theirs[r["index"]], k) for r in common])
               for k in ks}}

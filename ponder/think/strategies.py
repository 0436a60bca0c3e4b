"""Strategies: short programs over the primitives (see primitives.py for the `yield from` rule).

Each takes a `ThinkSession` and its own options and returns a `ThinkResult`. Defaults follow
the papers: temperature 0.8 (set on the session), step delimiter "\\n\\n", beam search as in
search-and-learn (N beams, width M, keep the top N/M), particle filtering as in its_hub
(weights logit(r), softmax resampling every step, argmax at the end), DeepConf online
(16 warm-up traces, window 2048, consensus 0.95).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import numpy as np

from ponder.engine.sequence import Sequence
from ponder.sampling_params import InvalidOption
from ponder.think.answers import exact_match, extract_answer
from ponder.think.confidence import ConfidenceTrace
from ponder.think.primitives import Gen, ThinkSession, softmax
from ponder.think.result import Candidate, ThinkResult
from ponder.think.scorers import ConfidenceScorer, make_scorer
from ponder.think.stopping import STOPPING_RULES, settled
from ponder.think.voting import pass_at_k, tally, winner

Extract = Callable[[str], "str | None"]
DELIMITER = ("\n\n",)


def greedy(s: ThinkSession, extract: Extract = extract_answer) -> Gen[ThinkResult]:
    """One greedy answer: the baseline."""
    s.configure(temperature=0.0)
    [branch] = yield from _sample(s, 1)
    chosen = s.candidate(branch, extract=extract)
    return ThinkResult("greedy", chosen.text, chosen.answer, [chosen])


def parallel(s: ThinkSession, n: int = 8, scorer=None, reference=None,
             extract: Extract = extract_answer) -> Gen[ThinkResult]:
    """n samples sharing the prompt. With `reference` (an answer, or a verifier of the completion
    text) the metrics hold the unbiased pass@k for k = 1, 2, 4, ..., n."""
    scorer = _prepare(s, scorer)
    branches = yield from _sample(s, _positive(n, "n"))
    candidates = yield from _candidates(s, branches, scorer, extract)
    metrics = {}
    if reference is not None:
        verify = reference if callable(reference) else exact_match(str(reference))
        correct = sum(bool(verify(c.text)) for c in candidates)
        metrics = {"num_correct": correct, **{f"pass@{k}": pass_at_k(n, correct, k) for k in _ks(n)}}
    chosen = candidates[_best(candidates)]
    return ThinkResult("parallel", chosen.text, chosen.answer, candidates, metrics=metrics)


def self_consistency(s: ThinkSession, n: int = 8, vote: str = "majority", scorer=None,
                     vote_temperature: float | None = None, extract: Extract = extract_answer) -> Gen[ThinkResult]:
    """n samples vote on their normalised answers: one vote each ("majority"), or their scores
    ("weighted"; DeepConf's mean confidence unless a scorer is given). With `vote_temperature` T,
    a weighted vote counts softmax(score / T) over the samples (CISC: P(True) from self-eval, or
    trace confidence, sharpened or flattened)."""
    if vote not in ("majority", "weighted"):
        raise InvalidOption("vote", f"vote must be 'majority' or 'weighted', got {vote!r}")
    if vote_temperature is not None and (vote != "weighted" or not vote_temperature > 0):
        raise InvalidOption("vote_temperature", "vote_temperature needs vote='weighted' and a value > 0")
    scorer = _prepare(s, ConfidenceScorer("mean") if vote == "weighted" and scorer is None else scorer)
    branches = yield from _sample(s, _positive(n, "n"))
    candidates = yield from _candidates(s, branches, scorer, extract)
    weights = [c.score for c in candidates] if vote == "weighted" else None
    if weights is not None and vote_temperature is not None:
        weights = softmax([w / vote_temperature for w in weights])
    return _voted("self-consistency", candidates, tally(_ballots(candidates), weights))


def best_of_n(s: ThinkSession, n: int = 8, scorer="self-eval",
              extract: Extract = extract_answer) -> Gen[ThinkResult]:
    """n samples; the best by `scorer` wins."""
    scorer = _prepare(s, scorer)
    if scorer is None:
        raise InvalidOption("scorer", "best-of-n needs a scorer")
    branches = yield from _sample(s, _positive(n, "n"))
    candidates = yield from _candidates(s, branches, scorer, extract)
    chosen = candidates[_best(candidates)]
    return ThinkResult("best-of-n", chosen.text, chosen.answer, candidates)


def deepconf(s: ThinkSession, n: int = 32, warmup: int = 16, keep_top: float = 0.9, window: int | None = None,
             consensus: float = 0.95, top_logprobs: int = 20,
             extract: Extract = extract_answer) -> Gen[ThinkResult]:
    """DeepConf online. Warm-up traces run to the end; the threshold keeps the top `keep_top` of
    their lowest group confidences (0.9: DeepConf-high, 0.1: DeepConf-low). The other traces
    run together and each stops as soon as its latest `window`-token group falls below it; all
    stop once one answer holds `consensus` of the confidence-weighted vote.

    `window` defaults to the paper's 2048 tokens, capped at a quarter of max_tokens: the paper's
    traces run to tens of thousands of tokens, and a window as long as the trace could never
    stop one early."""
    if window is None:
        limit = s.params.max_tokens
        window = 2048 if limit is None else max(1, min(2048, limit // 4))
    _positive(window, "window")
    _positive(warmup, "warmup")
    if n < warmup:
        raise InvalidOption(("n", "warmup"), f"n ({n}) must be >= warmup ({warmup})")
    if not 0.0 < keep_top <= 1.0:
        raise InvalidOption("keep_top", f"keep_top must be in (0, 1], got {keep_top}")
    s.require_logprobs(top_logprobs)
    root = yield from s.start()
    warm = s.fork(root, warmup)
    yield from s.generate(warm)
    traces = {b: ConfidenceTrace().update(b.logprobs) for b in warm}
    kept = [s.candidate(b, traces[b].lowest_group(window), extract) for b in warm]
    threshold = float(np.percentile([c.score for c in kept], 100 * (1 - keep_top)))
    s.emit("deepconf-threshold", threshold=threshold)
    online = s.launch(s.fork(root, n - warmup))
    dropped: list[Candidate] = []
    while online:
        votes = tally(_ballots(kept), [c.score for c in kept])
        top = winner(votes)
        reached = top is not None and votes[top] >= consensus * sum(votes.values())
        for b in list(online):
            trace = traces.setdefault(b, ConfidenceTrace()).update(b.logprobs)
            if s.is_complete(b):
                kept.append(s.candidate(b, trace.lowest_group(window), extract))
            elif reached or (len(trace) >= window and trace.tail(window) < threshold):
                b.finish_reason = "consensus" if reached else "low-confidence"
                dropped.append(s.candidate(b, trace.lowest_group(window), extract))
            else:
                continue
            s.prune(b)                      # its KV is not needed any more
            online.remove(b)
        if online:
            yield
    result = _voted("deepconf", kept, tally(_ballots(kept), [c.score for c in kept]))
    result.candidates += dropped
    result.metrics = {"threshold": threshold, "stopped_early": len(dropped)}
    return result


def beam_search(s: ThinkSession, n: int = 8, width: int = 4, scorer="self-eval", delimiter=DELIMITER,
                max_steps: int = 40, step_max_tokens: int | None = None,
                extract: Extract = extract_answer) -> Gen[ThinkResult]:
    """Step-level beam search (search-and-learn): n beams each take a step, are scored, the top
    n/width survive and are forked back to n beams. Completed beams leave the search; it ends
    when all are complete, n have completed, or after max_steps. The best-scored completion wins."""
    scorer = _prepare(s, scorer)
    if scorer is None or _positive(width, "width") > _positive(n, "n"):
        raise InvalidOption("scorer" if scorer is None else ("width", "n"), "beam search needs a scorer and width <= n")
    keep = max(1, n // width)
    root = yield from s.start()
    beams = s.fork(root, n)
    scorer = make_scorer(scorer)
    completed: list[Candidate] = []
    unfinished: list[Candidate] = []
    for it in range(_positive(max_steps, "max_steps")):
        yield from s.step(beams, delimiter, step_max_tokens)
        scores = yield from s.score(beams, scorer)
        live = []
        for beam, score in zip(beams, scores):
            if s.is_complete(beam):
                completed.append(s.candidate(beam, score, extract))
                s.prune(beam)
            else:
                live.append((score, beam))
        live.sort(key=lambda pair: -pair[0])
        s.emit("beam-step", step=it, scores=sorted(scores, reverse=True), completed=len(completed))
        if not live or len(completed) >= n or it == max_steps - 1:
            unfinished = [s.candidate(beam, score, extract) for score, beam in live]
            break
        for _, beam in live[keep:]:
            s.prune(beam)
        beams = _refill(s, [beam for _, beam in live[:keep]], n)
    candidates = completed + unfinished     # an unfinished beam wins only if none completed
    chosen = candidates[_best(candidates, list(range(len(completed))) or None)]
    return ThinkResult("beam-search", chosen.text, chosen.answer, candidates)


def particle_filtering(s: ThinkSession, n: int = 8, scorer="self-eval", delimiter=DELIMITER,
                       max_steps: int = 40, step_max_tokens: int | None = None,
                       extract: Extract = extract_answer) -> Gen[ThinkResult]:
    """Particle-based Monte Carlo (its_hub): each live particle takes a step and is scored with a
    reward r in [0, 1]; its log weight becomes logit(r). Every step all particles — stopped ones
    keeping their last weight — are resampled (with replacement, softmax of the log weights) by
    forking and pruning. At the end the particle with the highest weight wins."""
    scorer = _prepare(s, scorer)
    if scorer is None:
        raise InvalidOption("scorer", "particle filtering needs a scorer returning rewards in [0, 1]")
    root = yield from s.start()
    particles = s.fork(root, _positive(n, "n"))
    log_weights = [0.0] * n
    scorer = make_scorer(scorer)
    for it in range(_positive(max_steps, "max_steps")):
        live = [i for i, p in enumerate(particles) if not s.is_complete(p)]
        if not live:
            break
        yield from s.step([particles[i] for i in live], delimiter, step_max_tokens)
        rewards = yield from s.score([particles[i] for i in live], scorer)
        for i, reward in zip(live, rewards):
            log_weights[i] = _logit(reward)
        s.emit("particle-step", step=it, log_weights=list(log_weights))
        if all(s.is_complete(p) for p in particles) or it == max_steps - 1:
            break
        particles, origins = s.resample(particles, log_weights, n)
        log_weights = [log_weights[i] for i in origins]
    candidates = [s.candidate(p, w, extract) for p, w in zip(particles, log_weights)]
    chosen = candidates[_best(candidates)]
    return ThinkResult("particle-filtering", chosen.text, chosen.answer, candidates)


def adaptive_consistency(s: ThinkSession, n: int = 16, wave: int = 4, confidence: float = 0.95,
                         stopping: str = "beta", extract: Extract = extract_answer) -> Gen[ThinkResult]:
    """Self-consistency that stops early (Adaptive-Consistency, Aggarwal et al. 2023): samples come
    in waves of `wave`, and sampling stops once the `stopping` rule (think/stopping.py) says the vote
    is settled — by default once the leading answer is, with posterior probability ≥ `confidence`,
    more likely than the runner-up (the Beta rule) — or after n samples. The samples are those of a
    self-consistency pool in order (the same seeds), so it spends at most what self-consistency@n
    does."""
    n, wave = _positive(n, "n"), _positive(wave, "wave")
    candidates = yield from _in_waves(s, n, wave, confidence,
                                      lambda branches: [s.candidate(b, extract=extract) for b in branches],
                                      stopping)
    s.emit("stopped", samples=len(candidates), of=n)
    return _voted("adaptive-consistency", candidates, tally(_ballots(candidates)))


def _in_waves(s: ThinkSession, n: int, wave: int, confidence: float, judge,
              stopping: str = "beta") -> Gen[list[Candidate]]:
    """Up to n samples forked from the prompt in waves of `wave` (the first samples of an n-sample
    pool: the same seeds); `judge(branches)` makes each wave's candidates (a list, or a generator
    returning one), and sampling stops once the `stopping` rule is `settled` at `confidence`."""
    if not 0.5 <= confidence < 1.0:
        raise InvalidOption("confidence", f"confidence must be in [0.5, 1), got {confidence!r}")
    if stopping not in STOPPING_RULES:
        raise InvalidOption("stopping", f"stopping must be one of {', '.join(STOPPING_RULES)}, got {stopping!r}")
    root = yield from s.start()
    candidates: list[Candidate] = []
    while len(candidates) < n:
        branches = s.fork(root, min(wave, n - len(candidates)))
        yield from s.generate(branches)
        judged = judge(branches)
        candidates += (yield from judged) if inspect.isgenerator(judged) else judged
        if settled(stopping, _ballots(candidates), wave, confidence):
            break
    return candidates


# -- shared pieces ----------------------------------------------------------------------------
def _prepare(s: ThinkSession, scorer):
    scorer = make_scorer(scorer)
    if scorer is not None:
        s.require_logprobs(getattr(scorer, "top_logprobs", 0))
        if getattr(scorer, "self_certainty", False):
            s.require_self_certainty()
    return scorer


def _sample(s: ThinkSession, n: int) -> Gen[list[Sequence]]:
    """n complete answers, forked from the prompt prefilled once."""
    root = yield from s.start()
    branches = s.fork(root, n)
    yield from s.generate(branches)
    return branches


def _candidates(s: ThinkSession, branches, scorer, extract) -> Gen[list[Candidate]]:
    scores = yield from _scores(s, branches, scorer)
    return [s.candidate(b, score, extract) for b, score in zip(branches, scores)]


def _scores(s: ThinkSession, branches, scorer) -> Gen[list[float | None]]:
    """Each branch's score by `scorer`, or None for each when there is no scorer."""
    return (yield from s.score(branches, make_scorer(scorer))) if scorer is not None else [None] * len(branches)


def _ballots(candidates: list[Candidate]) -> list[str | None]:
    """What each candidate votes for: its answer, unless it was cut at max_tokens — a truncated
    solution's last number is where it stopped, not what it concluded — or has none."""
    return [c.answer if c.finish_reason != "length" else None for c in candidates]


def _voted(name: str, candidates: list[Candidate], votes: dict[str, float]) -> ThinkResult:
    """The winning answer; its text is that of its best-scored (else first) candidate. No vote
    cast (every candidate cut at max_tokens or without an answer): no answer."""
    top = winner(votes)
    backers = [i for i, c in enumerate(candidates) if c.answer == top] if top is not None else []
    chosen = candidates[_best(candidates, backers or None)] if candidates else Candidate("", None)
    return ThinkResult(name, chosen.text, top, candidates, votes=votes)


def _refill(s: ThinkSession, kept: list[Sequence], n: int) -> list[Sequence]:
    """Fork the kept beams round-robin back up to n beams."""
    beams = []
    for i, beam in enumerate(kept):
        copies = n // len(kept) + (i < n % len(kept))
        beams += [beam] + s.fork(beam, copies - 1)
    return beams


def _best(candidates: list[Candidate], among: list[int] | None = None) -> int:
    """Index of the highest score (the first on ties, or when nothing is scored)."""
    among = among if among is not None else list(range(len(candidates)))
    return max(among, key=lambda i: (candidates[i].score if candidates[i].score is not None else -math.inf,
                                     -i))


def _logit(reward: float) -> float:
    if not 0.0 <= reward <= 1.0:
        raise ValueError(f"particle filtering needs rewards in [0, 1], the scorer gave {reward}")
    r = min(max(reward, 1e-7), 1 - 1e-7)
    return math.log(r / (1 - r))


def _ks(n: int) -> list[int]:
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [n]


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOption(name, f"{name} must be a positive integer, got {value!r}")
    return value

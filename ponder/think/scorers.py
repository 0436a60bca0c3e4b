"""Scorers: map branches to scores, higher is better.

A scorer is any callable `scorer(session, seqs)` returning one float per branch, or a generator
returning them (when it runs a model: `yield from session.probe(...)`). `top_logprobs` says how
many logprobs per token the branches must record for it (0: none).

- `ConfidenceScorer`: DeepConf confidence (mean, lowest window, tail) from top-k logprobs.
- `SelfEvalScorer`: the same model judges — fork, append an evaluation question, read
  P(" Yes") against P(" No") from the next-token logits, free the fork. Or a second ponder model.
- `VerifierScorer`: a user's Python check of the completion text (exact match, unit tests).
- `RewardModelScorer`: any reward model callable (a PRM plugs in here), or a second ponder model.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

from ponder.sampling_params import InvalidOption, SamplingParams
from ponder.think.confidence import KINDS, trace_confidence
from ponder.think.primitives import ThinkSession, drive

_MARK = "\x00ponder-candidate\x00"


@dataclass
class ConfidenceScorer:
    kind: str = "mean"          # "mean", "min-window" (lowest group confidence) or "tail"
    window: int = 2048          # tokens per group / in the tail (the DeepConf paper's 2048)
    top_logprobs: int = 20

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"confidence kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def __call__(self, session: ThinkSession, seqs) -> list[float]:
        if any(s.logprobs is None and s.num_output_tokens for s in seqs):
            raise ValueError("confidence needs logprobs: call session.require_logprobs(k) before generating")
        return [trace_confidence(s.logprobs, self.kind, self.window) for s in seqs]


@dataclass
class SelfCertaintyScorer:
    """A trace's mean Self-Certainty: KL(uniform || p) per token over the raw distribution (higher
    is more certain; engine/token_stats.py)."""

    top_logprobs: int = 0
    self_certainty: bool = True      # the session records it (see strategies._prepare)

    def __call__(self, session: ThinkSession, seqs) -> list[float]:
        if any(s.self_certainty is None for s in seqs):
            raise ValueError("self-certainty needs session.require_self_certainty() before generating")
        return [sum(s.self_certainty) / len(s.self_certainty) if s.self_certainty else 0.0 for s in seqs]


@dataclass
class VerifierScorer:
    """`verify(completion_text) -> bool | float`, e.g. `exact_match("18")` or running unit tests."""

    verify: Callable[[str], float | bool]
    top_logprobs: int = 0

    def __call__(self, session: ThinkSession, seqs) -> list[float]:
        return [float(self.verify(s.text)) for s in seqs]


@dataclass
class SelfEvalScorer:
    """P(yes) / (P(yes) + P(no)) for an evaluation question asked after the candidate.

    With `judge=None` the session's own model answers, on forks that share the candidate's KV
    (only the question is prefilled). A judge (an `LLM` or `LLMEngine`) re-reads prompt and
    candidate as text with its own tokenizer and chat template."""

    question: str = "Is the answer above correct? Answer Yes or No."
    partial_question: str = "Is the reasoning above correct so far? Answer Yes or No."
    yes: tuple[str, ...] = ("Yes", " Yes", "yes", " yes", "YES")
    no: tuple[str, ...] = ("No", " No", "no", " no", "NO")
    judge: object | None = None
    top_logprobs: int = 0

    def __call__(self, session: ThinkSession, seqs):
        if self.judge is None or _engine_of(self.judge) is session.engine:
            return self._same_model(session, seqs)
        return self._second_model(session, seqs)

    def _same_model(self, session: ThinkSession, seqs):
        yes_ids, no_ids = label_token_ids(session.tokenizer, self.yes, self.no)
        suffixes = {}
        forks, scores = [], [0.0] * len(seqs)
        for seq in seqs:
            question = self.question if session.is_complete(seq) else self.partial_question
            if question not in suffixes:
                suffixes[question] = session.tokenizer.encode(
                    evaluation_suffix(session.tokenizer, session.messages, question), add_special_tokens=False)
            suffix = _drop_repeated_end(seq.token_ids, suffixes[question], session.engine.eos_token_ids)
            child = session.fork(seq, 1)[0]
            try:
                session.append(child, suffix)
            except ValueError:          # no room left in the context: score it lowest
                session.prune(child)
                child = None
            forks.append(child)
        probed = [c for c in forks if c is not None]
        logprobs = iter((yield from session.probe(probed, yes_ids + no_ids)))
        for i, child in enumerate(forks):
            if child is not None:
                scores[i] = yes_probability(next(logprobs), len(yes_ids))
                session.prune(child)
        return scores

    def _second_model(self, session: ThinkSession, seqs) -> list[float]:
        engine = _engine_of(self.judge)
        tok = engine.tokenizer
        yes_ids, no_ids = label_token_ids(tok, self.yes, self.no)
        messages = session.messages or [{"role": "user", "content": session.prompt_text}]
        judges = []
        for seq in seqs:
            question = self.question if session.is_complete(seq) else self.partial_question
            conversation = messages + [{"role": "assistant", "content": seq.text},
                                       {"role": "user", "content": question}]
            text = (tok.apply_chat_template(conversation) if tok.chat_template
                    else f"{session.prompt_text}{seq.text}\n\n{question}\nAnswer:")
            judges.append(ThinkSession(engine, tok.encode(text, add_special_tokens=False),
                                       SamplingParams(temperature=0.0, max_tokens=1)))
        try:
            logprobs = drive(engine, [j.probe([j.root], yes_ids + no_ids) for j in judges])
        finally:
            for judge in judges:
                judge.close()
                for key, value in judge.usage().items():
                    if key != "scorer_calls":
                        session.extra_usage[key] += value
        return [yes_probability(lp[0], len(yes_ids)) for lp in logprobs]


@dataclass
class RewardModelScorer:
    """A reward model: `model(prompt_text, completions) -> scores` (batched), e.g. a PRM wrapper;
    or a second ponder model (`LLM`/`LLMEngine`), used as a yes/no judge."""

    model: object
    top_logprobs: int = 0
    _judge: SelfEvalScorer | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if _engine_of(self.model) is not None:
            self._judge = SelfEvalScorer(judge=self.model)
        elif not callable(self.model):
            raise ValueError("a reward model is a callable (prompt, completions) -> scores, or a ponder LLM")

    def __call__(self, session: ThinkSession, seqs):
        if self._judge is not None:
            return self._judge(session, seqs)
        return list(self.model(session.prompt_text, [s.text for s in seqs]))


SCORER_NAMES = ("self-eval", "self-certainty", "confidence", "confidence-mean", "confidence-min-window",
                "confidence-tail")


def make_scorer(spec, **options):
    """A scorer from a name (see SCORER_NAMES), a scorer object, a function of the completion
    text (a verifier), or a function `(session, seqs) -> scores`."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec == "self-eval":
            return SelfEvalScorer(**options)
        if spec == "self-certainty":
            return SelfCertaintyScorer(**options)
        if spec in ("confidence", "confidence-mean"):
            return ConfidenceScorer("mean", **options)
        if spec.startswith("confidence-") and spec[len("confidence-"):] in KINDS:
            return ConfidenceScorer(spec[len("confidence-"):], **options)
        raise InvalidOption("scorer", f"unknown scorer {spec!r}; choose one of {', '.join(SCORER_NAMES)}, "
                         f"or pass a scorer object or a verifier function")
    if hasattr(spec, "top_logprobs"):
        return spec
    if callable(spec):
        return VerifierScorer(spec) if _num_params(spec) == 1 else spec
    raise ValueError(f"a scorer is a name, a scorer object or a function, got {type(spec).__name__}")


# -- self-evaluation helpers ----------------------------------------------------------------
def evaluation_suffix(tokenizer, messages: list[dict] | None, question: str) -> str:
    """Text that closes the candidate's turn and asks `question` (chat template when there is one)."""
    if messages is not None and tokenizer.chat_template:
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": _MARK}, {"role": "user", "content": question}])
        if _MARK in full:
            return full.split(_MARK, 1)[1]
    return f"\n\n{question}\nAnswer:"


def _drop_repeated_end(token_ids: list[int], suffix: list[int], eos_ids: list[int]) -> list[int]:
    """A candidate that ended with its end-of-turn token must not get a second one."""
    if suffix and token_ids and token_ids[-1] in eos_ids and suffix[0] == token_ids[-1]:
        return suffix[1:]
    return suffix


def label_token_ids(tokenizer, yes: tuple[str, ...], no: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """First token of each spelling of the labels; a token in both lists is dropped from both."""
    def first_tokens(labels):
        ids = []
        for label in labels:
            enc = tokenizer.encode(label, add_special_tokens=False)
            if enc and enc[0] not in ids:
                ids.append(enc[0])
        return ids

    yes_ids, no_ids = first_tokens(yes), first_tokens(no)
    both = set(yes_ids) & set(no_ids)
    yes_ids, no_ids = [t for t in yes_ids if t not in both], [t for t in no_ids if t not in both]
    if not yes_ids or not no_ids:
        raise ValueError("the yes and no labels need distinct first tokens")
    return yes_ids, no_ids


def yes_probability(logprobs: list[float], num_yes: int) -> float:
    """P(yes) / (P(yes) + P(no)) from the labels' logprobs (yes labels first)."""
    p_yes = sum(math.exp(lp) for lp in logprobs[:num_yes])
    p_no = sum(math.exp(lp) for lp in logprobs[num_yes:])
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5


def _num_params(fn) -> int | None:
    try:
        return len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):     # some builtins have no signature: treat as a verifier
        return 1


def _engine_of(model):
    """The LLMEngine behind an LLM or engine, else None."""
    from ponder.engine.engine import LLMEngine

    if isinstance(model, LLMEngine):
        return model
    engine = getattr(model, "engine", None)
    return engine if isinstance(engine, LLMEngine) else None

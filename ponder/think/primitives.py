"""Inference-time compute primitives: fork, step, append, score, prune, resample — in the engine.

A `ThinkSession` owns one engine request. Every branch is a sequence of that request: branches
share the prompt's KV blocks (copy-on-write), batch with everything else the engine runs, and
park between steps with their KV resident, so nothing is ever re-prefilled.

Primitives that need the engine to run (`start`, `step`, `generate`, `prefill`, `probe`,
`score`, `wait`) are generators: a strategy calls them with `yield from`, and each bare `yield`
hands control to whoever drives the engine for one engine step — `drive()` offline, the server's
engine loop online. The others (`fork`, `append`, `prune`, `resample`, `launch`) act at once,
between engine steps, so no lock is needed.

    session = ThinkSession(engine, prompt_ids, SamplingParams(temperature=0.8, max_tokens=256))
    root = session.run(session.start())            # prefill the prompt once, park
    branches = session.fork(root, 4)               # share every block
    session.run(session.step(branches, stop=("\\n\\n",)))   # one reasoning step each, then park
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from collections import Counter
from typing import Callable, Generator, Iterable, TypeVar

from ponder.engine.engine import LLMEngine
from ponder.engine.programs import run_programs
from ponder.engine.sequence import Sequence, SequenceStatus
from ponder.sampling_params import SamplingParams
from ponder.think.answers import extract_answer
from ponder.think.result import Candidate

T = TypeVar("T")
Gen = Generator[None, None, T]   # a primitive that waits on the engine: call it with `yield from`

_ACTIVE = (SequenceStatus.RUNNING, SequenceStatus.WAITING)


class ThinkSession:
    def __init__(self, engine: LLMEngine, prompt_ids: list[int], params: SamplingParams | None = None, *,
                 messages: list[dict] | None = None, prompt_text: str | None = None,
                 request_id: str | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.messages = messages
        self.prompt_text = prompt_text if prompt_text is not None else self.tokenizer.decode(prompt_ids)
        params = dataclasses.replace(params or SamplingParams(), n=1)   # our own copy: configure() edits it
        self.request = engine.add_request(None, params, request_id, prompt_token_ids=prompt_ids, driven=True)
        self.root = self.request.seqs[0]       # prefills its prompt, then parks
        seed = params.seed if params.seed is not None else self.root.seed
        self.rng = random.Random(seed)
        self.scorer_calls = 0
        self.extra_usage: Counter = Counter()  # work done elsewhere for this request (a judge model)
        self.events: list[dict] = []
        self.closed = False

    # -- configuration ----------------------------------------------------------------------
    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def configure(self, **sampling) -> None:
        """Change the sampling of every branch from the next token on (validated)."""
        self.request.params = dataclasses.replace(self.request.params, **sampling)

    def require_self_certainty(self) -> None:
        """Record each generated token's Self-Certainty (call before generating)."""
        self.engine.track_self_certainty(self.root)

    def require_logprobs(self, top_k: int) -> None:
        """Record top-k logprobs for every sampled token (call before generating)."""
        if top_k and (self.params.logprobs or 0) < top_k:
            self.configure(logprobs=top_k)

    # -- waiting primitives (generators) ----------------------------------------------------
    def wait(self, seqs: Iterable[Sequence]) -> Gen[None]:
        """Let the engine run until none of `seqs` is queued or running."""
        seqs = list(seqs)
        while any(s.status in _ACTIVE for s in seqs):
            yield

    def start(self) -> Gen[Sequence]:
        """Prefill the prompt once (all but its last token, which each branch computes with its
        first sample) and park; returns the root to fork branches from."""
        yield from self.wait([self.root])
        return self.root

    def launch(self, seqs: Iterable[Sequence], stop: Iterable[str] = (), max_tokens: int | None = None,
               stop_token_ids: Iterable[int] = ()) -> list[Sequence]:
        """Start one step on each live branch without waiting (see `step`); returns those started."""
        started = [seq for seq in seqs if self.is_live(seq)]
        for seq in started:
            self.engine.run_step(seq, tuple(stop), max_tokens, tuple(stop_token_ids))
        return started

    def step(self, seqs: Iterable[Sequence], stop: Iterable[str] = ("\n\n",), max_tokens: int | None = None,
             stop_token_ids: Iterable[int] = ()) -> Gen[list[Sequence]]:
        """Generate one reasoning step on each live branch — until a delimiter in `stop` (kept in the
        text), `max_tokens` more tokens, or the end of the answer — then park it, KV resident.
        Branches that are complete already are left alone. Returns `seqs`."""
        seqs = list(seqs)
        yield from self.wait(self.launch(seqs, stop, max_tokens, stop_token_ids))
        return seqs

    def generate(self, seqs: Iterable[Sequence]) -> Gen[list[Sequence]]:
        """Generate each live branch to its end (EOS, a stop of the request, max_tokens)."""
        return (yield from self.step(seqs, stop=()))

    def prefill(self, seqs: Iterable[Sequence]) -> Gen[list[Sequence]]:
        """Compute appended tokens now (all but the last of each branch), sampling nothing."""
        seqs = list(seqs)
        for seq in seqs:
            self.engine.prefill(seq)
        yield from self.wait(seqs)
        return seqs

    def probe(self, seqs: Iterable[Sequence], token_ids: list[int]) -> Gen[list[list[float]]]:
        """Next-token logprobs of `token_ids` after each branch (computing pending tokens first);
        nothing is sampled and the branches park again."""
        seqs = list(seqs)
        for seq in seqs:
            self.engine.probe(seq, token_ids)
        yield from self.wait(seqs)
        return [seq.control.probe_logprobs or [-math.inf] * len(token_ids)   # lost to an error
                for seq in seqs]

    def score(self, seqs: Iterable[Sequence], scorer: Callable) -> Gen[list[float]]:
        """Scores of `seqs` (higher is better). `scorer(session, seqs)` returns a list, or is a
        generator (it runs the model: self-evaluation) returning one; strategies build it from a
        name or a verifier with scorers.make_scorer."""
        seqs = list(seqs)
        if not seqs:
            return []
        result = scorer(self, seqs)
        scores = (yield from result) if inspect.isgenerator(result) else list(result)
        if len(scores) != len(seqs):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(seqs)} branches")
        self.scorer_calls += len(seqs)
        return [float(s) for s in scores]

    # -- immediate primitives ---------------------------------------------------------------
    def fork(self, seq: Sequence, n: int) -> list[Sequence]:
        """n new branches sharing every KV block of `seq` (copy-on-write); they start parked."""
        if seq.status is not SequenceStatus.PARKED and not seq.finished:
            raise ValueError(f"fork a parked branch (this one is {seq.status.value}); step() parks branches")
        return self.engine.fork(seq, n)

    def append(self, seq: Sequence, text_or_ids: str | list[int]) -> None:
        """Extend a parked branch by forced text or token ids: computed when it next runs
        (`prefill` to compute them now); no sampling."""
        ids = (self.tokenizer.encode(text_or_ids, add_special_tokens=False)
               if isinstance(text_or_ids, str) else list(text_or_ids))
        self.engine.append(seq, ids)

    def prune(self, seq: Sequence, reason: str = "pruned") -> None:
        """Drop a branch and free its KV blocks now."""
        self.engine.release(seq, reason)

    def resample(self, seqs: list[Sequence], log_weights: list[float], k: int) -> tuple[list[Sequence], list[int]]:
        """Draw k branches with replacement, with probabilities softmax(log_weights). A branch drawn
        c times is kept and forked c-1 times, one never drawn is pruned: nothing is recomputed.
        Returns the k branches and, for each, the index in `seqs` it descends from."""
        if len(seqs) != len(log_weights) or not seqs:
            raise ValueError("resample needs one log weight per branch, and at least one branch")
        counts = Counter(self.rng.choices(range(len(seqs)), weights=softmax(log_weights), k=k))
        out, origins = [], []
        for i, seq in enumerate(seqs):
            if counts[i] == 0:
                self.prune(seq, "resampled-out")
                continue
            family = [seq] + self.fork(seq, counts[i] - 1)
            out += family
            origins += [i] * len(family)
        return out, origins

    # -- reading branches -------------------------------------------------------------------
    @staticmethod
    def is_complete(seq: Sequence) -> bool:
        """The answer is over (EOS, stop, max_tokens, dropped)."""
        return seq.finish_reason is not None

    def is_live(self, seq: Sequence) -> bool:
        """Parked with its KV and not complete: it can take another step."""
        return seq.status is SequenceStatus.PARKED and seq.finish_reason is None

    @staticmethod
    def step_text(seq: Sequence) -> str:
        """Text of the branch's latest step."""
        return seq.text[seq.control.text_start:] if seq.control is not None else seq.text

    def candidate(self, seq: Sequence, score: float | None = None,
                  extract: Callable[[str], str | None] = extract_answer) -> Candidate:
        return Candidate(seq.text, extract(seq.text), score, seq.finish_reason, seq.num_output_tokens)

    def emit(self, event: str, **data) -> None:
        """A progress event (streamed by the server)."""
        self.events.append({"event": event, **data})

    def usage(self) -> dict:
        r, extra = self.request, self.extra_usage
        return {"prompt_tokens_computed": r.tokens_prefilled + extra["prompt_tokens_computed"],
                "prompt_tokens_cached": r.tokens_reused + extra["prompt_tokens_cached"],
                "generated_tokens": r.tokens_generated + extra["generated_tokens"],
                "scorer_calls": self.scorer_calls,
                **({"sandbox_runs": extra["sandbox_runs"]} if extra["sandbox_runs"] else {})}

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Free every branch still held and retire the request."""
        if self.closed:
            return
        self.closed = True
        self.engine.close_request(self.request)

    def run(self, program: Gen[T]) -> T:
        """Drive one primitive or program to completion right here (offline use)."""
        return drive(self.engine, [program])[0]


def softmax(log_weights: list[float]) -> list[float]:
    top = max(log_weights)
    if top == -math.inf:
        return [1.0] * len(log_weights)
    weights = [math.exp(w - top) for w in log_weights]
    total = sum(weights)
    return [w / total for w in weights]


def drive(engine: LLMEngine, programs: list[Gen]) -> list:
    """Run generator programs to completion with the engine's one program loop (stepping the
    engine whenever all of them wait). Offline only: the caller must be the engine's only driver.
    Returns their return values; raises RuntimeError if they wait on nothing the engine runs."""
    steps = [_GeneratorProgram(program) for program in programs]
    run_programs(engine, steps)
    stalled = next((s.result.error for s in steps if s.result.error), None)
    if stalled is not None:
        raise RuntimeError(stalled)
    return [s.value for s in steps]


@dataclasses.dataclass
class _Ended:
    error: str | None = None


class _GeneratorProgram:
    """A bare generator (a primitive, or a strategy without a session of its own) as a program."""

    request_id = ""

    def __init__(self, generator: Gen):
        self.generator, self.value, self.result = generator, None, None

    def advance(self) -> bool:
        if self.result is None:
            try:
                next(self.generator)
            except StopIteration as stop:
                self.value, self.result = stop.value, _Ended()
        return self.result is not None

    def abort(self) -> None:
        self.generator.close()
        if self.result is None:
            self.result = _Ended("aborted")

    def drain_events(self) -> list[dict]:
        return []

    def progress(self) -> dict:
        return {}

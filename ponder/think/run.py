"""Running strategies: prompt + options -> ThinkResult, offline (LLM.think, the CLI) or one engine
step at a time inside a server's engine loop (`start_think_request` + `ThinkRun.advance`)."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

from ponder.engine.engine import LLMEngine
from ponder.engine.programs import run_programs
from ponder.engine.sequence import Action
from ponder.sampling_params import SamplingParams
from ponder.think.answers import extract_answer
from ponder.think.primitives import Gen, ThinkSession
from ponder.think.result import ThinkResult
from ponder.think.catalog import STRATEGIES
from ponder.think.voting import tally, winner

DEFAULT_STRATEGY = "self-consistency"
# the sampling fields a think request may set; unset ones come from the engine's sampling_defaults
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed",
                   "structured_outputs")
THINK_MAX_TOKENS = 512          # per branch, unless max_tokens is set
ALIASES = {"sc": "self-consistency", "ac": "adaptive-consistency", "bon": "best-of-n", "beam": "beam-search",
           "pf": "particle-filtering", "pal": "program-of-thought", "pot": "program-of-thought"}


@dataclass(frozen=True)
class ThinkPrompt:
    """A think prompt rendered once: its token ids, the chat messages it came from (None for raw
    text or ids) and the question that self-evaluation quotes."""

    ids: list[int]
    messages: list[dict] | None
    question: str

    @classmethod
    def from_messages(cls, messages: list[dict], ids: list[int]) -> "ThinkPrompt":
        """For chat messages already rendered with the template (the server does that to check them)."""
        messages = [dict(m) for m in messages]
        users = [m.get("content", "") for m in messages if m.get("role") == "user"]
        return cls(list(ids), messages, users[-1] if users else str(messages[-1].get("content", "")))


class ThinkRun:
    """One think request in progress: a program (ponder/engine/programs.py). Call `advance()`
    between engine steps (on the thread that steps the engine); it returns True once `result` is
    set. The run holds no engine lock."""

    def __init__(self, session: ThinkSession, program: Gen[ThinkResult], strategy: str,
                 contain_errors: bool = False):
        self.session = session
        self.strategy = strategy
        self.contain_errors = contain_errors
        self.result: ThinkResult | None = None
        self._program = _closing(session, program)
        self.started = time.monotonic()
        self._answers: dict[int, str | None] = {}     # seq_id -> extracted answer of a finished branch

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def request_id(self) -> str:
        return self.session.request.request_id

    def advance(self) -> bool:
        """Run the strategy until it waits on the engine again (or ends)."""
        if self.result is not None:
            return True
        request = self.session.request
        lost = request.error or (None if request.request_id in self.session.engine.requests else "aborted")
        try:
            if lost:
                raise RuntimeError(f"think request {request.request_id} ended: {lost}")
            next(self._program)
        except StopIteration as stop:
            self.result = stop.value
        except Exception as e:                      # this request fails; the engine and others go on
            self._program.close()
            if not self.contain_errors:
                raise
            self.result = ThinkResult(self.strategy, "", None, [], self.session.usage(),
                                      error=f"{type(e).__name__}: {e}", error_option=getattr(e, "option", None))
        return self.result is not None

    def abort(self) -> None:
        """Stop now and free every branch (client gone)."""
        self._program.close()
        if self.result is None:
            self.result = ThinkResult(self.strategy, "", None, [], self.session.usage(), error="aborted")

    def drain_events(self) -> list[dict]:
        """Progress events since the last call (strategy phases, scores), for streaming."""
        events, self.session.events = self.session.events, []
        return events

    def progress(self) -> dict:
        """A snapshot for streaming, whatever the strategy: branches alive (generating or parked
        between steps) and finished, tokens generated so far, and the leading answer among the
        finished branches held now ("best_so_far", with its votes). The prompt's root branch and
        scorer forks (self-evaluation probes) are not counted."""
        s = self.session
        alive, finished = 0, []
        for seq in s.request.seqs:
            if seq is s.root or (seq.control is not None and seq.control.action is Action.PROBE):
                continue
            if seq.finish_reason is None:
                alive += 1
                continue
            if seq.seq_id not in self._answers:
                self._answers[seq.seq_id] = extract_answer(seq.text)
            finished.append(self._answers[seq.seq_id])
        votes = tally(finished)
        best = winner(votes)
        return {"event": "progress", "branches_alive": alive, "branches_finished": len(finished),
                "generated_tokens": s.usage()["generated_tokens"], "best_so_far": best,
                "best_so_far_votes": int(votes[best]) if best is not None else 0,
                "elapsed_s": round(time.monotonic() - self.started, 3)}


def _closing(session: ThinkSession, program: Gen[ThinkResult]) -> Gen[ThinkResult]:
    """The program, with usage filled in and every branch freed however it ends."""
    try:
        result = yield from program
        result.usage = session.usage()
        result.num_prompt_tokens = session.root.num_prompt_tokens
        return result
    finally:
        session.close()


def strategy_name(strategy: str) -> str | None:
    """The strategy a user's spelling names (`self_consistency`, `self-consistency`, `sc`), or None."""
    spelled = strategy.strip().lower().replace("_", "-")
    name = ALIASES.get(spelled, spelled)
    return name if name in STRATEGIES else None


def start_think(engine: LLMEngine, prompt, strategy: str = DEFAULT_STRATEGY, *, chat: bool | None = None,
                request_id: str | None = None, contain_errors: bool = False, **options) -> ThinkRun:
    """Queue a think request and run its strategy up to its first wait. Raises ValueError for an
    unknown strategy, an unknown option, a bad value or a prompt that cannot be served."""
    name = strategy_name(strategy)
    if name is None:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    fn = STRATEGIES[name]
    sampling = {k: options.pop(k) for k in list(options) if k in SAMPLING_FIELDS}
    accepted = [p for p in inspect.signature(fn).parameters if p != "s"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) for {name}: {', '.join(unknown)}; valid: "
                         f"{', '.join(accepted + list(SAMPLING_FIELDS))}")
    params = SamplingParams.with_defaults({**engine.sampling_defaults, "max_tokens": THINK_MAX_TOKENS}, **sampling)
    if not isinstance(prompt, ThinkPrompt):
        prompt = build_prompt(engine.tokenizer, prompt, chat)
    session = ThinkSession(engine, prompt.ids, params, messages=prompt.messages, prompt_text=prompt.question,
                           request_id=request_id)
    run = ThinkRun(session, fn(session, **options), name, contain_errors=False)
    run.advance()                    # bad option values surface here, before the request is accepted
    run.contain_errors = contain_errors
    return run


def think(engine: LLMEngine, prompts: list, strategy: str = DEFAULT_STRATEGY, **options) -> list[ThinkResult]:
    """Run one strategy on every prompt as one batch (their branches share engine steps); offline:
    the caller must be the engine's only driver."""
    runs = []
    try:
        for prompt in prompts:
            runs.append(start_think(engine, prompt, strategy, **dict(options)))
    except BaseException:
        for run in runs:
            run.abort()
        raise
    run_programs(engine, runs)       # a strategy's exception propagates (contain_errors=False)
    stalled = next((run.result.error for run in runs if run.result.error), None)
    if stalled is not None:
        raise RuntimeError(stalled)
    return [run.result for run in runs]


def build_prompt(tokenizer, prompt, chat: bool | None = None) -> ThinkPrompt:
    """A string becomes a user message when the model has a chat template (unless chat=False); a
    list of messages always uses the template; a list of token ids is used as is."""
    if isinstance(prompt, str):
        if not (chat if chat is not None else bool(tokenizer.chat_template)):
            return ThinkPrompt(tokenizer.encode(prompt), None, prompt)
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
        return ThinkPrompt.from_messages(prompt, tokenizer.encode(text, add_special_tokens=False))
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return ThinkPrompt(list(prompt), None, tokenizer.decode(list(prompt)))
    raise ValueError("a think prompt is a string, a list of chat messages or a list of token ids")


def start_think_request(engine: LLMEngine, prompt: ThinkPrompt | list[dict], options: dict,
                        request_id: str | None = None) -> ThinkRun:
    """For the server's engine loop: call on the loop thread, between engine steps; then call
    `run.advance()` after every engine step until it returns True. Errors after the start end
    only this request (`result.error`). `prompt`: chat messages, or a ThinkPrompt already rendered."""
    options = dict(options)
    strategy = options.pop("strategy", DEFAULT_STRATEGY)
    return start_think(engine, prompt, strategy, request_id=request_id, contain_errors=True, **options)


@dataclass(frozen=True)
class ThinkProgram:
    """A think request as a program factory (ponder/engine/programs.py) made of plain values — the
    prompt, "strategy" and its options — so it can be sent to another process (an engine replica)
    and the program built there: calling it with an engine starts the run, on the thread that
    steps that engine."""

    prompt: ThinkPrompt | tuple[dict, ...]
    options: dict
    request_id: str | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        """The rendered prompt's ids (empty for chat messages not yet rendered), for routing."""
        return self.prompt.ids if isinstance(self.prompt, ThinkPrompt) else []

    def __call__(self, engine: LLMEngine) -> ThinkRun:
        prompt = self.prompt if isinstance(self.prompt, ThinkPrompt) else list(self.prompt)
        return start_think_request(engine, prompt, self.options, self.request_id)


def think_program(prompt: ThinkPrompt | list[dict], options: dict, request_id: str | None = None) -> ThinkProgram:
    """A think request as a program factory for an engine's driver (the async engine calls it on
    the engine thread). Built from plain values: the prompt, "strategy" and its options."""
    return ThinkProgram(prompt if isinstance(prompt, ThinkPrompt) else tuple(dict(m) for m in prompt),
                        dict(options), request_id)


def run_think_request(engine: LLMEngine, messages: list[dict], options: dict) -> ThinkResult:
    """Blocking: run a think request to the end, stepping the engine here (only when nothing else
    drives this engine)."""
    run = start_think_request(engine, messages, options)
    run_programs(engine, [run])
    return run.result

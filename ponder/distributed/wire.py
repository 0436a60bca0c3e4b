"""What travels between a replica and the front end: output deltas, and errors that keep their kind.

An engine's RequestOutput is cumulative (all the text and tokens so far). Sending it whole every
step costs O(length²) over a request; a replica sends only what changed (`OutputEncoder`), and the
front end rebuilds the cumulative output (`OutputDecoder`), so the server's renderers read exactly
what they would read from a local engine. Outputs only grow, except that a stop string can cut the
end of the text: a delta therefore says how much of what was sent still stands (`keep`) and what
follows it.

In P/D mode a prefill replica tells the front end that a request's KV waits in the object store
with a `HandoffReady`, holding the reference in a list (so Ray passes it on without fetching it);
a think request's prompt, prefilled by a program, ends that program with a `PromptReady`.

Exceptions pickle their message only (EngineUnavailable would lose its Retry-After, RequestFailed
the option at fault), so errors travel as `WireError` and are rebuilt on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ponder.engine.streams import EngineDeadError, EngineUnavailable, RequestAborted, RequestFailed
from ponder.outputs import CompletionOutput, RequestOutput, Usage

_ERRORS = {cls.__name__: cls for cls in (EngineUnavailable, EngineDeadError, RequestAborted, RequestFailed,
                                         ValueError)}


@dataclass
class WireError:
    """An exception of a kind the server answers for (see server/generation.py's api_error)."""

    kind: str
    message: str
    option: str | None = None          # RequestFailed's option at fault
    retry_after: int | None = None     # EngineUnavailable's

    @classmethod
    def of(cls, exc: BaseException) -> "WireError":
        kind = next((name for name, known in _ERRORS.items() if isinstance(exc, known)), "RequestFailed")
        message = str(exc) if kind in _ERRORS and type(exc).__name__ == kind else f"{type(exc).__name__}: {exc}"
        return cls(kind, message, getattr(exc, "option", None), getattr(exc, "retry_after", None))

    def exception(self) -> Exception:
        if self.kind == "EngineUnavailable":
            return EngineUnavailable(self.message, self.retry_after)
        if self.kind == "RequestFailed":
            return RequestFailed(self.message, self.option)
        return _ERRORS.get(self.kind, RequestFailed)(self.message)


@dataclass
class HandoffReady:
    """A prefill replica's request whose prompt KV (an engine Handoff) is in Ray's object store."""

    request_id: str                    # the engine request
    refs: list                         # [ObjectRef of the Handoff]: a list, so Ray does not resolve it
    kv_bytes: int
    cost_tokens: int                   # router load it brings a decode replica (router.cost_tokens)


@dataclass
class PromptReady:
    """A prefill replica's PrefillPrompt program result as the front end gets it: the prompt's KV
    (an engine PromptKV) is in Ray's object store."""

    refs: list                         # [ObjectRef of the PromptKV]: a list, so Ray does not resolve it
    kv_bytes: int
    error: str | None = None           # (a program result's field: it succeeded)


@dataclass
class Tail:
    """The new state of a sequence (text or list) is its first `keep` items as sent, then `items`."""

    keep: int
    items: Sequence

    def apply(self, old):
        return old[:self.keep] + self.items


@dataclass
class CompletionDelta:
    index: int
    text: Tail
    token_ids: Tail
    logprobs: Tail | None              # None: the completion keeps no logprobs
    finish_reason: str | None
    stop_reason: str | int | None


@dataclass
class OutputDelta:
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    error: str | None
    usage: Usage
    prompt_logprobs: Tail | None
    prompt: str | None = None                      # these two in a request's first delta only
    prompt_token_ids: list[int] | None = None


def _tail(sent: int, new: Sequence) -> tuple[Tail, int]:
    keep = min(sent, len(new))
    return Tail(keep, new[keep:]), len(new)


@dataclass
class _Sent:
    """How much of one request's output a replica has sent."""

    text: dict[int, int] = field(default_factory=dict)        # per completion index
    tokens: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, int] = field(default_factory=dict)
    prompt_logprobs: int = 0
    opened: bool = False


class OutputEncoder:
    """Replica side: each request's output as a delta against what was sent before."""

    def __init__(self):
        self._sent: dict[str, _Sent] = {}

    def encode(self, out: RequestOutput) -> OutputDelta:
        sent = self._sent.setdefault(out.request_id, _Sent())
        completions = []
        for c in out.outputs:
            text, sent.text[c.index] = _tail(sent.text.get(c.index, 0), c.text)
            tokens, sent.tokens[c.index] = _tail(sent.tokens.get(c.index, 0), c.token_ids)
            logprobs = None
            if c.logprobs is not None:
                logprobs, sent.logprobs[c.index] = _tail(sent.logprobs.get(c.index, 0), c.logprobs)
            completions.append(CompletionDelta(c.index, text, tokens, logprobs, c.finish_reason, c.stop_reason))
        prompt_logprobs = None
        if out.prompt_logprobs is not None:
            prompt_logprobs, sent.prompt_logprobs = _tail(sent.prompt_logprobs, out.prompt_logprobs)
        delta = OutputDelta(out.request_id, completions, out.finished, out.error, out.usage, prompt_logprobs)
        if not sent.opened:
            delta.prompt, delta.prompt_token_ids, sent.opened = out.prompt, list(out.prompt_token_ids), True
        if out.finished:
            del self._sent[out.request_id]
        return delta

    def forget(self, request_ids: list[str]) -> None:
        """Drop what was sent of requests that ended without a finished output (aborted, failed)."""
        for rid in request_ids:
            self._sent.pop(rid, None)


class OutputDecoder:
    """Front-end side: the cumulative RequestOutput each delta brings a request to."""

    def __init__(self):
        self._outputs: dict[str, RequestOutput] = {}

    def decode(self, delta: OutputDelta) -> RequestOutput:
        out = self._outputs.get(delta.request_id)
        if out is None:
            if delta.prompt_token_ids is None:
                raise ValueError(f"the first delta of request {delta.request_id} carries no prompt")
            out = self._outputs[delta.request_id] = RequestOutput(delta.request_id, delta.prompt,
                                                                  delta.prompt_token_ids, [])
        completions = {c.index: c for c in out.outputs}
        for d in delta.completions:
            old = completions.get(d.index) or CompletionOutput(d.index, "", [])
            logprobs = d.logprobs.apply(old.logprobs or []) if d.logprobs is not None else old.logprobs
            completions[d.index] = CompletionOutput(d.index, d.text.apply(old.text), d.token_ids.apply(old.token_ids),
                                                    d.finish_reason, d.stop_reason, logprobs)
        prompt_logprobs = (delta.prompt_logprobs.apply(out.prompt_logprobs or [])
                           if delta.prompt_logprobs is not None else out.prompt_logprobs)
        # new objects every time: a reader may still hold the previous ones
        out = RequestOutput(out.request_id, out.prompt, out.prompt_token_ids,
                            [completions[i] for i in sorted(completions)], delta.finished, delta.error,
                            delta.usage, prompt_logprobs)
        if out.finished:
            del self._outputs[out.request_id]
        else:
            self._outputs[out.request_id] = out
        return out


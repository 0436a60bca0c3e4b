"""Engine outputs -> OpenAI response bodies and stream chunks (plain dicts: cheap per token).

A DeltaTracker turns the engine's cumulative outputs into per-choice deltas. While a choice runs it
holds back the last (longest stop string - 1) characters, which a stop string found on a later
token could still cut away, so the streamed deltas always add up to the final text. A non-streamed
response is the same thing in one step: a fresh tracker over the final outputs. With echo (or
vLLM's prompt_logprobs), a choice's first delta also carries the prompt, once it is computed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

from ponder.model.tokenizer import Tokenizer
from ponder.outputs import Logprob, RequestOutput
from ponder.sampling_params import SamplingParams
from ponder.server.chat_output import ChoiceParser, Parsed


@dataclass
class PromptEcho:
    """The prompt a completion choice starts with (echo): its text, and with logprobs its tokens
    and their logprobs (entry 0 None: nothing predicts the first token)."""

    text: str
    token_ids: list[int]
    logprobs: list[Logprob | None] | None


@dataclass
class ChoiceDelta:
    index: int                       # prompt index x n + completion index
    text: str
    logprobs: list[Logprob] | None   # of the tokens new in this delta; None when not requested
    finish_reason: str | None
    stop_reason: str | int | None
    # a choice's first delta only, once the prompt is computed: the echoed prompt, and vLLM's
    # prompt_logprobs when the request set that field
    echo: PromptEcho | None = None
    prompt_logprobs: list[Logprob | None] | None = None


class DeltaTracker:
    def __init__(self, params: SamplingParams, num_prompts: int, echo: list[str] | None = None,
                 list_prompt_logprobs: bool = False):
        """echo: per prompt, the text its choices start with (None: no echo);
        list_prompt_logprobs: the first delta of each choice carries the prompt's logprobs."""
        self.n = params.n
        self.want_logprobs = params.logprobs is not None
        self.holdback = max((len(s) for s in params.stop_strings), default=1) - 1
        self.echo, self.list_prompt_logprobs = echo, list_prompt_logprobs
        size = num_prompts * params.n
        self._text_sent = [0] * size
        self._tokens_sent = [0] * size
        self._finished = [False] * size
        self._prompt_sent = [echo is None and not list_prompt_logprobs] * size   # True: nothing to send

    def deltas(self, outs: list[RequestOutput | None]) -> list[ChoiceDelta]:
        found = []
        for p, out in enumerate(outs):
            for c in out.outputs if out is not None else ():
                i = p * self.n + c.index
                if self._finished[i]:
                    continue
                finished = c.finish_reason is not None
                end = len(c.text) if finished else max(self._text_sent[i], len(c.text) - self.holdback)
                text = c.text[self._text_sent[i]:end]
                logprobs = None
                if self.want_logprobs:
                    logprobs = (c.logprobs or [])[self._tokens_sent[i]:]
                    self._tokens_sent[i] += len(logprobs)
                # the prompt goes with the first token: by then all of it is computed and scored
                prompt = not self._prompt_sent[i] and bool(c.token_ids or finished)
                if not (text or logprobs or finished or prompt):
                    continue
                self._text_sent[i] = end
                self._finished[i] = finished
                delta = ChoiceDelta(i, text, logprobs, c.finish_reason, c.stop_reason)
                if prompt:
                    self._prompt_sent[i] = True
                    self._add_prompt(delta, p, out)
                found.append(delta)
        return found

    def _add_prompt(self, delta: ChoiceDelta, p: int, out: RequestOutput) -> None:
        # a request that ended before its prompt was computed has logprobs for a part of it only
        scored = out.prompt_logprobs or []
        scored = scored + [None] * (len(out.prompt_token_ids) - len(scored))
        if self.echo is not None:
            delta.echo = PromptEcho(self.echo[p], out.prompt_token_ids, scored if self.want_logprobs else None)
        if self.list_prompt_logprobs:
            delta.prompt_logprobs = scored


def usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(o.usage.prompt_tokens for o in outs)
    completion = sum(o.usage.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.usage.prompt_tokens_cached for o in outs)}}


class TokenTexts:
    """Token id -> its text (special tokens included), cached: logprobs name many tokens per step."""

    def __init__(self, tokenizer: Tokenizer):
        self.text = lru_cache(maxsize=1 << 16)(lambda token_id: tokenizer.decode([token_id], False))


class Renderer:
    """The envelope both endpoints share; subclasses render a choice and its logprobs."""

    object: str
    chunk_object: str

    def __init__(self, request_id: str, model: str, texts: TokenTexts):
        self.request_id, self.model, self.texts = request_id, model, texts
        self.created = int(time.time())

    def response(self, deltas: list[ChoiceDelta], usage: dict) -> dict:
        return {"id": self.request_id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self.choice(d) for d in deltas], "usage": usage}

    def chunk(self, choices: list[dict], include_usage: bool, usage: dict | None = None) -> dict:
        body = {"id": self.request_id, "object": self.chunk_object, "created": self.created,
                "model": self.model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return body

    done_marker: str | None = "data: [DONE]\n\n"   # what ends a stream

    def opening_chunks(self, num_choices: int, include_usage: bool, usage: dict | None = None) -> list[dict]:
        """Chunks sent before any token (the chat role)."""
        return []

    def closing_chunks(self, include_usage: bool, usage: dict) -> list[dict]:
        """Chunks sent after the last token: the usage, when asked for."""
        return [self.chunk([], True, usage)] if include_usage else []

    def choice(self, delta: ChoiceDelta) -> dict:
        """A choice of a whole response."""
        raise NotImplementedError

    def stream_choices(self, delta: ChoiceDelta) -> list[dict]:
        """A delta as streamed choices, one chunk each (a tool call takes more than one)."""
        return [self.choice(delta)]


class CompletionRenderer(Renderer):
    object = chunk_object = "text_completion"

    def __init__(self, request_id: str, model: str, texts: TokenTexts):
        super().__init__(request_id, model, texts)
        self._text_offsets: dict[int, int] = {}     # choice -> characters of the tokens rendered so far

    def choice(self, delta: ChoiceDelta) -> dict:
        body = {"index": delta.index, "text": (delta.echo.text if delta.echo else "") + delta.text,
                "logprobs": self._logprobs(delta), "finish_reason": delta.finish_reason,
                "stop_reason": delta.stop_reason}
        if delta.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._prompt_logprobs(delta.prompt_logprobs)
        return body

    def _logprobs(self, delta: ChoiceDelta) -> dict | None:
        """The legacy shape: the chosen token's logprob, and the top alternatives with it; with
        echo, the prompt's tokens first (the first with null logprobs, as OpenAI and vLLM)."""
        if delta.logprobs is None:
            return None
        entries = [(lp.token_id, lp) for lp in delta.logprobs]
        if delta.echo is not None and delta.echo.logprobs is not None:
            entries = list(zip(delta.echo.token_ids, delta.echo.logprobs)) + entries
        text = self.texts.text
        tokens, chosen, tops, offsets = [], [], [], []
        offset = self._text_offsets.get(delta.index, 0)
        for token_id, lp in entries:
            token = text(token_id)
            tokens.append(token)
            chosen.append(None if lp is None else _finite(lp.logprob))
            tops.append(None if lp is None else
                        {text(t): _finite(v) for t, v in {**lp.top, lp.token_id: lp.logprob}.items()})
            offsets.append(offset)
            offset += len(token)
        self._text_offsets[delta.index] = offset
        return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}

    def _prompt_logprobs(self, entries: list[Logprob | None]) -> list[dict | None]:
        """vLLM's shape: per prompt token, None for the first, else token id -> logprob, rank and
        decoded text, over the top alternatives and the prompt's own token."""
        return [None if lp is None else self._ranked(lp) for lp in entries]

    def _ranked(self, lp: Logprob) -> dict:
        ranked = {t: (v, k + 1) for k, (t, v) in enumerate(lp.top.items())}
        ranked[lp.token_id] = (lp.logprob, lp.rank)
        return {str(t): {"logprob": _finite(v), "rank": r, "decoded_token": self.texts.text(t)}
                for t, (v, r) in ranked.items()}


class ChatRenderer(Renderer):
    """Chat choices; with `options` (server/chat_output.py's ChoiceParser: reasoning, in_reasoning,
    tools) the text splits into content, reasoning_content and tool_calls."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, texts: TokenTexts, **options):
        super().__init__(request_id, model, texts)
        self._options = {k: v for k, v in options.items() if v}
        self._parsers: dict[int, ChoiceParser] = {}

    def opening_chunks(self, num_choices: int, include_usage: bool, usage: dict | None = None) -> list[dict]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], include_usage, usage) for i in range(num_choices)]

    def choice(self, delta: ChoiceDelta) -> dict:
        parsed = self._parse(delta)
        message = {"role": "assistant", "content": parsed.content if not parsed.calls else (parsed.content.strip() or None)}
        if parsed.reasoning:
            message["reasoning_content"] = parsed.reasoning
        if parsed.calls:
            message["tool_calls"] = [c.body() for c in parsed.calls]
        return {"index": delta.index, "message": message, "logprobs": self._logprobs(delta),
                "finish_reason": self._finish_reason(delta), "stop_reason": delta.stop_reason}

    def stream_choices(self, delta: ChoiceDelta) -> list[dict]:
        """Content and reasoning first; then per tool call its id and name, then its arguments."""
        parsed = self._parse(delta)
        first = {}
        if parsed.content:
            first["content"] = parsed.content
        if parsed.reasoning:
            first["reasoning_content"] = parsed.reasoning
        deltas = [first] if first else []
        calls_before = len(self._parsers[delta.index].calls) - len(parsed.calls) if self._options else 0
        for k, call in enumerate(parsed.calls, start=calls_before):
            deltas.append({"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
        out = [{"index": delta.index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        if not out:
            if delta.finish_reason is None and not delta.logprobs:
                return []                     # all held back (a tag that may be starting)
            out = [{"index": delta.index, "delta": {}, "logprobs": None, "finish_reason": None}]
        out[0]["logprobs"] = self._logprobs(delta)
        out[-1].update(finish_reason=self._finish_reason(delta), stop_reason=delta.stop_reason)
        return out

    def _parse(self, delta: ChoiceDelta) -> Parsed:
        if not self._options:
            return Parsed(content=delta.text)
        parser = self._parsers.setdefault(delta.index, ChoiceParser(**self._options))
        return parser.feed(delta.text, final=delta.finish_reason is not None)

    def _finish_reason(self, delta: ChoiceDelta) -> str | None:
        parser = self._parsers.get(delta.index)
        if delta.finish_reason == "stop" and parser is not None and parser.calls:
            return "tool_calls"
        return delta.finish_reason

    def _logprobs(self, delta: ChoiceDelta) -> dict | None:
        if delta.logprobs is None:
            return None
        return {"content": [{**self._token(lp.token_id, lp.logprob),
                             "top_logprobs": [self._token(t, v) for t, v in lp.top.items()]}
                            for lp in delta.logprobs], "refusal": None}

    def _token(self, token_id: int, logprob: float) -> dict:
        token = self.texts.text(token_id)
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def _finite(logprob: float) -> float:
    """JSON has no -inf: clamp as vLLM does."""
    return max(logprob, -9999.0) if not math.isnan(logprob) else -9999.0

"""The think surface of POST /v1/chat/completions: a `"ponder": {"strategy": ..., ...}` object in the
body (what the `openai` SDK sends through `extra_body`) runs a native inference-time-compute
strategy (ponder.think) instead of plain sampling.

This module checks the `ponder` object (every problem is a 400 naming the field, e.g.
`ponder.n`) and renders the result: a chat.completion whose message is the chosen answer, with the
candidates, votes and usage under an extra `ponder` field; streamed, one chat.completion.chunk per
progress event (an empty delta, the event under `ponder`), then the answer as a content delta, a
finish chunk carrying the whole result under `ponder`, the usage chunk if asked for, and [DONE].
"""

from __future__ import annotations

import inspect
import time

from ponder.sampling_params import InvalidOption, SamplingParams
from ponder.server.errors import invalid
from ponder.server.protocol import ChatCompletionRequest, EngineLimits
from ponder.server.responses import ChatRenderer
from ponder.think.result import ThinkResult
from ponder.think.run import DEFAULT_STRATEGY, SAMPLING_FIELDS, THINK_MAX_TOKENS, strategy_name
from ponder.think.options import OPTIONS, check_option, options_of
from ponder.think.catalog import STRATEGIES

# body fields plain sampling has and a think request cannot honour (n: use ponder.n)
_PLAIN_ONLY = ("stop", "stop_token_ids", "logit_bias", "presence_penalty", "frequency_penalty", "min_tokens",
               "ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "top_logprobs", "tools")


# body sampling fields a think request takes unless "ponder" sets them (max_tokens: the body's either field)
_BODY_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


# -- checking the ponder object ---------------------------------------------------------------------
def strategy_options(strategy: str) -> list[str]:
    """The options of a strategy settable over HTTP (its own, then the sampling ones)."""
    return options_of(strategy) + list(SAMPLING_FIELDS)


def think_options(body: ChatCompletionRequest, prompt_len: int, limits: EngineLimits) -> dict:
    """{"strategy": name, **options} for AsyncEngine.think: the `ponder` object checked, with the
    body's temperature, top_p, top_k, min_p, repetition_penalty, seed and max_tokens unless `ponder`
    sets them.
    Raises APIError(400) naming the field at fault."""
    ponder = body.ponder
    for name in _PLAIN_ONLY:
        if getattr(body, name) is not None:
            raise invalid(f"'{name}' is not supported with 'ponder' (a think strategy)", name)
    if body.n != 1:
        raise invalid("'n' must be 1 with 'ponder': the strategy's branches are set by 'ponder.n'", "n")
    if body.logprobs:
        raise invalid("'logprobs' is not supported with 'ponder' (a think strategy)", "logprobs")

    strategy = ponder.get("strategy", DEFAULT_STRATEGY)
    if not isinstance(strategy, str):
        raise invalid(f"'ponder.strategy' must be a string, got {strategy!r}", "ponder.strategy")
    name = strategy_name(strategy)
    if name is None:
        raise invalid(f"Unknown strategy {strategy!r} in 'ponder.strategy'; choose one of "
                      f"{', '.join(STRATEGIES)}", "ponder.strategy")
    valid = strategy_options(name)
    signature = inspect.signature(STRATEGIES[name]).parameters
    options = {}
    for key, value in ponder.items():
        if key == "strategy":
            continue
        param = f"ponder.{key}"
        if key == "structured_outputs":
            raise invalid("give the output constraint at the top level (response_format, structured_outputs, "
                          "guided_*), not in 'ponder'", param)
        if key in SAMPLING_FIELDS:
            options[key] = value               # SamplingParams checks these below
        elif key in OPTIONS and key in signature:
            try:
                options[key] = check_option(key, value)
            except InvalidOption as e:
                raise invalid(f"'{param}'{str(e)[len(e.option):]}", param) from None   # "'ponder.n' must be ..."
        elif key in signature:
            raise invalid(f"'{param}' takes a Python function: it cannot be set over HTTP", param)
        else:
            raise invalid(f"Unknown option '{param}' for strategy {name}; valid: {', '.join(valid)}", param)

    if name == "particle-filtering" and options.get("scorer", "self-eval") != "self-eval":
        raise invalid("particle filtering needs rewards in [0, 1]: of the named scorers only 'self-eval' "
                      f"gives them, got {options['scorer']!r}", "ponder.scorer")
    fields = {k: getattr(body, k) for k in _BODY_SAMPLING + ("max_tokens", "max_completion_tokens")}
    _, merged = think_options_from_body({**fields, "ponder": options})
    origin = {k: f"ponder.{k}" if k in options else k for k in merged}
    max_tokens, max_tokens_field = body._max_tokens()
    if "max_tokens" not in options and max_tokens_field is not None:
        origin["max_tokens"] = max_tokens_field
    if isinstance(merged.get("top_k"), int) and not isinstance(merged["top_k"], bool):
        merged["top_k"] = min(merged["top_k"], limits.vocab_size)
    sampling = {k: v for k, v in merged.items() if k in SAMPLING_FIELDS}
    try:
        SamplingParams(**sampling)
    except (ValueError, TypeError) as e:
        raise invalid(str(e), origin.get(getattr(e, "option", None), "ponder")) from None

    if "max_tokens" in merged:
        body._check_context(prompt_len, merged["max_tokens"], origin["max_tokens"], limits.max_model_len)
    else:              # the strategy's default, within the context
        body._check_context(prompt_len, None, None, limits.max_model_len)
        merged["max_tokens"] = min(THINK_MAX_TOKENS, limits.max_model_len - prompt_len)
    constraint, _ = body.constraint()      # response_format & co: every branch keeps to it
    if constraint is not None:
        merged["structured_outputs"] = constraint
    return {"strategy": name, **merged}


def param_of(error: Exception, options: dict) -> str:
    """The field a strategy's error is about: the first option it names that the request set
    (InvalidOption.options, or RequestFailed.option for one raised later in the run), as
    "ponder.<option>"; else "ponder"."""
    named = getattr(error, "options", None) or (getattr(error, "option", None),)
    return next((f"ponder.{o}" for o in named if o in options and o in OPTIONS), "ponder")


# -- rendering ------------------------------------------------------------------------------------------
class ThinkRenderer:
    """A think result as OpenAI chat JSON: a whole response, or stream chunks."""

    def __init__(self, request_id: str, model: str, texts, include_usage: bool):
        self.chat = ChatRenderer(request_id, model, texts)
        self.include_usage = include_usage

    def response(self, result: ThinkResult) -> dict:
        return chat_completion_response(result, self.chat.model, self.chat.request_id, self.chat.created)

    def opening_chunks(self) -> list[dict]:
        return self.chat.opening_chunks(1, self.include_usage)

    def progress_chunk(self, event: dict) -> dict:
        """A progress event: one choice with an empty delta (so clients that read
        `choices[0].delta.content` see nothing), the event under `ponder`."""
        chunk = self.chat.chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": None}],
                                self.include_usage)
        chunk["ponder"] = event
        return chunk

    def final_chunks(self, result: ThinkResult) -> list[dict]:
        """The answer as one content delta, the finish chunk (the whole result under `ponder`, as in
        the non-streamed response, with "event": "result"), and the usage chunk if asked for."""
        response = self.response(result)
        choice = response["choices"][0]
        chunks = []
        if choice["message"]["content"]:
            chunks.append(self.chat.chunk([{"index": 0, "delta": {"content": choice["message"]["content"]},
                                            "logprobs": None, "finish_reason": None}], self.include_usage))
        finish = self.chat.chunk([{"index": 0, "delta": {}, "logprobs": None,
                                   "finish_reason": choice["finish_reason"]}], self.include_usage)
        finish["ponder"] = {"event": "result", **response["ponder"]}
        chunks.append(finish)
        if self.include_usage:
            chunks.append(self.chat.chunk([], True, response["usage"]))
        return chunks


# -- OpenAI shapes of think requests and results -----------------------------------------------
def think_options_from_body(body: dict) -> tuple[str, dict]:
    """(strategy, options) from an OpenAI chat request with a `"ponder": {"strategy": ...}` field;
    temperature, top_p, top_k, min_p, repetition_penalty, seed and max_tokens of the body apply unless
    "ponder" sets them."""
    ponder = body.get("ponder")
    if not isinstance(ponder, dict):
        raise ValueError('"ponder" must be an object like {"strategy": "self-consistency", "n": 8}')
    options = dict(ponder)
    strategy = options.pop("strategy", DEFAULT_STRATEGY)
    if not isinstance(strategy, str):
        raise ValueError('"ponder.strategy" must be a string')
    for key in _BODY_SAMPLING:
        if body.get(key) is not None:
            options.setdefault(key, body[key])
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        options.setdefault("max_tokens", max_tokens)
    return strategy, options


def chat_completion_response(result: ThinkResult, model: str, request_id: str,
                             created: int | None = None) -> dict:
    """An OpenAI chat.completion body for a think result; the details ride along under "ponder"."""
    usage = result.usage
    completion = usage.get("generated_tokens", 0)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                     "finish_reason": "stop" if result.error is None else "error"}],
        "usage": {"prompt_tokens": result.num_prompt_tokens, "completion_tokens": completion,
                  "total_tokens": result.num_prompt_tokens + completion,
                  "prompt_tokens_details": {"cached_tokens": usage.get("prompt_tokens_cached", 0)}},
        "ponder": result.to_dict(),
    }

"""SamplingParams: what to generate and how, validated at construction.

Names and meanings follow vLLM's SamplingParams and the OpenAI API.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field


class InvalidOption(ValueError):
    """A value that fails validation; `option` names it (as the caller spelled the option), so a
    server can point at the request field at fault without reading the message. A check about
    several options ("n must be >= warmup") names them all, the likeliest culprit first."""

    def __init__(self, option: str | tuple[str, ...], message: str):
        super().__init__(message)
        self.options = (option,) if isinstance(option, str) else tuple(option)
        self.option = self.options[0]


# What a request gets for the sampling fields it leaves unset — the one place these live. The
# engine's `sampling_defaults` option picks them: "model" (the default) is the model's recommended
# sampling over ponder's, "ponder" is ponder's alone (llama.cpp's: small models turn temperature 1
# with no truncation into noise), "none" is SamplingParams' own (temperature 1, nothing truncated:
# OpenAI's and vLLM's meaning of an unset field).
PONDER_SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


def sampling_defaults(source: str, recommended: dict) -> dict:
    """The sampling fields a request gets unless it sets them; `source`: model, ponder or none."""
    if source == "none":
        return {}
    return {**PONDER_SAMPLING_DEFAULTS, **(recommended if source == "model" else {})}


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the generated text (vLLM's StructuredOutputsParams): exactly one of `json`
    (a JSON schema, as a dict or a string), `regex`, `choice` (the text is one of these strings),
    `grammar` (Lark, or llama.cpp's GBNF) or `json_object=True` (any JSON object). The engine
    compiles it with llguidance and masks every token that would break it. JSON may carry
    whitespace between tokens unless `disable_any_whitespace` (vLLM's name: small models can loop
    on whitespace)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.disable_any_whitespace, bool):
            raise InvalidOption("disable_any_whitespace", "disable_any_whitespace must be a boolean")
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object is True else []
        if len(given) != 1:
            raise InvalidOption(tuple(given) or "structured_outputs",
                                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object"
                                + (f"; got {', '.join(given)}" if given else ""))
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidOption("json", f"json must be a JSON schema (an object or a string), got {self.json!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidOption(name, f"{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise InvalidOption("choice", f"choice must be a non-empty list of non-empty strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None) \
            if not self.json_object else "json_object"

    def key(self) -> tuple[str, str]:
        """What identifies the compiled constraint (the grammar cache's key)."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        elif self.kind == "choice":
            value = json.dumps(list(value))
        return self.kind + ("/compact" if self.disable_any_whitespace else ""), str(value)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1            # -1 (or 0) disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    # vLLM's: for every prompt token after the first, its logprob and this many top alternatives
    # (RequestOutput.prompt_logprobs; what lm-eval's loglikelihood tasks score)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    @classmethod
    def with_defaults(cls, defaults: dict, **fields) -> "SamplingParams":
        """Fields given (not None) win over `defaults` (an engine's `sampling_defaults`), which
        win over the dataclass's own."""
        return cls(**{**defaults, **{k: v for k, v in fields.items() if v is not None}})

    def __post_init__(self) -> None:
        check_int(self.n, "n", low=1)
        check_number(self.temperature, "temperature", low=0.0)
        check_number(self.top_p, "top_p", low=0.0, high=1.0)
        if self.top_p == 0.0:
            raise InvalidOption("top_p", "top_p must be in (0, 1], got 0")
        check_int(self.top_k, "top_k", low=-1)
        check_number(self.min_p, "min_p", low=0.0, high=1.0)
        check_number(self.presence_penalty, "presence_penalty", low=-2.0, high=2.0)
        check_number(self.frequency_penalty, "frequency_penalty", low=-2.0, high=2.0)
        check_number(self.repetition_penalty, "repetition_penalty", low=0.0)
        if self.repetition_penalty == 0.0:
            raise InvalidOption("repetition_penalty", "repetition_penalty must be > 0, got 0")
        if self.seed is not None:
            check_int(self.seed, "seed")
        if self.max_tokens is not None:
            check_int(self.max_tokens, "max_tokens", low=1)
        check_int(self.min_tokens, "min_tokens", low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidOption("min_tokens", f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None:
            check_int(self.logprobs, "logprobs", low=0, high=20)
        if self.prompt_logprobs is not None:
            check_int(self.prompt_logprobs, "prompt_logprobs", low=0, high=20)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InvalidOption("logit_bias", "logit_bias must be a dict of token id -> bias")
            bias = {}
            for key, value in self.logit_bias.items():
                try:
                    token = int(key)
                except (TypeError, ValueError):
                    raise InvalidOption("logit_bias", f"logit_bias keys must be token ids, got {key!r}") from None
                check_number(value, "logit_bias", low=-100.0, high=100.0, shown=f"logit_bias[{key}]")
                bias[token] = float(value)
            self.logit_bias = bias
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise InvalidOption("stop", f"stop must be a non-empty string or a list of them, got {s!r}")
        self.stop_strings = tuple(stops)
        if self.stop_token_ids is not None:
            for t in self.stop_token_ids:
                check_int(t, "stop_token_ids", low=0)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise InvalidOption("structured_outputs", "structured_outputs must be a StructuredOutputs")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidOption(name, f"{name} must be a boolean, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> None:
    """Raise InvalidOption unless `value` is an integer (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOption(name, f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise InvalidOption(name, f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InvalidOption(name, f"{name} must be <= {high}, got {value}")


def check_number(value, name: str, low: float | None = None, high: float | None = None,
                 shown: str | None = None) -> None:
    """Raise InvalidOption unless `value` is a finite number in [low, high] (`shown`: the name
    the message uses, when it is more precise than the option's)."""
    shown = shown or name
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidOption(name, f"{shown} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise InvalidOption(name, f"{shown} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InvalidOption(name, f"{shown} must be <= {high}, got {value}")


# -- the command line: the sampling flags of generate, chat and think ---------------------------
_FLAGS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
          "seed": int}


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for the sampling fields; unset ones take the engine's sampling_defaults."""
    g = p.add_argument_group("sampling (unset: the engine's --sampling-defaults)")
    for name, kind in _FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                       help="the request's seed (the engine's is --engine-seed)" if name == "seed" else None)


def sampling_fields(args) -> dict:
    """The sampling fields set on the command line."""
    return {name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None}

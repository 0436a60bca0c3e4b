"""What generation returns: per request, per completion, and usage."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of the chosen token and its top alternatives (token id -> logprob); `rank`
    (1 = the likeliest token) is known for prompt tokens, whose logprobs score a text."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)
    rank: int | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None      # "stop", "length", "abort", "error" or None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[Logprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_cached: int = 0
    spec_draft_tokens: int = 0        # speculative decoding: draft tokens verified, and accepted
    spec_accepted_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    # with SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing
    # predicts it); shorter while the prompt is still being computed
    prompt_logprobs: list[Logprob | None] | None = None

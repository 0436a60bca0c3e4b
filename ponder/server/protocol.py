"""OpenAI request bodies (pydantic, strict types, unknown fields refused) and how they become
engine inputs: prompt token ids and SamplingParams.

Ranges are SamplingParams' to check (one rule, one place); this module adds what only the API
knows: field names as the client spelled them, the context window, token ids within the vocabulary,
and how many choices one request may ask for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

import json

import jinja2
from pydantic import Field, PrivateAttr

from ponder.model.tokenizer import Tokenizer
from ponder.sampling_params import SamplingParams, StructuredOutputs
from ponder.server.body import StrictBody
from ponder.server.errors import APIError, invalid
from ponder.server.chat_output import THINK_OPEN
from ponder.server.structured import StructuredFields
from ponder.server.tools import MessageToolCall, Tool, ToolChoice, ToolUse, template_messages, tool_use

MAX_BODY_BYTES = 16 << 20


@dataclass(frozen=True)
class EngineLimits:
    max_model_len: int
    vocab_size: int
    max_choices: int          # n x prompts in one request (the engine's max_num_seqs)
    sampling_defaults: dict = field(default_factory=dict)   # for the sampling fields a body leaves unset


class StreamOptions(StrictBody):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk carries the usage so far (load testers read it)
    continuous_usage_stats: bool = False


class _GenerationRequest(StructuredFields):
    """Fields both endpoints share: OpenAI's sampling fields, vLLM's extras and the output
    constraints (server/structured.py)."""

    prompt_field: ClassVar[str]

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = Field(None, description="a string or a list of strings")
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="an object mapping token ids to biases in [-100, 100]")
    user: str | None = None
    # Sent by OpenAI SDKs and clients, harmless here, accepted and ignored: request tags, storing
    # the completion for the OpenAI dashboard, the serving tier.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage in every streamed chunk (vLLM's continuous_usage_stats, with include_usage)."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    # -- to the engine ----------------------------------------------------------------------
    def sampling_params(self, prompts: list[list[int]], limits: EngineLimits) -> SamplingParams:
        """SamplingParams for these prompts; raises APIError(400) naming the field at fault."""
        max_tokens, max_tokens_field = self._max_tokens()
        options = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, stop=self.stop,
                       seed=self.seed, presence_penalty=self.presence_penalty,
                       frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias,
                       top_k=None if self.top_k is None else min(self.top_k, limits.vocab_size),
                       min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                       min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
                       stop_token_ids=self.stop_token_ids,
                       include_stop_str_in_output=self.include_stop_str_in_output,
                       skip_special_tokens=self.skip_special_tokens, logprobs=self._logprobs(),
                       prompt_logprobs=self._prompt_logprobs(), structured_outputs=self.constraint()[0])
        options = {k: v for k, v in options.items() if v is not None}
        try:
            params = SamplingParams.with_defaults({**limits.sampling_defaults, "max_tokens": max_tokens}, **options)
        except ValueError as e:
            raise invalid(str(e), self._field_of(e, {"max_tokens": max_tokens_field})) from None
        check_token_ids(params.logit_bias or {}, "logit_bias", limits.vocab_size)
        check_token_ids(params.stop_token_ids or [], "stop_token_ids", limits.vocab_size)
        for ids in prompts:
            self._check_context(len(ids), params.max_tokens if max_tokens_field else None,
                                max_tokens_field, limits.max_model_len)
        return params

    def _check_choices(self, num_prompts: int, limits: EngineLimits) -> None:
        if isinstance(self.n, int) and self.n >= 1 and self.n * num_prompts > limits.max_choices:
            raise invalid(f"n x prompts must be <= {limits.max_choices} (the engine's max_num_seqs), "
                          f"got {self.n} x {num_prompts}", "n" if self.n > limits.max_choices else self.prompt_field)

    def _check_context(self, prompt_len: int, max_tokens: int | None, field: str | None,
                       max_model_len: int) -> None:
        if prompt_len >= max_model_len:
            raise invalid(f"This model's maximum context length is {max_model_len} tokens, but the "
                          f"prompt is {prompt_len} tokens (at least one more is needed to generate). "
                          f"Please reduce the length of the {self.prompt_field}.",
                          self.prompt_field, "context_length_exceeded")
        if max_tokens is not None and prompt_len + max_tokens > max_model_len:
            raise invalid(f"This model's maximum context length is {max_model_len} tokens. However, you "
                          f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                          f"{max_tokens} for the completion). Please reduce the length of the "
                          f"{self.prompt_field} or {field}.", field, "context_length_exceeded")

    def _field_of(self, error: ValueError, aliases: dict[str, str | None]) -> str | None:
        """The request field a SamplingParams error is about (InvalidOption.option), as the client
        named it."""
        option = getattr(error, "option", None)
        name = aliases.get(option, option)
        return name if name in type(self).model_fields else None

    def _max_tokens(self) -> tuple[int | None, str | None]:
        """The completion length limit and the field that set it (None: the default applies)."""
        raise NotImplementedError

    def _logprobs(self) -> int | None:
        raise NotImplementedError

    def _prompt_logprobs(self) -> int | None:
        return None

    @property
    def echoes(self) -> bool:
        """The choices start with the prompt (completions' echo)."""
        return False

    @property
    def lists_prompt_logprobs(self) -> bool:
        """The choices carry vLLM's prompt_logprobs (completions' field of that name)."""
        return False

    def echoed_prompts(self, prompts: list[list[int]], tokenizer: Tokenizer) -> list[str] | None:
        """The prompt texts the choices start with, or None."""
        return None


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt_field: ClassVar[str] = "prompt"

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids or a list of lists of token ids")
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    prompt_logprobs: int | None = None     # vLLM's extra: listed as the choice's prompt_logprobs

    def prompt_token_ids(self, tokenizer: Tokenizer, limits: EngineLimits) -> list[list[int]]:
        prompts = self._prompt_list()
        if not prompts:
            raise invalid("prompt must not be empty", "prompt")
        self._check_choices(len(prompts), limits)
        for p in prompts:
            if not isinstance(p, str):      # before anything decodes them (echo)
                check_token_ids(p, "prompt", limits.vocab_size)
        return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    def _max_tokens(self) -> tuple[int | None, str | None]:
        return self.max_tokens, ("max_tokens" if "max_tokens" in self.model_fields_set else None)

    def output_options(self) -> dict:
        return {}

    def _logprobs(self) -> int | None:
        return self.logprobs

    def _prompt_logprobs(self) -> int | None:
        """echo with logprobs scores the prompt too (the legacy logprobs cover it: lm-eval's
        loglikelihood); an explicit prompt_logprobs sets how many alternatives."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None

    @property
    def echoes(self) -> bool:
        return self.echo

    @property
    def lists_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None

    def echoed_prompts(self, prompts: list[list[int]], tokenizer: Tokenizer) -> list[str] | None:
        """Prompt strings as sent; token-id prompts decoded, special tokens kept."""
        if not self.echo:
            return None
        return [p if isinstance(p, str) else tokenizer.decode(ids, skip_special_tokens=False)
                for p, ids in zip(self._prompt_list(), prompts)]

    def _prompt_list(self) -> list[str | list[int]]:
        single = isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int))
        return [self.prompt] if single else self.prompt


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="a string or a list of text parts")
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None     # an assistant's calls
    tool_call_id: str | None = None                     # a tool message: the call it answers
    reasoning_content: str | None = None                # an earlier answer's reasoning (not re-sent)

    def template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:            # templates expect the arguments as an object, not a JSON string
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in self.tool_calls]
        return message


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# documented non-empty; chat_prompt checks it (with the message chat completions have always given)
ChatMessages = Annotated[list[ChatMessage], Field(description="a non-empty list of messages",
                                                  json_schema_extra={"minItems": 1})]


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    prompt_field: ClassVar[str] = "messages"

    messages: ChatMessages
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = Field(None, description='"none", "auto", "required" or '
                                                             '{"type": "function", "function": {"name": ...}}')
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict | None = Field(None, description="extra template variables, e.g. "
                                                                '{"enable_thinking": false}')
    # ponder's extra: run a think strategy (see ponder/server/think.py)
    ponder: dict | None = Field(None, description='an object like {"strategy": "self-consistency", "n": 8}')
    _tools: ToolUse | None = PrivateAttr(None)
    _tool_constraint: StructuredOutputs | None = PrivateAttr(None)
    _output: dict = PrivateAttr(default_factory=dict)

    def prompt_token_ids(self, tokenizer: Tokenizer, limits: EngineLimits) -> list[list[int]]:
        self._check_choices(1, limits)
        self._tools = tool_use(self.tools, self.tool_choice, self.parallel_tool_calls)
        text = chat_prompt(self.messages, tokenizer, tools=self._tools, template_kwargs=self.chat_template_kwargs)
        self._tool_constraint = self._tools.constraint(tokenizer) if self._tools else None
        thinks = THINK_OPEN in (tokenizer.chat_template or "")
        self._output = {"reasoning": thinks, "in_reasoning": thinks and text.rstrip().endswith(THINK_OPEN),
                        "tools": tuple(t.function.name for t in self._tools.tools) if self._tools else ()}
        return [tokenizer.encode(text, add_special_tokens=False)]

    def output_options(self) -> dict:
        """How the answer's text splits (server/chat_output.py): think blocks, tool calls."""
        return self._output

    def constraint(self):
        """The body's output constraint, or the grammar that tool_choice "required" or a named
        function implies (the two cannot be combined)."""
        structured, origin = super().constraint()
        if self._tool_constraint is None:
            return structured, origin
        if structured is not None:
            raise invalid("tool_choice \"required\" or a named function cannot be combined with another "
                          "output constraint", "tool_choice")
        return self._tool_constraint, {"grammar": "tool_choice"}

    def _max_tokens(self) -> tuple[int | None, str | None]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        if self.max_tokens is not None:
            return self.max_tokens, "max_tokens"
        return None, None

    def _logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
            return None
        return self.top_logprobs or 0

    def _field_of(self, error: ValueError, aliases: dict[str, str | None]) -> str | None:
        return super()._field_of(error, {**aliases, "logprobs": "top_logprobs"})


def chat_prompt(messages: list[ChatMessage], tokenizer: Tokenizer, add_generation_prompt: bool = True,
                tools: ToolUse | None = None, template_kwargs: dict | None = None) -> str:
    """The messages rendered with the model's chat template (for chat completions and /tokenize
    alike, so both count the same tokens), with the tools (server/tools.py) and extra template
    variables; a 400 naming `messages` if they cannot be."""
    if not messages:
        raise invalid("messages must contain at least one message", "messages")
    rendered, options = template_messages([m.template_input() for m in messages], tools, tokenizer)
    try:
        return tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt,
                                             **{**(template_kwargs or {}), **options})
    except (ValueError, TypeError, jinja2.TemplateError) as e:
        raise invalid(f"The model's chat template cannot render these messages: {e}", "messages") from None


def check_token_ids(ids, field: str, vocab_size: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(f"{field} has token id {bad}, outside the vocabulary [0, {vocab_size})", field)


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"The model `{requested}` does not exist. This server serves `{served}`.",
                       "model", "model_not_found")

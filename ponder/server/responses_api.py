"""OpenAI's Responses API (`POST /v1/responses`), stateless as Ollama's: text and function-call
items in, a response object (or its stream of typed events) out.

A responses request is translated into a chat request (instructions -> a system message,
function_call / function_call_output items -> assistant tool calls and tool messages, text.format
-> response_format, max_output_tokens -> max_completion_tokens) and runs as one; errors name the
responses field. `ResponsesRenderer` renders the chat choice's parts (server/chat_output.py) as
output items: a message with output_text, function_call items, reasoning.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import Field

from ponder.server.body import StrictBody
from ponder.server.errors import APIError, invalid
from ponder.server.protocol import ChatCompletionRequest
from ponder.server.responses import ChatRenderer, ChoiceDelta, TokenTexts
from ponder.server.tools import ToolFunction



class ContentPart(StrictBody):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list | None = None


class _Item(StrictBody):
    """What every item a client sends back may carry (as the API returned it)."""

    id: str | None = None
    status: str | None = None


class MessageItem(_Item):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class FunctionTool(ToolFunction):
    """A function tool, flat as the Responses API spells it (chat nests it under "function")."""

    type: Literal["function"]


class NamedFunction(StrictBody):
    type: Literal["function"]
    name: str


class TextFormat(StrictBody):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(StrictBody):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(StrictBody):
    """POST /v1/responses."""

    model: str | None = None
    input: str | list[MessageItem | FunctionCallItem | FunctionCallOutputItem] = Field(
        description="a string, or a list of message, function_call and function_call_output items")
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    previous_response_id: str | None = None
    # sent by SDKs and harmless here (stateless: nothing is stored)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    user: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict | None = None
    include: list[str] | None = None

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat request; raises APIError(400) naming the responses field."""
        if self.previous_response_id is not None:
            raise invalid("this server keeps no responses (stateless): send the whole conversation in "
                          "'input' instead of previous_response_id", "previous_response_id")
        body = {"model": self.model, "messages": self._messages(), "stream": self.stream}
        for name, value in (("max_completion_tokens", self.max_output_tokens), ("temperature", self.temperature),
                            ("top_p", self.top_p), ("parallel_tool_calls", self.parallel_tool_calls)):
            if value is not None:
                body[name] = value
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                             for t in self.tools]
        if isinstance(self.tool_choice, NamedFunction):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise invalid("text.format of type json_schema needs a schema", "text.format.schema")
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name or "response",
                                                                              "schema": fmt.schema_}}
        elif fmt is not None and fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        return ChatCompletionRequest.model_validate(body)

    def _messages(self) -> list[dict]:
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                    messages[-1]["tool_calls"].append(call)     # parallel calls: one assistant turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        if not messages or all(m["role"] == "system" for m in messages):
            raise invalid("input must hold at least one message", "input")
        return messages


# chat fields -> the responses fields they come from, for errors
_FIELD = {"max_completion_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format",
          "response_format.json_schema.schema": "text.format.schema", "n": "input"}


def responses_error(error: APIError) -> APIError:
    """A chat request's error, naming the responses field."""
    if error.param is not None:
        error.param = _FIELD.get(error.param, error.param)
    return error


class ResponsesRenderer(ChatRenderer):
    """The chat choice as a response object, or as the Responses API's stream of events."""

    def __init__(self, request_id: str, model: str, texts: TokenTexts, body: ResponsesRequest, **options):
        super().__init__(request_id, model, texts, **options)
        self.body, self.created = body, int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.items: list[dict] = []          # output items so far (streaming)
        self.text = self.reasoning = ""
        self.sequence = 0
        self.finish_reason: str | None = None

    # -- whole ----------------------------------------------------------------------------------
    def response(self, deltas: list[ChoiceDelta], usage: dict) -> dict:
        parsed = self._parse(deltas[0])
        self.finish_reason = deltas[0].finish_reason
        items = []
        if parsed.reasoning:
            items.append(self._reasoning_item(parsed.reasoning))
        if parsed.content.strip() or not parsed.calls:
            items.append(self._message_item(parsed.content.strip() if parsed.calls else parsed.content))
        items += [self._call_item(c) for c in parsed.calls]
        return self._object("completed" if self.finish_reason != "length" else "incomplete", items, usage)

    # -- streamed -------------------------------------------------------------------------------
    def opening_chunks(self, num_choices: int, include_usage: bool, usage: dict | None = None) -> list[dict]:
        shell = self._object("in_progress", [], None)
        return [self._event("response.created", response=shell), self._event("response.in_progress", response=shell)]

    def chunk(self, choices: list[dict], include_usage: bool, usage: dict | None = None) -> dict:
        return choices[0]                    # each "choice" is a whole event already

    def stream_choices(self, delta: ChoiceDelta) -> list[dict]:
        parsed = self._parse(delta)
        events = []
        if parsed.reasoning:
            self.reasoning += parsed.reasoning
        if parsed.content:
            if not self.text and not any(i["type"] == "message" for i in self.items):
                events += self._open_message()
            self.text += parsed.content
            events.append(self._event("response.output_text.delta", item_id=self.message_id,
                                      output_index=self._index(self.message_id), content_index=0,
                                      delta=parsed.content))
        for call in parsed.calls:
            item = self._call_item(call)
            self.items.append(item)
            index = len(self.items) - 1
            events.append(self._event("response.output_item.added", output_index=index,
                                      item={**item, "arguments": "", "status": "in_progress"}))
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=index, delta=call.arguments))
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, arguments=call.arguments))
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        return events

    def closing_chunks(self, include_usage: bool, usage: dict) -> list[dict]:
        events = []
        if any(i["type"] == "message" for i in self.items):
            index, part = self._index(self.message_id), {"type": "output_text", "text": self.text, "annotations": []}
            message = self._message_item(self.text)
            self.items[index] = message
            events += [self._event("response.output_text.done", item_id=self.message_id, output_index=index,
                                   content_index=0, text=self.text),
                       self._event("response.content_part.done", item_id=self.message_id, output_index=index,
                                   content_index=0, part=part),
                       self._event("response.output_item.done", output_index=index, item=message)]
        if self.reasoning:
            self.items.insert(0, self._reasoning_item(self.reasoning))
        status = "incomplete" if self.finish_reason == "length" else "completed"
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return events + [self._event(kind, response=self._object(status, self.items, usage))]

    done_marker = None                      # the Responses API ends with its last event, no [DONE]

    # -- pieces ---------------------------------------------------------------------------------
    def _open_message(self) -> list[dict]:
        self.items.append({"type": "message", "id": self.message_id, "status": "in_progress", "role": "assistant",
                           "content": []})
        index = len(self.items) - 1
        return [self._event("response.output_item.added", output_index=index, item=self.items[index]),
                self._event("response.content_part.added", item_id=self.message_id, output_index=index,
                            content_index=0, part={"type": "output_text", "text": "", "annotations": []})]

    def _index(self, item_id: str) -> int:
        return next(i for i, item in enumerate(self.items) if item["id"] == item_id)

    def _message_item(self, text: str) -> dict:
        return {"type": "message", "id": self.message_id, "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    @staticmethod
    def _call_item(call) -> dict:
        return {"type": "function_call", "id": f"fc_{call.id.removeprefix('call_')}", "call_id": call.id,
                "name": call.name, "arguments": call.arguments, "status": "completed"}

    @staticmethod
    def _reasoning_item(text: str) -> dict:
        return {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    def _event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def _object(self, status: str, items: list[dict], usage: dict | None) -> dict:
        body = self.body
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
            else {"type": "text"}
        return {
            "id": self.request_id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": items, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "metadata": body.metadata or {},
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "tool_choice": body.tool_choice if isinstance(body.tool_choice, str) or body.tool_choice is None
            else body.tool_choice.model_dump(), "parallel_tool_calls": body.parallel_tool_calls is not False,
            "text": {"format": fmt}, "previous_response_id": None, "store": False, "truncation": "disabled",
            "usage": _usage(usage),
        }


def _usage(usage: dict | None) -> dict | None:
    if usage is None:
        return None
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)},
            "output_tokens_details": {"reasoning_tokens": 0}}

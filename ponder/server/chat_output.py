"""A chat choice's text, split as OpenAI clients expect it: `<think>…</think>` into
`reasoning_content`, `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks (the Hermes
format of the Qwen2.5 templates, and of ponder's fallback for templates without tools) into
`tool_calls`, the rest into `content`.

The same parser serves whole responses (fed the final text at once) and streams (fed each delta):
text that could still be the start of a tag is held back until it cannot, so the streamed pieces
add up to the whole response's fields.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_CALLS = "[TOOL_CALLS]"          # Mistral's templates: the tag, then a JSON list of calls


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str           # a JSON object, as a string (OpenAI's shape)

    def body(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class ChoiceParser:
    """Splits one choice's text as it arrives (see the module's docstring).

    `reasoning`: look for a think block (only at the start of the answer); `in_reasoning`: the
    prompt opened one already (a template that ends the generation prompt with `<think>`);
    `tools`: the names of the tools the answer may call (their blocks are parsed). Small models
    often answer a call as a bare JSON object without the tags: an answer that is exactly one
    `{"name": <a tool>, "arguments": {...}}` is a call too (held back until it ends, since it
    cannot be told apart before).
    """

    def __init__(self, reasoning: bool = False, in_reasoning: bool = False, tools: tuple[str, ...] = ()):
        self.mode = "reasoning" if in_reasoning else "content"
        self.think_possible = reasoning and not in_reasoning   # a <think> may still open the answer
        self.tools = tuple(tools)
        self.bare_possible = bool(tools)  # the answer may still be a bare JSON call
        self.emitted = False
        self.buffer = ""
        self.strip_next = False          # drop the newlines that follow a closing tag
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool = False) -> Parsed:
        """The parts of `text` (appended to what came before) that can be told apart now; with
        `final`, everything (an unclosed think block is reasoning, an unclosed call is content)."""
        self.buffer += text
        out = Parsed()
        while self.buffer:
            if self.mode == "reasoning":
                if not self._take_until(THINK_CLOSE, out, "reasoning", final):
                    break
                self.mode, self.strip_next = "content", True
            elif self.mode == "mistral":       # no closing tag: the list ends with the answer
                if not final:
                    break
                calls = parse_call_list(self.buffer)
                if calls is None:
                    out.content += MISTRAL_CALLS + self.buffer
                else:
                    self.calls += calls
                    out.calls += calls
                self.buffer = ""
            elif self.mode == "call":
                end = self.buffer.find(CALL_CLOSE)
                if end == -1:
                    if final:
                        out.content += CALL_OPEN + self.buffer
                        self.buffer = ""
                    break
                body, self.buffer = self.buffer[:end], self.buffer[end + len(CALL_CLOSE):]
                call = parse_call(body)
                if call is None:
                    out.content += CALL_OPEN + body + CALL_CLOSE
                else:
                    self.calls.append(call)
                    out.calls.append(call)
                self.mode, self.strip_next = "content", True
            elif not self._content(out, final):
                break
        return out

    def _content(self, out: Parsed, final: bool) -> bool:
        """Emit content up to the next tag, switching mode there; False when it must wait."""
        if self.strip_next:
            self.buffer = self.buffer.lstrip("\n")
            if not self.buffer:
                return False
            self.strip_next = False
        if self.bare_possible and not self.emitted:
            if self.buffer.lstrip().startswith("{"):
                if not final:
                    return False             # wait for the end: a call, or content after all
                call = parse_call(self.buffer)
                if call is not None and call.name in self.tools:
                    self.calls.append(call)
                    out.calls.append(call)
                    self.buffer = ""
                    return False
            if self.buffer.strip():
                self.bare_possible = False
        tags = ([THINK_OPEN] if self.think_possible else []) + ([CALL_OPEN, MISTRAL_CALLS] if self.tools else [])
        if self.think_possible:
            stripped = self.buffer.lstrip()
            if stripped.startswith(THINK_OPEN):
                self.buffer, self.mode, self.think_possible = stripped[len(THINK_OPEN):], "reasoning", False
                return True
            if not final and THINK_OPEN.startswith(stripped):
                return False             # could still be "<think>"
            self.think_possible = False
            tags = tags[1:]
        found = [(i, tag) for tag in tags if (i := self.buffer.find(tag)) != -1]
        if found:
            i, tag = min(found)
            self._emit(out, self.buffer[:i])
            self.buffer = self.buffer[i + len(tag):]
            self.mode = "mistral" if tag == MISTRAL_CALLS else "call"
            return True
        keep = 0 if final else max((_partial_suffix(self.buffer, tag) for tag in tags), default=0)
        self._emit(out, self.buffer[:len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _emit(self, out: Parsed, text: str) -> None:
        out.content += text
        self.emitted = self.emitted or bool(text.strip())

    def _take_until(self, tag: str, out: Parsed, part: str, final: bool) -> bool:
        end = self.buffer.find(tag)
        if end == -1:
            keep = 0 if final else _partial_suffix(self.buffer, tag)
            setattr(out, part, getattr(out, part) + self.buffer[:len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return False
        setattr(out, part, getattr(out, part) + self.buffer[:end])
        self.buffer = self.buffer[end + len(tag):]
        return True


def parse_call(body: str) -> ToolCall | None:
    """One call block's JSON: {"name": str, "arguments": object (or a JSON string of one)}."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_call_list(text: str) -> list[ToolCall] | None:
    """Mistral's `[{"name": ..., "arguments": {...}}, ...]` (None unless every entry is a call)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    calls = [parse_call(json.dumps(entry)) for entry in value]
    return calls if all(c is not None for c in calls) else None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0

"""Tool calling: the request's `tools` and `tool_choice`, the messages that carry calls and their
results, and what they mean for the prompt and the output.

The model's chat template renders the tools when it knows them (the Qwen2.5 templates do, with
Hermes-style `<tool_call>` blocks). A template without tool support (SmolLM2's) gets ponder's
fallback in the same format: the tools described in the system message, earlier calls written as
`<tool_call>` blocks and results as `<tool_response>` user turns. Either way the answer is parsed
by server/chat_output.py. `tool_choice` "required" or a named function constrains the output with
a grammar (one or more call blocks whose JSON matches the tools' schemas), so it always parses;
"auto" leaves the model free; "none" renders no tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal


from ponder.model.tokenizer import Tokenizer
from ponder.sampling_params import StructuredOutputs
from ponder.server.chat_output import CALL_CLOSE, CALL_OPEN
from ponder.server.body import StrictBody
from ponder.server.errors import invalid



class ToolFunction(StrictBody):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(StrictBody):
    type: Literal["function"]
    function: ToolFunction


class NamedFunction(StrictBody):
    name: str


class NamedToolChoice(StrictBody):
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(StrictBody):
    name: str
    arguments: str


class MessageToolCall(StrictBody):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass
class ToolUse:
    """The tools of one request, checked."""

    tools: list[Tool]
    choice: str                  # "auto", "required" or "named"
    name: str | None             # the named function
    parallel: bool

    def template_tools(self) -> list[dict]:
        """The tools as chat templates expect them (OpenAI's shape, plain dicts)."""
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def constraint(self, tokenizer: Tokenizer) -> StructuredOutputs | None:
        """For "required" and a named function: a grammar admitting only call blocks whose JSON
        names an allowed function with arguments matching its parameters."""
        if self.choice == "auto":
            return None
        allowed = [t.function for t in self.tools if self.name in (None, t.function.name)]
        # json.dumps's spacing (what the templates show the model), and no properties beyond
        # those declared unless the schema says otherwise: a small model otherwise invents them
        # until max_tokens
        schema = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
                  "anyOf": [{"type": "object", "properties": {"name": {"const": f.name},
                                                              "arguments": _closed(f.parameters)},
                             "required": ["name", "arguments"], "additionalProperties": False} for f in allowed]}
        repeat = "+" if self.parallel else ""
        grammar = (f'start: call{repeat}\ncall: {_tag(tokenizer, CALL_OPEN)} "\\n" body "\\n" '
                   f'{_tag(tokenizer, CALL_CLOSE)} "\\n"?\nbody: %json {json.dumps(schema)}')
        return StructuredOutputs(grammar=grammar)


def tool_use(tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None) -> ToolUse | None:
    """The request's tool use, or None when no tool may be called. Raises APIError(400) naming
    the field at fault."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice needs tools", "tool_choice")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("tool names must be unique", "tools")
    if choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise invalid(f"tool_choice names {choice.function.name!r}, which is not among the tools "
                          f"({', '.join(names)})", "tool_choice")
        return ToolUse(list(tools), "named", choice.function.name, False)
    return ToolUse(list(tools), choice or "auto", None, parallel is not False)


def template_messages(messages: list[dict], use: ToolUse | None, tokenizer: Tokenizer) -> tuple[list[dict], dict]:
    """The messages and template arguments to render: the template's own tool support, or the
    fallback (see the module's docstring)."""
    if use is not None and supports_tools(tokenizer):
        return messages, {"tools": use.template_tools()}
    if use is None and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages, {}
    if supports_tools(tokenizer):          # history with calls, no tools now: the template renders it
        return messages, {}
    out = [_fallback_message(m) for m in messages]
    if use is not None:
        description = _FALLBACK_SYSTEM.format(tools="\n".join(json.dumps(t) for t in use.template_tools()))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + description}
        else:
            out.insert(0, {"role": "system", "content": description})
    return out, {}


def supports_tools(tokenizer: Tokenizer) -> bool:
    return bool(tokenizer.chat_template) and "tools" in tokenizer.chat_template


_FALLBACK_SYSTEM = """# Tools

You may call one or more functions to assist with the user query. The functions, as JSON:
<tools>
{tools}
</tools>

To call a function, answer with a JSON object with the function's name and arguments within
<tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def _fallback_message(message: dict) -> dict:
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    calls = message.get("tool_calls")
    if not calls:
        return message
    blocks = [f"{CALL_OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}"
              f"\n{CALL_CLOSE}" for c in calls]
    text = "\n".join(([message["content"]] if message.get("content") else []) + blocks)
    return {"role": "assistant", "content": text}


def _closed(parameters: dict | None) -> dict:
    schema = dict(parameters or {"type": "object"})
    if schema.get("type") == "object" and "additionalProperties" not in schema and "properties" in schema:
        schema["additionalProperties"] = False
    return schema


def _tag(tokenizer: Tokenizer, tag: str) -> str:
    """A tag in a grammar: by token id when the tokenizer has it as one (added) token, which
    llguidance matches by id, else as text."""
    ids = tokenizer.encode(tag, add_special_tokens=False)
    return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(tag)

"""The chat output parser: think blocks to reasoning, tool-call blocks to calls, the rest to
content; streamed in any pieces, it gives what the whole text gives."""

from __future__ import annotations

import json
import random

import pytest

from ponder.server.chat_output import ChoiceParser

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CASES = [
    # (text, parser options, content, reasoning, calls)
    ("Hello there.", {}, "Hello there.", "", []),
    ("<think>\nLet me see.\n</think>\n\nIt is 4.", {"reasoning": True}, "It is 4.", "\nLet me see.\n", []),
    ("Let me see.\n</think>\n\nIt is 4.", {"reasoning": True, "in_reasoning": True}, "It is 4.", "Let me see.\n", []),
    ("a <think> b", {"reasoning": True}, "a <think> b", "", []),                  # only at the start
    (CALL, {"tools": ("get_weather", "f")}, "", "", [("get_weather", {"city": "Paris"})]),
    ("Sure.\n" + CALL + "\n" + CALL.replace("Paris", "Rome"), {"tools": ("get_weather", "f")}, "Sure.\n", "",
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    ("<tool_call>not json</tool_call> x", {"tools": ("get_weather", "f")}, "<tool_call>not json</tool_call> x", "", []),
    ("<tool_call>\n{\"name\": \"f\"", {"tools": ("get_weather", "f")}, "<tool_call>\n{\"name\": \"f\"", "", []),   # unclosed
    ("1 < 2 and <tool", {"tools": ("get_weather", "f")}, "1 < 2 and <tool", "", []),
    ("<think>plan</think>" + CALL, {"reasoning": True, "tools": ("get_weather",)}, "", "plan",
     [("get_weather", {"city": "Paris"})]),
    (CALL, {}, CALL, "", []),                                                      # tools off
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', {"tools": ("get_weather",)}, "", "",
     [("get_weather", {"city": "Paris"})]),                                        # a bare JSON call
    ('{"name": "other", "arguments": {}}', {"tools": ("get_weather",)}, '{"name": "other", "arguments": {}}', "", []),
    ('{"a": 1} and more', {"tools": ("get_weather",)}, '{"a": 1} and more', "", []),
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]',
     {"tools": ("get_weather", "f")}, "", "", [("get_weather", {"city": "Paris"}), ("f", {})]),   # Mistral's
    ("[TOOL_CALLS] not json", {"tools": ("f",)}, "[TOOL_CALLS] not json", "", []),
]


def _run(text, options, pieces):
    parser = ChoiceParser(**options)
    content, reasoning, calls = "", "", []
    for i, piece in enumerate(pieces):
        out = parser.feed(piece, final=i == len(pieces) - 1)
        content, reasoning, calls = content + out.content, reasoning + out.reasoning, calls + out.calls
    return content, reasoning, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text, options, content, reasoning, calls", CASES)
def test_whole_and_streamed_agree(text, options, content, reasoning, calls):
    assert _run(text, options, [text]) == (content, reasoning, calls)
    rng = random.Random(len(text))
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])] + [""]
        assert _run(text, options, pieces) == (content, reasoning, calls)
    assert _run(text, options, list(text) + [""]) == (content, reasoning, calls)


def test_partial_tag_is_held_back_until_it_cannot_be_one():
    parser = ChoiceParser(tools=("f",))
    assert parser.feed("x").content == "x"
    assert parser.feed("Hi <tool").content == "Hi "
    assert parser.feed("box>").content == "<toolbox>"

"""Structured output: the text obeys the constraint (JSON schema, regex, choice, grammar) with
n > 1, seeds, stop strings, preemption and think's forks; a bad constraint is refused clearly."""

from __future__ import annotations

import json
import re

import pytest

from ponder import SamplingParams, StructuredOutputs
from ponder.llm import LLM
from ponder.sampling_params import InvalidOption

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}


def _texts(llm, constraint, n=1, prompts=([5, 6, 7],), **sampling):
    params = SamplingParams(**{"max_tokens": 60, "n": n, "structured_outputs": constraint, **sampling})
    return [c for out in llm.generate(list(prompts), params) for c in out.outputs]


@pytest.fixture
def llm(make_tiny_engine):
    return LLM.from_engine(make_tiny_engine())


def test_regex_and_choice_hold_greedy_and_sampled(llm):
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 3}):
        for c in _texts(llm, StructuredOutputs(regex=r"[ab]{3}-[0-9]"), n=3 if sampling["temperature"] else 1,
                        **sampling):
            assert re.fullmatch(r"[ab]{3}-[0-9]", c.text) and c.finish_reason == "stop"
        for c in _texts(llm, StructuredOutputs(choice=["yes", "no", "maybe"]), **sampling):
            assert c.text in ("yes", "no", "maybe")


def test_json_schema_gives_valid_json_for_every_choice(llm):
    outs = _texts(llm, StructuredOutputs(json=SCHEMA, disable_any_whitespace=True), n=4, prompts=([1, 2], [9, 9, 9]), temperature=1.0, seed=1)
    for c in outs:
        value = json.loads(c.text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
    anything = _texts(llm, StructuredOutputs(json_object=True), temperature=1.0, seed=2, max_tokens=200)[0]
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.text), dict)
    else:                             # cut by max_tokens: a prefix of a JSON object
        assert anything.finish_reason == "length" and anything.text.startswith("{")


def test_lark_and_gbnf_grammars(llm):
    lark = StructuredOutputs(grammar='start: "x" NUM\nNUM: /[0-9]{2}/')
    gbnf = StructuredOutputs(grammar='root ::= "x" [0-9] [0-9]')
    for constraint in (lark, gbnf):
        for c in _texts(llm, constraint, temperature=1.0, seed=2, n=2):
            assert re.fullmatch(r"x[0-9]{2}", c.text)


def test_seeded_constrained_output_is_batch_invariant(llm):
    constraint = StructuredOutputs(regex=r"[a-z]{4,8}")
    alone = _texts(llm, constraint, temperature=1.0, seed=11)[0].text
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=11, structured_outputs=constraint),
              SamplingParams(max_tokens=20, temperature=1.0, seed=5)]
    together = llm.generate([[5, 6, 7], [1, 2, 3]], params)
    assert together[0].outputs[0].text == alone


def test_constraint_survives_preemption(make_tiny_engine):
    llm = LLM.from_engine(make_tiny_engine(num_kv_blocks=14, block_size=4))
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=4,
                            structured_outputs=StructuredOutputs(regex=r"(ab|cd){12}"))
    outs = llm.generate([[i, i + 1, i + 2] for i in range(1, 7)], params)
    assert llm.engine.stats()["preemptions"] > 0
    for out in outs:
        assert re.fullmatch(r"(ab|cd){1,12}", out.outputs[0].text)


def test_stop_string_cuts_a_constrained_text(llm):
    c = _texts(llm, StructuredOutputs(regex=r"aaab+"), temperature=0.0, stop=["b"])[0]
    assert c.text == "aaa" and c.stop_reason == "b"


@pytest.mark.parametrize("constraint, field", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="start: undefined_rule"), "grammar"),
    (dict(grammar="oops"), "grammar"),                 # not even GBNF: its converter raises
])
def test_an_invalid_constraint_is_refused_naming_it(llm, constraint, field):
    with pytest.raises(InvalidOption) as e:
        llm.engine.add_request([1, 2], SamplingParams(structured_outputs=StructuredOutputs(**constraint)))
    assert e.value.option == field
    assert not llm.engine.has_unfinished_requests()


def test_exactly_one_constraint():
    with pytest.raises(InvalidOption):
        StructuredOutputs(regex="a", choice=["a"])
    with pytest.raises(InvalidOption):
        StructuredOutputs()
    with pytest.raises(InvalidOption) as e:
        StructuredOutputs(choice=[])
    assert e.value.option == "choice"


def test_think_branches_keep_their_constraint(llm):
    result = llm.think([5, 6, 7], "self-consistency", n=4, chat=False, temperature=1.0, seed=3, max_tokens=30,
                       structured_outputs=StructuredOutputs(choice=["12", "7"]))
    assert {c.text for c in result.candidates} <= {"12", "7"} and len(result.candidates) == 4

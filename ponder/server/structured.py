"""Structured output in request bodies, as OpenAI and vLLM spell it: `response_format`
(text, json_object, json_schema), vLLM's `structured_outputs` object (json, regex, choice,
grammar, json_object) and its older `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`. Each becomes one StructuredOutputs; the field a bad constraint is about is
named in the 400."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ponder.sampling_params import InvalidOption, StructuredOutputs
from ponder.server.body import StrictBody
from ponder.server.errors import invalid



class JsonSchemaFormat(StrictBody):
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="a JSON schema")
    strict: bool | None = None


class ResponseFormat(StrictBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(StrictBody):
    json_: dict | str | None = Field(None, alias="json", description="a JSON schema")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="a Lark or GBNF grammar")
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None


class StructuredFields(StrictBody):
    """The body fields that constrain the output (the base of both generation requests)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint(self) -> tuple[StructuredOutputs | None, dict[str, str]]:
        """The body's constraint, and for each StructuredOutputs field the body field it came
        from (to name it in errors). Raises APIError(400) naming the field at fault."""
        given = [name for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                                   "guided_grammar") if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        if len(given) > 1:
            raise invalid(f"give one output constraint; got {', '.join(given)}", given[1])
        if not given:
            return None, {}
        source = given[0]
        fields, origin = self._fields(source)
        try:
            return StructuredOutputs(**fields), origin
        except InvalidOption as e:
            raise invalid(f"'{origin.get(e.option, source)}': {e}", origin.get(e.option, source)) from None

    def _fields(self, source: str) -> tuple[dict, dict[str, str]]:
        if source == "response_format":
            fmt = self.response_format
            if fmt.type == "json_object":
                return {"json_object": True}, {"json_object": "response_format"}
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise invalid("response_format of type json_schema needs json_schema.schema",
                              "response_format.json_schema")
            return {"json": fmt.json_schema.schema_}, {"json": "response_format.json_schema.schema"}
        if source == "structured_outputs":
            body = self.structured_outputs
            fields = {"json": body.json_, "regex": body.regex, "choice": body.choice, "grammar": body.grammar,
                      "json_object": bool(body.json_object),
                      "disable_any_whitespace": bool(body.disable_any_whitespace)}
            return fields, {k: f"structured_outputs.{k}" for k in fields}
        kind = source.removeprefix("guided_")
        return {kind: getattr(self, source)}, {kind: source}

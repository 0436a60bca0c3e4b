"""/openapi.json documents every body, answer and error, and the server keeps to it: schemathesis
sends requests drawn from the document (valid and invalid) to the tiny model's server and checks
the answers against it."""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from ponder.server.app import ServerConfig
from ponder.server.protocol import ChatCompletionRequest, CompletionRequest
from ponder.server.responses_api import ResponsesRequest
from ponder.server.tokenization import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

BODIES = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
          "/v1/responses": "ResponsesRequest",
          "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}
FIELDS = {"/v1/completions": set(CompletionRequest.model_fields),
          "/v1/chat/completions": set(ChatCompletionRequest.model_fields),
          "/v1/responses": set(ResponsesRequest.model_fields),
          "/tokenize": set(TokenizeCompletionRequest.model_fields) | set(TokenizeChatRequest.model_fields),
          "/detokenize": set(DetokenizeRequest.model_fields)}


def _operations(document: dict) -> dict[str, dict]:
    return {f"{method.upper()} {path}": op for path, ops in document["paths"].items() for method, op in ops.items()}


def test_the_document_names_every_body_and_error(start_tiny_server, tiny_server):
    server = start_tiny_server(ServerConfig(api_key="k3y"))
    document = httpx.get(server.url + "/openapi.json").json()
    operations = _operations(document)
    assert set(operations) == {"GET /health", "GET /metrics", "GET /v1/models", "GET /v1/models/{model}",
                               "POST /v1/completions", "POST /v1/chat/completions", "POST /v1/responses",
                               "POST /tokenize",
                               "POST /detokenize"}
    for path, model in BODIES.items():
        body = operations[f"POST {path}"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert set(operations[f"POST {path}"]["responses"]) >= {"200", "400", "401", "404", "413"}
    schemas = document["components"]["schemas"]
    assert set(schemas["CompletionRequest"]["properties"]) == FIELDS["/v1/completions"]
    assert schemas["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    for label, operation in operations.items():
        assert "422" not in operation["responses"], label       # FastAPI's, never answered here
        for status, answer in operation["responses"].items():
            if status >= "400":
                assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        assert ("security" in operation) == (label not in ("GET /health", "GET /metrics")), label
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    keyless = httpx.get(tiny_server.url + "/openapi.json").json()
    assert "securitySchemes" not in keyless["components"]
    assert not any("security" in operation for operation in _operations(keyless).values())


def _small(context, body):
    """Bodies the tiny model answers at once: a few tokens and choices (think branches too), for the
    model it serves (any other is a 404 at once, which test_errors covers)."""
    if isinstance(body, dict):
        for fields in (body, body.get("ponder")):
            for field, most in (("max_tokens", 4), ("max_completion_tokens", 4), ("max_output_tokens", 4), ("n", 2)):
                if isinstance(fields, dict) and type(fields.get(field)) is int:
                    fields[field] = min(fields[field], most)
        if "messages" in body:
            body.setdefault("max_tokens", 4)
        if "input" in body:
            body.setdefault("max_output_tokens", 4)
        if isinstance(body.get("model"), str):
            body["model"] = "tiny"
    return body


def _ponder_promises(ctx, response, case) -> None:
    """Every answer has an X-Request-Id; every 4xx has the OpenAI shape; a 400 about a JSON object
    names a field of the body, or one the endpoint has (a missing one)."""
    assert response.headers.get("x-request-id"), response.headers
    if not 400 <= response.status_code < 500:
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if response.status_code == 400 and isinstance(case.body, dict):
        param = error["param"]
        assert param is not None, (case.body, error)
        assert param.split(".")[0] in FIELDS[case.operation.path] | set(case.body), (case.body, error)


def test_the_server_keeps_to_its_document(tiny_server):
    schema = schemathesis.openapi.from_url(tiny_server.url + "/openapi.json")
    schema.hook("map_body")(_small)
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def keeps_to_it(case):
        # every default check (no 5xx, documented statuses, content types and answer schemas, invalid
        # bodies refused, ...) but that valid bodies are accepted: ranges and rules across fields
        # (top_p <= 1, min_tokens <= max_tokens) are SamplingParams', and the document does not repeat them
        case.call_and_validate(excluded_checks=[positive_data_acceptance], additional_checks=[_ponder_promises])

    keeps_to_it()

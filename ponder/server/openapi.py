"""What /openapi.json says beyond what FastAPI infers from the routes: the bodies the routes read by
hand (app._read_body: size-limited, strict, errors naming the field, so FastAPI never sees them),
the OpenAI-shaped error answers with their statuses, and the bearer key when one is required.
The models here only document answers that the routes build as dicts.
"""

from __future__ import annotations

from typing import Iterable

from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from ponder.server.errors import ErrorBody
from ponder.server.protocol import MAX_BODY_BYTES

_REF = "#/components/schemas/{model}"
_WHEN = {
    400: "A malformed body, a wrong type or out-of-range value, an unknown field; `param` names the field",
    401: "The API key is missing or wrong (the server runs with --api-key)",
    404: "An unknown model",
    413: f"A body over {MAX_BODY_BYTES >> 20} MiB",
    503: "Too many requests waiting (retry after Retry-After seconds), shutting down, or the engine has failed",
}
# one server-sent event (OpenAPI 3.1 has a stream's `schema` describe each event)
_EVENT = {"type": "object", "required": ["data"],
          "properties": {"data": {"type": "string", "description": "a chunk as JSON, or [DONE] at the end"}}}
# FastAPI documents a 422 for routes with parameters; this server answers those errors with a 400
_FASTAPI_ONLY = ("HTTPValidationError", "ValidationError")


class ModelCard(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


class ReplicaHealth(BaseModel):
    replica: int
    role: str | None = Field(None, description="with a prefill/decode split: prefill or decode")
    status: str = Field(description="starting, serving, draining, dead or stopped")
    error: str | None = None
    replaces: int | None = Field(None, description="the replica this one replaced")
    requests_in_flight: int = 0


class Health(BaseModel):
    status: str
    replicas: list[ReplicaHealth] | None = Field(None, description="with --replicas: each replica")


def error_responses(*statuses: int) -> dict:
    """A route's `responses`: the error answers it can give."""
    return {status: {"model": ErrorBody, "description": _WHEN[status]} for status in statuses}


def request_body(model: type[BaseModel]) -> dict:
    """A route's `openapi_extra`: its body, read by hand, is a `model` (install_openapi adds its schema)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def streamed(what: str) -> dict:
    """The 200 of a route that answers JSON, or server-sent events when the body says "stream": true."""
    return {200: {"description": f"{what}: JSON, or server-sent events ending with `data: [DONE]` when streamed",
                  "content": {"text/event-stream": {"schema": _EVENT}}}}


def install_openapi(app: FastAPI, bodies: Iterable[type[BaseModel]], bearer_key: bool) -> None:
    """Make app.openapi() add the schemas of the hand-read `bodies` and, with `bearer_key`, the
    bearer scheme on every route that can answer 401."""
    fastapi_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _complete(fastapi_openapi(), list(bodies), bearer_key)
        return app.openapi_schema

    app.openapi = openapi


def _complete(schema: dict, bodies: list[type[BaseModel]], bearer_key: bool) -> dict:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _, defs = models_json_schema([(model, "validation") for model in bodies], ref_template=_REF)
    for name, definition in defs.get("$defs", {}).items():
        if schemas.setdefault(name, definition) != definition:
            raise ValueError(f"two schemas named {name} in /openapi.json")
    operations = [op for path in schema["paths"].values() for op in path.values()]
    for operation in operations:
        operation["responses"].pop("422", None)
        if bearer_key and "401" in operation["responses"]:
            operation["security"] = [{"bearer": []}]
    for name in _FASTAPI_ONLY:
        schemas.pop(name, None)
    if bearer_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    _check_refs(schema, schemas)
    return schema


def _check_refs(node, schemas: dict) -> None:
    """Every $ref names a schema in components (a body model left out of install_openapi would not)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.removeprefix("#/components/schemas/") not in schemas:
            raise ValueError(f"/openapi.json refers to {ref}, which it does not define")
        for value in node.values():
            _check_refs(value, schemas)
    elif isinstance(node, list):
        for value in node:
            _check_refs(value, schemas)

"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}, with the right status."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ponder.server.request_id import request_id_headers

logger = logging.getLogger("ponder.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error",
          500: "server_error"}
# pydantic tags the members of a union by their type in an error's location ("str", "list[int]")
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\]|[A-Z]\w*)$")


class APIError(Exception):
    """An HTTP error with an OpenAI-style body; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        self.type = error_type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> Response:
        return json_response(self.body(), self.status, self.headers)


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx)")
    param: str | None = Field(description='the request field at fault, as a path ("messages.0.role")')
    code: str | None = Field(description='e.g. "context_length_exceeded", "invalid_api_key", "model_not_found"')


class ErrorBody(BaseModel):
    """Every error answer, in OpenAI's shape."""

    error: ErrorDetail      # for /openapi.json: the answers themselves are built as dicts (error_body)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def json_response(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status, headers, media_type="application/json")


def dumps(body: dict) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def from_validation_error(error: ValidationError | RequestValidationError,
                          model: type[BaseModel] | None = None) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (FastAPI's 422 becomes a 400 too)."""
    first = error.errors()[0]
    kind, loc = first["type"], [str(x) for x in first["loc"] if not _UNION_TAG.match(str(x))]
    if loc and loc[0] in ("body", "query", "path", "header"):   # FastAPI's own locations
        loc = loc[1:]
    if kind == "json_invalid":
        return invalid(f"The request body is not valid JSON: {first['msg']}", code="invalid_json")
    if kind == "model_type" and not loc:
        return invalid("The request body must be a JSON object")
    param = ".".join(loc) if loc else None     # (a field may be named "")
    if kind == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing":
        return invalid(f"Missing required parameter: '{param}'", param)
    message = f"Invalid value for '{param}': {first['msg']}"
    field = model.model_fields.get(loc[0]) if model is not None and loc else None
    if field is not None and field.description:
        message += f" (expected {field.description})"
    return invalid(message, param)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app returns, its own or FastAPI's and Starlette's, gets the OpenAI shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        # Starlette sends this answer from outside every middleware: it names the request itself
        return APIError(500, f"Internal server error: {type(exc).__name__}",
                        headers=request_id_headers(request)).response()

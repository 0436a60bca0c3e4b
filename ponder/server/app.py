"""The OpenAI-compatible HTTP API: FastAPI routes over an AsyncEngine.

POST /v1/completions and /v1/chat/completions (streamed as server-sent events or not, see
generation.py; a chat request with a "ponder" object runs a think strategy, see think.py), GET
/v1/models, vLLM's POST /tokenize and /detokenize, /health and /metrics. Every error has the OpenAI
shape (see errors.py), every answer an X-Request-Id (request_id.py), and /openapi.json documents
every body and error (openapi.py).
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from ponder.engine.async_engine import AsyncEngine
from ponder.engine.engine_thread import EngineThread
from ponder.engine.streams import EngineDeadError, EngineUnavailable, RequestAborted, RequestFailed, Stream
from ponder.engine.engine import LLMEngine
from ponder.engine.structured import Grammars
from ponder.model.loader import DEFAULT_MODEL
from ponder.model.tokenizer import Tokenizer
from ponder.sampling_params import InvalidOption, SamplingParams
from ponder.server.errors import APIError, from_validation_error, install_error_handlers, invalid, json_response
from ponder.server.generation import Generation, ThinkGeneration, api_error
from ponder.server.metrics import CONTENT_TYPE, ServerMetrics
from ponder.server.openapi import (Health, ModelCard, ModelList, error_responses, install_openapi, request_body,
                                   streamed)
from ponder.server.protocol import (MAX_BODY_BYTES, ChatCompletionRequest, CompletionRequest, EngineLimits,
                                    check_model)
from ponder.server.request_id import HEADER as REQUEST_ID, RequestIdMiddleware
from ponder.server.responses import ChatRenderer, CompletionRenderer, DeltaTracker, Renderer, TokenTexts
from ponder.server.responses_api import ResponsesRenderer, ResponsesRequest, responses_error
from ponder.server.structured import StructuredFields
from ponder.server.think import ThinkRenderer, param_of, think_options
from ponder.server import tokenization
from ponder.server.tokenization import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from ponder.think.run import ThinkPrompt, think_program

_BODIES = (CompletionRequest, ChatCompletionRequest, ResponsesRequest, TokenizeRequest,   # read by hand
           DetokenizeRequest)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None              # required as "Authorization: Bearer KEY" on /v1 when set
    served_model_name: str | None = None    # default: the engine's model name
    max_waiting_requests: int | None = 256  # past it: 503 with Retry-After; None: unbounded
    drain_timeout: float = 30.0             # on SIGTERM: seconds to let in-flight requests finish
    log_level: str = "info"
    access_log: bool = False
    allowed_origins: list[str] | None = None   # CORS: the web origins browsers may call from ("*": any)


@dataclass
class ServerState:
    config: ServerConfig
    engine: AsyncEngine              # or anything with its interface (ponder.distributed's ReplicaSet)
    metrics: ServerMetrics           # or anything with its scrape() and rejected()
    model_name: str
    limits: EngineLimits
    tokenizer: Tokenizer
    texts: TokenTexts
    created: int
    grammars: Grammars               # the engine's compiled output constraints (thread-safe)


def build_app(engine: LLMEngine, config: ServerConfig | None = None,
              engine_thread: EngineThread | None = None) -> FastAPI:
    """A FastAPI app serving `engine`; the engine thread runs while the app's lifespan does (on
    `engine_thread`, the thread that built the engine, when given)."""
    config = config or ServerConfig()
    model_name = config.served_model_name or engine.config.model or DEFAULT_MODEL
    metrics = ServerMetrics(model_name, lambda: async_engine.stats)
    async_engine = AsyncEngine(engine, config.max_waiting_requests, on_step=metrics.observe_step,
                               engine_thread=engine_thread)
    return serving_app(ServerState(config, async_engine, metrics, model_name,
                                   EngineLimits(engine.max_model_len, engine.vocab_size, engine.config.max_num_seqs,
                                                engine.sampling_defaults),
                                   engine.tokenizer, TokenTexts(engine.tokenizer), int(time.time()), engine.grammars))


def serving_app(state: ServerState) -> FastAPI:
    """The app over `state.engine`, which is started and shut down with the app's lifespan."""
    config = state.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        yield
        await state.engine.shutdown()

    app = FastAPI(title="ponder", description="OpenAI-compatible API of the ponder inference engine",
                  lifespan=lifespan)
    app.state.ponder = state
    install_error_handlers(app)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=[REQUEST_ID])
    app.add_middleware(RequestIdMiddleware)     # added last, so outermost: CORS preflights get an id too
    app.include_router(_public)
    app.include_router(_keyed)
    app.include_router(_v1)
    install_openapi(app, _BODIES, bearer_key=config.api_key is not None)
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.ponder


def _require_api_key(request: Request) -> None:
    key = _state(request).config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Invalid or missing API key: send it as 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


_KEY_REQUIRED = dict(dependencies=[Depends(_require_api_key)], responses=error_responses(401))
_public = APIRouter()
_keyed = APIRouter(**_KEY_REQUIRED)     # vLLM serves its tokenizer routes at the root, beside /v1
_v1 = APIRouter(prefix="/v1", **_KEY_REQUIRED)
_BODY_ERRORS = error_responses(400, 404, 413)     # a body: malformed, for another model, too large


@_public.get("/health", response_model=Health, responses=error_responses(503))
async def health(request: Request) -> Response:
    report = _state(request).engine.health()
    if report["status"] != "ok":
        raise APIError(503, report["error"])
    return json_response(report)


@_public.get("/metrics", response_class=PlainTextResponse, description="Prometheus metrics (text format)")
async def metrics(request: Request) -> Response:
    return Response(await _state(request).metrics.scrape(), media_type=CONTENT_TYPE)


@_v1.get("/models", response_model=ModelList)
async def list_models(request: Request) -> Response:
    return json_response({"object": "list", "data": [_model_card(_state(request))]})


@_v1.get("/models/{model:path}", response_model=ModelCard, responses=error_responses(404))
async def retrieve_model(model: str, request: Request) -> Response:
    state = _state(request)
    check_model(model, state.model_name)
    return json_response(_model_card(state))


@_v1.post("/completions", openapi_extra=request_body(CompletionRequest),
          responses={**streamed("The completion"), **_BODY_ERRORS, **error_responses(503)})
async def completions(request: Request) -> Response:
    return await _generate(request, await _read_body(request, CompletionRequest), "cmpl", CompletionRenderer)


@_v1.post("/chat/completions", openapi_extra=request_body(ChatCompletionRequest),
          responses={**streamed("The chat completion"), **_BODY_ERRORS, **error_responses(503)})
async def chat_completions(request: Request) -> Response:
    body = await _read_body(request, ChatCompletionRequest)
    if body.ponder is not None:
        return await _think(request, body)
    return await _generate(request, body, "chatcmpl", ChatRenderer)


@_v1.post("/responses", openapi_extra=request_body(ResponsesRequest),
          responses={**streamed("The response"), **_BODY_ERRORS, **error_responses(503)})
async def responses(request: Request) -> Response:
    """OpenAI's Responses API, stateless: run as the chat request it translates to."""
    body = await _read_body(request, ResponsesRequest)
    try:
        chat = body.to_chat()
        return await _generate(request, chat, "resp", partial(ResponsesRenderer, body=body))
    except ValidationError as e:
        raise responses_error(from_validation_error(e, ChatCompletionRequest)) from None
    except APIError as e:
        raise responses_error(e) from None


@_keyed.post("/tokenize", response_model=TokenizeResponse, openapi_extra=request_body(TokenizeRequest),
             responses=_BODY_ERRORS)
async def tokenize(request: Request) -> Response:
    """A prompt's token ids, or chat messages' as the chat template renders them."""
    return await _tokenizer_answer(request, TokenizeRequest, tokenization.tokenize)


@_keyed.post("/detokenize", response_model=DetokenizeResponse, openapi_extra=request_body(DetokenizeRequest),
             responses=_BODY_ERRORS)
async def detokenize(request: Request) -> Response:
    """The text of token ids."""
    return await _tokenizer_answer(request, DetokenizeRequest, tokenization.detokenize)


async def _tokenizer_answer(request: Request, body_type, answer) -> Response:
    state = _state(request)
    body = await _read_body(request, body_type)
    check_model(body.model, state.model_name)
    # long texts and templates take a while: off the event loop, which serves the streams
    return json_response(await asyncio.to_thread(answer, body, state.tokenizer, state.limits))


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "ponder",
            "max_model_len": state.limits.max_model_len}


async def _read_body(request: Request, body_type):
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        return body_type.model_validate_json(b"".join(chunks))
    except ValidationError as e:
        raise from_validation_error(e, body_type) from None


async def _generate(request: Request, body: CompletionRequest | ChatCompletionRequest, id_prefix: str,
                    renderer_type: type[Renderer]) -> Response:
    state = _state(request)
    check_model(body.model, state.model_name)
    # templates and tokenizers take a while on long prompts: off the event loop, which serves the streams
    prompts = await asyncio.to_thread(body.prompt_token_ids, state.tokenizer, state.limits)
    params = body.sampling_params(prompts, state.limits)
    echo = await asyncio.to_thread(body.echoed_prompts, prompts, state.tokenizer) if body.echoes else None
    if params.structured_outputs is not None:
        await _compile_constraint(state, body)
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    stream = await _submit(state, prompts, params, request_id, body.prompt_field)
    generation = Generation(stream, DeltaTracker(params, len(prompts), echo, body.lists_prompt_logprobs),
                            renderer_type(request_id, state.model_name, state.texts, **body.output_options()),
                            len(prompts) * params.n, body.include_usage, state.engine,
                            sum(len(p) for p in prompts) if body.continuous_usage else None)
    if body.stream:
        return StreamingResponse(generation.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return json_response(await generation.complete(request))


async def _compile_constraint(state: ServerState, body: StructuredFields) -> None:
    """Compile the body's output constraint on a worker thread (cached: the engine thread then only
    copies it), so a slow schema stalls no stream; an invalid one is a 400 naming its field."""
    constraint, origin = body.constraint()
    try:
        await asyncio.to_thread(state.grammars.compile, constraint)
    except InvalidOption as e:
        raise invalid(str(e), origin.get(e.option, next(iter(origin.values())))) from None


async def _submit(state: ServerState, prompts: list[list[int]], params: SamplingParams, request_id: str,
                  prompt_field: str) -> Stream:
    try:
        return await state.engine.add(prompts, params, request_id)
    except ValueError as e:            # the engine refused a prompt (empty, bad token ids, too long)
        raise invalid(str(e), prompt_field) from None
    except EngineUnavailable as e:
        state.metrics.rejected("overloaded" if e.retry_after else "unavailable")
        raise api_error(e) from None
    except EngineDeadError as e:
        raise api_error(e) from None


async def _think(request: Request, body: ChatCompletionRequest) -> Response:
    """A chat request with a "ponder" object: run the think strategy, whole or streamed."""
    state = _state(request)
    check_model(body.model, state.model_name)
    # renders the chat template (a 400 naming "messages" if it cannot) and checks the context
    [ids] = await asyncio.to_thread(body.prompt_token_ids, state.tokenizer, state.limits)
    options = think_options(body, len(ids), state.limits)
    if "structured_outputs" in options:
        await _compile_constraint(state, body)
    prompt = ThinkPrompt.from_messages([m.template_input() for m in body.messages], ids)   # rendered once
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    try:
        stream = await state.engine.start_program(think_program(prompt, options, request_id), request_id)
    except ValueError as e:            # a bad option value, or a prompt the engine refuses
        raise invalid(str(e), param_of(e, options)) from None
    except EngineUnavailable as e:
        state.metrics.rejected("overloaded" if e.retry_after else "unavailable")
        raise api_error(e) from None
    except (EngineDeadError, RequestFailed, RequestAborted) as e:   # (P/D: aborted while prefilled)
        raise api_error(e) from None
    reply = ThinkGeneration(stream, ThinkRenderer(request_id, state.model_name, state.texts, body.include_usage),
                            state.engine, options)
    if body.stream:
        return StreamingResponse(reply.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return json_response(await reply.complete(request))

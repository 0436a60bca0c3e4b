"""The OpenAI-compatible HTTP API: FastAPI routes over an AsyncEngine.

POST /v1/completions and /v1/chat/completions (streamed as server-sent events or not; a chat
request with a "ponder" object runs a think strategy, see think.py), GET /v1/models, /health and
/metrics. Every error has the OpenAI shape (see errors.py).
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from ponder.engine.async_engine import AsyncEngine
from ponder.engine.engine_thread import EngineThread
from ponder.engine.streams import EngineDeadError, EngineUnavailable, RequestAborted, RequestFailed, Stream
from ponder.engine.engine import LLMEngine
from ponder.engine.structured import Grammars
from ponder.model.loader import DEFAULT_MODEL
from ponder.model.tokenizer import Tokenizer
from ponder.outputs import RequestOutput
from ponder.sampling_params import InvalidOption, SamplingParams
from ponder.server.errors import (APIError, dumps, from_validation_error, install_error_handlers, invalid,
                                  json_response)
from ponder.server.metrics import CONTENT_TYPE, ServerMetrics
from ponder.server.protocol import (MAX_BODY_BYTES, ChatCompletionRequest, CompletionRequest, EngineLimits,
                                    check_model)
from ponder.server.responses import (ChatRenderer, CompletionRenderer, DeltaTracker, Renderer, TokenTexts,
                                     usage)
from ponder.server.responses_api import ResponsesRenderer, ResponsesRequest, responses_error
from ponder.server.structured import StructuredFields
from ponder.server.think import ThinkRenderer, param_of, think_options
from ponder.think.run import ThinkPrompt, think_program


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


@dataclass
class ServerState:
    config: ServerConfig
    engine: AsyncEngine
    metrics: ServerMetrics
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
    state = ServerState(config, async_engine, metrics, model_name,
                        EngineLimits(engine.max_model_len, engine.vocab_size, engine.config.max_num_seqs,
                                     engine.sampling_defaults),
                        engine.tokenizer, TokenTexts(engine.tokenizer), int(time.time()), engine.grammars)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        await async_engine.shutdown()

    app = FastAPI(title="ponder", description="OpenAI-compatible API of the ponder inference engine",
                  lifespan=lifespan)
    app.state.ponder = state
    install_error_handlers(app)
    app.include_router(_public)
    app.include_router(_v1)
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


_public = APIRouter()
_v1 = APIRouter(prefix="/v1", dependencies=[Depends(_require_api_key)])


@_public.get("/health")
async def health(request: Request) -> Response:
    engine = _state(request).engine
    if not engine.healthy:
        raise APIError(503, f"the engine is not running: {engine.error!r}")
    return json_response({"status": "ok"})


@_public.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


@_v1.get("/models")
async def list_models(request: Request) -> Response:
    return json_response({"object": "list", "data": [_model_card(_state(request))]})


@_v1.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> Response:
    state = _state(request)
    check_model(model, state.model_name)
    return json_response(_model_card(state))


@_v1.post("/completions")
async def completions(request: Request) -> Response:
    return await _generate(request, await _read_body(request, CompletionRequest), "cmpl", CompletionRenderer)


@_v1.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = await _read_body(request, ChatCompletionRequest)
    if body.ponder is not None:
        return await _think(request, body)
    return await _generate(request, body, "chatcmpl", ChatRenderer)


@_v1.post("/responses")
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
        raise _api_error(e) from None
    except EngineDeadError as e:
        raise _api_error(e) from None


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
        raise _api_error(e) from None
    except (EngineDeadError, RequestFailed) as e:
        raise _api_error(e) from None
    reply = ThinkGeneration(stream, ThinkRenderer(request_id, state.model_name, state.texts, body.include_usage),
                            state.engine, options)
    if body.stream:
        return StreamingResponse(reply.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return json_response(await reply.complete(request))


def _api_error(exc: Exception) -> APIError:
    """The HTTP error for a request the engine could not finish."""
    if isinstance(exc, EngineUnavailable):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return APIError(503, str(exc), code="server_overloaded" if exc.retry_after else "unavailable",
                        headers=headers)
    if isinstance(exc, RequestAborted):
        return APIError(503, f"The request was aborted: {exc}", code="aborted")
    if isinstance(exc, RequestFailed):
        return invalid(str(exc))
    return APIError(500, str(exc))


@dataclass
class Generation:
    """One request's engine stream rendered as OpenAI JSON: whole, or as server-sent events."""

    stream: Stream
    tracker: DeltaTracker
    renderer: Renderer
    num_choices: int
    include_usage: bool
    engine: AsyncEngine
    prompt_tokens: int | None = None   # set: usage in every chunk (continuous_usage_stats)

    async def complete(self, request: Request) -> dict:
        """The whole response; the requests are aborted at once if the client disconnects first."""
        try:
            outs = await _unless_disconnected(self.stream.final(), request, self._abort_unless_done)
        except (RequestFailed, RequestAborted, EngineDeadError) as e:
            raise _api_error(e) from None
        return self.renderer.response(self.tracker.deltas(outs), usage(outs))

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events, one write per engine step; the requests are aborted if the client
        goes away (Starlette cancels this generator when it sees the disconnect)."""
        render = self.renderer
        try:
            opening = render.opening_chunks(self.num_choices, self.include_usage, self._usage([]))
            if opening:
                yield _events(opening)
            outs: list[RequestOutput] = []
            async for update in self.stream.updates():
                outs = update.outputs
                deltas = self.tracker.deltas(outs)
                if deltas:
                    so_far = self._usage(outs)
                    yield _events([render.chunk([choice], self.include_usage, so_far)
                                   for d in deltas for choice in render.stream_choices(d)])
            closing = render.closing_chunks(self.include_usage, usage(outs))
            if closing:
                yield _events(closing)
        except (RequestFailed, RequestAborted, EngineDeadError) as e:
            yield _events([_api_error(e).body()])
        finally:
            self._abort_unless_done()
        if render.done_marker:
            yield render.done_marker

    def _usage(self, outs: list[RequestOutput]) -> dict | None:
        """The usage so far, for every chunk when continuous usage is on (else None)."""
        if self.prompt_tokens is None:
            return None
        return usage(outs) if outs else {"prompt_tokens": self.prompt_tokens, "completion_tokens": 0,
                                         "total_tokens": self.prompt_tokens}

    def _abort_unless_done(self) -> None:
        if not self.stream.done:
            self.engine.abort(self.stream.request_ids)


async def _unless_disconnected(work, request: Request, abort: Callable[[], None]):
    """The result of `work`, unless the client disconnects first (then a 499). `abort` runs
    either way (a no-op once the work is done), so a vanished client's blocks are freed at once."""
    final = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({final, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        final.cancel()
        abort()
    if not final.done() or final.cancelled():
        raise APIError(499, "The client disconnected")
    return final.result()


@dataclass
class ThinkGeneration:
    """One think request rendered as OpenAI JSON: whole, or as server-sent events with progress."""

    stream: Stream
    renderer: ThinkRenderer
    engine: AsyncEngine
    options: dict

    def _error(self, exc: Exception) -> APIError:
        if isinstance(exc, RequestFailed):     # the strategy failed: name the option at fault if it can
            return invalid(str(exc), param_of(exc, self.options))
        return _api_error(exc)

    async def complete(self, request: Request) -> dict:
        """The whole response; the run is aborted at once (its branches freed) if the client
        disconnects first."""
        try:
            result = await _unless_disconnected(self.stream.final(), request, self._abort_unless_done)
        except (RequestFailed, RequestAborted, EngineDeadError) as e:
            raise self._error(e) from None
        return self.renderer.response(result)

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: the role chunk, progress chunks as the strategy runs, then the
        answer; the run is aborted if the client goes away."""
        render = self.renderer
        try:
            yield _events(render.opening_chunks())
            async for update in self.stream.updates():
                yield _events([render.progress_chunk(e) for e in update.events])
            yield _events(render.final_chunks(self.stream.result))
        except (RequestFailed, RequestAborted, EngineDeadError) as e:
            yield _events([self._error(e).body()])
        finally:
            self._abort_unless_done()
        yield "data: [DONE]\n\n"

    def _abort_unless_done(self) -> None:
        if not self.stream.done:
            self.engine.abort(self.stream.request_ids)


def _events(bodies: list[dict]) -> str:
    """Server-sent events; a typed event (the Responses API's) also names itself on an event line."""
    return "".join(f"event: {body['type']}\ndata: {dumps(body)}\n\n" if isinstance(body.get("type"), str)
                   else f"data: {dumps(body)}\n\n" for body in bodies)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass

"""The FastAPI app: OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models`, vLLM's `/tokenize`,
`/health` and `/metrics`. Every user error is an OpenAI-style error body with a 4xx status; nothing a
client sends takes the server down."""
from __future__ import annotations

import asyncio
import copy
import functools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from .engine_loop import EngineLoop, RequestStream
from .metrics import ServerMetrics
from .protocol import (COMPLETION_DEFAULT_MAX_TOKENS, MAX_CHOICES, APIError, ChatCompletionRequest, ChatMessage,
                       CompletionRequest, DetokenizeRequest, GenerationRequest, TokenizeRequest)
from .responses import DONE, Completion, TextDeltas, event, usage

if TYPE_CHECKING:
    from ..engine import LLM, RequestOutput

T = TypeVar("T")


def build_app(llm: LLM, served_model_names: list[str], api_key: str | None = None) -> FastAPI:
    """The server of `llm` under the names `served_model_names` (the first is the default). With `api_key`,
    `/v1/*` and `/tokenize` need `Authorization: Bearer <api_key>`."""
    metrics = ServerMetrics(served_model_names[0], llm.method_name)
    engine_loop = EngineLoop(llm.engine, metrics)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    app = FastAPI(title="sparsedecode", lifespan=lifespan)
    _add_error_handlers(app)

    def check_api_key(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if api_key is not None and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid API key: send it as the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def model_name(requested: str | None) -> str:
        if requested is None:
            return served_model_names[0]
        if requested not in served_model_names:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                                f"{', '.join(served_model_names)}.", param="model", code="model_not_found")
        return requested

    token_text = _token_texts(llm)

    def encode(prompt: str) -> Awaitable[list[int]]:  # on the engine thread: the tokenizer is not shared
        return engine_loop.call(lambda: llm.engine.encode(prompt))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine_loop.is_alive() else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    api = APIRouter(dependencies=[Depends(check_api_key)])

    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        cards = [{"id": name, "object": "model", "created": started, "owned_by": "sparsedecode",
                  "max_model_len": llm.max_context, "method": llm.method_name} for name in served_model_names]
        return {"object": "list", "data": cards}

    async def chat_prompt(messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The messages through the model's chat template (on the engine thread, which owns the tokenizer)."""
        dicts = [m.template_dict() for m in messages]
        try:
            return await engine_loop.call(lambda: llm.apply_chat_template(dicts, add_generation_prompt))
        except Exception as e:  # a template raises what it likes on messages it does not take
            raise APIError(400, f"the chat template rejects these messages: {e}", param="messages") from None

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        model_name(body.model)
        param = "prompt" if body.messages is None else "messages"
        _need_tokenizer(llm, param)
        prompt = body.prompt if body.messages is None else await chat_prompt(body.messages, body.add_generation_prompt)
        try:
            tokens = await encode(prompt)
        except ValueError as e:  # e.g. an empty prompt
            raise APIError(400, str(e), param=param) from None
        return {"count": len(tokens), "max_model_len": llm.max_context, "tokens": tokens}

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        model_name(body.model)
        _need_tokenizer(llm, "tokens")
        try:
            ids = llm.engine.check_token_ids(body.tokens, "tokens")
        except ValueError as e:
            raise APIError(400, str(e), param="tokens") from None
        return {"prompt": await engine_loop.call(lambda: llm.tokenizer.decode(ids))}

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        name = model_name(body.model)
        if any(isinstance(prompt, str) for prompt in body.prompt):
            _need_tokenizer(llm, "prompt")
        max_tokens = body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        return await _generate(request, body, Completion(name, chat=False, token_text=token_text), body.prompt,
                               max_tokens, arrival)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        name = model_name(body.model)
        _need_tokenizer(llm, "messages")
        prompt = await chat_prompt(body.messages)
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:  # OpenAI's default: up to the end of the context
            max_tokens = max(llm.max_context - len(await encode(prompt)), 1)
        return await _generate(request, body, Completion(name, chat=True, token_text=token_text), [prompt],
                               max_tokens, arrival)

    async def _generate(request: Request, body: GenerationRequest, completion: Completion,
                        prompts: list[str | list[int]], max_tokens: int, arrival: float) -> Response:
        """`body.n` choices of each prompt, each an engine request; choice i of a prompt has index
        prompt * n + i."""
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} is more than {MAX_CHOICES} choices in one "
                                "request: split it", param="n")
        streams = []
        try:
            for prompt in prompts:
                for choice in range(body.n):
                    params = body.sampling_params(max_tokens, choice)
                    streams.append(await engine_loop.add(prompt, params, body.sparsedecode, arrival))
        except ValueError as e:  # the engine's own check of this request (length, parameters, method options)
            _close(streams)
            raise APIError(400, str(e)) from None
        except BaseException:
            _close(streams)
            raise
        if body.stream:
            return StreamingResponse(_events(streams, completion, body), media_type="text/event-stream")
        outs = await _unless_disconnected(request, _last_outputs(streams))
        return JSONResponse(completion.whole(outs, body.n))

    app.include_router(api)
    return app


def _token_texts(llm: LLM) -> Callable[[int], str]:
    """A token id's text for log-probabilities, from a copy of the tokenizer (the engine thread uses its own:
    a fast tokenizer is not safe to share between threads); `token_id:N` without a tokenizer."""
    if llm.tokenizer is None:
        return lambda token_id: f"token_id:{token_id}"
    tokenizer = copy.deepcopy(llm.tokenizer)
    return functools.lru_cache(maxsize=None)(lambda token_id: tokenizer.decode([token_id]))


def _need_tokenizer(llm: LLM, param: str) -> None:
    if llm.tokenizer is None:
        raise APIError(400, "this model has no tokenizer (random weights): send token ids as the `prompt` of "
                            "/v1/completions", param=param)


def _close(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


async def _last_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    latest: list[RequestOutput | None] = [None] * len(streams)
    try:
        async for index, out in _outputs_in_arrival_order(streams):
            latest[index] = out
        return latest
    except RuntimeError as e:  # the engine failed while running them
        raise APIError(500, str(e)) from None
    finally:  # also when cancelled (a client gone): every unfinished choice is aborted
        _close(streams)


async def _outputs_in_arrival_order(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) of all streams as they come, until every one has finished; raises what ended
    one of them."""
    arrivals: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                arrivals.put_nowait((index, out))
        except RuntimeError as e:
            arrivals.put_nowait((index, e))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        unfinished = len(streams)
        while unfinished:
            index, out = await arrivals.get()
            if isinstance(out, RuntimeError):
                raise out
            unfinished -= out.finished
            yield index, out
    finally:
        for task in tasks:
            task.cancel()


async def _events(streams: list[RequestStream], completion: Completion,
                  body: GenerationRequest) -> AsyncIterator[str]:
    """The request's server-sent events: per choice one chunk per engine step that produced tokens (its text
    may be empty: held back, or a model without tokenizer), then the usage chunk if asked, then [DONE]. A
    client gone cancels this generator (Starlette listens for the disconnect), which aborts the choices."""
    deltas = [TextDeltas() for _ in streams]
    tokens = [0] * len(streams)
    latest: list[RequestOutput | None] = [None] * len(streams)
    try:
        async for index, out in _outputs_in_arrival_order(streams):
            latest[index] = out
            if len(out.token_ids) == tokens[index] and not out.finished:
                continue
            piece = deltas[index].next(out.text, out.finished)
            yield completion.chunk(index, piece, tokens[index] == 0, out.finish_reason if out.finished else None,
                                   usage([out]) if body.continuous_usage() else None,  # the choice's, as vLLM
                                   body.include_usage() or body.continuous_usage(),
                                   None if out.logprobs is None else out.logprobs[tokens[index]:])
            tokens[index] = len(out.token_ids)
        if body.include_usage():
            yield completion.usage_chunk(latest, body.n)
    except RuntimeError as e:  # headers are sent: the error goes in the stream, as vLLM does
        yield event(APIError(500, str(e)).body())
    finally:
        _close(streams)
    yield DONE


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (which aborts its request)."""
    task = asyncio.ensure_future(work)
    disconnected = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait([task, disconnected], return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise APIError(499, "client disconnected")
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return await api_error(request, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:  # a bug: uvicorn logs the traceback
        return await api_error(request, APIError(500, f"internal server error: {type(e).__name__}: {e}"))


def _validation_error(e: RequestValidationError) -> APIError:
    """The first problem of a request body, named: `max_tokens: Input should be greater than or equal to 1`."""
    error = e.errors()[0]
    if error["type"] == "json_invalid":
        return APIError(400, f"malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}")
    where = [str(part) for part in error["loc"][1:]]  # loc starts with "body"
    message = error["msg"].removeprefix("Value error, ")
    return APIError(400, f"{'.'.join(where) or 'request body'}: {message}", param=where[0] if where else None)

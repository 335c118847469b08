"""The one thread that owns the engine. The engine is not thread-safe, so every call into it (add, abort,
step, stats, tokenisation) runs on this thread; the asyncio side sends commands through a queue and
receives each request's outputs on its own asyncio queue."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .metrics import ServerMetrics

if TYPE_CHECKING:
    from ..engine import LLMEngine, RequestOutput, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Request:
    outputs: asyncio.Queue  # RequestOutput, or the exception that ended the request
    loop: asyncio.AbstractEventLoop
    arrival: float  # time.monotonic() when the server received it
    tokens: int = 0  # tokens delivered so far
    last_token_at: float = 0.0

    def deliver(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class RequestStream:
    """The outputs of one request, the last one finished; raises the exception that ended it if the engine
    failed. Closing it before the end (a client gone) aborts the request and frees its blocks at once;
    so does dropping it, for a response cancelled before its body started."""

    def __init__(self, engine_loop: EngineLoop, request_id: str, request: _Request) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine_loop = engine_loop
        self._request = request

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._request.outputs.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine_loop.abort(self.request_id)

    __del__ = close


class EngineLoop:
    """Steps the engine while it has work and sleeps on the command queue when idle."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}
        self._thread = threading.Thread(target=self._run, name="sparsedecode-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Abort what is left and end the thread."""
        self._commands.put(None)
        self._thread.join()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps and return its result (or raise its exception)."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:  # handed to the caller, whatever it is
                done.set_exception(e)

        self._commands.put(run)
        return await asyncio.wrap_future(done)

    async def add(self, prompt: str | list[int], params: SamplingParams, method_options: dict[str, Any] | None,
                  arrival: float) -> RequestStream:
        """Add a request; raises the engine's ValueError for bad input."""
        request_id = uuid.uuid4().hex
        request = _Request(asyncio.Queue(), asyncio.get_running_loop(), arrival)

        def add() -> None:
            self.engine.add_request(prompt, params, request_id=request_id, method_options=method_options)
            self._requests[request_id] = request

        stream = RequestStream(self, request_id, request)
        try:
            await self.call(add)
        except BaseException:
            stream.close()  # cancelled while queued: the abort runs after the add, in order
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort on the engine thread; safe from `__del__` (SimpleQueue.put is reentrant)."""
        self._commands.put(lambda: self._abort(request_id))

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self.metrics.engine_stats(self.engine.stats())
            idle = not self.engine.has_unfinished_requests()
            commands = [self._commands.get()] if idle else []
            while not self._commands.empty():
                commands.append(self._commands.get())
            for command in commands:
                if command is None:
                    self._shutdown()
                    return
                command()
            if self.engine.has_unfinished_requests():
                self._step()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # an engine bug: fail the requests in flight, keep serving the next ones
            log.exception("engine step failed; aborting the requests in flight")
            for request_id in list(self._requests):
                self._requests[request_id].deliver(RuntimeError(f"engine step failed: {e}"))
                self._abort(request_id)
            return
        now = time.monotonic()
        for out in outputs:
            request = self._requests.get(out.request_id)
            if request is None:
                continue
            new = len(out.token_ids) - request.tokens
            if new > 0:
                first = request.tokens == 0
                gap = 0.0 if first else now - request.last_token_at  # tokens of one step arrive together
                self.metrics.tokens(new, now - request.arrival if first else None, gap / max(new - first, 1))
                request.tokens, request.last_token_at = len(out.token_ids), now
            if out.finished:
                del self._requests[out.request_id]
                if out.finish_reason != "abort":
                    self.metrics.finished(out.finish_reason, len(out.prompt_token_ids), out.num_cached_tokens,
                                          now - request.arrival, out.kv_fraction_read)
            request.deliver(out)

    def _abort(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self.engine.abort(request_id)

    def _shutdown(self) -> None:
        for request_id, request in list(self._requests.items()):
            request.deliver(RuntimeError("the server is shutting down"))
            self._abort(request_id)

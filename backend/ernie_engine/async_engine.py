"""The serving engine: one background thread steps `LLMEngine` for all requests; callers stream results.

Callers on any thread validate and tokenize their request themselves (`add_request` raises ValueError
at once), then hand it over through an inbox; only the step thread touches the engine. The thread sleeps
on a condition variable while there is nothing to do. Each request gets a `RequestStream`, iterable with
`for` (blocking) or `async for` (awaits without blocking the event loop); it ends after the finished output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from .config import EngineConfig
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .sequence import Request

logger = logging.getLogger(__name__)

# A burst of requests (a client's concurrent batch, spread out by the HTTP layers in front) reaching an idle
# engine is admitted together, so that it is prefilled in one step rather than one request first and the rest
# a step later: the step loop waits while arrivals keep coming, BURST_GAP_S apart at most, BURST_MAX_S in all.
BURST_GAP_S = 0.005
BURST_MAX_S = 0.03


class RequestStream:
    """The outputs of one request, in order. Leaving the iteration early aborts the request."""

    def __init__(self, request_id: str, on_close: Callable[[str], None]):
        self.request_id = request_id
        self._on_close = on_close
        self._items: deque[RequestOutput] = deque()
        self._cond = threading.Condition()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        self.finished = False

    def put(self, output: RequestOutput) -> None:
        with self._cond:
            self._items.append(output)
            self._cond.notify_all()
            waker, self._waker = self._waker, None
        if waker is not None:
            loop, future = waker
            # RuntimeError: the consumer's loop is closed, nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future)

    def _pop(self) -> RequestOutput:
        out = self._items.popleft()
        self.finished = out.finished
        return out

    def __iter__(self) -> Iterator[RequestOutput]:
        try:
            while not self.finished:
                with self._cond:
                    while not self._items:
                        self._cond.wait()
                    out = self._pop()
                yield out
        finally:
            if not self.finished:
                self._on_close(self.request_id)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        try:
            while not self.finished:
                with self._cond:
                    if self._items:
                        out, future = self._pop(), None
                    else:
                        out, future = None, loop.create_future()
                        self._waker = (loop, future)
                if future is not None:
                    await future
                    continue
                yield out
        finally:
            if not self.finished:
                self._on_close(self.request_id)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, **config_kwargs: Any):
        self.engine = LLMEngine(config or EngineConfig(**config_kwargs))
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        # The streams, not their ids: an abort queued as its request finished must not end a new request
        # given the same id before the step loop takes the abort.
        self._aborts: list[RequestStream] = []
        self._streams: dict[str, RequestStream] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ernie-engine-step", daemon=True)
        self._thread.start()

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        sampling_params: SamplingParams | None = None,
    ) -> RequestStream:
        """Validate (ValueError on bad input or a duplicate live request id) and queue a request."""
        request = self.engine.make_request(request_id, prompt, prompt_token_ids, messages, tools,
                                           chat_template_kwargs, sampling_params)
        with self._cond:
            if self._stopped:
                raise RuntimeError("the engine is shut down")
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            stream = RequestStream(request_id, self.abort)
            self._streams[request_id] = stream
            self._inbox.append(request)
            self._cond.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """The request's stream ends with finish_reason "abort" (no-op once it has finished)."""
        with self._cond:
            if request_id in self._streams:
                self._aborts.append(self._streams[request_id])
                self._cond.notify()

    def metrics(self) -> dict[str, Any]:
        return self.engine.get_metrics()

    def tokenize(self, **kwargs: Any) -> list[int]:
        """`LLMEngine.tokenize`, on the caller's thread (the tokenizer service touches no engine state)."""
        return self.engine.tokenize(**kwargs)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.engine.detokenize(token_ids)

    def tokenizer_info(self) -> dict[str, Any]:
        return self.engine.tokenizer_info()

    def shutdown(self) -> None:
        """Stop the step thread; unfinished requests end with finish_reason "abort"."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
        self.engine.shutdown()

    def check_health(self) -> None:
        """Raise, naming the cause, when requests can no longer be served (for the backend's readiness)."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine step thread is not running")
        self.engine.check_health()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._stopped or self._inbox or self._aborts or engine.has_unfinished()):
                    self._cond.wait()
                if self._inbox and not engine.has_unfinished():
                    self._await_burst()
                inbox, self._inbox = self._inbox, []
                aborts = [s.request_id for s in self._aborts if self._streams.get(s.request_id) is s]
                self._aborts = []
                stopped = self._stopped
            for request in inbox:
                self._admit(request)
            if stopped:
                self._dispatch(engine.abort_all())
                return
            try:
                self._dispatch([out for rid in aborts if (out := engine.abort(rid))])
                self._dispatch(engine.step())
            except Exception as err:  # a broken step must not end the loop: fail what is in flight
                logger.exception("engine step raised; failing all requests in flight")
                self._dispatch(engine.abort_all(error=f"engine failure: {err!r}"))

    def _await_burst(self) -> None:
        """With the lock held: wait while more requests keep arriving (see BURST_GAP_S)."""
        deadline = time.monotonic() + BURST_MAX_S
        seen = len(self._inbox)
        while not self._stopped and (left := deadline - time.monotonic()) > 0:
            self._cond.wait(min(BURST_GAP_S, left))
            if len(self._inbox) == seen:
                return
            seen = len(self._inbox)

    def _admit(self, request: Request) -> None:
        try:
            self.engine.add(request)
        except Exception as err:
            logger.exception("could not add request %s", request.request_id)
            self._dispatch([RequestOutput(request.request_id, [], request.num_prompt_tokens, finished=True,
                                          error=f"could not add the request: {err!r}")])

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._cond:
                stream = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
            if stream is not None:
                stream.put(out)

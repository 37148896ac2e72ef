"""One ``ModelStreamInfer`` call: requests answered as they complete, each reply with its ``id``.

Requests are read as they come and run concurrently, so the sequences interleaved on one
stream are batched together (and with every other client's); the steps of one sequence run one
after another in the order they arrived (a chain per ordering key). Each request gets exactly
one ``ModelStreamInferResponse``: its ``infer_response``, or an ``error_message``
(``"<code>: <detail>"``) with ``infer_response.id``, model name and version set; an error ends
no stream. Bounds, per stream:

- at most ``MAX_IN_FLIGHT`` requests read and not yet answered, and about ``max_bytes`` of them
  (one more request may be read past it): past either the stream stops reading, so a client
  that sends faster than it reads is held back by HTTP/2 flow control, not buffered;
- a reply not taken by the client within ``send_timeout_s`` (``ECHO_SEND_TIMEOUT_S``) ends the
  stream with ``DEADLINE_EXCEEDED`` ``send_timeout``;
- no request for ``idle_timeout_s`` (``ECHO_IDLE_TIMEOUT_S``) with nothing in flight ends it
  with ``UNAVAILABLE`` ``idle_timeout``.

Both timeouts are checked by one watchdog per stream, once a second, not per message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from functools import lru_cache, partial
from typing import Any

import grpc
from grpc.aio import ServicerContext

from app.core.errors import DeadlineExceeded, GoingAway, IdleTimeout, ServiceError
from app.core.metrics import GRPC_STREAM_MESSAGES
from app.grpc.errors import grpc_status
from app.grpc.guard import Caller
from app.grpc.proto import pb

MAX_IN_FLIGHT = 256
WATCH_PERIOD_S = 1.0
_WAKE = object()  # the reader reached the end: the writer checks whether all is answered

# A request begun: the future that runs it (nothing cancels it), and what turns its result into
# the response.
Begun = tuple["asyncio.Future[Any]", Callable[[Any], pb.ModelInferResponse]]
Begin = Callable[[pb.ModelInferRequest], Begun]
OrderKey = Callable[[pb.ModelInferRequest], Hashable | None]


@lru_cache(maxsize=32)
def _messages(code: str) -> Any:
    return GRPC_STREAM_MESSAGES.labels(code)


class InferStream:
    """Reads, runs and answers the requests of one stream, counting them in ``caller``."""

    def __init__(
        self,
        context: ServicerContext,
        caller: Caller,
        begin: Begin,
        order_key: OrderKey,
        max_bytes: int,
        idle_timeout_s: float,
        send_timeout_s: float,
    ) -> None:
        self.context, self.caller, self.begin, self.order_key = context, caller, begin, order_key
        self.max_bytes, self.idle_timeout_s, self.send_timeout_s = (
            max_bytes,
            idle_timeout_s,
            send_timeout_s,
        )
        self.loop = asyncio.get_running_loop()
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._in_flight = 0
        self._bytes = 0
        self._room: asyncio.Future[None] | None = None
        self._tails: dict[Hashable, asyncio.Future[None]] = {}
        self._running: set[asyncio.Future[Any]] = set()  # strong references
        self._eof = False
        self._closing = False
        self._reader: asyncio.Task[None] | None = None
        self._last_read = self.loop.time()
        self._write_started: float | None = None
        self._cut_off: ServiceError | None = None
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Serve the stream until the client ends it (or a timeout or the shutdown does)."""
        self._task = asyncio.current_task()
        reader = self._reader = asyncio.create_task(self._read(), name="grpc-stream-reader")
        self._timer = self.loop.call_later(WATCH_PERIOD_S, self._watch)
        try:
            await self._write()
        except asyncio.CancelledError:
            if self._cut_off is None:
                raise
            self._task.uncancel()  # type: ignore[union-attr]
            raise self._cut_off from None
        finally:
            self._timer.cancel()
            reader.cancel()
        if self._closing and not self._eof:
            raise GoingAway("the server is shutting down", "shutting_down")

    def close(self) -> None:
        """Stop reading: answer what was read, then end (``UNAVAILABLE`` ``shutting_down``)."""
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
        self._out.put_nowait(_WAKE)

    async def _write(self) -> None:
        context, out, caller = self.context, self._out, self.caller
        while not ((self._eof or self._closing) and self._in_flight == 0):
            item = await out.get()
            if item is _WAKE:
                continue
            if isinstance(item, BaseException):
                raise item
            reply, size = item
            self._write_started = self.loop.time()
            await context.write(reply)
            self._write_started = None
            caller.messages += 1
            self._in_flight -= 1
            self._bytes -= size
            room = self._room
            if room is not None and not room.done():
                room.set_result(None)

    async def _read(self) -> None:
        context = self.context
        try:
            while True:
                while self._in_flight >= MAX_IN_FLIGHT or self._bytes >= self.max_bytes:
                    self._room = self.loop.create_future()
                    await self._room
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                self._last_read = self.loop.time()
                size = request.ByteSize()
                self._in_flight += 1
                self._bytes += size
                self._start(request, size)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke (the client went away mid-message)
            self._out.put_nowait(exc)
            return
        self._eof = True
        self._out.put_nowait(_WAKE)

    def _start(self, request: pb.ModelInferRequest, size: int) -> None:
        """Begin a request now, or once the one before it with the same key is answered. No
        task of the stream's own: what answers it runs from callbacks."""
        try:
            key = self.order_key(request)
        except Exception as exc:
            self._out.put_nowait((self._error(request, exc), size))
            return
        done = None
        if key is not None:
            before = self._tails.get(key)
            done = self._tails[key] = self.loop.create_future()
            if before is not None:
                before.add_done_callback(partial(self._begin, request, size, key, done))
                return
        self._begin(request, size, key, done)

    def _begin(
        self,
        request: pb.ModelInferRequest,
        size: int,
        key: Hashable | None,
        done: asyncio.Future[None] | None,
        _before: object = None,
    ) -> None:
        try:
            running, answer = self.begin(request)
        except Exception as exc:
            self._answer(key, done, self._error(request, exc), size)
            return
        self._running.add(running)
        running.add_done_callback(partial(self._answered, request, size, key, done, answer))

    def _answered(
        self,
        request: pb.ModelInferRequest,
        size: int,
        key: Hashable | None,
        done: asyncio.Future[None] | None,
        answer: Callable[[Any], pb.ModelInferResponse],
        running: asyncio.Future[Any],
    ) -> None:
        self._running.discard(running)
        if running.cancelled():  # the loop is shutting down: nothing to answer
            self._answer(key, done, None, size)
            return
        exc = running.exception()
        if exc is None:
            try:
                reply = pb.ModelStreamInferResponse(infer_response=answer(running.result()))
            except Exception as error:
                exc = error
            else:
                _messages("OK").inc()
        if exc is not None:
            reply = self._error(request, exc)
        self._answer(key, done, reply, size)

    def _answer(
        self,
        key: Hashable | None,
        done: asyncio.Future[None] | None,
        reply: pb.ModelStreamInferResponse | None,
        size: int,
    ) -> None:
        """The request is answered: the next one with its key may begin; the reply goes out."""
        if done is not None:
            done.set_result(None)
            if self._tails.get(key) is done:  # type: ignore[arg-type]
                del self._tails[key]  # type: ignore[arg-type]
        if reply is not None:
            self._out.put_nowait((reply, size))

    def _error(
        self, request: pb.ModelInferRequest, exc: BaseException
    ) -> pb.ModelStreamInferResponse:
        code, message, _ = grpc_status(exc, "ModelStreamInfer")
        _messages(code.name).inc()
        return pb.ModelStreamInferResponse(
            error_message=message,
            infer_response=pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            ),
        )

    def _watch(self) -> None:
        """Once a second: a reply unread too long, or a stream idle too long, is cut off."""
        now = self.loop.time()
        started = self._write_started
        if started is not None and now - started >= self.send_timeout_s:
            self._cut_off = DeadlineExceeded(
                f"a reply stayed unread for {self.send_timeout_s:g} s (ECHO_SEND_TIMEOUT_S)",
                "send_timeout",
            )
        elif (
            self._in_flight == 0
            and started is None
            and now - self._last_read >= self.idle_timeout_s
        ):
            self._cut_off = IdleTimeout(
                f"no request for {self.idle_timeout_s:g} s (ECHO_IDLE_TIMEOUT_S)"
            )
        if self._cut_off is not None and self._task is not None:
            self._task.cancel()
            return
        self._timer = self.loop.call_later(WATCH_PERIOD_S, self._watch)

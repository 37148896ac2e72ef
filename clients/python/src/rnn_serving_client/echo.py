"""Exactly-once echo streams over the ``/echo`` WebSocket (protocol: ``docs/echo-protocol.md``).

One :class:`EchoStream` is one echo session. Messages go out in order, at most
``max_in_flight`` unanswered at a time, and every reply is handed to the application exactly
once, in order. After a drop (a reset connection, a close 1001/1006/1011/1012/1013, a lost
lease) the stream reconnects with exponential backoff and jitter, trying the base URLs in turn,
resumes with ``last_seq`` = the last reply it received, drops replayed duplicates and re-sends
the messages the server had not processed. ``session_in_use`` and ``store_unavailable`` are
retried like a drop, until ``reconnect_deadline`` seconds have passed without a working
connection; then every waiting call raises :class:`ReconnectDeadlineExceeded`.

Why ``max_in_flight`` defaults to 4: the server keeps only the last ``ECHO_REPLAY_REPLIES``
(default 4) replies of a session for a resume. With more messages unanswered, a drop could lose
replies the server sent and no longer keeps (``replay_unavailable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import re
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .errors import (
    ConnectionFailed,
    InvalidInput,
    ReconnectDeadlineExceeded,
    RnnServingError,
    SessionLost,
    TooLarge,
    Unavailable,
    error_from_close,
    error_from_response,
)
from .store import RESET, MemorySessionStore, SessionState, SessionStore
from .types import EchoReply

__all__ = ["EchoStream", "as_bits"]

log = logging.getLogger("rnn_serving_client.echo")
_SECRET = re.compile(r"((?:^|[?&\s])(?:token|access_token)=)[^&\s]*")


class _Redact(logging.Filter):
    """websockets logs each handshake's request line (with the resume token) at DEBUG: the
    connections log to ``rnn_serving_client.websocket``, whose records read ``token=[redacted]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRET.sub(r"\1[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


ws_log = logging.getLogger("rnn_serving_client.websocket")
ws_log.addFilter(_Redact())

# Closes after which the session is resumed; every other close ends the stream with its error.
RETRY_CLOSES = frozenset({1000, 1001, 1005, 1006, 1011, 1012, 1013, 1014})
_CONNECT_PROXY_ARG = "proxy" in inspect.signature(connect).parameters  # websockets >= 15


def as_bits(bits: Any) -> tuple[int, ...]:
    """A message's bits as a tuple of 0/1 ints: a sequence of 0/1 (ints or bools), or a NumPy
    array (anything with ``.tolist()``). Anything else is refused here, before it is sent."""
    if hasattr(bits, "tolist"):
        bits = bits.tolist()
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Iterable):
        raise InvalidInput("invalid_bits", "bits must be a sequence of 0 and 1")
    out = tuple(bits)
    if not out:
        raise InvalidInput("empty_bits", "a message needs at least one bit")
    if any(b not in (0, 1) or isinstance(b, float) for b in out):
        raise InvalidInput("invalid_bits", "bits must be the integers 0 and 1")
    return tuple(int(b) for b in out)


class _Entry:
    """One message of the stream: unsent → sent → answered → handed to the application."""

    __slots__ = ("after", "bits", "future", "handed", "recovered", "reply", "sent", "seq")

    def __init__(self, bits: tuple[int, ...] | None, seq: int, recovered: bool = False) -> None:
        self.bits = bits  # None: a reset
        self.seq = seq  # bits: the seq that answers it; reset: the seq of the message before it
        self.reply: EchoReply | None = None
        self.sent = False
        self.handed = False
        self.recovered = recovered
        self.future: asyncio.Future[EchoReply | None] = asyncio.get_running_loop().create_future()

    @property
    def payload(self) -> str:
        if self.bits is None:
            return '{"type":"reset"}'
        return '{"bits":[' + ",".join("1" if b else "0" for b in self.bits) + "]}"

    @property
    def answered(self) -> bool:
        return self.future.done()


class EchoStream:
    """An exactly-once echo session (``async with client.echo() as stream``).

    ``await stream.send(bits)`` → that message's :class:`EchoReply`; ``await stream.reset()``;
    ``async for reply in stream.stream(chunks)`` pipelines a whole iterable (sync or async) of
    chunks and yields the replies in order. ``stream.recovered()`` returns the replies to the
    messages a previous process left unanswered (with a :class:`FileSessionStore`).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        headers: dict[str, str] | None = None,
        store: SessionStore | None = None,
        max_in_flight: int = 4,
        reconnect_deadline: float = 60.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        open_timeout: float = 10.0,
        max_frame_bytes: int = 65536,
    ) -> None:
        if not urls:
            raise ValueError("need at least one URL")
        self._urls = [_ws_url(u) for u in urls]
        self._url_index = 0
        self._headers = dict(headers or {})
        self._store: SessionStore = store if store is not None else MemorySessionStore()
        self.max_in_flight = max(1, max_in_flight)
        self.reconnect_deadline = reconnect_deadline
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.open_timeout = open_timeout
        self.max_frame_bytes = max_frame_bytes
        self._session_id: str | None = None
        self._token: str | None = None
        self.echo_step: int | None = None
        self.model_version: int | None = None
        self.resumed = False
        self.connections = 0  #: connections opened (1 + reconnects)
        self.retried: dict[str, int] = {}  #: drops and failed connects retried, by code
        self._received = 0  # seq of the last reply received
        self._next_seq = 1  # seq that will answer the next bits message
        self._entries: deque[_Entry] = deque()  # not yet handed over, in order
        self._unsent: deque[_Entry] = deque()
        self._inflight = 0
        self._ws: ClientConnection | None = None
        self._wake: asyncio.Event | None = None
        self._connected: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: RnnServingError | None = None
        self._closing = False

    # -- public --------------------------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def seq(self) -> int:
        """The seq of the last reply received (every message up to it is answered)."""
        return self._received

    @property
    def submitted(self) -> int:
        """Bits messages this session has taken so far (answered or not): after a restart from a
        file store, the application's next message is its message ``submitted + 1``."""
        return self._next_seq - 1

    async def __aenter__(self) -> EchoStream:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Resume the store's session if it holds one, else start a new one."""
        self._wake, self._connected = asyncio.Event(), asyncio.Event()
        state = self._store.load()
        if state is not None:
            self._restore(state)
        self._task = asyncio.create_task(self._run(), name="rnn-serving-echo")
        await self._wait_connected()

    async def send(self, bits: Any) -> EchoReply:
        """Send one message; its reply (exactly once, whatever drops happen meanwhile)."""
        entry = self._enqueue(as_bits(bits))
        reply = await self._answer(entry)
        self._hand_over(entry)
        assert reply is not None
        return reply

    async def reset(self) -> None:
        """Back to the model's initial state (this session's model version)."""
        entry = self._enqueue(None)
        await self._answer(entry)
        self._hand_over(entry)

    async def stream(self, chunks: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[EchoReply]:
        """Send every chunk of ``chunks`` (pipelined, ``max_in_flight`` at a time on the wire)
        and yield their replies in order, each exactly once."""
        waiting: deque[_Entry] = deque()
        async for chunk in _aiter(chunks):
            waiting.append(self._enqueue(as_bits(chunk)))
            while waiting and (waiting[0].answered or len(waiting) > 2 * self.max_in_flight):
                yield await self._yield_one(waiting)
        while waiting:
            yield await self._yield_one(waiting)

    async def recovered(self) -> list[EchoReply]:
        """The replies to the messages a previous process left unanswered or unread (restored
        from the store), in order; each is handed over once (later calls return [])."""
        out: list[EchoReply] = []
        for entry in [e for e in self._entries if e.recovered and not e.handed]:
            reply = await self._answer(entry)
            self._hand_over(entry)
            if reply is not None:
                out.append(reply)
        return out

    async def close(self, *, forget: bool = False) -> None:
        """Close the connection. The session stays in the store, resumable for the server's
        ``ECHO_SESSION_TTL_S``, unless ``forget``."""
        self._closing = True
        ws = self._ws
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        self._fail_waiting(RnnServingError("closed", "the stream was closed"))
        if forget:
            self._store.clear()

    def __repr__(self) -> str:
        return (
            f"EchoStream(url={self._urls[self._url_index]!r}, session_id={self._session_id!r}, "
            f"seq={self._received}, unanswered={sum(not e.answered for e in self._entries)})"
        )

    # -- the application side ------------------------------------------------------------------

    def _enqueue(self, bits: tuple[int, ...] | None) -> _Entry:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise RnnServingError("closed", "the stream was closed")
        if bits is None:
            entry = _Entry(None, self._next_seq - 1)
        else:
            if 12 + 2 * len(bits) > self.max_frame_bytes:
                raise TooLarge("frame_too_large", f"at most {self.max_frame_bytes} bytes a frame")
            entry = _Entry(bits, self._next_seq)
            self._next_seq += 1
        self._entries.append(entry)
        self._unsent.append(entry)
        self._save()  # before it can reach the wire
        assert self._wake is not None
        self._wake.set()
        return entry

    async def _answer(self, entry: _Entry) -> EchoReply | None:
        return await asyncio.shield(entry.future)

    async def _yield_one(self, waiting: deque[_Entry]) -> EchoReply:
        entry = waiting.popleft()
        reply = await self._answer(entry)
        self._hand_over(entry)
        assert reply is not None
        return reply

    def _hand_over(self, entry: _Entry) -> None:
        """The application has the reply: drop it from the store (it is not handed out again)."""
        entry.handed = True
        while self._entries and self._entries[0].handed:
            self._entries.popleft()
        self._save()

    def _save(self) -> None:
        if self._session_id is None or self._token is None:
            return
        pending = tuple(e.bits if e.bits is not None else RESET for e in self._entries
                        if not e.answered)  # fmt: skip
        replies = tuple(e.reply for e in self._entries if e.reply is not None and not e.handed)
        self._store.save(
            SessionState(
                session_id=self._session_id,
                token=self._token,
                seq=self._received,
                pending=pending,
                replies=replies,
                echo_step=self.echo_step,
                model_version=self.model_version,
            )
        )

    def _restore(self, state: SessionState) -> None:
        self._session_id, self._token = state.session_id, state.token
        self.echo_step, self.model_version = state.echo_step, state.model_version
        self._received = state.seq
        for reply in state.replies:
            entry = _Entry(tuple(reply.bits), reply.seq, recovered=True)
            entry.reply, entry.sent = reply, True
            entry.future.set_result(reply)
            self._entries.append(entry)
        seq = state.seq
        for message in state.pending:
            if message is RESET:
                entry = _Entry(None, seq, recovered=True)
            else:
                seq += 1
                entry = _Entry(message, seq, recovered=True)
            self._entries.append(entry)
            self._unsent.append(entry)
        self._next_seq = seq + 1

    def _fail_waiting(self, error: RnnServingError) -> None:
        for entry in self._entries:
            if not entry.future.done():
                entry.future.set_exception(error)
                entry.future.exception()  # retrieved: no "never retrieved" warning

    async def _wait_connected(self) -> None:
        assert self._connected is not None and self._task is not None
        waiter = asyncio.ensure_future(self._connected.wait())
        await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._error is not None:
            raise self._error

    # -- the connection side -------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._closing:
                ws = await self._connect()
                writer = asyncio.create_task(self._write(ws))
                try:
                    error = await self._read(ws)
                finally:
                    writer.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await writer
                    self._ws = None
                    assert self._connected is not None
                    self._connected.clear()
                with contextlib.suppress(Exception):
                    await ws.close()
                if self._closing:
                    return
                if not _retryable(error):
                    raise error
                self.retried[error.code] = self.retried.get(error.code, 0) + 1
                if error.code == "idle_timeout" and all(e.answered for e in self._entries):
                    assert self._wake is not None  # idle: resume when there is something to send
                    self._wake.clear()
                    await self._wake.wait()
                log.info("echo connection dropped (%s: %s); resuming", error.code, error.status)
        except RnnServingError as exc:
            self._error = exc
            self._fail_waiting(exc)
        except Exception as exc:  # a bug or a protocol violation: never leave callers hanging
            self._error = RnnServingError("client_error", repr(exc))
            self._fail_waiting(self._error)

    async def _connect(self) -> ClientConnection:
        """A connection with the session attached, replays taken, unanswered messages queued."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_deadline
        attempt = 0
        while True:
            try:
                ws = await self._attach()
                self.connections += 1
                return ws
            except RnnServingError as exc:
                if not _retryable(exc):
                    raise
                self.retried[exc.code] = self.retried.get(exc.code, 0) + 1
                if isinstance(exc, ConnectionFailed) or exc.code in ("not_ready", "shutting_down"):
                    self._url_index = (self._url_index + 1) % len(self._urls)  # try the next one
                delay = min(self.backoff_max, self.backoff_initial * 2**attempt)
                delay = delay / 2 + random.uniform(0, delay / 2)
                retry_after = getattr(exc, "retry_after", None)
                if retry_after is not None and exc.code == "session_in_use":
                    delay = min(delay, retry_after)  # when the lease lapses at the latest
                elif retry_after is not None:
                    delay = max(delay, min(retry_after, self.backoff_max * 2))
                attempt += 1
                left = deadline - loop.time()
                if left <= 0:
                    raise ReconnectDeadlineExceeded(
                        f"no connection within {self.reconnect_deadline} s "
                        f"({attempt} tries; last: {exc})",
                        exc,
                    ) from exc
                log.info("echo connect failed (%s); retrying in %.2f s", exc.code, delay)
                await asyncio.sleep(min(delay, left))

    async def _attach(self) -> ClientConnection:
        url = self._urls[self._url_index] + "/echo"
        if self._session_id is not None and self._token is not None:
            url += (
                f"?session_id={quote(self._session_id, safe='')}"
                f"&token={quote(self._token, safe='')}&last_seq={self._received}"
            )
        kwargs: dict[str, Any] = {
            "additional_headers": self._headers,
            "open_timeout": self.open_timeout,
            "max_size": 2**22,
            "logger": ws_log,
        }
        if _CONNECT_PROXY_ARG:
            kwargs["proxy"] = None
        try:
            ws = await connect(url, **kwargs)
        except InvalidStatus as exc:
            status = exc.response.status_code
            try:
                body: Any = json.loads(exc.response.body or b"")
            except ValueError:
                body = (exc.response.body or b"").decode(errors="replace")
            raise error_from_response(status, body, exc.response.headers) from None
        except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
            raise ConnectionFailed("connection_failed", type(exc).__name__) from None
        try:
            first = await self._recv(ws)
            if first.get("type") != "session":
                raise RnnServingError("protocol_error", f"expected a session frame, got {first}")
            if self._session_id is not None and first["session_id"] != self._session_id:
                raise RnnServingError("protocol_error", "the server opened another session")
            server_seq = int(first["seq"])
            if server_seq < self._received:
                raise SessionLost("invalid_last_seq", "the session is behind the replies received")
            self._session_id, self._token = first["session_id"], first["token"]
            self.echo_step, self.model_version = first.get("echo_step"), first.get("model_version")
            self.resumed = bool(first.get("resumed"))
            if not self.resumed:
                self._received = server_seq
            for _ in range(server_seq - self._received):  # answered, never received: replayed
                frame = await self._recv(ws)
                if frame.get("type") != "echo":
                    raise RnnServingError("protocol_error", f"expected a replay, got {frame}")
                self._on_echo(frame)
            self._requeue(server_seq)
            self._save()
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise
        self._ws = ws
        assert self._connected is not None
        self._connected.set()
        return ws

    async def _recv(self, ws: ClientConnection) -> dict[str, Any]:
        try:
            raw = await asyncio.wait_for(ws.recv(), self.open_timeout)
        except ConnectionClosed as exc:
            raise _close_error(exc) from None
        except asyncio.TimeoutError:
            raise ConnectionFailed("connection_failed", "no frame in time") from None
        frame: dict[str, Any] = json.loads(raw)
        if frame.get("type") == "error" and frame.get("code") not in ("store_unavailable",
                                                                       "lease_lost"):  # fmt: skip
            raise RnnServingError("protocol_error", f"unexpected error frame {frame.get('code')}")
        return frame

    def _requeue(self, server_seq: int) -> None:
        """After the session frame and the replays: queue every unanswered message again."""
        for entry in self._entries:
            if entry.bits is None and not entry.answered and entry.seq < server_seq:
                entry.future.set_result(None)  # a message after it was processed, so it was
        self._unsent = deque(e for e in self._entries if not e.answered)
        for entry in self._unsent:
            entry.sent = False
            if entry.bits is not None and entry.seq <= server_seq:
                raise RnnServingError("protocol_error", f"message {entry.seq} was not replayed")
        self._inflight = 0
        assert self._wake is not None
        self._wake.set()

    async def _write(self, ws: ClientConnection) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            while self._unsent and (
                self._unsent[0].bits is None or self._inflight < self.max_in_flight
            ):
                entry = self._unsent.popleft()
                if entry.answered:
                    continue
                entry.sent = True
                if entry.bits is not None:
                    self._inflight += 1
                try:
                    await ws.send(entry.payload)
                except ConnectionClosed:
                    return  # the reader sees the close
            await self._wake.wait()

    async def _read(self, ws: ClientConnection) -> RnnServingError:
        """Handle the connection's frames until it closes; the close as an error."""
        try:
            async for raw in ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "echo":
                    self._on_echo(frame)
                elif kind == "reset":
                    self._on_reset()
                elif kind == "error":
                    self._on_error(frame)
        except ConnectionClosed as exc:
            return _close_error(exc)
        except OSError as exc:
            return ConnectionFailed("connection_failed", type(exc).__name__)
        rcvd = ws.close_code
        return error_from_close(rcvd if rcvd is not None else 1006, ws.close_reason or "")

    def _on_echo(self, frame: dict[str, Any]) -> None:
        seq = int(frame["seq"])
        if seq <= self._received:
            return  # a duplicate
        entry = next((e for e in self._entries if not e.answered), None)
        while entry is not None and entry.bits is None and entry.seq < seq:
            entry.future.set_result(None)  # a reset before this message: processed
            entry = next((e for e in self._entries if not e.answered), None)
        if entry is None or entry.bits is None or entry.seq != seq:
            raise RnnServingError("protocol_error", f"reply {seq} answers no message sent")
        reply = EchoReply.from_json(frame)
        entry.reply = reply
        self._received = seq
        self._inflight = max(0, self._inflight - 1)
        entry.future.set_result(reply)
        self._save()
        assert self._wake is not None
        self._wake.set()

    def _on_reset(self) -> None:
        entry = next((e for e in self._entries if not e.answered), None)
        if entry is None or entry.bits is not None:
            raise RnnServingError("protocol_error", "a reset reply answers no reset sent")
        entry.future.set_result(None)
        self._save()

    def _on_error(self, frame: dict[str, Any]) -> None:
        code, detail = str(frame.get("code")), str(frame.get("detail", ""))
        if code in ("store_unavailable", "lease_lost"):
            return  # a close follows; the message is re-sent after the resume
        entry = next((e for e in self._entries if not e.answered and e.sent), None)
        if entry is None:
            raise RnnServingError("protocol_error", f"an error frame ({code}) answers nothing")
        error = (TooLarge if code in ("frame_too_large", "too_many_bits") else InvalidInput)(
            code, detail
        )
        entry.future.set_exception(error)
        if entry.bits is not None:  # refused messages take no seq: the later ones move up
            self._inflight = max(0, self._inflight - 1)
            for later in self._entries:
                if later is not entry and not later.answered and later.seq >= entry.seq:
                    later.seq -= 1
            self._next_seq -= 1
        entry.handed = True  # the caller gets the error; nothing to hand over
        self._save()
        assert self._wake is not None
        self._wake.set()


def _retryable(error: RnnServingError) -> bool:
    if isinstance(error, ConnectionFailed):
        return True
    if isinstance(error, Unavailable) and not isinstance(error, ReconnectDeadlineExceeded):
        return True  # 503, 1013 (session_in_use, store_unavailable, lease_lost …), 1001, 1012
    return error.status in RETRY_CLOSES and not isinstance(error, (InvalidInput, SessionLost))


def _close_error(exc: ConnectionClosed) -> RnnServingError:
    rcvd = exc.rcvd
    if rcvd is None:
        return ConnectionFailed("connection_failed", "the connection closed without a close frame")
    return error_from_close(rcvd.code, rcvd.reason)


def _ws_url(url: str) -> str:
    parts = urlsplit(url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not an http(s) or ws(s) URL: {url!r}")
    path = parts.path.removesuffix("/echo")
    return f"{scheme}://{parts.netloc}{path}"


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item

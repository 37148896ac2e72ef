"""A minimal gRPC client protocol (HTTP/2, RFC 9113) for load, built to be cheap as the HTTP/1.1
and WebSocket ones of ``bench.wire``: an ``asyncio.Protocol`` that frames pre-encoded protobuf
messages and hands each reply's bytes to a callback, with no grpcio client on the hot path.

What a gRPC client needs and no more: the connection preface and SETTINGS (our receive windows
as large as HTTP/2 allows, topped up as they are used, so the server is never held back by us),
request HEADERS as HPACK literals (no table, no Huffman), length-prefixed messages in DATA frames
split to the server's frame size and sent within its flow-control windows (queued until its
WINDOW_UPDATE otherwise), PING and SETTINGS acknowledged. Response HEADERS are not decoded: a
stream that ends (trailers, ``END_STREAM``) or is reset is reported with how many messages it
brought, and errors show in the reply messages themselves (``ModelStreamInferResponse``'s
``error_message``) or as a unary call that ended without a message.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
MAX_WINDOW = 2**31 - 1
TOP_UP = 2**30  # received bytes after which a receive window is topped up again
_HEAD = struct.Struct(">IBI")  # (24-bit length << 8 | type), flags, stream


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        (len(payload) << 8 | kind).to_bytes(4, "big")
        + bytes([flags])
        + stream.to_bytes(4, "big")
        + payload
    )


def _hpack_int(n: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (RFC 7541 §5.1), the H (Huffman) bit clear."""
    if n < 127:
        return bytes([n])
    out, n = bytearray([127]), n - 127
    while n >= 128:
        out.append(n % 128 + 128)
        n //= 128
    out.append(n)
    return bytes(out)


def request_headers(path: str, authority: str, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The HPACK block of a gRPC request: every field a literal without indexing."""
    fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *metadata,
    ]
    block = bytearray()
    for name, value in fields:
        n, v = name.encode(), value.encode()
        block += b"\x00" + _hpack_int(len(n)) + n + _hpack_int(len(v)) + v
    return bytes(block)


def grpc_message(message: bytes) -> bytes:
    """A length-prefixed gRPC message (not compressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


class GrpcConn(asyncio.Protocol):
    """One HTTP/2 connection carrying gRPC calls; replies go to ``on_message(stream, bytes)``,
    stream ends to ``on_end(stream, messages, reset)``."""

    def __init__(
        self,
        on_message: Callable[[int, bytes], None],
        on_end: Callable[[int, int, bool], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.on_message, self.on_end = on_message, on_end
        self.ready: asyncio.Future[None] = loop.create_future()  # the server's SETTINGS came
        self.lost: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.next_stream = 1
        self.max_frame = 16_384
        self.peer_initial = 65_535
        self.send_window = 65_535  # the connection's, for our DATA
        self.windows: dict[int, int] = {}  # stream -> its send window
        self.pending: deque[tuple[int, bytes, bool]] = deque()  # DATA held back by the windows
        self.partial: dict[int, bytearray] = {}  # stream -> bytes of a message not complete yet
        self.counts: dict[int, int] = {}  # stream -> messages received
        self.received = 0  # bytes since the connection window was last topped up
        self.goaway = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, MAX_WINDOW)
        transport.write(  # type: ignore[attr-defined]
            PREFACE
            + _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - 65_535).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before SETTINGS: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)
        for stream in list(self.counts):
            self._ended(stream, True)

    def open(self, headers: bytes, message: bytes | None = None, end: bool = False) -> int:
        """Start a call (HEADERS), with its first message; returns its stream id."""
        stream = self.next_stream
        self.next_stream += 2
        self.windows[stream] = self.peer_initial
        self.counts[stream] = 0
        flags = END_HEADERS | (END_STREAM if end and message is None else 0)
        self.transport.write(_frame(HEADERS, flags, stream, headers))  # type: ignore[union-attr]
        if message is not None:
            self.send(stream, message, end)
        return stream

    def send(self, stream: int, message: bytes, end: bool = False) -> None:
        """One gRPC message on ``stream`` (``end``: the last one, half-closing the stream)."""
        data = grpc_message(message)
        if self.pending or not self._fits(stream, len(data)):
            self.pending.append((stream, data, end))
            return
        self._write_data(stream, data, end)

    def cancel(self, stream: int) -> None:
        self.transport.write(_frame(RST_STREAM, 0, stream, b"\x00\x00\x00\x08"))  # type: ignore[union-attr]
        self._ended(stream, True)

    def _fits(self, stream: int, n: int) -> bool:
        return n <= self.send_window and n <= self.windows.get(stream, 0)

    def _write_data(self, stream: int, data: bytes, end: bool) -> None:
        n = len(data)
        self.send_window -= n
        self.windows[stream] -= n
        size = self.max_frame
        if n <= size:
            frames = _frame(DATA, END_STREAM if end else 0, stream, data)
        else:
            parts = [data[i : i + size] for i in range(0, n, size)]
            frames = b"".join(
                _frame(DATA, END_STREAM if end and i == len(parts) - 1 else 0, stream, part)
                for i, part in enumerate(parts)
            )
        self.transport.write(frames)  # type: ignore[union-attr]

    def _flush(self) -> None:
        while self.pending:
            stream, data, end = self.pending[0]
            if stream not in self.windows:  # the stream ended meanwhile
                self.pending.popleft()
                continue
            if not self._fits(stream, len(data)):
                return
            self.pending.popleft()
            self._write_data(stream, data, end)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        at, size = 0, len(buf)
        while size - at >= 9:
            word, flags, stream = _HEAD.unpack_from(buf, at)
            length, kind = word >> 8, word & 0xFF
            stream &= 0x7FFFFFFF
            end = at + 9 + length
            if end > size:
                break
            payload = buf[at + 9 : end]
            at = end
            if kind == DATA:
                self._on_data(stream, flags, payload)
            elif kind == HEADERS:
                if flags & END_STREAM:
                    self._ended(stream, False)
            elif kind == SETTINGS:
                if not flags & ACK:
                    self._on_settings(payload)
            elif kind == WINDOW_UPDATE:
                increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                if stream == 0:
                    self.send_window += increment
                elif stream in self.windows:
                    self.windows[stream] += increment
                self._flush()
            elif kind == PING:
                if not flags & ACK:
                    self.transport.write(_frame(PING, ACK, 0, payload))  # type: ignore[union-attr]
            elif kind == RST_STREAM:
                self._ended(stream, True)
            elif kind == GOAWAY:
                self.goaway = True
        del buf[:at]

    def _on_settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == 0x4:  # INITIAL_WINDOW_SIZE: applies to open streams too
                delta, self.peer_initial = value - self.peer_initial, value
                for stream in self.windows:
                    self.windows[stream] += delta
            elif key == 0x5:
                self.max_frame = value
        self.transport.write(_frame(SETTINGS, ACK, 0))  # type: ignore[union-attr]
        if not self.ready.done():
            self.ready.set_result(None)
        self._flush()

    def _on_data(self, stream: int, flags: int, payload: bytearray) -> None:
        n = len(payload)
        if flags & PADDED:
            payload = payload[1 : n - payload[0]]
        self.received += n
        if self.received >= TOP_UP:  # our windows were MAX_WINDOW: give back what was used
            topup = self.received.to_bytes(4, "big")
            self.transport.write(  # type: ignore[union-attr]
                _frame(WINDOW_UPDATE, 0, 0, topup) + _frame(WINDOW_UPDATE, 0, stream, topup)
            )
            self.received = 0
        partial = self.partial.get(stream)
        if partial is not None:
            partial += payload
            data = partial
        else:
            data = payload
        at, size = 0, len(data)
        while size - at >= 5:
            length = int.from_bytes(data[at + 1 : at + 5], "big")
            if size - at - 5 < length:
                break
            self.counts[stream] = self.counts.get(stream, 0) + 1
            self.on_message(stream, bytes(data[at + 5 : at + 5 + length]))
            at += 5 + length
        if at < size:
            self.partial[stream] = bytearray(data[at:])
        elif partial is not None:
            del self.partial[stream]
        if flags & END_STREAM:
            self._ended(stream, False)

    def _ended(self, stream: int, reset: bool) -> None:
        self.windows.pop(stream, None)
        self.partial.pop(stream, None)
        messages = self.counts.pop(stream, None)
        if messages is not None and self.on_end is not None:
            self.on_end(stream, messages, reset)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame(GOAWAY, 0, 0, bytes(8)))
            self.transport.close()

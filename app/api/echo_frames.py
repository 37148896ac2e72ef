"""The frames of ``WS /echo``, in and out: :func:`parse_frame` turns a client's text frame into
bits or a reset; the other functions write the server's frames.

The per-message path is deliberately lean: orjson, and the bits checked with a few C-level calls
instead of pydantic (``app.schemas.echo`` documents the same frames; ``tests/test_api_echo.py``
checks every server frame against those schemas, ``tests/test_hostile_http.py`` the parser).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from app.services.echo_replies import unpack_reply

_BINARY = b"\0\1"
_MISSING = object()
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
RESET_FRAME = '{"type":"reset"}'


class FrameError(Exception):
    """A refused client frame: answered with an error frame, the connection carries on."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def parse_frame(text: str, max_bytes: int, max_bits: int) -> bytes | None:
    """A client text frame → its bits as ``bytes`` of 0/1, or None for a reset.

    A bit is the JSON integer 0 or 1: ``true``/``false``, ``1.0`` and ``"1"`` are refused
    everywhere (``set(map(type, ...))`` sees them even where ``True == 1``).
    """
    if len(text) > max_bytes or (not text.isascii() and len(text.encode()) > max_bytes):
        raise FrameError("frame_too_large", f"frames are limited to {max_bytes} bytes")
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise FrameError("invalid_json", f"not JSON: {exc}") from None
    if type(frame) is not dict:
        raise FrameError("invalid_frame", "a frame must be a JSON object")
    kind = frame.get("type", "bits")
    if kind == "reset":
        return None
    if kind != "bits":
        raise FrameError("unknown_type", f'"type" must be "bits" or "reset", got {kind!r:.40}')
    bits = frame.get("bits", _MISSING)
    if bits is _MISSING:
        raise FrameError("missing_bits", 'a bits frame needs "bits": [0, 1, ...]')
    if type(bits) is not list:
        raise FrameError("invalid_bits", '"bits" must be a list of integers 0 and 1')
    if not bits:
        raise FrameError("empty_bits", '"bits" must not be empty')
    if len(bits) > max_bits:
        raise FrameError("too_many_bits", f"at most {max_bits} bits per message, got {len(bits)}")
    if len(set(map(type, bits))) != 1 or type(bits[0]) is not int:
        raise FrameError("invalid_bits", "bits must be the JSON integers 0 and 1")
    try:
        chunk = bytes(bits)
    except (ValueError, OverflowError):  # below 0 or above 255
        chunk = b"\2"
    if chunk.translate(None, _BINARY):
        raise FrameError("invalid_bits", "bits must be the JSON integers 0 and 1")
    return chunk


def echo_frame(seq: int, probs: np.ndarray, bits: np.ndarray) -> str:
    """The ``echo`` frame's text (float32 probabilities, uint8 bits)."""
    reply = {"type": "echo", "seq": seq, "probabilities": probs, "bits": bits}
    return orjson.dumps(reply, option=_NUMPY).decode()


def replay_frame(packed: bytes) -> str:
    """The ``echo`` frame a packed reply was made from, byte for byte (``last_seq`` resumes)."""
    return echo_frame(*unpack_reply(packed))


def session_frame(**fields: Any) -> str:
    """The ``session`` frame that opens every connection."""
    return orjson.dumps({"type": "session", **fields}).decode()


def error_frame(code: str, detail: str) -> str:
    """An ``error`` frame: the message was refused, the connection carries on."""
    return orjson.dumps({"type": "error", "code": code, "detail": detail}).decode()

"""Client frames of ``WS /echo``: :func:`parse_frame` turns a text frame into bits or a reset.

The per-message path is deliberately lean: orjson, and the bits checked with a few C-level calls
instead of pydantic (``app.schemas.echo`` documents the same frames; ``tests/test_echo_frames.py``
checks that both accept and refuse the same frames).
"""

from __future__ import annotations

import orjson

_BINARY = b"\0\1"
_MISSING = object()


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

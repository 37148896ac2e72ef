"""Echo replies: the ``echo`` frame a session sent, packed small enough to keep a few per session.

A resume with ``?last_seq=N`` re-sends the replies after ``N`` that the client missed (the server
may have answered and stored a step whose reply never arrived), so every session keeps its most
recent ``ECHO_REPLAY_REPLIES`` replies: in memory, or in Redis next to its state. Packed, a
reply is its ``seq`` (8 bytes) plus 5 bytes per bit (float32 probability, uint8 bit), 5x smaller
than its JSON; :func:`unpack_reply` gives back what ``app.api.echo_frames`` turns into exactly the
text that was sent.
"""

from __future__ import annotations

import numpy as np

_SEQ = 8  # bytes of the packed seq (little-endian)


def pack_reply(seq: int, probs: np.ndarray, bits: np.ndarray) -> bytes:
    """``seq`` + float32 probabilities + uint8 bits, as bytes."""
    return (
        seq.to_bytes(_SEQ, "little")
        + probs.astype(np.float32, copy=False).tobytes()
        + (bits.astype(np.uint8, copy=False).tobytes())
    )


def reply_seq(packed: bytes) -> int:
    return int.from_bytes(packed[:_SEQ], "little")


def unpack_reply(packed: bytes) -> tuple[int, np.ndarray, np.ndarray]:
    """``(seq, probabilities, bits)`` of a packed reply (views of ``packed``)."""
    n = (len(packed) - _SEQ) // 5
    probs = np.frombuffer(packed, np.float32, n, _SEQ)
    bits = np.frombuffer(packed, np.uint8, n, _SEQ + 4 * n)
    return reply_seq(packed), probs, bits

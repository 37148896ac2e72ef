"""Echo replies: the ``echo`` frame a session sent, packed small enough to keep a few per session.

A resume with ``?last_seq=N`` re-sends the replies after ``N`` that the client missed (the server
may have answered and stored a step whose reply never arrived), so every session keeps its most
recent ``ECHO_REPLAY_REPLIES`` replies: in memory, or in Redis next to its state. Packed, a
reply is its ``seq`` (8 bytes) plus 5 bytes per bit (float32 probability, uint8 bit), 5x smaller
than its JSON; :func:`unpack_reply` gives back what ``app.api.echo_frames`` turns into exactly the
text that was sent.

A v2 sequence step (``app.services.echo_sequences``) keeps its reply the same way, with a fixed
:data:`SEQUENCE_TAG_BYTES`-byte tag after the bits (:class:`SequenceTag`: the step's flags, the
model version that answered, a digest of the request ``id`` and one of the request itself), so
that a retried ``id`` is answered from it (:func:`unpack_sequence_reply`). Sequence sessions are
never resumed over ``/echo``, so the two layouts never meet.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

_SEQ = 8  # bytes of the packed seq (little-endian)


def pack_reply(seq: int, probs: np.ndarray, bits: np.ndarray, tag: bytes = b"") -> bytes:
    """``seq`` + float32 probabilities + uint8 bits (+ a sequence step's ``tag``), as bytes."""
    packed = (
        seq.to_bytes(_SEQ, "little")
        + probs.astype(np.float32, copy=False).tobytes()
        + (bits.astype(np.uint8, copy=False).tobytes())
    )
    return packed + tag if tag else packed


def reply_seq(packed: bytes) -> int:
    return int.from_bytes(packed[:_SEQ], "little")


def unpack_reply(packed: bytes) -> tuple[int, np.ndarray, np.ndarray]:
    """``(seq, probabilities, bits)`` of a packed reply (views of ``packed``)."""
    n = (len(packed) - _SEQ) // 5
    probs = np.frombuffer(packed, np.float32, n, _SEQ)
    bits = np.frombuffer(packed, np.uint8, n, _SEQ + 4 * n)
    return reply_seq(packed), probs, bits


# --- v2 sequence steps ---------------------------------------------------------------------------

STARTED, ENDED, HAS_ID = 1, 2, 4  # SequenceTag.flags
_TAG = struct.Struct("<BI16s8s")  # flags, version, id digest, request digest
SEQUENCE_TAG_BYTES = _TAG.size  # 29


class SequenceTag(NamedTuple):
    """What a sequence step's kept reply says about the request that it answered."""

    flags: int  # STARTED | ENDED | HAS_ID
    version: int  # the echo model version that answered
    id_digest: bytes  # 16 bytes: a digest of the request ``id`` (zeros without HAS_ID)
    request_digest: bytes  # 8 bytes: a digest of the flags and the bits sent

    def pack(self) -> bytes:
        return _TAG.pack(*self)


def unpack_sequence_reply(packed: bytes) -> tuple[int, np.ndarray, np.ndarray, SequenceTag]:
    """``(seq, probabilities, bits, tag)`` of a packed sequence step reply."""
    n = (len(packed) - _SEQ - SEQUENCE_TAG_BYTES) // 5
    probs = np.frombuffer(packed, np.float32, n, _SEQ)
    bits = np.frombuffer(packed, np.uint8, n, _SEQ + 4 * n)
    tag = SequenceTag(*_TAG.unpack_from(packed, _SEQ + 5 * n))
    return reply_seq(packed), probs, bits, tag


def sequence_tag(packed: bytes) -> SequenceTag:
    """Only the tag of a packed sequence step reply (the last bytes)."""
    return SequenceTag(*_TAG.unpack_from(packed, len(packed) - SEQUENCE_TAG_BYTES))

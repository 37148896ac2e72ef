"""The frames of the ``/echo`` WebSocket protocol (documentation; the hot path parses by hand,
and ``tests/test_api_echo.py`` checks every frame the server sends against these models).

Every frame is one JSON object in a WebSocket *text* frame. See ``docs/echo-protocol.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class BitsFrame(BaseModel):
    """Client → server: bits to advance the session by (``type`` may be omitted)."""

    type: Literal["bits"] = "bits"
    bits: list[Literal[0, 1]] = Field(
        ...,
        min_length=1,
        description="JSON integers 0 or 1 (true/false, 1.0 and strings are rejected); at most "
        "ECHO_MAX_BITS_PER_MESSAGE of them, in a frame of at most ECHO_MAX_FRAME_BYTES bytes.",
    )


class ResetFrame(BaseModel):
    """Client → server: put the session's state back to the model's initial state."""

    type: Literal["reset"]


class SessionFrame(BaseModel):
    """Server → client, first frame of every connection."""

    type: Literal["session"] = "session"
    session_id: str = Field(..., description="Pass as ?session_id= to resume.")
    token: str = Field(..., description="Pass as &token= to resume; keep it secret.")
    resumed: bool = Field(..., description="True when this connection continues a session.")
    echo_step: int = Field(..., description="How many steps late the model echoes its input.")
    seq: int = Field(
        ...,
        description="The session's last answered (and, with Redis, stored) echo reply; 0 when "
        "new. On a resume with last_seq below it, the echo frames after last_seq follow.",
    )
    model_version: int = Field(..., description="The echo model version the session runs on.")


class EchoFrame(BaseModel):
    """Server → client, one per bits frame, in order."""

    type: Literal["echo"] = "echo"
    seq: int = Field(
        ...,
        description="1 for the session's first echo reply, +1 for each one after; continues "
        "across resumes and resets.",
    )
    probabilities: list[float] = Field(..., description="P(echoed bit = 1), one per input bit.")
    bits: list[Literal[0, 1]] = Field(..., description="Predicted echo bits (probability > 0.5).")


class ResetAckFrame(BaseModel):
    """Server → client: the reset is done; the next bits start from the initial state."""

    type: Literal["reset"] = "reset"


ErrorCode = Literal[
    "binary_frame",  # only text frames are read
    "frame_too_large",  # more than ECHO_MAX_FRAME_BYTES bytes
    "invalid_json",  # not JSON
    "invalid_frame",  # JSON but not an object
    "unknown_type",  # "type" is not "bits" or "reset"
    "missing_bits",  # a bits frame without "bits"
    "invalid_bits",  # "bits" is not a list of integers 0/1
    "empty_bits",  # "bits" is []
    "too_many_bits",  # more than ECHO_MAX_BITS_PER_MESSAGE bits
    # Redis store only, each followed by a close (1013): the message was not answered.
    "store_unavailable",  # its step could not be stored: resume with last_seq later
    "lease_lost",  # another connection attached the session
]


class ErrorFrame(BaseModel):
    """Server → client: the frame was refused; the session and connection are unaffected
    (except ``store_unavailable`` and ``lease_lost``, which a close follows)."""

    type: Literal["error"] = "error"
    code: ErrorCode
    detail: str

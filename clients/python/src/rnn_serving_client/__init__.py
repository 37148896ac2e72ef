"""Typed Python client for rnn-serving: MNIST digits over HTTP, exactly-once echo streams.

    from rnn_serving_client import Client

    with Client("http://127.0.0.1:8000") as client:
        print(client.predict_digit(image).digit)
        with client.echo() as stream:
            print(stream.send([1, 0, 1]).bits)

``AsyncClient`` is the same API with ``await`` (``async with client.echo() as stream``).
"""

from .client import AsyncClient, Client, SyncEchoStream
from .echo import EchoStream
from .errors import (
    Conflict,
    ConnectionFailed,
    InvalidInput,
    NotFound,
    Overloaded,
    ReconnectDeadlineExceeded,
    RnnServingError,
    ServerError,
    SessionLost,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from .store import FileSessionStore, MemorySessionStore, SessionState, SessionStore
from .types import DigitPrediction, EchoReply, Health, ModelInfo, ModelRef, ModelsInfo

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "DigitPrediction",
    "EchoReply",
    "EchoStream",
    "FileSessionStore",
    "Health",
    "InvalidInput",
    "MemorySessionStore",
    "ModelInfo",
    "ModelRef",
    "ModelsInfo",
    "NotFound",
    "Overloaded",
    "ReconnectDeadlineExceeded",
    "RnnServingError",
    "ServerError",
    "SessionLost",
    "SessionState",
    "SessionStore",
    "SyncEchoStream",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
]

"""``WS /echo``: stream bits, get the echo model's predictions; the hidden state lives on.

Protocol (details and a client example in ``docs/echo-protocol.md``; frames in
``app.schemas.echo``): the server first sends a ``session`` frame (on a resume with
``&last_seq=N``, then the echo frames after ``N`` that the client missed); every
``{"bits": [...]}`` gets an ``echo`` frame, ``{"type": "reset"}`` a ``reset`` frame, and a bad
frame an ``error`` frame (the connection stays open). Refusals (not ready, session cap, unknown
session, wrong token, session in use, store unavailable) accept the handshake and close at once
with a code and a ``"<code>: <detail>"`` reason, so that every client can read why. With the
Redis store a step is answered only once it is stored; if it cannot be, the connection gets an
``error`` frame and is closed (1013), and the session resumes from its last stored step.

The per-message path is deliberately lean: orjson in and out, bits checked with a few C-level
calls, no per-message logging or pydantic.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, WebSocket
from starlette.types import Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from app.api.echo_frames import (
    RESET_FRAME,
    FrameError,
    echo_frame,
    error_frame,
    parse_frame,
    replay_frame,
    session_frame,
)
from app.api.errors import close_code, close_reason
from app.core.errors import (
    GoingAway,
    InvalidInput,
    LeaseLost,
    NotReady,
    ServiceError,
    StoreUnavailable,
)
from app.core.metrics import ECHO_ERRORS, ECHO_SESSIONS_REFUSED
from app.core.params import MAX_SESSION_ID_CHARS, MAX_TOKEN_CHARS, parse_token_like, parse_uint
from app.services.echo_service import EchoService
from app.services.echo_sessions import Session
from app.state import app_state

log = logging.getLogger(__name__)
router = APIRouter(tags=["echo"])


class _Connection:
    """The service's handle on a connection: end it with a domain error's close code."""

    __slots__ = ("_ws",)

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket

    async def end(self, error: ServiceError) -> None:
        await self._ws.close(close_code(error), close_reason(error))


@router.websocket("/echo")
async def echo(
    websocket: WebSocket,
    session_id: str | None = None,
    token: str | None = None,
    last_seq: str | None = None,
) -> None:
    """Open (no parameters) or resume (``?session_id=...&token=...[&last_seq=N]``) a session.

    Every parameter is parsed (``app.core.params``) before anything is attached, and once a
    session is attached it is detached on every way out of this handler, exceptions included.
    """
    state = app_state(websocket)
    service = state.echo
    await websocket.accept()
    session: Session | None = None
    ended = "disconnected"
    try:
        try:
            resume = _resume_params(session_id, token, last_seq)
            if state.lifecycle.status != "ready" or service is None or not service.running:
                raise NotReady(f"the service is {state.lifecycle.status}")
            client = websocket.client.host if websocket.client else None
            session = await service.open(resume[0], resume[1], _Connection(websocket), client)
            missed = session.missed(resume[2]) if resume[2] is not None else []
        except ServiceError as exc:  # close code and reason from app.api.errors' one table
            ECHO_SESSIONS_REFUSED.labels(exc.code).inc()
            if session is not None:  # detached before the client hears why (it may retry)
                attached, session = session, None
                await service.close(attached, ended=exc.code)  # type: ignore[union-attr]
            await websocket.close(close_code(exc), close_reason(exc))
            return
        await websocket.send_text(
            session_frame(
                session_id=session.id,
                token=session.token,
                resumed=session_id is not None,
                echo_step=service.echo_step(session),
                seq=session.seq,
                model_version=session.version,
            )
        )
        for packed in missed:  # replies stored but (maybe) never received, in order
            await websocket.send_text(replay_frame(packed))
        ended = await _serve(websocket, service, session)
    except (WebSocketDisconnect, OSError):
        ended = "client gone"
    finally:
        if session is not None and service is not None:
            await service.close(session, ended=ended)


def _resume_params(
    session_id: str | None, token: str | None, last_seq: str | None
) -> tuple[str | None, str | None, int | None]:
    """The query's resume parameters, parsed strictly (``InvalidInput`` ``invalid_resume``)."""
    if (session_id is None) != (token is None):
        raise InvalidInput("pass both session_id and token, or neither", "invalid_resume")
    if last_seq is not None and session_id is None:
        raise InvalidInput("last_seq needs session_id and token", "invalid_resume")
    if session_id is None or token is None:
        return None, None, None
    return (
        parse_token_like(session_id, "session_id", MAX_SESSION_ID_CHARS, "invalid_resume"),
        parse_token_like(token, "token", MAX_TOKEN_CHARS, "invalid_resume"),
        None if last_seq is None else parse_uint(last_seq, "last_seq", "invalid_resume"),
    )


async def _serve(websocket: WebSocket, service: EchoService, session: Session) -> str:
    """Answer the connection's frames one at a time, in order, until it closes."""
    settings = service.settings
    max_bytes, max_bits = settings.echo_max_frame_bytes, settings.echo_max_bits_per_message
    # Starlette's public receive/send: a send to a vanished client raises WebSocketDisconnect.
    receive, send = websocket.receive, websocket.send
    frame_error, touch = FrameError, service.toucher(session)
    while True:
        message = await receive()
        touch(session)  # any frame counts against ECHO_IDLE_TIMEOUT_S
        text = message.get("text")
        if text is None:
            if message["type"] == "websocket.disconnect":
                return f"disconnected ({message.get('code')})"
            await _send_error(send, "binary_frame", "send JSON in text frames")
            continue
        try:
            chunk = parse_frame(text, max_bytes, max_bits)
        except frame_error as exc:
            await _send_error(send, exc.code, exc.detail)
            continue
        try:
            if chunk is None:
                await service.reset(session)
                await send({"type": "websocket.send", "text": RESET_FRAME})
                continue
            probs, bits, seq, packed = await service.advance(session, chunk)  # (stored)
        except GoingAway:
            return "server stopping"
        except ServiceError as exc:  # model or store failed, deadline passed: say so, end here
            if websocket.application_state == WebSocketState.DISCONNECTED:
                return exc.code  # the service ended this connection meanwhile (lease_lost)
            if isinstance(exc, StoreUnavailable | LeaseLost):
                await _send_error(send, exc.code, exc.detail)
            reason = f"{exc.code}: {exc.detail}; the session can be resumed"
            await send({"type": "websocket.close", "code": close_code(exc), "reason": reason[:123]})
            return exc.code
        session.record(seq, packed)
        await send({"type": "websocket.send", "text": echo_frame(seq, probs, bits)})


async def _send_error(send: Send, code: str, detail: str) -> None:
    ECHO_ERRORS.labels(code).inc()
    await send({"type": "websocket.send", "text": error_frame(code, detail)})

"""Where an echo stream keeps what it needs to resume: the session id and token, the ``seq`` of
the last reply received, the replies received but not yet handed to the application, and the
messages not answered yet.

``MemorySessionStore`` (the default) survives reconnects; ``FileSessionStore`` also survives the
client process: a new process that opens ``client.echo(store=FileSessionStore(path))`` resumes
the same session, receives the replies to the unanswered messages (``stream.recovered()``) and
carries on. The token is a credential: it is written to the file (keep it private: the file is
created with mode 0600) but never logged and never part of a ``repr``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .types import EchoReply

__all__ = ["FileSessionStore", "MemorySessionStore", "SessionState", "SessionStore"]

RESET = None  # an unanswered reset, among the unanswered messages (which are lists of bits)


@dataclass(frozen=True)
class SessionState:
    """A resumable echo session.

    ``seq``: the last reply received from the server (the ``last_seq`` of a resume);
    ``replies``: replies received but not yet handed to the application, in order;
    ``pending``: the messages sent or about to be sent but not answered yet, in order (a list of
    bits, or None for a reset); message ``seq + 1 + i`` is the i-th bits message among them.
    """

    session_id: str
    token: str = field(repr=False)
    seq: int = 0
    pending: tuple[tuple[int, ...] | None, ...] = ()
    replies: tuple[EchoReply, ...] = ()
    echo_step: int | None = None
    model_version: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "token": self.token,
            "seq": self.seq,
            "pending": [
                {"type": "reset"} if m is RESET else {"bits": list(m)} for m in self.pending
            ],
            "replies": [
                {"seq": r.seq, "probabilities": list(r.probabilities), "bits": list(r.bits)}
                for r in self.replies
            ],
            "echo_step": self.echo_step,
            "model_version": self.model_version,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionState:
        pending = tuple(
            RESET if m.get("type") == "reset" else tuple(int(b) for b in m["bits"])
            for m in data.get("pending", [])
        )
        return cls(
            session_id=str(data["session_id"]),
            token=str(data["token"]),
            seq=int(data.get("seq", 0)),
            pending=pending,
            replies=tuple(EchoReply.from_json(r) for r in data.get("replies", [])),
            echo_step=data.get("echo_step"),
            model_version=data.get("model_version"),
        )

    def with_(self, **changes: Any) -> SessionState:
        return replace(self, **changes)


@runtime_checkable
class SessionStore(Protocol):
    """Keeps one session's :class:`SessionState`. ``save`` is called before a message goes on
    the wire and whenever a reply is handed to the application, so it should be quick."""

    def load(self) -> SessionState | None: ...

    def save(self, state: SessionState) -> None: ...

    def clear(self) -> None: ...


class MemorySessionStore:
    """In this process only (the default): resumes across reconnects, not across restarts."""

    def __init__(self, state: SessionState | None = None) -> None:
        self._state = state

    def load(self) -> SessionState | None:
        return self._state

    def save(self, state: SessionState) -> None:
        self._state = state

    def clear(self) -> None:
        self._state = None

    def __repr__(self) -> str:
        sid = self._state.session_id if self._state else None
        return f"MemorySessionStore(session_id={sid!r})"


class FileSessionStore:
    """A JSON file, replaced atomically on every save (a temporary file in the same folder, then
    ``os.replace``), so a crash at any moment leaves the old state or the new one.

    ``fsync=True`` also survives a power loss (slower: one fsync per save).
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync

    def load(self) -> SessionState | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return SessionState.from_json(json.loads(text))

    def save(self, state: SessionState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state.to_json(), f, separators=(",", ":"))
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"FileSessionStore({str(self.path)!r})"

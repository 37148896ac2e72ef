"""The ``/echo`` route in process (Starlette's test client, the real echo model and service):
its parameters are parsed before anything is attached, and an attached session is detached on
every way out of the handler."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.api import echo
from app.core.config import Settings
from app.services.echo_service import EchoService
from app.services.models import EchoModel
from app.state import AppState
from modelspec import contract


@pytest.fixture(scope="module")
def echo_model(repo_root: Path) -> EchoModel:
    path = contract.resolve_version_dir(repo_root / "models", contract.ECHO_MODEL, 1)
    model = EchoModel(contract.ECHO_MODEL, int(path.name), path, contract.ModelMetadata.read(path))
    model.load(
        {
            contract.ECHO_STEP_SIGNATURE: {contract.ECHO_BITS, contract.ECHO_STATE},
            contract.ECHO_INITIAL_STATE_SIGNATURE: {contract.ECHO_BATCH_SIZE},
        }
    )
    return model


@pytest.fixture
def served(echo_model: EchoModel) -> Iterator[tuple[TestClient, AppState]]:
    state = AppState(Settings(echo_xla=False, echo_max_queue_delay_ms=0))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service = EchoService(state.settings)
        await service.add_lane(echo_model)
        await service.start()
        state.echo, state.lifecycle.status = service, "ready"
        yield
        await service.stop()

    app = FastAPI(lifespan=lifespan)
    app.include_router(echo.router)
    app.state = state  # type: ignore[assignment]
    with TestClient(app) as client:
        yield client, state


def _open(client: TestClient) -> dict[str, Any]:
    with client.websocket_connect("/echo") as ws:
        return ws.receive_json()


def _stored(state: AppState) -> Any:
    assert state.echo is not None and state.echo.default is not None
    store = state.echo.default.store
    assert store is not None
    return store


@pytest.mark.parametrize("last_seq", ["²", "①", "-1", "1e3", " 1", "99999999999999999999"])
def test_a_malformed_last_seq_is_refused_before_the_session_is_attached(
    served: tuple[TestClient, AppState], last_seq: str
) -> None:
    client, state = served
    opened = _open(client)
    url = f"/echo?session_id={opened['session_id']}&token={opened['token']}&last_seq={last_seq}"
    with client.websocket_connect(url) as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    assert closed.value.code == 1008 and closed.value.reason.startswith("invalid_resume")
    session = _stored(state).sessions[opened["session_id"]]
    assert not session.attached
    with client.websocket_connect(
        f"/echo?session_id={opened['session_id']}&token={opened['token']}&last_seq=0"
    ) as ws:
        assert ws.receive_json()["resumed"] is True


@pytest.mark.parametrize(
    "query", ["session_id=a b&token=x", "session_id=x&token=" + "t" * 129, "session_id=é&token=x"]
)
def test_malformed_session_ids_and_tokens_are_refused(
    served: tuple[TestClient, AppState], query: str
) -> None:
    client, _ = served
    with client.websocket_connect(f"/echo?{query}") as ws, pytest.raises(WebSocketDisconnect) as c:
        ws.receive_json()
    assert c.value.code == 1008 and c.value.reason.startswith("invalid_resume")


def test_an_exception_after_attach_detaches_and_the_session_resumes(
    served: tuple[TestClient, AppState],
) -> None:
    client, state = served
    opened = _open(client)
    assert state.echo is not None
    service, real_echo_step = state.echo, state.echo.echo_step

    def exploding_echo_step(session: Any) -> int:  # fails between attach and the first frame
        service.echo_step = real_echo_step  # type: ignore[method-assign]  # once
        raise RuntimeError("boom after attach")

    service.echo_step = exploding_echo_step  # type: ignore[method-assign]
    url = f"/echo?session_id={opened['session_id']}&token={opened['token']}"
    with pytest.raises(RuntimeError, match="boom after attach"), client.websocket_connect(url):
        pass
    assert not _stored(state).sessions[opened["session_id"]].attached
    with client.websocket_connect(url) as ws:
        frame = ws.receive_json()
        assert frame["resumed"] is True and frame["session_id"] == opened["session_id"]
        ws.send_json({"bits": [1, 0, 1]})
        assert ws.receive_json()["seq"] == 1

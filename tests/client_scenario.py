"""Client-side scenarios for ``tests/test_client_python.py``, run by the Python of a fresh virtual
environment that holds only the client's wheel and its dependencies (never the repository's
venv), so that what is tested is what ``pip install`` gives. Only the standard library and
``rnn_serving_client`` are imported. Each mode prints one JSON line; assertions fail it.

    python client_scenario.py MODE '{"urls": [...], ...}'
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import rnn_serving_client as rsc


def messages(seed: int, count: int, bits: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(0, 1) for _ in range(bits)] for _ in range(count)]


def write(out: io.TextIOBase, reply: rsc.EchoReply) -> None:
    out.write(
        json.dumps({"seq": reply.seq, "bits": reply.bits, "probabilities": reply.probabilities})
    )
    out.write("\n")
    out.flush()


async def stream(cfg: dict[str, Any]) -> dict[str, Any]:
    """Stream ``messages(seed, count, bits)`` (resuming a file store's session if it holds
    one), writing each reply to ``out`` as it is handed over; ``exit_after``: die hard
    (``os._exit``) after that many replies; ``secrets``: check the token leaks nowhere."""
    log_text = io.StringIO()
    if cfg.get("secrets"):
        handler = logging.StreamHandler(log_text)
        handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
        logging.basicConfig(level=logging.DEBUG, handlers=[handler])
    msgs = messages(cfg["seed"], cfg["count"], cfg["bits"])
    store: rsc.SessionStore = (
        rsc.FileSessionStore(cfg["store"]) if cfg.get("store") else rsc.MemorySessionStore()
    )
    delay, exit_after = cfg.get("delay", 0), cfg.get("exit_after")
    handed = 0
    with open(cfg["out"], "a", encoding="utf-8") as out:
        async with rsc.AsyncClient(cfg["urls"], api_key=cfg.get("api_key")) as client:
            echo = client.echo(
                store=store,
                max_in_flight=cfg.get("max_in_flight", 4),
                reconnect_deadline=cfg.get("deadline", 60),
            )
            async with echo as s:
                recovered = await s.recovered()
                for reply in recovered:
                    write(out, reply)
                start = s.submitted

                async def chunks():
                    for m in msgs[start:]:
                        if delay:
                            await asyncio.sleep(delay)
                        yield m

                async for reply in s.stream(chunks()):
                    write(out, reply)
                    handed += 1
                    if exit_after and handed >= exit_after:
                        os._exit(3)  # the process dies here: no cleanup, no close
                state = store.load()
                assert state is not None and state.pending == () and state.replies == ()
                token = state.token
                result = {
                    "connections": s.connections,
                    "retried": s.retried,
                    "recovered": len(recovered),
                    "started_at": start,
                    "echo_step": s.echo_step,
                }
                reprs = repr(s) + repr(store) + repr(state) + repr(echo) + repr(client)
    if cfg.get("secrets"):
        logs = log_text.getvalue()
        result["token_in_logs"] = token in logs
        result["token_in_reprs"] = token in reprs
        result["redacted_in_logs"] = "token=[redacted]" in logs
        result["log_lines"] = logs.count("\n")
    return result


async def attached_elsewhere(cfg: dict[str, Any]) -> dict[str, Any]:
    """A session attached to one connection cannot be resumed by another: ``session_in_use``
    is retried until the deadline, then a typed error; a dead address likewise."""
    out: dict[str, Any] = {}
    async with rsc.AsyncClient(cfg["urls"]) as client:
        kept = rsc.MemorySessionStore()
        async with client.echo(store=kept) as first:
            await first.send([1, 0, 1])
            state = kept.load()
            assert state is not None
            holder = rsc.MemorySessionStore(state)
            t0 = asyncio.get_running_loop().time()
            try:
                async with client.echo(store=holder, reconnect_deadline=1.5):
                    pass
            except rsc.ReconnectDeadlineExceeded as exc:
                assert isinstance(exc.last_error, rsc.Unavailable)
                out["in_use"] = exc.last_error.code
                out["in_use_waited"] = asyncio.get_running_loop().time() - t0
                assert state.token not in str(exc) and state.token not in repr(exc)
            reply = await first.send([1, 1])  # the first connection is unaffected
            out["first_goes_on"] = reply.seq
    async with rsc.AsyncClient(cfg["dead_url"]) as client:
        try:
            async with client.echo(reconnect_deadline=0.5, backoff_initial=0.05):
                pass
        except rsc.ReconnectDeadlineExceeded as exc:
            out["dead"] = type(exc.last_error).__name__
    return out


async def idle(cfg: dict[str, Any]) -> dict[str, Any]:
    """The server closes an idle connection (1001 ``idle_timeout``): the stream does not
    reconnect until it has something to send, then resumes."""
    client = rsc.AsyncClient(cfg["urls"], api_key=cfg.get("api_key"))
    async with client, client.echo() as s:
        first = await s.send([1, 1, 0, 1])
        await asyncio.sleep(cfg["sleep"])
        idle_connections = s.connections
        second = await s.send([0, 0, 1])
        return {
            "seqs": [first.seq, second.seq],
            "idle_connections": idle_connections,
            "connections": s.connections,
        }


def digits(cfg: dict[str, Any]) -> dict[str, Any]:
    """The HTTP API: one image, flat, a batch, array-likes, 0–1 floats, pictures, versions,
    typed errors, models and health."""

    class ArrayLike:  # what a NumPy array offers; NumPy itself is not installed here
        def __init__(self, value: Any) -> None:
            self.value = value

        def tolist(self) -> Any:
            return self.value

    image = cfg["image"]  # 0–255 rows
    out: dict[str, Any] = {}
    with rsc.Client(cfg["urls"][0], timeout=30) as client:
        one = client.predict_digit(image)
        assert isinstance(one, rsc.DigitPrediction)
        out["one"] = [one.digit, list(one.probabilities), one.model.name, one.model.version]
        flat = client.predict_digit([p for row in image for p in row])
        assert isinstance(flat, rsc.DigitPrediction) and flat.probabilities == one.probabilities
        batch = client.predict_digit(ArrayLike([image, [[0] * 28] * 28, image]))
        assert isinstance(batch, list) and len(batch) == 3
        assert batch[0].probabilities == batch[2].probabilities
        out["batch"] = [p.digit for p in batch]
        out["batch_close"] = max(
            abs(a - b) for a, b in zip(batch[0].probabilities, one.probabilities, strict=True)
        )
        floats = client.predict_digit([[p / 255 for p in row] for row in image])
        assert isinstance(floats, rsc.DigitPrediction)
        out["floats_close"] = max(
            abs(a - b) for a, b in zip(floats.probabilities, one.probabilities, strict=True)
        )
        assert client.predict_digits(image)[0].digit == one.digit
        picture = Path(cfg["picture"])
        by_path = client.predict_digit(picture)
        by_bytes = client.predict_digit(picture.read_bytes())
        with picture.open("rb") as f:
            by_file = client.predict_digit(f)
        assert by_path.probabilities == by_bytes.probabilities == by_file.probabilities
        out["picture"] = by_path.digit
        with rsc.Client(cfg["urls"][0], version=1) as pinned:
            assert pinned.predict_digit(image).model.version == 1
        errors = {}
        for name, call in {
            "shape": lambda: client.predict_digit([[0] * 27] * 28),
            "pixels": lambda: client.predict_digit([[300] * 28] * 28),
            "version": lambda: client.predict_digit(image, version=99),
            "picture": lambda: client.predict_digit(b"not a picture"),
        }.items():
            try:
                call()
            except rsc.RnnServingError as exc:
                errors[name] = [type(exc).__name__, exc.code, exc.status, bool(exc.detail)]
        out["errors"] = errors
        models = client.models()
        out["models"] = sorted({(m.name, m.version) for m in models.models})
        out["echo_store"] = models.echo_store.get("kind")
        health = client.health()
        out["health"] = [health.live, health.ready, health.status]
    return out


async def keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """With ``API_KEYS`` set: without a key, typed ``Unauthorized`` (HTTP and WebSocket)."""
    out: dict[str, Any] = {}
    async with rsc.AsyncClient(cfg["urls"][0]) as client:
        try:
            await client.predict_digit([[0] * 28] * 28)
        except rsc.Unauthorized as exc:
            out["http"] = [exc.code, exc.status]
        try:
            async with client.echo(reconnect_deadline=2):
                pass
        except rsc.Unauthorized as exc:
            out["echo"] = [exc.code, exc.status]
    async with rsc.AsyncClient(cfg["urls"][0], api_key=cfg["api_key"]) as client:
        out["with_key"] = (await client.predict_digit([[0] * 28] * 28)).model.name
        assert cfg["api_key"] not in repr(client)
    return out


def units(cfg: dict[str, Any]) -> dict[str, Any]:
    """No server: errors from bodies and close reasons, the file store, reprs."""
    from rnn_serving_client.errors import error_from_close, error_from_response

    busy = error_from_response(
        503, {"error": "too_many_uploads", "detail": "retry"}, {"retry-after": "2"}
    )
    assert isinstance(busy, rsc.Overloaded) and busy.retry_after == 2.0 and busy.status == 503
    down = error_from_response(503, {"error": "not_ready", "detail": "loading"}, {})
    assert type(down) is rsc.Unavailable and down.retry_after is None
    assert type(error_from_response(504, {"error": "timeout", "detail": "x"})) is rsc.Timeout
    assert type(error_from_response(413, {"error": "image_too_large", "detail": "x"})) is (
        rsc.TooLarge
    )
    v2 = error_from_response(400, {"error": "invalid_shape: images must be [n, 28, 28]"})
    assert (type(v2), v2.code, v2.detail) == (rsc.InvalidInput, "invalid_shape", v2.detail)
    in_use = error_from_close(1013, "session_in_use: attached elsewhere; retry in 3.2 s")
    assert type(in_use) is rsc.Unavailable and in_use.retry_after == 3.2
    assert in_use.code == "session_in_use" and in_use.status == 1013
    lost = error_from_close(1008, "replay_unavailable: only the last 4 replies are kept")
    assert type(lost) is rsc.SessionLost and isinstance(lost, rsc.NotFound)
    assert type(error_from_close(1008, "invalid_token: wrong token")) is rsc.Unauthorized
    assert type(error_from_close(1012, "")) is rsc.Unavailable

    path = Path(cfg["dir"]) / "s" / "session.json"
    store = rsc.FileSessionStore(path)
    assert store.load() is None
    state = rsc.SessionState(
        "sid", "secret-token", seq=7, pending=((1, 0), None, (1,)), echo_step=3, model_version=1
    )
    store.save(state)
    assert store.load() == state and oct(path.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in path.parent.iterdir()) == ["session.json"]  # no temp left
    assert "secret-token" not in repr(state) + repr(store) + str(state)
    store.clear()
    assert store.load() is None and isinstance(store, rsc.SessionStore)
    return {"ok": True}


def main() -> None:
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    assert "site-packages" in rsc.__file__, f"not the installed wheel: {rsc.__file__}"
    if mode == "digits":
        result = digits(cfg)
    elif mode == "units":
        result = units(cfg)
    else:
        result = asyncio.run(
            {
                "stream": stream,
                "attached_elsewhere": attached_elsewhere,
                "keys": keys,
                "idle": idle,
            }[mode](cfg)
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""``Client`` (sync) and ``AsyncClient``: digits over HTTP, echo streams over WebSocket."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, overload

import httpx

from .echo import EchoStream
from .errors import ConnectionFailed, InvalidInput, RnnServingError, Timeout, error_from_response
from .store import SessionStore
from .types import DigitPrediction, EchoReply, Health, ModelRef, ModelsInfo

__all__ = ["AsyncClient", "Client", "SyncEchoStream"]

T = TypeVar("T")
File = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO
DEFAULT_URL = "http://127.0.0.1:8000"


class _Base:
    def __init__(
        self,
        base_url: str | Sequence[str] = DEFAULT_URL,
        *,
        api_key: str | None = None,
        version: int | None = None,
        timeout: float | httpx.Timeout = 30.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("need at least one base URL")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.version = version
        self.timeout = timeout
        self._headers = dict(headers or {})
        if api_key is not None:  # app/api/access.py: Authorization: Bearer <key>
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._url_index = 0

    def __repr__(self) -> str:  # never the API key
        return f"{type(self).__name__}({self.base_urls[self._url_index]!r})"

    def _digit_request(
        self, data: Any, version: int | None, pixel_scale: float | None
    ) -> tuple[dict[str, Any], bool]:
        """(httpx request arguments, one image?) for ``POST /predict/digit``."""
        version = self.version if version is None else version
        params = {"version": str(version)} if version is not None else {}
        upload = _upload(data)
        if upload is not None:
            return {"files": {"file": upload}, "params": params}, True
        body, single = _pixels_body(data, pixel_scale)
        return {"json": body, "params": params}, single

    def _echo_stream(self, store: SessionStore | None, options: dict[str, Any]) -> EchoStream:
        return EchoStream(self.base_urls, headers=self._headers, store=store, **options)


def _upload(data: Any) -> tuple[str, bytes] | None:
    """A picture to upload as multipart ``file``: bytes, a path, or a binary file object."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return "image", bytes(data)
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        return path.name, path.read_bytes()
    if hasattr(data, "read"):
        content = data.read()
        if not isinstance(content, bytes):
            raise InvalidInput("invalid_image", "open the picture in binary mode ('rb')")
        return Path(str(getattr(data, "name", "image"))).name, content
    return None


def _pixels_body(data: Any, pixel_scale: float | None) -> tuple[dict[str, Any], bool]:
    """The JSON body for one 28×28 image or a batch (nested lists, tuples or NumPy arrays)."""
    if hasattr(data, "tolist"):
        data = data.tolist()
    if not isinstance(data, (list, tuple)) or not data:
        raise InvalidInput("invalid_request", "send a 28×28 image, a batch of them, or a picture")
    depth, probe = 0, data
    while isinstance(probe, (list, tuple)) and probe:
        probe = probe[0]
        depth += 1
    if depth == 1:
        single = True  # a flat 784
    elif depth == 2:
        single = len(data[0]) != 784  # 28 rows of 28, or a batch of flat images
    elif depth == 3:
        single = False
    else:
        raise InvalidInput("invalid_shape", "an image is 28×28 (or 784 flat); a batch a list")
    if pixel_scale is None:
        pixel_scale = _guess_scale(data)
    body: dict[str, Any] = {"image" if single else "images": _as_lists(data)}
    if pixel_scale is not None:
        body["pixel_scale"] = pixel_scale
    return body, single


def _guess_scale(data: Any) -> float | None:
    """1 for float pixels in [0, 1]; None (the service's 255) otherwise."""
    stack, top, floats = [data], 0.0, False
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, (int, float)):
            floats = floats or isinstance(item, float)
            top = max(top, item)
    return 1 if floats and top <= 1.0 else None


def _as_lists(data: Any) -> Any:
    return [_as_lists(x) for x in data] if isinstance(data, (list, tuple)) else data


def _response_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _check(response: httpx.Response) -> Any:
    body = _response_json(response)
    if response.status_code >= 400:
        raise error_from_response(response.status_code, body, response.headers)
    return body


def _predictions(body: dict[str, Any], single: bool) -> DigitPrediction | list[DigitPrediction]:
    model = ModelRef.from_json(body["model"])
    if single:
        return DigitPrediction(int(body["digit"]), tuple(body["probabilities"]), model)
    return [
        DigitPrediction(int(p["digit"]), tuple(p["probabilities"]), model)
        for p in body["predictions"]
    ]


def _health(live: httpx.Response | None, ready: httpx.Response) -> Health:
    body = _response_json(ready)
    status = body.get("status", "") if isinstance(body, dict) else ""
    detail = body.get("detail") if isinstance(body, dict) else None
    return Health(
        live=live is not None and live.status_code == 200,
        ready=ready.status_code == 200,
        status=str(status),
        detail=detail,
    )


def _transport_error(exc: httpx.TransportError) -> RnnServingError:
    if isinstance(exc, httpx.TimeoutException):
        return Timeout("timeout", f"no answer in time ({type(exc).__name__})")
    return ConnectionFailed("connection_failed", type(exc).__name__)


class AsyncClient(_Base):
    """The async client. ``base_url`` may be a list: requests and echo reconnects fail over to
    the next URL when one cannot be reached.

    ``api_key``: sent as ``Authorization: Bearer``; ``version``: the digit model version every
    ``predict_digit`` pins (per call: ``version=``); ``timeout``: seconds per HTTP request.
    """

    def __init__(self, base_url: str | Sequence[str] = DEFAULT_URL, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._http = httpx.AsyncClient(headers=self._headers, timeout=self.timeout, trust_env=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for _ in range(len(self.base_urls)):
            url = self.base_urls[self._url_index] + path
            try:
                return await self._http.request(method, url, **kwargs)
            except httpx.ConnectError as exc:
                self._url_index = (self._url_index + 1) % len(self.base_urls)
                last = exc
            except httpx.TransportError as exc:
                raise _transport_error(exc) from None
        raise _transport_error(last) from None

    @overload
    async def predict_digit(
        self, data: File, *, version: int | None = ..., pixel_scale: float | None = ...
    ) -> DigitPrediction: ...
    @overload
    async def predict_digit(
        self, data: Any, *, version: int | None = ..., pixel_scale: float | None = ...
    ) -> DigitPrediction | list[DigitPrediction]: ...
    async def predict_digit(
        self, data: Any, *, version: int | None = None, pixel_scale: float | None = None
    ) -> DigitPrediction | list[DigitPrediction]:
        """Classify one image (28×28 or 784 flat; lists or NumPy), a batch of them (a list of
        predictions back), or a picture (a path, bytes or a binary file: uploaded).

        Pixels are MNIST-style 0–255, white ink on black; floats in [0, 1] are detected and sent
        with ``pixel_scale=1`` (pass ``pixel_scale`` to say it yourself).
        """
        kwargs, single = self._digit_request(data, version, pixel_scale)
        body = _check(await self._request("POST", "/predict/digit", **kwargs))
        return _predictions(body, single)

    async def predict_digits(
        self, images: Any, *, version: int | None = None, pixel_scale: float | None = None
    ) -> list[DigitPrediction]:
        """A batch of images → one prediction each, in order."""
        result = await self.predict_digit(images, version=version, pixel_scale=pixel_scale)
        return result if isinstance(result, list) else [result]

    async def models(self) -> ModelsInfo:
        """``GET /v1/models``."""
        return ModelsInfo.from_json(_check(await self._request("GET", "/v1/models")))

    async def health(self) -> Health:
        """``/livez`` and ``/readyz`` (a not-ready service is ``ready=False``, not an error)."""
        live = await self._request("GET", "/livez")
        return _health(live, await self._request("GET", "/readyz"))

    def echo(self, *, store: SessionStore | None = None, **options: Any) -> EchoStream:
        """An exactly-once echo session: ``async with client.echo() as stream``. ``store``:
        where the session is kept (memory; ``FileSessionStore(path)`` to outlive the process:
        a stored session is resumed). ``options``: ``max_in_flight``, ``reconnect_deadline``,
        ``backoff_initial``, ``backoff_max``, ``open_timeout`` (see :class:`EchoStream`)."""
        return self._echo_stream(store, options)


class _LoopThread:
    """An event loop in a daemon thread, for the sync wrappers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def stop(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class SyncEchoStream:
    """The blocking face of :class:`EchoStream` (``with client.echo() as stream``), for scripts
    and notebooks: the stream runs on an event loop in a background thread."""

    def __init__(self, factory: Callable[[], EchoStream]) -> None:
        self._factory = factory
        self._loop: _LoopThread | None = None
        self._stream: EchoStream | None = None

    def __enter__(self) -> SyncEchoStream:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self._loop = _LoopThread()

        async def make() -> EchoStream:
            stream = self._factory()
            await stream.open()
            return stream

        try:
            self._stream = self._loop.run(make())
        except BaseException:
            self._loop.stop()
            raise

    @property
    def async_stream(self) -> EchoStream:
        assert self._stream is not None, "open the stream first"
        return self._stream

    def __getattr__(self, name: str) -> Any:  # session_id, seq, submitted, echo_step …
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.async_stream, name)

    def _run(self, awaitable: Awaitable[T]) -> T:
        assert self._loop is not None, "open the stream first"

        async def wrapped() -> T:
            return await awaitable

        return self._loop.run(wrapped())

    def send(self, bits: Any) -> EchoReply:
        return self._run(self.async_stream.send(bits))

    def reset(self) -> None:
        self._run(self.async_stream.reset())

    def recovered(self) -> list[EchoReply]:
        return self._run(self.async_stream.recovered())

    def stream(self, chunks: Iterable[Any] | AsyncIterable[Any]) -> Iterator[EchoReply]:
        agen = self.async_stream.stream(chunks)
        while True:
            try:
                yield self._run(agen.__anext__())
            except StopAsyncIteration:
                return

    def close(self, *, forget: bool = False) -> None:
        if self._loop is None:
            return
        if self._stream is not None:
            self._run(self._stream.close(forget=forget))
        self._loop.stop()
        self._loop = None

    def __repr__(self) -> str:
        return f"Sync{self._stream!r}"


class Client(_Base):
    """The blocking client; the same API as :class:`AsyncClient` without ``await``."""

    def __init__(self, base_url: str | Sequence[str] = DEFAULT_URL, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._http = httpx.Client(headers=self._headers, timeout=self.timeout, trust_env=False)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for _ in range(len(self.base_urls)):
            url = self.base_urls[self._url_index] + path
            try:
                return self._http.request(method, url, **kwargs)
            except httpx.ConnectError as exc:
                self._url_index = (self._url_index + 1) % len(self.base_urls)
                last = exc
            except httpx.TransportError as exc:
                raise _transport_error(exc) from None
        raise _transport_error(last) from None

    @overload
    def predict_digit(
        self, data: File, *, version: int | None = ..., pixel_scale: float | None = ...
    ) -> DigitPrediction: ...
    @overload
    def predict_digit(
        self, data: Any, *, version: int | None = ..., pixel_scale: float | None = ...
    ) -> DigitPrediction | list[DigitPrediction]: ...
    def predict_digit(
        self, data: Any, *, version: int | None = None, pixel_scale: float | None = None
    ) -> DigitPrediction | list[DigitPrediction]:
        """See :meth:`AsyncClient.predict_digit`."""
        kwargs, single = self._digit_request(data, version, pixel_scale)
        return _predictions(_check(self._request("POST", "/predict/digit", **kwargs)), single)

    def predict_digits(
        self, images: Any, *, version: int | None = None, pixel_scale: float | None = None
    ) -> list[DigitPrediction]:
        result = self.predict_digit(images, version=version, pixel_scale=pixel_scale)
        return result if isinstance(result, list) else [result]

    def models(self) -> ModelsInfo:
        return ModelsInfo.from_json(_check(self._request("GET", "/v1/models")))

    def health(self) -> Health:
        live = self._request("GET", "/livez")
        return _health(live, self._request("GET", "/readyz"))

    def echo(self, *, store: SessionStore | None = None, **options: Any) -> SyncEchoStream:
        """A blocking exactly-once echo session: ``with client.echo() as stream``."""
        return SyncEchoStream(lambda: self._echo_stream(store, options))

"""Model versions while serving: what ``MODEL_DIR`` holds, what the policies want, hot swaps.

For each model, :meth:`ModelRepository.sync` lists the complete versions on disk
(``modelspec.contract.list_versions``), asks the model's :class:`VersionPolicy` which to serve,
loads and warms the new ones beside the running ones (digits: a ``DigitService`` of their own,
XLA-compiled; echo: a lane of the ``EchoService``), and only then drains the versions the policy
dropped: no new work, in-flight work (and, for echo, live sessions) finishes, then the model is
unloaded. A version that fails to load or to pass its warm-up check is ``failed`` with the
reason, logged and counted; it never disturbs serving, and is tried again only once its folder
changes. Requests that name no version go to the newest ``available`` one.

``sync`` runs at start-up, every ``MODEL_POLL_S`` and on SIGHUP (``app.main``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.config import Settings
from app.core.errors import NotFound, NotReady
from app.core.metrics import MODEL_VERSION_EVENTS
from app.services.digit_service import DigitService
from app.services.echo_service import EchoService
from app.services.models import DigitModel, EchoModel, ServedModel, compute_device, read_metadata
from app.services.version_policy import VersionPolicy
from modelspec.contract import (
    DIGIT_MODEL,
    ECHO_MODEL,
    ModelNotFoundError,
    list_versions,
    scan_versions,
)

log = logging.getLogger(__name__)

MODELS: dict[str, type[DigitModel] | type[EchoModel]] = {
    DIGIT_MODEL: DigitModel,
    ECHO_MODEL: EchoModel,
}


@dataclass
class Version:
    """One version folder and what became of it."""

    name: str
    number: int
    path: Path
    state: str = "loading"  # loading → available → draining → unloaded, or failed
    reason: str | None = None
    model: ServedModel | None = None
    digits: DigitService | None = None  # mnist_lstm versions
    stamp: float = 0.0  # the folder's mtime when loaded: a failed version is retried once it moves


def policy(text: str, pin: int | None) -> VersionPolicy:
    """The policy a setting names; the old single-version pin wins when it is set."""
    if pin is not None:
        return VersionPolicy(latest=None, specific=(pin,))
    return VersionPolicy.parse(text)


class ModelRepository:
    """Every served version of both models; ``sync()`` to follow ``MODEL_DIR``, ``stop()``."""

    def __init__(self, settings: Settings, echo: EchoService) -> None:
        self.settings, self.echo = settings, echo
        self.policies = {
            DIGIT_MODEL: policy(settings.digit_model_versions, settings.digit_model_version),
            ECHO_MODEL: policy(settings.echo_model_versions, settings.echo_model_version),
        }
        self.versions: dict[str, dict[int, Version]] = {name: {} for name in MODELS}
        self.device = "unknown"
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        for name in MODELS:  # fail fast, naming the folder, before anything loads
            if not self.wanted(name):
                root = Path(settings.model_dir) / name
                raise ModelNotFoundError(
                    f"no version of {name!r} under {root} matches {self.policies[name]} "
                    f"(found {list_versions(root) or 'none'}; expected "
                    "<model_dir>/<name>/<integer version>/ with a complete SavedModel)"
                )

    def wanted(self, name: str) -> list[int]:
        """The versions the policy serves out of the complete ones, minus unchanged failures."""
        root = Path(self.settings.model_dir) / name
        usable = [v for v in list_versions(root) if not self._failed_unchanged(name, v)]
        return self.policies[name].select(usable)

    async def sync(self) -> None:
        """Load what the policies want and is not loaded; then drain what they dropped."""
        async with self._lock:
            if self.device == "unknown":
                self.device = await asyncio.to_thread(compute_device)
            for name in MODELS:
                wanted = self.wanted(name)
                known = self.versions[name]
                for number in wanted:
                    if number not in known or known[number].state in ("unloaded", "failed"):
                        await self._load(name, number)
                available = [v for v in known.values() if v.state == "available"]
                keep = {v.number for v in available if v.number in wanted}
                if not keep:  # nothing the policy wants loaded: keep serving what we have
                    continue
                for version in available:
                    if version.number not in keep:
                        task = asyncio.create_task(self._retire(version), name="model-retire")
                        self._retiring.add(task)
                        task.add_done_callback(self._retiring.discard)

    async def poll(self) -> None:
        """``sync`` every ``MODEL_POLL_S`` seconds (a failure is logged, polling goes on)."""
        while True:
            await asyncio.sleep(self.settings.model_poll_s)
            try:
                await self.sync()
            except Exception:
                log.exception("model repository scan failed")

    async def stop(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for version in self.versions[DIGIT_MODEL].values():
            if version.digits is not None:
                await version.digits.stop()

    def serving(self, name: str) -> list[int]:
        return sorted(n for n, v in self.versions[name].items() if v.state == "available")

    def default(self, name: str) -> Version | None:
        serving = self.serving(name)
        return self.versions[name][serving[-1]] if serving else None

    def digit_service(self, version: int | None = None) -> DigitService:
        """The digits service of ``version`` (default: the newest available); else 404/503."""
        if version is None:
            default = self.default(DIGIT_MODEL)
            if default is None or default.digits is None:
                raise NotReady("no mnist_lstm version is available")
            return default.digits
        return self.version(DIGIT_MODEL, version).digits  # type: ignore[return-value]

    def version(self, name: str, number: int) -> Version:
        """An available version, else ``NotFound`` listing the available ones."""
        found = self.versions.get(name, {}).get(number)
        if found is None or found.state != "available":
            state = f" ({found.state})" if found is not None else ""
            raise NotFound(
                f"{name} version {number} is not available{state}; "
                f"available: {', '.join(map(str, self.serving(name))) or 'none'}",
                "version_not_found",
            )
        return found

    def describe(self) -> dict[str, Any]:
        """Every version of both models with its state; the loaded ones with their details."""
        models = []
        for name in MODELS:
            default = self.default(name)
            for number in sorted(self.versions[name]):
                v = self.versions[name][number]
                entry: dict[str, Any] = {"name": name, "version": number, "state": v.state}
                entry["default"] = v is default
                if v.reason:
                    entry["reason"] = v.reason
                if v.model is not None and v.model.signatures:
                    entry |= v.model.describe()
                else:
                    entry |= {"path": str(v.path), "loaded": False}
                entry["in_flight"] = v.digits.in_flight if v.digits is not None else 0
                if name == ECHO_MODEL:
                    lane = self.echo.lanes.get(number)
                    entry["sessions"] = lane.sessions if lane is not None else 0
                models.append(entry)
        ignored = {
            name: found
            for name in MODELS
            if (found := scan_versions(Path(self.settings.model_dir) / name)[1])
        }
        return {"device": self.device, "models": models, "ignored": ignored}

    async def _load(self, name: str, number: int) -> None:
        path = Path(self.settings.model_dir) / name / str(number)
        version = Version(name, number, path, stamp=_stamp(path))
        self.versions[name][number] = version
        cls = MODELS[name]
        model: ServedModel | None = None
        log.info("model version loading", extra={"model": name, "version": number})
        try:
            model = cls(name=name, version=number, path=path, metadata=read_metadata(path))
            await asyncio.to_thread(model.load, cls.REQUIRED)
            await asyncio.to_thread(model.warm_up)
            if isinstance(model, DigitModel):
                version.digits = DigitService(model, self.settings)
                await version.digits.start()
            else:
                await self.echo.add_lane(model)  # type: ignore[arg-type]
        except Exception as exc:  # a broken version must never disturb serving
            version.state, version.reason = "failed", f"{type(exc).__name__}: {exc}"[:500]
            version.digits = None
            if model is not None:
                model.unload()
            MODEL_VERSION_EVENTS.labels(name, "failed").inc()
            log.error(
                "model version failed to load",
                extra={"model": name, "version": number, "reason": version.reason},
            )
            return
        version.model, version.state = model, "available"
        MODEL_VERSION_EVENTS.labels(name, "loaded").inc()
        log.info("model version available", extra={"model": name, "version": number})

    async def _retire(self, version: Version) -> None:
        """Drain (in-flight work and live sessions finish), then unload."""
        version.state = "draining"
        log.info("model version draining", extra={"model": version.name, "version": version.number})
        if version.digits is not None:
            await version.digits.stop()
        else:
            await self.echo.retire_lane(version.number)
        if version.model is not None:
            version.model.unload()
        version.model, version.digits = None, None
        await asyncio.to_thread(_release_memory)
        version.state = "unloaded"
        MODEL_VERSION_EVENTS.labels(version.name, "unloaded").inc()
        log.info("model version unloaded", extra={"model": version.name, "version": version.number})

    def _failed_unchanged(self, name: str, number: int) -> bool:
        version = self.versions[name].get(number)
        if version is None or version.state != "failed":
            return False
        return version.stamp == _stamp(version.path)


def _release_memory() -> None:
    """Collect the unloaded model's objects and hand freed heap pages back to the OS (glibc's
    ``malloc_trim``: without it the freed tensors stay in the process as fragmented heap)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _stamp(path: Path) -> float:
    """The newest mtime of the folder and its files (a replaced or repaired version moves it)."""
    try:
        return max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*"))])
    except OSError:
        return 0.0

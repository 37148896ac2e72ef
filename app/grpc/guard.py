"""What every gRPC call passes through: its API key, its client's caps, its metrics and log line.

- **API keys** (``API_KEYS``): every RPC but ``ServerLive`` and ``ServerReady`` (the health
  probes, public over HTTP too) needs ``authorization: Bearer <key>`` in its metadata;
  otherwise ``UNAUTHENTICATED``. Keys are compared as HTTP compares them (``app.core.api_keys``).
- **Caps per client**: calls in progress (a stream counts as one call for as long as it is
  open) are counted per client address (IPv6: per /64) and per network (IPv4 /24, IPv6 /48),
  O(1) on start and end (``app.core.edge.ConnectionCounts``), and capped by the settings that cap
  HTTP connections, ``MAX_CONNECTIONS_PER_CLIENT`` and ``MAX_CONNECTIONS_PER_NETWORK``: one
  HTTP/1.1 connection carries one request at a time, so the same number bounds the same work.
  Over the cap: ``UNAVAILABLE`` ``too_many_calls_from_client`` with a ``retry-after`` trailer.
  Behind a proxy in ``TRUSTED_PROXIES`` the client is the rightmost untrusted address of its
  ``x-forwarded-for`` metadata (nginx's ``grpc_set_header``), as uvicorn does for HTTP.
- **Metrics**: ``grpc_requests_total{method, code}`` and ``grpc_request_duration_seconds{method}``
  per call (the batchers' ``model_*`` metrics count gRPC work with the rest); stream messages in
  ``grpc_stream_messages_total{code}``.
- **Logs**: one JSON access line per call (a stream: when it ends, with its message count),
  written like HTTP's (``app.core.logging.AccessLog``); no metadata value is logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import grpc
from grpc.aio import ServicerContext

from app.core.addresses import client_key, network_key
from app.core.api_keys import ApiKeys, bearer_credential, split_list
from app.core.config import Settings
from app.core.edge import ConnectionCounts
from app.core.errors import Overloaded, Unauthorized
from app.core.logging import AccessLog
from app.core.metrics import GRPC_LATENCY, GRPC_REQUESTS
from app.grpc.errors import grpc_status

Request = TypeVar("Request")
Response = TypeVar("Response")
access_log = AccessLog()

UNAUTHORIZED = (
    "this service needs an API key: send the metadata authorization: Bearer <key> "
    "(tritonclient: headers={'authorization': 'Bearer <key>'})"
)


@dataclass(slots=True)
class Caller:
    """Who makes a call, as the caps and the logs see it."""

    client: str  # the address (logged)
    key: str  # its client key (IPv6: the /64)
    network: str  # its network key (IPv4 /24, IPv6 /48)
    api_key: str | None  # the key it presented, if keys are on (scopes its sequences)
    messages: int = 0  # stream requests answered so far (logged when the stream ends)


def peer_host(peer: str) -> str:
    """The address of a ``context.peer()`` string: ``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
        return host.strip("[]") or "unknown"
    return rest or peer or "unknown"


@lru_cache(maxsize=1024)
def _counter(method: str, code: str) -> Any:
    return GRPC_REQUESTS.labels(method, code)


@lru_cache(maxsize=64)
def _latency(method: str) -> Any:
    return GRPC_LATENCY.labels(method)


class Guard:
    """Admits calls (key, caps), releases them, and counts and logs each one."""

    def __init__(self, settings: Settings) -> None:
        self.keys = ApiKeys(split_list(settings.api_keys.get_secret_value()))
        self.trusted_proxies = tuple(
            ipaddress.ip_network(p, strict=False) for p in split_list(settings.trusted_proxies)
        )
        self.per_client = settings.max_connections_per_client
        self.per_network = settings.max_connections_per_network
        self.counts = ConnectionCounts()

    def trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self.trusted_proxies)

    def admit(self, context: ServicerContext, public: bool) -> Caller:
        """Check the key (unless ``public``) and count the call, or raise a domain error."""
        authorization = forwarded = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value
            elif key == "x-forwarded-for":
                forwarded = value
        host = peer_host(context.peer())
        if self.trusted_proxies and forwarded is not None and self.trusted(host):
            host = self._forwarded_client(forwarded, host)
        presented = None
        if self.keys:
            presented = bearer_credential(authorization if isinstance(authorization, str) else None)
            if not public and not self.keys.check(presented):
                raise Unauthorized(UNAUTHORIZED)
        caller = Caller(host, client_key(host), network_key(host), presented)
        counts = self.counts
        if counts.clients.get(caller.key, 0) >= self.per_client:
            raise Overloaded(
                f"this address already has {self.per_client} gRPC calls in progress "
                "(MAX_CONNECTIONS_PER_CLIENT); wait for one to end",
                "too_many_calls_from_client",
            )
        if counts.networks.get(caller.network, 0) >= self.per_network:
            raise Overloaded(
                f"this network already has {self.per_network} gRPC calls in progress "
                "(MAX_CONNECTIONS_PER_NETWORK); wait for one to end",
                "too_many_calls_from_network",
            )
        counts.add(caller.key, caller.network)
        return caller

    def release(self, caller: Caller) -> None:
        self.counts.remove(caller.key, caller.network)

    def _forwarded_client(self, forwarded: str, proxy: str) -> str:
        """The rightmost address of ``x-forwarded-for`` that is not a trusted proxy."""
        hosts = [h.strip() for h in forwarded.split(",")[-16:] if h.strip()]
        for host in reversed(hosts):
            if not self.trusted(host):
                return host
        return hosts[0] if hosts else proxy

    def unary(
        self,
        method: str,
        behaviour: Callable[[Request, Caller], Awaitable[Response]],
        public: bool = False,
    ) -> Callable[[Request, ServicerContext], Awaitable[Response]]:
        """A unary handler: admit, answer, and on a failure abort with its status."""

        async def handler(request: Request, context: ServicerContext) -> Response:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            caller = None
            try:
                caller = self.admit(context, public)
                return await behaviour(request, caller)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code, message, trailers = grpc_status(exc, method)
                if trailers:
                    context.set_trailing_metadata(trailers)
                await context.abort(code, message)
                raise  # not reached: abort raises
            finally:
                if caller is not None:
                    self.release(caller)
                self.observe(method, code, started, caller, context)

        return handler

    def stream(
        self,
        method: str,
        behaviour: Callable[[ServicerContext, Caller], Awaitable[None]],
    ) -> Callable[[Any, ServicerContext], Awaitable[None]]:
        """A bidirectional-stream handler: admit, run ``behaviour`` (it reads and writes through
        the context and counts the requests it answered in ``caller.messages``), end with its
        status."""

        async def handler(request_iterator: Any, context: ServicerContext) -> None:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            caller = None
            try:
                caller = self.admit(context, public=False)
                await behaviour(context, caller)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code, message, trailers = grpc_status(exc, method)
                if trailers:
                    context.set_trailing_metadata(trailers)
                await context.abort(code, message)
            finally:
                if caller is not None:
                    self.release(caller)
                messages = caller.messages if caller is not None else 0
                self.observe(method, code, started, caller, context, messages)

        return handler

    def observe(
        self,
        method: str,
        code: grpc.StatusCode,
        started: float,
        caller: Caller | None,
        context: ServicerContext,
        messages: int | None = None,
    ) -> None:
        elapsed = time.perf_counter() - started
        _counter(method, code.name).inc()
        _latency(method).observe(elapsed)
        fields: dict[str, Any] = {
            "rpc": method,
            "status": code.name,
            "duration_ms": round(elapsed * 1000, 3),
            "client": caller.client if caller is not None else peer_host(context.peer()),
        }
        if messages is not None:
            fields["messages"] = messages
        access_log.write(fields)

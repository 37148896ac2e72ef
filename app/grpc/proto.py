"""The KServe v2 / Triton gRPC messages, from the ``tritonclient`` wheel pinned in pyproject.toml.

``grpc_service.proto`` (package ``inference``, service ``GRPCInferenceService``) is published
by Triton (triton-inference-server/common, ``protobuf/grpc_service.proto`` with
``model_config.proto``, BSD-3-Clause) and is the KServe v2 gRPC protocol plus Triton's
extensions. ``tritonclient`` 2.73.0 ships the protoc-generated modules
``tritonclient.grpc.service_pb2`` and ``service_pb2_grpc`` as public modules (Triton's own
examples import them to build raw requests). Using them instead of a vendored proto and a
grpcio-tools step keeps one copy of the protocol in the tree (none), and the server and the
tests' real client (``tritonclient.grpc``) speak exactly the same generated code. An upgrade of
``tritonclient`` is an upgrade of the protocol: tests/test_grpc.py covers every RPC served.

Only the message classes and the service's method table are used here; the handlers are
registered by ``app.grpc.server`` (not through the generated servicer base class, whose
unimplemented methods are synchronous).
"""

from __future__ import annotations

from tritonclient.grpc import service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"

__all__ = ["SERVICE", "pb"]

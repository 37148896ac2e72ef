"""The KServe v2 / Triton gRPC service (``inference.GRPCInferenceService``) on ``GRPC_PORT``.

A transport beside ``app.api``, over the same services: grpcio's asyncio server runs in the
uvicorn process and event loop (``app.main``'s lifespan starts and stops it), so its requests
share the batchers, the model repository and the echo sessions with HTTP and ``/echo``.

- ``proto``: the generated messages and method table (from the pinned ``tritonclient``);
- ``codec``: ``ModelInferRequest`` tensors in, ``raw_output_contents`` out;
- ``errors``: domain errors → gRPC status codes and ``"<code>: <detail>"`` messages;
- ``guard``: API keys from the ``authorization`` metadata, per-client call caps, metrics, logs;
- ``servicer``: the RPCs; ``server``: the ``grpc.aio`` server, its limits and lifecycle.
"""

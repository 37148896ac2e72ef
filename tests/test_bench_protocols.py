"""The protocol benchmark's wire format (``bench.protocols``) against the server's own codec,
and the load generator's HTTP parser on a v2 binary response, in-process."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest

from app.api.v2_request import parse_infer, render_infer, wanted_outputs
from bench import protocols
from bench.wire import HttpConn, Run

PIXELS = [bytes(range(i, i + 256)) * 3 + bytes(16) for i in (0, 0)]  # two 784-byte images


def split(request: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")[1:]
    return {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}, body


@pytest.mark.parametrize("protocol", ["v2-json", "v2-binary"])
def test_v2_requests_parse_as_the_server_parses_them(protocol: str) -> None:
    headers, body = split(protocols.request(protocol, PIXELS))
    assert int(headers["content-length"]) == len(body)
    request, (tensor,) = parse_infer(body, headers.get("inference-header-content-length"), 1 << 22)
    assert (tensor.name, tensor.datatype, tensor.shape) == ("images", "UINT8", (2, 28, 28))
    assert tensor.decode().tobytes() == b"".join(PIXELS)
    binary = protocol == "v2-binary"
    wanted = wanted_outputs(request, ("probabilities", "digit"))
    assert wanted == [("probabilities", binary), ("digit", binary)]


@pytest.mark.parametrize("binary", [False, True])
def test_v2_replies_decode_to_predictions(binary: bool) -> None:
    probs = np.eye(10, dtype=np.float32)[[3, 7]]
    digits = np.array([3, 7], np.int64)
    body, _ = render_infer("mnist_lstm", "1", None, [("probabilities", probs, binary),
                                                     ("digit", digits, binary)])  # fmt: skip
    preds = protocols.v2_predictions(body)
    assert [p["digit"] for p in preds] == [3, 7]
    assert preds[1]["probabilities"] == probs[1].tolist()
    bad = render_infer("m", "1", None, [("probabilities", probs, binary),
                                        ("digit", digits[::-1].copy(), binary)])[0]  # fmt: skip
    with pytest.raises(ValueError, match="most probable"):
        protocols.v2_predictions(bad)


def test_http_parser_reads_content_length_not_inference_header_content_length() -> None:
    async def go() -> Run:
        run = Run(sample_every=1)
        conn = HttpConn()
        conn.run, conn.reqs = run, [b""]
        conn.transport = type("T", (), {"write": lambda self, data: None})()
        run.inflight = 1
        run.stopped = True
        body = b'{"outputs":[]}' + bytes(8)
        conn.data_received(
            b"HTTP/1.1 200 OK\r\ninference-header-content-length: 14\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body
        )
        return run

    run = asyncio.run(go())
    assert run.n == 1 and run.samples == [(0, b'{"outputs":[]}' + bytes(8))]
    assert orjson.loads(run.samples[0][1][:14]) == {"outputs": []}

"""Digits through three protocols side by side: ``/predict/digit`` JSON, v2 JSON, v2 binary.

    python -m bench.run --only protocols          # a fresh server, results in bench/results/
    python -m bench.protocols --port P --server-pid PID --case v2-binary:64:128 ...  # loadgen

The same real MNIST images, the same keep-alive closed loops (``bench.wire``) and the same
measurement windows (``bench.loadgen.measure_quiet``) for every protocol; the cases of one
round alternate protocols and repeat for ``--rounds``, so drifts of a shared machine hit all
alike. Every protocol sends UINT8-range pixels and gets the probabilities and the digit back:

* ``native``: ``POST /predict/digit`` ``{"images": [28 rows of 28 ints] …}`` (one: ``"image"``);
* ``v2-json``: ``POST /v2/models/mnist_lstm/infer``, UINT8 ``data`` flat, outputs as JSON;
* ``v2-binary``: the same with the binary tensor data extension for the input and both outputs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
from typing import Any

import uvloop

from bench import mnist
from bench.loadgen import BATCHES, SINGLE_IMAGES, Cfg, emit, measure_quiet
from bench.verify import verify_digits
from bench.wire import HttpConn, Run

PROTOCOLS = ("native", "v2-json", "v2-binary")
V2_PATH = "/v2/models/mnist_lstm/infer"
_DECODER = json.JSONDecoder()


def http_post(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode() + body


def request(protocol: str, images: list[bytes]) -> bytes:
    """One pre-encoded HTTP request carrying ``images`` (784 raw bytes each)."""
    if protocol == "native":
        rows = [mnist.as_rows(im) for im in images]
        doc: dict[str, Any] = {"image": rows[0]} if len(rows) == 1 else {"images": rows}
        body = json.dumps(doc, separators=(",", ":")).encode()
        return http_post("/predict/digit", body, {"Content-Type": "application/json"})
    shape = [len(images), 28, 28]
    tensor: dict[str, Any] = {"name": "images", "shape": shape, "datatype": "UINT8"}
    if protocol == "v2-json":
        tensor["data"] = list(b"".join(images))
        outputs = [{"name": n, "parameters": {"binary_data": False}} for n in ("probabilities",
                   "digit")]  # fmt: skip
        body = json.dumps({"inputs": [tensor], "outputs": outputs}, separators=(",", ":"))
        return http_post(V2_PATH, body.encode(), {"Content-Type": "application/json"})
    pixels = b"".join(images)
    tensor["parameters"] = {"binary_data_size": len(pixels)}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}},
                        separators=(",", ":")).encode()  # fmt: skip
    headers = {"Content-Type": "application/octet-stream",
               "Inference-Header-Content-Length": str(len(header))}  # fmt: skip
    return http_post(V2_PATH, header + pixels, headers)


def v2_predictions(body: bytes) -> list[dict[str, Any]]:
    """A v2 response (JSON, or a JSON header then binary outputs) → ``/predict/digit``-style
    ``[{"digit": d, "probabilities": [10 floats]}, ...]``, for ``verify_digits``."""
    doc, end = _DECODER.raw_decode(body.decode("latin-1"))
    blob, at, out = body[end:], 0, {}
    for o in doc["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = o["data"]
            continue
        code = "q" if o["datatype"] == "INT64" else "f"
        fmt = f"<{size // struct.calcsize(code)}{code}"
        out[o["name"]] = list(struct.unpack(fmt, blob[at : at + size]))
        at += size
    probs, digits = out["probabilities"], out["digit"]
    rows = [probs[i * 10 : i * 10 + 10] for i in range(len(digits))]
    for d, p in zip(digits, rows, strict=True):
        if d != max(range(10), key=p.__getitem__):
            raise ValueError("digit is not the most probable class")
    return [{"digit": d, "probabilities": p} for d, p in zip(digits, rows, strict=True)]


def verify(protocol: str, samples: list[tuple[int, bytes]], groups: list[list[int]],
           labels: list[int]) -> dict[str, int]:  # fmt: skip
    if protocol == "native":
        return verify_digits(samples, groups, labels)
    native_style, malformed = [], 0
    for i, body in samples:
        try:
            preds = v2_predictions(body)
        except (ValueError, KeyError, TypeError, struct.error):
            malformed += 1
            continue
        doc = preds[0] if len(preds) == 1 else {"predictions": preds}
        native_style.append((i, json.dumps(doc).encode()))
    result = verify_digits(native_style, groups, labels)
    result["malformed"] += malformed
    return result


async def run_case(cfg: Cfg, protocol: str, conns_n: int, per_req: int) -> dict[str, Any]:
    count = SINGLE_IMAGES if per_req == 1 else BATCHES * per_req
    images, labels = mnist.load(count)
    groups = [list(range(i, i + per_req)) for i in range(0, count, per_req)]
    reqs = [request(protocol, [images[j] for j in g]) for g in groups]
    loop = asyncio.get_running_loop()
    conns = [(await loop.create_connection(HttpConn, cfg.host, cfg.port))[1]
             for _ in range(conns_n)]  # fmt: skip

    def start(run: Run) -> None:
        for j, conn in enumerate(conns):
            conn.begin(run, reqs, j * 7)

    result, run = await measure_quiet(cfg, start, "mnist_lstm", per_req, 31 if per_req == 1 else 3)
    for conn in conns:
        conn.transport.close()  # type: ignore[union-attr]
    return {"scenario": "protocol", "protocol": protocol, "concurrency": conns_n,
            "images_per_request": per_req, "request_bytes": sum(map(len, reqs)) // len(reqs),
            **result, "verify": verify(protocol, run.samples, groups, labels)}  # fmt: skip


async def main_async(cfg: Cfg, cases: list[str]) -> None:
    for case in cases:
        protocol, c, n = case.split(":")
        try:
            emit(await run_case(cfg, protocol, int(c), int(n)))
        except Exception as exc:
            emit({"scenario": "protocol", "protocol": protocol, "concurrency": int(c),
                  "images_per_request": int(n), "error": repr(exc)})  # fmt: skip
        await asyncio.sleep(0.3)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--server-pid", type=int, required=True)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--max-other", type=float, default=20.0)
    ap.add_argument("--case", action="append", default=[], metavar="PROTOCOL:C:N")
    args = ap.parse_args(argv)
    for case in args.case:
        if case.split(":")[0] not in PROTOCOLS:
            ap.error(f"unknown protocol in {case!r}; one of {', '.join(PROTOCOLS)}")
    cfg = Cfg(args.host, args.port, args.server_pid, args.warmup, args.duration, args.max_other)
    uvloop.run(main_async(cfg, args.case))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

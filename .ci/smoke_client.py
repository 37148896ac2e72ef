"""Smoke-test a running server from outside: real MNIST digits over HTTP, an echo stream over WS,
and both over gRPC.

    python .ci/smoke_client.py [--base-url http://127.0.0.1:8000] [--grpc-url 127.0.0.1:8001]

Checks that ``GET /`` serves the demo page and its scripts (static files shipped in the package),
then sends ``--digits`` images of the MNIST test set (from the original IDX files) one by one to
``POST /predict/digit`` and needs at least ``--min-correct`` of them classified as labelled;
then streams ``--bits`` random bits to ``WS /echo`` in chunks of varying size and needs every
predicted bit from position ``echo_step`` on to equal the input ``echo_step`` bits earlier.
Unless ``--grpc-url`` is empty, the same digits go in one ``ModelInfer`` and the same bits as
an echo sequence on a ``ModelStreamInfer`` stream to the gRPC service (``tritonclient.grpc``).
Exits 0 when all checks pass, 1 otherwise. Needs httpx, websockets, numpy and tritonclient (the
dev venv).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import websockets

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from training.mnist_data import FILES, read_idx, verify_md5  # noqa: E402


class SmokeFailure(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def load_test_digits(mnist_dir: Path, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` seeded-random images (uint8 28×28) of the MNIST test set and their labels."""
    arrays = {}
    for key in ("test_images", "test_labels"):
        filename, md5 = FILES[key]
        verify_md5(mnist_dir / filename, md5)
        arrays[key] = read_idx(mnist_dir / filename, ndim=3 if key.endswith("images") else 1)
    picks = np.random.default_rng(seed).choice(len(arrays["test_labels"]), count, replace=False)
    return arrays["test_images"][picks], arrays["test_labels"][picks]


def check_page(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        page = client.get("/")
        check(page.status_code == 200, f"GET /: HTTP {page.status_code}: {page.text[:300]}")
        check('id="digit-canvas"' in page.text, "GET / is not the demo page")
        for name in ("digits.js", "echo.js", "style.css"):
            r = client.get(f"/static/{name}")
            check(r.status_code == 200 and r.content, f"GET /static/{name}: HTTP {r.status_code}")
    print("page: / and its static files served")


def check_digits(base_url: str, images: np.ndarray, labels: np.ndarray, min_correct: int) -> None:
    correct = 0
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for image, label in zip(images, labels, strict=True):
            response = client.post("/predict/digit", json={"image": image.tolist()})
            check(
                response.status_code == 200,
                f"POST /predict/digit: HTTP {response.status_code}: {response.text[:500]}",
            )
            body = response.json()
            digit, probs = body.get("digit"), body.get("probabilities")
            check(isinstance(digit, int) and 0 <= digit <= 9, f"bad digit in {body}")
            check(
                isinstance(probs, list)
                and len(probs) == 10
                and math.isclose(sum(probs), 1, abs_tol=1e-3),
                f"probabilities are not 10 values summing to 1: {probs}",
            )
            check(int(np.argmax(probs)) == digit, f"digit {digit} is not the argmax of {probs}")
            check(isinstance(body.get("model"), dict), f"no model info in {body}")
            correct += digit == int(label)
            print(f"  digit: label {label} -> {digit} (p={max(probs):.3f})")
    print(f"digits: {correct}/{len(labels)} correct, model {body['model']}")
    check(correct >= min_correct, f"only {correct}/{len(labels)} digits right, need {min_correct}")


async def check_echo(ws_url: str, total_bits: int, seed: int) -> None:
    rng = random.Random(seed)
    sent: list[int] = []
    echoed: list[int] = []
    p_one: list[float] = []
    async with websockets.connect(f"{ws_url}/echo", open_timeout=30) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        check(first.get("type") == "session", f"first frame is not a session frame: {first}")
        step = first.get("echo_step")
        check(isinstance(step, int) and step > 0, f"bad echo_step in {first}")
        seq = first.get("seq", 0)
        while len(sent) < total_bits:
            size = min(rng.choice((1, 3, 17, 64)), total_bits - len(sent))
            chunk = [rng.randint(0, 1) for _ in range(size)]
            await ws.send(json.dumps({"bits": chunk}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
            check(reply.get("type") == "echo", f"expected an echo frame, got {reply}")
            seq += 1
            check(reply.get("seq") == seq, f"seq {reply.get('seq')}, expected {seq}")
            bits, probs = reply.get("bits"), reply.get("probabilities")
            check(
                isinstance(bits, list)
                and isinstance(probs, list)
                and len(bits) == len(probs) == len(chunk),
                f"{len(chunk)} bits sent, reply has bits {bits} and probabilities {probs}",
            )
            sent += chunk
            echoed += bits
            p_one += probs
    expected = [0] * step + sent[:-step]
    wrong = [t for t in range(step, len(sent)) if echoed[t] != expected[t]]
    inconsistent = [t for t in range(step, len(sent)) if (p_one[t] > 0.5) != bool(echoed[t])]
    check(not inconsistent, f"bits disagree with their probabilities at {inconsistent[:20]}")
    print(f"echo: {len(sent)} bits, echo_step {step}, {len(wrong)} wrong after the first {step}")
    if wrong:
        window = slice(max(wrong[0] - 10, 0), wrong[0] + 10)
        raise SmokeFailure(
            f"echo mismatches at positions {wrong[:20]}; around {wrong[0]}: "
            f"expected {expected[window]}, got {echoed[window]}"
        )


def check_grpc(url: str, images: np.ndarray, labels: np.ndarray, min_correct: int, bits: int,
               seed: int) -> None:  # fmt: skip
    import queue

    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url)
    try:
        check(client.is_server_ready(), f"gRPC {url}: ServerReady is false")
        tensor = triton.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        digits = client.infer("mnist_lstm", [tensor]).as_numpy("digit")
        correct = int((digits == labels).sum())
        check(correct >= min_correct, f"gRPC digits: {correct}/{len(labels)} correct")
        stream = np.random.default_rng(seed + 1).integers(0, 2, bits).astype(np.uint8)
        chunks = np.array_split(stream, 5)
        replies: queue.Queue = queue.Queue()
        client.start_stream(lambda result, error: replies.put((result, error)))
        for i, chunk in enumerate(chunks):
            tensor = triton.InferInput("bits", [1, len(chunk)], "UINT8")
            tensor.set_data_from_numpy(chunk.reshape(1, -1))
            client.async_stream_infer("echo_rnn", [tensor], request_id=str(i),
                                      sequence_id=f"smoke-{seed}", sequence_start=i == 0,
                                      sequence_end=i == len(chunks) - 1)  # fmt: skip
        got: dict[str, np.ndarray] = {}
        for _ in chunks:
            result, error = replies.get(timeout=30)
            check(error is None, f"gRPC echo stream: {error}")
            got[result.get_response().id] = result.as_numpy("bits")[0]
        client.stop_stream()
        echoed = np.concatenate([got[str(i)] for i in range(len(chunks))])
        check(bool((echoed[3:] == stream[:-3]).all()), "gRPC echo: the bits are not echoed")
        print(f"gRPC {url}: {correct}/{len(labels)} digits, {bits} echo bits on a stream")
    except InferenceServerException as exc:
        raise SmokeFailure(f"gRPC {url}: {exc}") from None
    finally:
        client.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--mnist-dir",
        type=Path,
        default=os.environ.get("MNIST_DIR") or REPO.parent / "shared" / "data" / "mnist",
        help="folder with the IDX .gz files (default: $MNIST_DIR, else ../shared/data/mnist)",
    )
    p.add_argument("--digits", type=int, default=20, help="test images to send")
    p.add_argument("--min-correct", type=int, default=19, help="of --digits")
    p.add_argument("--bits", type=int, default=300, help="echo bits to stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grpc-url", default="127.0.0.1:8001", help="host:port; empty: skip gRPC")
    args = p.parse_args()

    started = time.perf_counter()
    try:
        check_page(args.base_url)
        images, labels = load_test_digits(args.mnist_dir, args.digits, args.seed)
        check_digits(args.base_url, images, labels, args.min_correct)
        ws_url = "ws" + args.base_url.removeprefix("http")
        asyncio.run(check_echo(ws_url, args.bits, args.seed))
        if args.grpc_url:
            check_grpc(args.grpc_url, images, labels, args.min_correct, args.bits, args.seed)
    except (SmokeFailure, httpx.HTTPError, websockets.WebSocketException, OSError) as exc:
        print(f"SMOKE FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"smoke client: all checks passed in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

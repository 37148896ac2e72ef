"""Smoke-test a running server from outside: real MNIST digits over HTTP, an echo stream over WS.

    python .ci/smoke_client.py [--base-url http://127.0.0.1:8000] [--mnist-dir DIR]

Checks that ``GET /`` serves the demo page and its scripts (static files shipped in the package),
then sends ``--digits`` images of the MNIST test set (from the original IDX files) one by one to
``POST /predict/digit`` and needs at least ``--min-correct`` of them classified as labelled;
then streams ``--bits`` random bits to ``WS /echo`` in chunks of varying size and needs every
predicted bit from position ``echo_step`` on to equal the input ``echo_step`` bits earlier.
Exits 0 when all checks pass, 1 otherwise. Needs httpx, websockets and numpy (the dev venv).
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
    args = p.parse_args()

    started = time.perf_counter()
    try:
        check_page(args.base_url)
        images, labels = load_test_digits(args.mnist_dir, args.digits, args.seed)
        check_digits(args.base_url, images, labels, args.min_correct)
        ws_url = "ws" + args.base_url.removeprefix("http")
        asyncio.run(check_echo(ws_url, args.bits, args.seed))
    except (SmokeFailure, httpx.HTTPError, websockets.WebSocketException, OSError) as exc:
        print(f"SMOKE FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"smoke client: all checks passed in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

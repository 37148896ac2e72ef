"""Which way should the demo page send a drawing: MNIST-style pixels or a PNG upload?

    python -m bench.page_digits [--count 200] [--offset 0]

Starts the real server and headless Chromium, traces ``--count`` real MNIST test digits onto the
page's canvas with mouse strokes (``tests/page_drawing.py``) and reads the page's answer twice
per drawing: with the drawing scaled in the page and sent as 28×28 JSON pixels, and with the
canvas uploaded as a PNG through the server's photo preprocessing. Prints both accuracies and
the time per answer, and writes ``bench/results/page_digits.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests import servers as server
from tests.browser import find_chromium
from tests.page_drawing import predicted_digit, trace_digit
from training.mnist_data import find_mnist, load_mnist

REPO = Path(__file__).resolve().parent.parent
MODES = ("pixels", "png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--offset", type=int, default=0, help="first MNIST test image")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "page_digits.json")
    args = parser.parse_args()

    mnist = load_mnist(find_mnist())
    images = mnist.x_test[args.offset : args.offset + args.count]
    labels = mnist.y_test[args.offset : args.offset + args.count].tolist()
    answers: dict[str, list[int]] = {mode: [] for mode in MODES}
    seconds = dict.fromkeys(MODES, 0.0)
    with (
        tempfile.TemporaryDirectory() as logs,
        server.running({}, Path(logs) / "server.log", bench=False) as live,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=find_chromium())
        page = browser.new_page()
        page.goto(f"{live.base_url}/")
        for i, image in enumerate(images):
            page.select_option("#digit-mode", MODES[0])
            trace_digit(page, image)
            for mode in MODES:
                start = time.perf_counter()
                page.select_option("#digit-mode", mode)  # asks again for the same drawing
                answers[mode].append(predicted_digit(page))
                seconds[mode] += time.perf_counter() - start
            if (i + 1) % 20 == 0:
                print(f"  {i + 1} drawn", flush=True)
        browser.close()

    report = {
        "images": f"MNIST test set [{args.offset}:{args.offset + args.count}]",
        "count": len(labels),
        "results": {
            mode: {
                "correct": sum(a == y for a, y in zip(answers[mode], labels, strict=True)),
                "ms_per_answer": round(1000 * seconds[mode] / len(labels), 1),
                "wrong": [
                    {"index": args.offset + i, "label": y, "answer": a}
                    for i, (a, y) in enumerate(zip(answers[mode], labels, strict=True))
                    if a != y
                ],
            }
            for mode in MODES
        },
    }
    for mode, r in report["results"].items():
        print(f"{mode:>6}: {r['correct']}/{len(labels)} right, {r['ms_per_answer']} ms per answer")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Screenshots of the demo page for the README: ``make screenshots`` (``-m tests.screenshots``).

Starts the real server and headless Chromium, draws a real MNIST test digit, streams bits to
the echo model, and writes ``digits.png``, ``echo.png`` and ``phone.png`` (a 390-px-wide
screen) to ``docs/screenshots/`` (or ``--out``). Tests never write there, so test runs leave
the tree clean.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from tests.browser import find_chromium
from tests.live_server import REPO, start_server
from tests.page_drawing import draw_and_read
from training.mnist_data import find_mnist, load_mnist

OUT = REPO / "docs" / "screenshots"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--digit", type=int, default=0, help="index in the MNIST test set")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mnist = load_mnist(find_mnist())
    image = mnist.x_test[args.digit]

    with (
        tempfile.TemporaryDirectory() as logs,
        start_server(Path(logs)) as server,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=find_chromium())
        screens = {
            "wide": {"viewport": {"width": 1280, "height": 860}},
            "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True},
        }
        for name, screen in screens.items():
            context = browser.new_context(**screen, device_scale_factor=1, has_touch=True)
            page = context.new_page()
            page.goto(f"{server.base_url}/")
            expect(page.locator("#echo")).to_have_attribute("data-state", "open")
            draw_and_read(page, image)
            page.select_option("#echo-rate", "50")
            page.click("#echo-start")
            deadline = time.monotonic() + 30
            while int(page.inner_text("#echo-sent")) < 120 and time.monotonic() < deadline:
                page.wait_for_timeout(50)
            if name == "wide":
                page.locator("#digits").screenshot(path=args.out / "digits.png")
                page.locator("#echo").screenshot(path=args.out / "echo.png")
                page.screenshot(path=args.out / "page.png")
            else:
                page.screenshot(path=args.out / "phone.png", full_page=True)
            context.close()
        browser.close()
    print(f"wrote {', '.join(sorted(p.name for p in args.out.glob('*.png')))} to {args.out}")


if __name__ == "__main__":
    main()

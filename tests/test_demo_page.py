"""The demo page in headless Chromium (Playwright), against the real server.

Never skipped: without a browser these tests fail and say how to get one (``tests/browser.py``).
Waits poll the page (Playwright's ``expect`` or a short poll loop), never fixed sleeps.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.browser import NoBrowser, find_chromium
from tests.live_server import LiveServer, free_port, start_server
from tests.page_drawing import draw_and_read, trace_digit
from training.mnist_data import MnistData

pytestmark = pytest.mark.slow
ECHO_STEP = 3  # the shipped echo_rnn's


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        path = find_chromium()
    except NoBrowser as exc:
        pytest.fail(str(exc), pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator:
    """``open_page(base_url)`` → a fresh tab (own sessionStorage) showing the demo page.

    Fails the test on any uncaught script error or Content-Security-Policy violation.
    """
    contexts, problems = [], []

    def opener(base_url: str, wait_open: bool = True, **context_args) -> Page:
        context = browser.new_context(**context_args)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: problems.append(f"script error: {exc}"))
        page.on(
            "console",
            lambda msg: "Content Security Policy" in msg.text and problems.append(msg.text),
        )
        page.goto(f"{base_url}/")
        if wait_open:
            expect(page.locator("#echo")).to_have_attribute("data-state", "open", timeout=15_000)
        return page

    yield opener
    for context in contexts:
        context.close()
    assert not problems


def poll(page: Page, condition, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(25)


def number(page: Page, selector: str) -> int:
    return int(page.inner_text(selector))


def stream(page: Page, bits: int, rate: str) -> None:
    """Stream random bits at ``rate`` per second until at least ``bits`` are sent; stop."""
    page.select_option("#echo-rate", rate)
    page.click("#echo-start")
    poll(page, lambda: number(page, "#echo-sent") >= bits, f"{bits} bits sent")
    page.click("#echo-start")
    settle(page)


def settle(page: Page) -> None:
    """Wait until every sent message has its answer."""
    expect(page.locator("#echo")).to_have_attribute("data-pending", "0", timeout=15_000)


def send_typed(page: Page, text: str) -> None:
    page.fill("#echo-typed", text)
    page.press("#echo-typed", "Enter")


def test_drawn_mnist_test_digits_are_recognised(
    live_server: LiveServer, open_page, mnist: MnistData
) -> None:
    page = open_page(live_server.base_url)
    picks = np.random.default_rng(14).choice(len(mnist.y_test), 10, replace=False)
    answers = [draw_and_read(page, mnist.x_test[i]) for i in picks]
    labels = mnist.y_test[picks].tolist()
    right = sum(a == y for a, y in zip(answers, labels, strict=True))
    assert right >= 9, f"the page read {answers} for digits {labels}"
    bars = page.locator("#digit-bars [role=listitem]")
    expect(bars).to_have_count(10)
    top = page.locator("#digit-bars .top")
    expect(top).to_have_count(1)
    assert top.inner_text().startswith(str(answers[-1]))


def test_an_uploaded_photo_is_read_and_a_bad_file_is_explained(
    live_server: LiveServer, open_page, mnist: MnistData
) -> None:
    page = open_page(live_server.base_url)
    # A "photo": dark ink on light paper, bigger than MNIST and off-centre.
    paper = Image.new("L", (300, 200), 235)
    digit = Image.fromarray(255 - mnist.x_test[1]).resize((140, 140))
    paper.paste(digit, (40, 30))
    png = io.BytesIO()
    paper.save(png, format="PNG")
    page.set_input_files(
        "#digit-file",
        files=[{"name": "photo.png", "mimeType": "image/png", "buffer": png.getvalue()}],
    )
    expect(page.locator("#digit-result")).to_have_attribute("data-seq", "photo")
    assert page.inner_text("#digit-result") == str(mnist.y_test[1])
    expect(page.locator("#digit-photo")).to_be_visible()

    page.set_input_files(
        "#digit-file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}]
    )
    expect(page.locator("#digit-status")).to_contain_text("The server cannot read that file")
    expect(page.locator("#digit-status")).to_contain_text("(unsupported_image)")


def test_echo_streams_200_bits_and_every_scored_bit_is_right(
    live_server: LiveServer, open_page
) -> None:
    page = open_page(live_server.base_url)
    stream(page, 200, rate="200")
    sent = number(page, "#echo-sent")
    assert number(page, "#echo-scored") == sent - ECHO_STEP
    expect(page.locator("#echo-accuracy")).to_have_text("100 %")
    assert number(page, "#echo-seq") >= 1
    expect(page.locator("#echo-session")).to_have_text(re.compile(r"^[\w-]{20,}$"))
    assert page.inner_text("#echo-step-text") == str(ECHO_STEP)
    painted = page.evaluate(
        """() => {
            const c = document.getElementById("echo-plot");
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            const strips = [0, 0, 0];
            for (let i = 0; i < d.length; i += 4) {
                const y = Math.floor(i / 4 / c.width);
                if (d[i + 3] && (d[i] !== d[i + 1] || d[i + 1] !== d[i + 2])) {
                    strips[Math.min(2, Math.floor((3 * y) / c.height))] += 1;
                }
            }
            return strips;
        }"""
    )
    assert all(n > 500 for n in painted), f"coloured pixels per strip of the plot: {painted}"


def test_a_reload_resumes_the_session_with_a_continuous_stream(
    live_server: LiveServer, open_page
) -> None:
    page = open_page(live_server.base_url)
    stream(page, 50, rate="200")
    session, seq = page.inner_text("#echo-session"), number(page, "#echo-seq")

    page.reload()
    expect(page.locator("#echo-status")).to_have_text(f"Connected (resumed at seq {seq}).")
    assert page.inner_text("#echo-session") == session
    send_typed(page, "1101")
    settle(page)
    assert number(page, "#echo-seq") == seq + 1

    # Reload while messages are in flight: those the server processed are not sent again, the
    # others are, so the model's state and the page's targets stay aligned.
    page.select_option("#echo-rate", "1000")
    page.click("#echo-start")
    poll(page, lambda: number(page, "#echo-sent") >= 400, "400 bits sent")
    page.reload()
    expect(page.locator("#echo")).to_have_attribute("data-state", "open")
    assert page.inner_text("#echo-session") == session
    settle(page)
    send_typed(page, "".join(map(str, np.random.default_rng(1).integers(0, 2, 64))))
    settle(page)
    expect(page.locator("#echo-accuracy")).to_have_text("100 %")
    assert number(page, "#echo-scored") >= 400


def test_error_frames_and_close_reasons_are_shown_in_words(
    live_server: LiveServer, open_page
) -> None:
    page = open_page(live_server.base_url)
    send_typed(page, "0120")
    error = page.locator("#echo-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("bits must be the JSON integers 0 and 1 (invalid_bits)")
    send_typed(page, "0110")
    settle(page)
    assert number(page, "#echo-sent") == 4  # the refused message is not counted
    assert page.locator("#echo").get_attribute("data-state") == "open"

    # A session the server does not know: the close reason in words, then a new session.
    # (Changed at the next load, before the page's scripts run: leaving, the page saves its own.)
    page.add_init_script(
        """if (!sessionStorage.getItem("tampered")) {
            const s = JSON.parse(sessionStorage.getItem("echo-demo"));
            s.sessionId = "no-such-session";
            sessionStorage.setItem("echo-demo", JSON.stringify(s));
            sessionStorage.setItem("tampered", "yes");
        }"""
    )
    page.reload()
    expect(error).to_contain_text("session_not_found")
    expect(error).to_contain_text("Starting a new session")
    expect(page.locator("#echo-status")).to_have_text("Connected (new session).")
    assert page.inner_text("#echo-session") != "no-such-session"


def test_a_stopped_server_shows_an_error_and_the_page_recovers(
    tmp_path: Path, open_page, mnist: MnistData
) -> None:
    """A deployment with API keys restarts: the page asks for the key once, says what is wrong
    while the server is away, and works again when it is back on the same port."""
    port = free_port()
    # No XLA compile (a faster start, same answers); API keys on, as docs/security.md describes.
    env = {"DIGIT_XLA": "false", "API_KEYS": "first-key,second-key"}
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with start_server(tmp_path / "first", env, port=port) as server:
        page = open_page(server.base_url, wait_open=False)
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#echo-error")).to_contain_text("unauthorized: this service needs")
        for key in ("wrong-key", "second-key"):
            page.fill("#key-input", key)
            page.press("#key-input", "Enter")
        expect(page.locator("#echo")).to_have_attribute("data-state", "open")
        expect(page.locator("#key-form")).to_be_hidden()
        send_typed(page, "0110")
        settle(page)
    expect(page.locator("#echo-error")).to_contain_text("Connection closed")
    expect(page.locator("#echo-status")).to_contain_text("reconnecting")
    trace_digit(page, mnist.x_test[0])
    expect(page.locator("#digit-status")).to_contain_text("Cannot reach the server")

    with start_server(tmp_path / "second", env, port=port):
        # The new process has no sessions: the page says so and starts a new one.
        expect(page.locator("#echo-status")).to_have_text(
            "Connected (new session).", timeout=60_000
        )
        expect(page.locator("#echo-error")).to_contain_text("session_not_found")
        send_typed(page, "0110")
        settle(page)
        assert number(page, "#echo-seq") == 1
        assert draw_and_read(page, mnist.x_test[0]) == mnist.y_test[0]
        expect(page.locator("#digit-status")).to_contain_text("Answered by mnist_lstm")

"""Drive the demo page's digits panel like a person: trace an MNIST digit with the mouse.

Shared by the browser tests, the screenshots and ``bench/page_digits.py``. A digit is traced row
by row: each horizontal run of ink pixels (>= ``INK`` of 255) becomes one mouse stroke across
the 280×280 canvas (10 canvas pixels per MNIST pixel), drawn with the page's own round brush.
"""

from __future__ import annotations

import numpy as np
from playwright.sync_api import Page, expect

INK = 128  # MNIST pixels at least this bright are traced
FRAME = 28


def ink_runs(image: np.ndarray, threshold: int = INK) -> list[tuple[int, int, int]]:
    """``(row, first column, last column)`` of every horizontal run of ink in a 28×28 image."""
    runs = []
    for y, row in enumerate(np.asarray(image) >= threshold):
        x = 0
        while x < FRAME:
            if row[x]:
                start = x
                while x + 1 < FRAME and row[x + 1]:
                    x += 1
                runs.append((y, start, x))
            x += 1
    return runs


def trace_digit(page: Page, image: np.ndarray) -> None:
    """Clear the canvas and draw ``image`` onto it with mouse strokes."""
    page.click("#digit-clear")
    canvas = page.locator("#digit-canvas")
    canvas.scroll_into_view_if_needed()  # the mouse only reaches what is in the viewport
    box = canvas.bounding_box()
    assert box is not None, "the canvas is not visible"
    cell = box["width"] / FRAME

    def at(col: float, row: int) -> tuple[float, float]:
        return box["x"] + (col + 0.5) * cell, box["y"] + (row + 0.5) * cell

    for row, first, last in ink_runs(image):
        page.mouse.move(*at(first, row))
        page.mouse.down()
        page.mouse.move(*at(last, row))
        page.mouse.up()


def predicted_digit(page: Page, timeout_ms: float = 15_000) -> int:
    """Wait for the answer to the drawing as it is now, and return the digit the page shows."""
    seq = page.get_attribute("#digit-canvas", "data-seq")
    expect(page.locator("#digit-result")).to_have_attribute("data-seq", seq, timeout=timeout_ms)
    return int(page.inner_text("#digit-result"))


def draw_and_read(page: Page, image: np.ndarray) -> int:
    """Trace ``image`` and return the digit the page then shows."""
    trace_digit(page, image)
    return predicted_digit(page)

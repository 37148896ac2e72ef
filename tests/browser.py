"""Find a Chromium for Playwright, or say how to get one; ``python -m tests.browser [--install]``.

The order: ``$CHROMIUM`` (an executable), an installed Chromium or Chrome on ``PATH`` (Debian's
``chromium`` package: ``/usr/bin/chromium``), then Playwright's own download
(``playwright install chromium``). Without any of them the page tests fail with
``HOW_TO_GET_ONE``; they never skip. ``--install`` (``make browser``) first tries to get one:
Playwright's download, then ``apt-get install chromium`` when running as root on Debian/Ubuntu.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

SYSTEM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HOW_TO_GET_ONE = (
    "no Chromium for the browser tests. Get one with `make browser` (tries "
    "`playwright install chromium`, then `apt-get install chromium` as root), or install your "
    "system's chromium package (Debian/Ubuntu: `sudo apt-get install chromium`), or point "
    "$CHROMIUM at a Chromium or Chrome executable."
)


class NoBrowser(RuntimeError):
    pass


def _playwright_download() -> str | None:
    """The executable of Playwright's own Chromium download, if it is there."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        path = p.chromium.executable_path
    return path if path and Path(path).is_file() else None


def find_chromium() -> str | None:
    """The Chromium executable to launch; ``None`` means Playwright's own download.

    Raises ``NoBrowser`` (with ``HOW_TO_GET_ONE``) when there is none at all, and when
    ``$CHROMIUM`` names something that is not an executable file.
    """
    named = os.environ.get("CHROMIUM")
    if named:
        path = shutil.which(named)
        if path is None:
            raise NoBrowser(f"$CHROMIUM={named} is not an executable; {HOW_TO_GET_ONE}")
        return path
    for name in SYSTEM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    if _playwright_download():
        return None
    raise NoBrowser(HOW_TO_GET_ONE)


def describe() -> str:
    path = find_chromium()
    return f"Chromium for the page tests: {path or 'Playwright download'}"


def _try(cmd: list[str], timeout: float = 600) -> None:
    print("+", " ".join(cmd), flush=True)
    try:
        subprocess.run(cmd, check=False, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"  failed: {exc}", flush=True)


def install() -> None:
    """Try to get a Chromium where none is found (Playwright's download, else apt as root)."""
    try:
        find_chromium()
        return
    except NoBrowser:
        pass
    _try([sys.executable, "-m", "playwright", "install", "chromium"])
    try:
        find_chromium()
        return
    except NoBrowser:
        pass
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=False, env=env, timeout=900)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--install", action="store_true", help="try to get one if none is found")
    args = parser.parse_args()
    if args.install:
        install()
    try:
        print(describe())
    except NoBrowser as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

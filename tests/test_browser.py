"""Finding a browser for the page tests: $CHROMIUM, then PATH, then Playwright's download."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests import browser
from tests.browser import NoBrowser, find_chromium


def fake_executable(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_chromium_names_the_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chrome = fake_executable(tmp_path, "my-chrome")
    monkeypatch.setenv("CHROMIUM", str(chrome))
    assert find_chromium() == str(chrome)
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "missing"))
    with pytest.raises(NoBrowser, match=r"\$CHROMIUM=.*missing is not an executable"):
        find_chromium()


def test_an_installed_chromium_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chromium = fake_executable(tmp_path, "chromium")
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_chromium() == str(chromium)


def test_without_any_browser_the_message_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(browser, "_playwright_download", lambda: None)
    with pytest.raises(NoBrowser) as caught:
        find_chromium()
    assert "make browser" in str(caught.value) and "apt-get install chromium" in str(caught.value)


@pytest.mark.slow  # needs the browser `make browser` installs
def test_this_machine_has_one() -> None:
    """What the page tests will launch; fails (never skips) where there is none."""
    path = find_chromium()
    assert path is None or os.access(path, os.X_OK)

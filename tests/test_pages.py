"""The demo page's routes on the real server: ``GET /``, ``GET /static/{name}`` and their headers.

What the page does in a browser is tested in ``tests/test_demo_page.py``.
"""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch

import httpx
import pytest

from app.api.pages import FILES, STATIC_DIR
from tests.live_server import REPO, LiveServer

JS = [name for name in FILES if name.endswith(".js")]


@pytest.mark.slow
def test_index_is_the_page_with_a_self_only_csp(live_server: LiveServer) -> None:
    r = httpx.get(f"{live_server.base_url}/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<canvas id="digit-canvas" width="280" height="280"' in r.text
    csp = dict(
        part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";")
    )
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == csp["style-src"] == csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-cache"
    assert 'href="/docs"' in r.text and 'href="/v1/models"' in r.text


@pytest.mark.slow
def test_every_file_the_page_loads_is_served_with_its_type(live_server: LiveServer) -> None:
    html = (STATIC_DIR / "index.html").read_text()
    wanted = set(re.findall(r'(?:src|href)="/static/([^"]+)"', html))
    for name in JS:
        wanted |= set(re.findall(r'from "\./([^"]+)"', (STATIC_DIR / name).read_text()))
    assert {"style.css", "digits.js", "echo.js"} <= wanted
    assert wanted <= set(FILES), f"the page loads files the server does not serve: {wanted}"
    for name in wanted:
        r = httpx.get(f"{live_server.base_url}/static/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"] == FILES[name]
        assert r.content == (STATIC_DIR / name).read_bytes()
        assert "content-security-policy" in r.headers


def test_no_network_access_and_small_readable_scripts() -> None:
    for name in FILES:
        text = (STATIC_DIR / name).read_text()
        assert not re.search(
            r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text.replace("http://www.w3.org/2000/svg", "")
        ), f"{name} refers to another site"
        if name.endswith((".js", ".css")):
            assert len(text.splitlines()) <= 300, f"{name} is over 300 lines"


@pytest.mark.slow
def test_unchanged_files_answer_304_and_head_has_no_body(live_server: LiveServer) -> None:
    url = f"{live_server.base_url}/static/echo.js"
    first = httpx.get(url)
    again = httpx.get(url, headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    head = httpx.head(f"{live_server.base_url}/")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len((STATIC_DIR / "index.html").read_bytes()))


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [
        "/static/secret.js",
        "/static/..%2Fmain.py",
        "/static/%2e%2e%2fapi%2fpages.py",
        "/static/static%2Findex.html",
        "/static/",
        "/static/index.html/x",
    ],
)
def test_only_the_listed_files_are_served(live_server: LiveServer, path: str) -> None:
    r = httpx.get(f"{live_server.base_url}{path}")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"


def test_the_static_files_ship_in_the_package() -> None:
    """Every served file matches the package data of ``app`` and every file there is served."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["app"]
    on_disk = {p.name for p in STATIC_DIR.iterdir() if p.is_file()}
    assert on_disk == set(FILES)
    for name in FILES:
        assert any(fnmatch(f"static/{name}", g) for g in globs), name

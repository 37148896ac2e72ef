"""The demo page: ``GET /`` and ``GET /static/{name}`` from the package's ``app/static`` folder.

Only the files named in ``FILES`` are served (no path from the URL ever reaches the file
system), each read once and kept in memory with a strong ETag. Every answer carries a
Content-Security-Policy that allows nothing but this origin (no inline script, no CDN), and
``Cache-Control: no-cache``: browsers keep a copy but revalidate it (a cheap 304), so a new
release never mixes an old script with a new page.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request, Response

from app.api.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "util.js": "text/javascript; charset=utf-8",
    "digits.js": "text/javascript; charset=utf-8",
    "echo.js": "text/javascript; charset=utf-8",
    "echo-plot.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


@cache
def load(name: str) -> StaticFile:
    """One of ``FILES``, read once; ``ApiError`` 404 for any other name."""
    media_type = FILES.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no static file {name!r:.80}")
    body = (STATIC_DIR / name).read_bytes()
    return StaticFile(body, media_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def _serve(request: Request, name: str) -> Response:
    file = load(name)
    headers = {**SECURITY_HEADERS, "ETag": file.etag}
    if file.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else file.body
    response = Response(body, media_type=file.media_type, headers=headers)
    response.headers["content-length"] = str(len(file.body))
    return response


@router.api_route("/", methods=["GET", "HEAD"])
async def index(request: Request) -> Response:
    """The demo page: draw a digit, stream bits to the echo model."""
    return _serve(request, "index.html")


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static(request: Request, name: str) -> Response:
    """The page's stylesheet and scripts."""
    return _serve(request, name)

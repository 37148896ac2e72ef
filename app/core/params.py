"""Strict parsers for the values clients put in URLs: query and path parameters.

Every value a route reads from a URL goes through one of these *before* the route changes any
state, so that a check and a conversion can never disagree (``"²".isdigit()`` is true, ``int("²")``
raises). Integers are ASCII digits only, with a bounded length and value; identifiers are
URL-safe base64 of a bounded length. Failures raise ``InvalidInput`` with a stable code.
"""

from __future__ import annotations

import re

from app.core.errors import InvalidInput

MAX_VERSION = 999_999_999
MAX_SEQ = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only (no re.ASCII needed: the class is explicit)
_URLSAFE = re.compile(r"[A-Za-z0-9_-]+")
MAX_SESSION_ID_CHARS = 64  # the service's own ids are 22 characters
MAX_TOKEN_CHARS = 128  # its tokens are 43


def parse_uint(text: str, name: str, code: str, *, low: int = 0, high: int = MAX_SEQ) -> int:
    """``text`` as an integer in ``[low, high]`` written in ASCII digits, else ``InvalidInput``."""
    if _DIGITS.fullmatch(text) is None or not low <= (value := int(text)) <= high:
        raise InvalidInput(f"{name} must be an integer from {low} to {high} in digits 0-9", code)
    return value


def parse_version(text: str, code: str = "invalid_version") -> int:
    """A model version: 1 to 999,999,999."""
    return parse_uint(text, "version", code, low=1, high=MAX_VERSION)


def parse_token_like(text: str, name: str, max_chars: int, code: str) -> str:
    """A session id or token: 1 to ``max_chars`` URL-safe base64 characters."""
    if len(text) > max_chars or _URLSAFE.fullmatch(text) is None:
        raise InvalidInput(
            f"{name} must be 1 to {max_chars} characters of A-Z, a-z, 0-9, '-' and '_'", code
        )
    return text

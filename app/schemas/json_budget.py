"""A cost bound on a JSON body, checked before any parser turns it into Python objects.

Parsing is linear, but not in the body's bytes alone: ``[[],[],…]`` makes a Python list of
~90 bytes from every 3 bytes (4 MiB → ~140 MB and ~100–400 ms, much of it the garbage
collector), ``{"k1":0,…}`` a key per 8 bytes, ``["ab",…]`` a string per 5. A valid request is
numbers, mostly: the digit model's hold at most one list per 57 bytes (a row of 28 pixels) and
a handful of keys and strings. :func:`check_json_budget` counts the ``[``, ``{`` and ``"``
bytes of a body over :data:`FREE_BYTES` (vectorised, ~0.2 ms per MiB: 5× ``bytes.count``) and
refuses one with more than a list, object or string per :data:`BYTES_PER_NODE` bytes. The
densest body it lets through then costs about what as many bytes of plain numbers do (4 MiB:
~80 MB of objects, one orjson pass of ~20–40 ms). Brackets and quotes inside strings count
too: they only make a count larger, for bodies no route accepts anyway.
"""

from __future__ import annotations

import numpy as np

from app.core.errors import InvalidInput

FREE_BYTES = 64 * 1024  # smaller bodies are cheap whatever their shape (≤ ~2 MB of objects)
BYTES_PER_NODE = 16
_OPEN_LIST, _OPEN_OBJECT, _QUOTE = b'[{"'


def check_json_budget(body: bytes, code: str = "invalid_request") -> None:
    """``InvalidInput`` (``code``) for a body too dense in lists, objects and strings."""
    if len(body) <= FREE_BYTES:
        return
    raw = np.frombuffer(body, np.uint8)
    brackets = np.count_nonzero(raw == _OPEN_LIST) + np.count_nonzero(raw == _OPEN_OBJECT)
    nodes = int(brackets) + int(np.count_nonzero(raw == _QUOTE)) // 2
    if nodes > len(body) // BYTES_PER_NODE:
        raise InvalidInput(
            f"the {len(body)}-byte JSON body holds {nodes} lists, objects and strings: more than "
            f"one per {BYTES_PER_NODE} bytes, which no valid request does (they are numbers, "
            "mostly)",
            code,
        )

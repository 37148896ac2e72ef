"""Stream 1,000 random bits to /echo in chunks, reconnecting halfway; check the echo.

    python examples/echo_client.py [ws://127.0.0.1:8000/echo]

Needs ``websockets`` (installed by ``make install``). ``tests/test_examples.py`` runs it against
the real server.
"""

import json
import random
import sys

from websockets.sync.client import connect

URL = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8000/echo"
bits = [random.randint(0, 1) for _ in range(1000)]
predicted: list[int] = []

with connect(URL) as ws:
    session = json.loads(ws.recv())  # {"type": "session", "session_id": ..., "token": ...}
    for i in range(0, 500, 50):
        ws.send(json.dumps({"bits": bits[i : i + 50]}))
        predicted += json.loads(ws.recv())["bits"]

resume = f"{URL}?session_id={session['session_id']}&token={session['token']}"
with connect(resume) as ws:  # same session, same hidden state
    assert json.loads(ws.recv())["resumed"] is True
    for i in range(500, 1000, 50):
        ws.send(json.dumps({"bits": bits[i : i + 50]}))
        predicted += json.loads(ws.recv())["bits"]

step = session["echo_step"]
assert predicted == [0] * step + bits[:-step], "not an echo"
print(f"echoed {len(bits)} bits, {step} steps late")

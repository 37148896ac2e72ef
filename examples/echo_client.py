"""Stream 1,000 random bits to /echo in chunks, resuming exactly once after every disconnect.

    python examples/echo_client.py [ws://127.0.0.1:8000/echo]

The client remembers the ``seq`` of the last echo frame it received. After a disconnect (here one
on purpose halfway; in life a network drop, a deploy, a crashed server) it resumes with
``?session_id=...&token=...&last_seq=N``: the server first re-sends the replies after N that it
had stored but the client never got, then the client re-sends its messages after the session's
``seq``. Every reply arrives exactly once. Needs ``websockets`` (installed by ``make install``);
``tests/test_examples.py`` runs it against the real server, with sessions in memory and in Redis.
"""

import json
import random
import sys
import time

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

URL = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8000/echo"
bits = [random.randint(0, 1) for _ in range(1000)]
chunks = [bits[i : i + 50] for i in range(0, len(bits), 50)]  # message k has seq k + 1
replies: dict[int, list[int]] = {}  # seq -> predicted bits
session: dict = {}


def attach():
    """A new session, or the resumed one (waiting while another connection still holds it)."""
    while True:
        url = URL
        if session:
            url += f"?session_id={session['session_id']}&token={session['token']}"
            url += f"&last_seq={max(replies, default=0)}"
        ws = connect(url)
        try:
            frame = json.loads(ws.recv())
        except ConnectionClosed:  # e.g. 1013 session_in_use: the old server's lease lasts
            if not (ws.close_reason or "").startswith(("session_in_use", "store_unavailable")):
                raise
            time.sleep(1)
            continue
        session.update(frame)
        for _ in range(frame["seq"] - max(replies, default=0)):  # stored, never received
            echo = json.loads(ws.recv())
            replies[echo["seq"]] = echo["bits"]
        return ws


ws = attach()
while len(replies) < len(chunks):
    try:
        for seq in range(session["seq"] + 1, len(chunks) + 1):
            ws.send(json.dumps({"bits": chunks[seq - 1]}))
            echo = json.loads(ws.recv())
            replies[echo["seq"]] = echo["bits"]
            if seq == len(chunks) // 2 and session["resumed"] is False:
                ws.close()  # disconnect on purpose; a dropped network does the same
                break
            session["seq"] = seq
    except ConnectionClosed:
        pass
    ws.close()
    if len(replies) < len(chunks):
        ws = attach()
ws.close()

step = session["echo_step"]
predicted = [b for seq in sorted(replies) for b in replies[seq]]
assert sorted(replies) == list(range(1, len(chunks) + 1)), "a reply missing or twice"
assert predicted == [0] * step + bits[:-step], "not an echo"
print(f"echoed {len(bits)} bits, {step} steps late, over {int(session['resumed']) + 1} connections")

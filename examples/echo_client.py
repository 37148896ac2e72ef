"""Stream 1,000 random bits to /echo with the Python client, exactly once across a reconnect.

    pip install ./clients/python
    python examples/echo_client.py [ws://127.0.0.1:8000/echo]

The first half goes over one connection, which is then closed; the session (id, token, the seq
of the last reply) stays in the stream's store, and a second ``client.echo(store=...)`` resumes
it over a new connection with the same hidden state. A dropped network, a deploy or a killed
server does the same inside one stream: the client resumes with ``last_seq`` on its own, drops
the replayed duplicates and re-sends what was not answered (docs/client.md). At the end the
replies are checked: each exactly once, in order, and the input echoed 3 steps late.
``tests/test_examples.py`` runs it against the real server, with sessions in memory and in Redis.
"""

import random
import sys

from rnn_serving_client import Client, MemorySessionStore

URL = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8000/echo"
bits = [random.randint(0, 1) for _ in range(1000)]
chunks = [bits[i : i + 50] for i in range(0, len(bits), 50)]
half = len(chunks) // 2
store = MemorySessionStore()  # FileSessionStore(path) would also survive this process

with Client(URL) as client:
    with client.echo(store=store) as stream:  # a new session
        replies = list(stream.stream(chunks[:half]))  # pipelined, in order
        step = stream.echo_step
    with client.echo(store=store) as stream:  # a second connection resumes it
        replies += [stream.send(chunk) for chunk in chunks[half:]]
        connections = 1 + stream.connections

predicted = [b for reply in replies for b in reply.bits]
assert [r.seq for r in replies] == list(range(1, len(chunks) + 1)), "a reply missing or twice"
assert predicted == [0] * step + bits[:-step], "not an echo"
print(f"echoed {len(bits)} bits, {step} steps late, over {connections} connections")

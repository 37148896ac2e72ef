"""Checks of sampled replies, run after the measurement (never on the hot path)."""

from __future__ import annotations

import json

from bench.wire import WsConn


def verify_digits(
    samples: list[tuple[int, bytes]], groups: list[list[int]], labels: list[int]
) -> dict[str, int]:
    """Sampled replies (request index, body) against the MNIST labels of the images sent."""
    checked = correct = malformed = 0
    for i, body in samples:
        try:
            doc = json.loads(body)
            group = groups[i % len(groups)]
            preds = [doc] if len(group) == 1 else doc["predictions"]
            if len(preds) != len(group):
                raise ValueError("wrong number of predictions")
            for p, j in zip(preds, group, strict=True):
                checked += 1
                correct += p["digit"] == labels[j] and len(p["probabilities"]) == 10
        except (ValueError, KeyError, TypeError):
            malformed += 1
    return {"checked": checked, "correct": correct, "malformed": malformed}


def verify_echo(sessions: list[WsConn], phases: list[list[list[int]]], step: int) -> dict[str, int]:
    """Every 10th reply of the sampled sessions: ``bits`` = the sent stream delayed by ``step``."""
    checked = correct = malformed = 0
    for conn in sessions:
        if conn.history is None:
            continue
        starts, stream = [], []
        for tag, k in conn.history:
            starts.append(len(stream))
            stream.extend(phases[tag][k])
        for m, body in conn.replies:
            try:
                got = json.loads(body)["bits"]
                want = [stream[p] if p >= 0 else 0 for p in range(starts[m] - step,
                        starts[m] - step + len(got))]  # fmt: skip
                n_sent = len(phases[conn.history[m][0]][conn.history[m][1]])
                if len(got) != n_sent:
                    raise ValueError("wrong number of bits")
                checked += len(got)
                correct += sum(a == b for a, b in zip(got, want, strict=True))
            except (ValueError, KeyError, TypeError):
                malformed += 1
    return {"checked_bits": checked, "correct_bits": correct, "malformed": malformed}

"""bench/chaos.py's bookkeeping, without Docker: recovery times from reply arrivals, the parsing of
redis-cli's answers, the stream checks and the report. The chaos test itself (Docker, the scale
stack) runs in .ci/container-smoke.sh (short form) and ``make chaos``."""

from __future__ import annotations

import pytest

from bench import chaos
from bench.chaos import ChaosFailure, Flow, compare, messages, recovery, rsc


def flow(arrivals: list[float], connections: list[int], index: int = 0) -> Flow:
    f = Flow(index=index, seed=index)
    f.arrivals, f.connections = arrivals, connections
    return f


def test_recovery_times_count_the_last_reconnect_of_each_cut_stream() -> None:
    cut_twice = flow([0.0, 1.0, 4.0, 4.1, 6.0, 6.1, 20.0], [1, 1, 2, 2, 3, 3, 3])
    slowed = flow([0.0, 1.0, 3.5, 3.6, 20.0], [1, 1, 1, 1, 1], index=1)
    result = recovery([cut_twice, slowed], t0=2.0, t1=10.0)
    assert result["streams"] == 2 and result["cut"] == 1
    # The cut stream's last reconnect: the reply at 6.0 after one at 4.1.
    assert result["time_to_flow_s"] == {"median": 4.0, "max": 4.0}
    assert result["outage_s"] == {"median": 1.9, "max": 1.9}
    # Longest gaps in (2, 10]: 3.0 (1.0 -> 4.0) and 2.5 (1.0 -> 3.5); 20.0 is after t1.
    assert result["longest_gap_s"] == {"median": 2.75, "max": 3.0}
    assert result["per_stream"] == [[4.0, 1.9, 3.0], [None, None, 2.5]]


def test_recovery_files_the_client_events_of_the_window_by_code() -> None:
    f = flow([0.0, 5.0], [1, 2])
    f.events = [(1.0, "dropped", "x"), (3.0, "dropped", "store_unavailable")]
    f.events += [(4.0, "connect_failed", "session_in_use"), (12.0, "dropped", "late")]
    result = recovery([f], t0=2.0, t1=10.0)
    assert result["client_events"] == {
        "connect_failed:session_in_use": 1,
        "dropped:store_unavailable": 1,
    }
    assert recovery([], 0, 1)["time_to_flow_s"] is None


def test_sentinel_replies_parse() -> None:
    one = ["name", "10.0.0.12:6379", "flags", "slave", "master-link-status", "ok"]
    two = ["name", "10.0.0.13:6379", "flags", "s_down,slave", "master-link-status", "err"]
    flat = "\n".join([*one, *two])
    assert chaos.parse_pairs(flat) == [
        {"name": "10.0.0.12:6379", "flags": "slave", "master-link-status": "ok"},
        {"name": "10.0.0.13:6379", "flags": "s_down,slave", "master-link-status": "err"},
    ]
    info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave0:ip=a,state=online\r\n"
    assert chaos.parse_info(info) == {
        "role": "master",
        "connected_slaves": "2",
        "slave0": "ip=a,state=online",
    }


def echoed(f: Flow, count: int, step: int, flip: int | None = None) -> list:
    """The replies an echo model with ``step`` would give ``f``'s first ``count`` messages."""
    source = messages(f.seed)
    sent = [next(source) for _ in range(count)]
    stream = [0] * step + [b for m in sent for b in m]
    out, at = [], 0
    for k, m in enumerate(sent, start=1):
        bits = stream[at : at + len(m)]
        if k == flip:
            bits = [1 - bits[0], *bits[1:]]
        out.append(rsc.EchoReply(k, tuple(0.25 for _ in m), tuple(bits)))
        at += len(m)
    return out


def test_compare_takes_only_equal_echoes() -> None:
    f = Flow(index=0, seed=3)
    f.replies = echoed(f, 20, step=3)
    assert compare(f, echoed(f, 20, step=3), echo_step=3) == 0.0
    with pytest.raises(ChaosFailure, match="bits differ"):
        compare(f, echoed(f, 20, step=3, flip=7), echo_step=3)
    f.replies = echoed(f, 20, step=2)
    with pytest.raises(ChaosFailure, match="not an echo"):
        compare(f, f.replies, echo_step=3)


def test_a_reply_out_of_turn_fails_the_stream() -> None:
    f = Flow(index=0, seed=0)
    f.record(1, rsc.EchoReply(1, (0.5,), (0,)), 0.0, 1)
    with pytest.raises(ChaosFailure, match="message 2 answered by seq 3"):
        f.record(2, rsc.EchoReply(3, (0.5,), (0,)), 0.1, 1)


def test_the_report_names_date_commit_command_and_each_fault() -> None:
    row = {
        "fault": "kill-primary",
        "target": "redis-1",
        "cut": 8,
        "streams": 8,
        "time_to_flow_s": {"median": 4.0, "max": 5.5},
        "outage_s": {"median": 4.5, "max": 6.0},
        "longest_gap_s": {"median": 4.5, "max": 6.0},
        "stack_settled_after_s": 7.4,
        "restarted_by_policy": True,
        "primary_after": "redis-3",
        "target_demoted": True,
        "client_events": {"dropped:store_unavailable": 8},
    }
    result = {
        "meta": {
            "started": "2026-12-06T06:25:30+00:00",
            "command": "python -m bench.chaos --streams 8",
            "commit": "abc1234",
            "cpu_count": 2,
            "machine_before": {"loadavg": [1.5, 1, 1]},
            "pace_s": 0.1,
            "window": 4,
            "lease_s": 10.0,
            "stall_s": 3.0,
        },
        "failover_timeout_s": 5.0,
        "faults": [row],
        "checks": {
            "streams": 8,
            "replies": 1000,
            "acknowledged_steps_lost": 0,
            "streams_exact": 8,
            "largest_probability_difference": 1.5e-7,
            "client_retries": {},
        },
    }
    text = chaos.markdown(result)
    assert "2026-12-06T06:25:30+00:00, commit abc1234" in text
    assert "`python -m bench.chaos --streams 8`" in text
    assert "| kill-primary | redis-1 | 8 of 8 | 4.00 / 5.50 | 4.50 / 6.00 |" in text
    assert "0 acknowledged steps lost, 8 of 8 streams equal" in text

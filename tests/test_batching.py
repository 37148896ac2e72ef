"""The idle-wait policy both batchers share."""

from __future__ import annotations

from app.services.batching import IdleWaitPolicy


def test_lone_batches_stop_the_wait_and_company_restores_it() -> None:
    policy = IdleWaitPolicy()
    decisions = []
    for _ in range(400):
        decisions.append(policy.should_wait())
        policy.record(False)
    first_skip = decisions.index(False)
    assert 5 <= first_skip <= 12, decisions
    later = decisions[first_skip:]
    assert 0 < sum(later) <= len(later) // 128 + 1  # only the rare periodic probes still wait
    policy.record(True)
    assert policy.should_wait()


def test_batches_with_company_keep_waiting() -> None:
    policy = IdleWaitPolicy()
    for _ in range(100):
        assert policy.should_wait()
        policy.record(True)

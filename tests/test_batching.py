"""The timing policies both batchers share: idle wait and inline calls."""

from __future__ import annotations

from app.services.batching import IdleWaitPolicy, InlinePolicy


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


def test_a_shape_runs_inline_once_its_calls_are_known_to_fit_the_budget() -> None:
    policy = InlinePolicy(budget_s=0.002)
    assert not policy.inline(1)  # never seen: the model thread first
    policy.record(1, 0.0005)
    assert policy.inline(1)
    assert not policy.inline(2)  # every shape on its own
    policy.record(2, 0.010)
    assert not policy.inline(2)


def test_one_slow_call_sends_its_shape_back_to_the_thread_until_the_average_falls() -> None:
    policy = InlinePolicy(budget_s=0.002, alpha=0.25)
    policy.record("s", 0.001)
    policy.record("s", 0.009)  # average 0.001 + 0.25 * 0.008 = 0.003
    assert not policy.inline("s")
    policy.record("s", 0.001)  # 0.0025
    assert not policy.inline("s")
    policy.record("s", 0.001)  # 0.002125
    assert not policy.inline("s")
    policy.record("s", 0.001)  # 0.00184
    assert policy.inline("s")


def test_a_zero_budget_keeps_every_call_on_the_thread() -> None:
    policy = InlinePolicy(budget_s=0.0)
    policy.record(1, 0.0)
    assert not policy.inline(1)

"""The batching core in-process, with a scripted adapter: ordering, row limits, continuation,
deadline, drain on stop, failure isolation. No model, no server, no wall-clock thresholds: a
gate (``threading.Event``) holds the model call where a test needs it to be busy."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from app.core.errors import DeadlineExceeded, GoingAway, ModelFailed
from app.services.batching import AGAIN, Batcher, BatchMetrics

Item = tuple[str, int]  # (tag, rows)


class Script:
    """Answers each item with (tag, call number); records the calls; can hold or fail them."""

    def __init__(self, again: dict[str, int] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_tags: set[str] = set()
        self.again = dict(again or {})  # tag → how many more calls it needs
        self.finished_done: list[list[bool]] = []
        self.threads: list[str] = []  # where each call ran

    def rows(self, item: Item) -> int:
        return item[1]

    def prepare(self, items: list[Item]) -> list[str]:
        return [tag for tag, _ in items]

    def compute(self, tags: list[str]) -> int:
        self.calls.append(tags)
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        self.gate.wait(10)
        if self.fail_tags & set(tags):
            raise RuntimeError("model exploded")
        return len(self.calls)

    def finish(self, items: list[Item], call: int, done: list[bool]) -> Sequence[Any]:
        self.finished_done.append(done)
        out: list[Any] = []
        for tag, _ in items:
            if self.again.get(tag, 0) > 0:
                self.again[tag] -= 1
                out.append(AGAIN)
            else:
                out.append((tag, call))
        return out


class Recorder:
    """Stands in for a metric child."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def inc(self, n: float = 1) -> None:
        self.values.append(n)

    def observe(self, v: float) -> None:
        self.values.append(v)

    def observe_many(self, vs: Any) -> None:
        self.values.extend(vs.tolist())


def batcher(script: Script, **kw: Any) -> Batcher[Item, Any]:
    args: dict[str, Any] = {"enabled": True, "max_rows": 4, "max_delay_s": 0.0, "timeout_s": 5.0}
    metrics = BatchMetrics(Recorder(), Recorder(), Recorder(), Recorder())
    return Batcher("test", script, metrics=metrics, **{**args, **kw})


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def test_items_keep_their_order_and_calls_respect_max_rows() -> None:
    async def scenario() -> None:
        script = Script()
        b = batcher(script)
        await b.start()
        script.gate.clear()
        first = b.submit(("a", 1))
        await until(script.entered.is_set)  # the model is busy with "a"; the rest queue up
        items = [("b", 2), ("c", 2), ("d", 1), ("e", 3), ("f", 1)]
        rest = [b.submit(item) for item in items]
        script.gate.set()
        results = await asyncio.gather(first, *rest)
        await b.stop()
        assert [tag for tag, _ in results] == ["a", "b", "c", "d", "e", "f"]
        assert script.calls == [["a"], ["b", "c"], ["d", "e"], ["f"]]
        assert b.metrics.calls.values == [1, 1, 1, 1]
        assert b.metrics.rows.values == [1, 4, 4, 1]
        assert len(b.metrics.waits.values) == 6  # one queue wait per item

    run(scenario)


def test_an_item_answered_again_goes_first_into_the_next_call() -> None:
    async def scenario() -> None:
        script = Script(again={"long": 2})
        b = batcher(script, max_rows=2)
        await b.start()
        script.gate.clear()
        futures = [b.submit(("long", 1)), b.submit(("x", 1))]
        await until(script.entered.is_set)
        futures += [b.submit(("y", 1)), b.submit(("z", 1))]
        script.gate.set()
        results = await asyncio.gather(*futures)
        await b.stop()
        assert script.calls == [["long", "x"], ["long", "y"], ["long", "z"]]
        assert results == [("long", 3), ("x", 1), ("y", 2), ("z", 3)]
        assert len(b.metrics.waits.values) == 4  # the continuations did not wait again

    run(scenario)


def test_past_its_deadline_an_item_fails_and_is_not_run() -> None:
    async def scenario() -> None:
        script = Script()
        b = batcher(script, timeout_s=0.2)
        await b.start()
        script.gate.clear()
        running = b.submit(("run", 1))
        await until(script.entered.is_set)
        queued = b.submit(("queued", 1))
        for future in (running, queued):
            with pytest.raises(DeadlineExceeded):
                await future
        script.gate.set()
        assert await b.submit(("later", 1)) == ("later", 2)
        await b.stop()
        assert script.calls == [["run"], ["later"]]
        assert script.finished_done[0] == [True]  # finish was told the item was answered

    run(scenario)


def test_a_failing_call_fails_only_its_items_and_the_batcher_goes_on() -> None:
    async def scenario() -> None:
        script = Script()
        script.fail_tags = {"bad"}
        b = batcher(script, max_rows=2)
        await b.start()
        script.gate.clear()
        first = b.submit(("bad", 1))
        await until(script.entered.is_set)
        other = b.submit(("good", 2))
        script.gate.set()
        with pytest.raises(ModelFailed) as info:
            await first
        assert isinstance(info.value.__cause__, RuntimeError)
        assert await other == ("good", 2)
        await b.stop()

    run(scenario)


def test_stop_drains_what_is_queued_then_refuses_new_items() -> None:
    async def scenario() -> None:
        script = Script()
        b = batcher(script, max_rows=1)
        await b.start()
        script.gate.clear()
        futures = [b.submit((tag, 1)) for tag in "abc"]
        await until(script.entered.is_set)
        stopping = asyncio.create_task(b.stop())
        await until(lambda: not b.running)
        with pytest.raises(GoingAway):
            await b.submit(("late", 1))
        script.gate.set()
        await stopping
        assert [tag for tag, _ in await asyncio.gather(*futures)] == ["a", "b", "c"]

    run(scenario)


def test_an_idle_pipeline_waits_for_company_unless_the_batch_is_full() -> None:
    async def scenario() -> None:
        script = Script()
        b = batcher(script, max_rows=3, max_delay_s=30.0)
        await b.start()
        futures = [b.submit((tag, 1)) for tag in "abc"]  # full: goes at once, not in 30 s
        await asyncio.gather(*futures)
        lone = asyncio.ensure_future(b.submit(("d", 1)))
        await asyncio.sleep(0.05)
        assert not lone.done() and script.calls == [["a", "b", "c"]]  # held back for company
        more = [b.submit(("e", 1)), b.submit(("f", 1))]
        await asyncio.gather(lone, *more)
        await b.stop()
        assert script.calls == [["a", "b", "c"], ["d", "e", "f"]]

    run(scenario)


def test_batching_off_runs_each_item_alone_with_its_continuations() -> None:
    async def scenario() -> None:
        script = Script(again={"long": 1})
        b = batcher(script, enabled=False)
        await b.start()
        results = await asyncio.gather(*(b.submit((tag, 1)) for tag in ["long", "x"]))
        script.fail_tags = {"bad"}
        with pytest.raises(ModelFailed):
            await b.submit(("bad", 1))
        await b.stop()
        assert sorted(map(tuple, script.calls)) == [("bad",), ("long",), ("long",), ("x",)]
        assert [tag for tag, _ in results] == ["long", "x"]

    run(scenario)


def test_cheap_call_shapes_run_on_the_event_loop_new_and_costly_ones_on_the_model_thread() -> None:
    async def scenario() -> None:
        loop_thread = threading.current_thread().name
        script = Script()
        b = batcher(script, inline_budget_s=5.0)
        await b.start()
        for tag in "abc":
            await b.submit((tag, 1))  # 1 row: first on the thread, then known cheap
        await b.submit(("d", 2))  # a new shape (2 rows): the thread again
        await b.submit(("e", 2))
        b._inline.record(1, 60.0)  # calls of 1 row turned costly (e.g. the host got busy)
        await b.submit(("f", 1))
        await b.stop()
        where = ["loop" if name == loop_thread else "thread" for name in script.threads]
        assert where == ["thread", "loop", "loop", "thread", "loop", "thread"]

    run(scenario)


def test_without_an_inline_budget_every_call_runs_on_the_model_thread() -> None:
    async def scenario() -> None:
        script = Script()
        b = batcher(script)  # inline_budget_s defaults to 0
        await b.start()
        for tag in "abc":
            await b.submit((tag, 1))
        await b.stop()
        assert all(name.startswith("test-model") for name in script.threads), script.threads

    run(scenario)

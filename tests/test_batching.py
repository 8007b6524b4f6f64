"""The encoder's batching policy (pipeline/batching.py), driven on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.batching import TowerBatcher


class Runner:
    """A batch function that records what it ran and takes ``seconds`` per batch."""

    def __init__(self, seconds: float = 0.05, fail: str | None = None) -> None:
        self.seconds = seconds
        self.fail = fail
        self.batches: list[tuple[str, list]] = []

    async def __call__(self, tower: str, items: list) -> list:
        self.batches.append((tower, list(items)))
        await asyncio.sleep(self.seconds)
        if tower == self.fail:
            raise RuntimeError(f"{tower} refused")
        return [f"{tower}:{x}" for x in items]


def test_items_arriving_while_the_runner_is_busy_meet_in_one_batch_per_tower():
    """Three sessions' windows end together but reach the encoder a few ms apart: their items
    join one batch per tower, instead of running one by one behind each other."""

    async def main():
        run = Runner(seconds=0.1)
        b = TowerBatcher(run, max_batch=8, max_wait_s=0.01)
        first = asyncio.ensure_future(b.submit_many("vision", ["s0"]))
        await asyncio.sleep(0.03)  # the runner is now busy with s0's vision
        rest = []
        for s in ("s1", "s2"):  # further apart than max_wait_s: no batch formed on arrival holds both
            rest += [asyncio.ensure_future(b.submit_many(tower, [s])) for tower in ("audio", "vision")]
            await asyncio.sleep(0.03)
        out = await asyncio.gather(first, *rest)
        return run.batches, out

    batches, out = asyncio.run(main())
    assert batches == [("vision", ["s0"]), ("audio", ["s1", "s2"]), ("vision", ["s1", "s2"])]
    assert out == [["vision:s0"], ["audio:s1"], ["vision:s1"], ["audio:s2"], ["vision:s2"]]


def test_an_idle_runner_waits_max_wait_for_more_and_never_exceeds_max_batch():
    async def main():
        run = Runner(seconds=0.0)
        b = TowerBatcher(run, max_batch=3, max_wait_s=0.2)
        a = asyncio.ensure_future(b.submit_many("imu", [1]))
        await asyncio.sleep(0.05)
        c = asyncio.ensure_future(b.submit_many("imu", [2, 3, 4, 5]))
        await asyncio.gather(a, c)
        return run.batches, b.batch_sizes

    batches, sizes = asyncio.run(main())
    assert batches == [("imu", [1, 2, 3]), ("imu", [4, 5])]
    assert sizes == {"imu": [3, 2]}


def test_the_tower_whose_oldest_item_waited_longest_goes_first():
    async def main():
        run = Runner(seconds=0.05)
        b = TowerBatcher(run, max_batch=8, max_wait_s=0.0)
        busy = asyncio.ensure_future(b.submit_many("text", ["t"]))
        await asyncio.sleep(0.01)
        order = []
        for tower in ("depth", "audio", "depth", "thermal"):
            order.append(asyncio.ensure_future(b.submit_many(tower, [tower])))
            await asyncio.sleep(0.005)
        await asyncio.gather(busy, *order)
        return [t for t, _ in run.batches]

    assert asyncio.run(main()) == ["text", "depth", "audio", "thermal"]


def test_a_failed_batch_fails_its_own_callers_only():
    async def main():
        run = Runner(seconds=0.01, fail="depth")
        b = TowerBatcher(run, max_batch=8, max_wait_s=0.0)
        return await asyncio.gather(b.submit_many("depth", [1, 2]), b.submit_many("audio", [3]),
                                    return_exceptions=True)

    depth, audio = asyncio.run(main())
    assert isinstance(depth, RuntimeError) and "depth refused" in str(depth)
    assert audio == ["audio:3"]


def test_wrong_result_count_is_an_error_not_a_silent_mismatch():
    async def short(tower, items):
        return items[:-1]

    async def main():
        return await asyncio.gather(TowerBatcher(short, max_wait_s=0.0).submit_many("vision", [1, 2]),
                                    return_exceptions=True)

    (err,) = asyncio.run(main())
    # the batch of two, then each item alone (the short function returns nothing for one item)
    assert isinstance(err, RuntimeError) and "returned 0 results for 1 items" in str(err)


class Staged:
    """A two-stage batch: ``prepare`` and ``run`` each take their time and log when they start
    and end, so the test can see which batches overlapped."""

    def __init__(self, prep_s: float = 0.03, run_s: float = 0.05, fail_prepare: str | None = None) -> None:
        self.prep_s, self.run_s, self.fail_prepare = prep_s, run_s, fail_prepare
        self.events: list[tuple[str, str, str]] = []  # (stage, "start"/"end", tower)

    async def prepare(self, tower: str, items: list) -> list:
        self.events.append(("prepare", "start", tower))
        await asyncio.sleep(self.prep_s)
        self.events.append(("prepare", "end", tower))
        if tower == self.fail_prepare:
            raise ValueError(f"{tower} cannot be prepared")
        return [f"prepared {x}" for x in items]

    async def run(self, tower: str, staged: list) -> list:
        self.events.append(("run", "start", tower))
        await asyncio.sleep(self.run_s)
        self.events.append(("run", "end", tower))
        return [f"{tower}:{x}" for x in staged]


def _max_overlap(events: list[tuple[str, str, str]], stages: tuple[str, ...]) -> int:
    live = most = 0
    for stage, edge, _ in events:
        if stage in stages:
            live += 1 if edge == "start" else -1
            most = max(most, live)
    return most


def test_with_prepare_the_next_batch_is_prepared_while_the_current_one_runs():
    """Preprocessing and the model run in different threads of an encoder: while the model runs
    one tower's batch, the next tower's batch is prepared, so a window end's towers do not wait
    for each other's preprocessing. Each stage still runs one batch at a time, and at most two
    batches are in flight."""

    async def main():
        st = Staged()
        b = TowerBatcher(st.run, max_batch=8, max_wait_s=0.0, prepare=st.prepare)
        out = await asyncio.gather(*(b.submit_many(t, [t[0], t[1]]) for t in ("vision", "audio", "imu", "depth")))
        return st.events, out

    events, out = asyncio.run(main())
    assert out == [[f"{t}:prepared {t[0]}", f"{t}:prepared {t[1]}"] for t in ("vision", "audio", "imu", "depth")]
    # the second batch's preparation started before the first batch's model run ended
    assert events.index(("prepare", "start", "audio")) < events.index(("run", "end", "vision"))
    assert _max_overlap(events, ("prepare",)) == 1 and _max_overlap(events, ("run",)) == 1
    # in flight = prepared or being prepared, and not yet run to its end
    in_flight = most = 0
    for stage, edge, _ in events:
        if (stage, edge) == ("prepare", "start"):
            in_flight += 1
        elif (stage, edge) == ("run", "end"):
            in_flight -= 1
        most = max(most, in_flight)
    assert most == 2
    # the model still runs the batches in the order they were formed
    assert [t for s, e, t in events if (s, e) == ("run", "start")] == ["vision", "audio", "imu", "depth"]


def test_a_batch_that_cannot_be_prepared_fails_its_own_callers_only():
    async def main():
        st = Staged(prep_s=0.01, run_s=0.01, fail_prepare="depth")
        b = TowerBatcher(st.run, max_batch=8, max_wait_s=0.0, prepare=st.prepare)
        res = await asyncio.gather(b.submit_many("depth", [1, 2]), b.submit_many("audio", [3]),
                                   return_exceptions=True)
        again = await b.submit_many("imu", [4])  # the runner goes on after the failure
        return res, again

    (depth, audio), imu = asyncio.run(main())
    assert isinstance(depth, ValueError) and "depth cannot be prepared" in str(depth)
    assert audio == ["audio:prepared 3"] and imu == ["imu:prepared 4"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        TowerBatcher(Runner(), max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        TowerBatcher(Runner(), max_wait_s=-1)

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
    assert isinstance(err, RuntimeError) and "1 results for 2 items" in str(err)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        TowerBatcher(Runner(), max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        TowerBatcher(Runner(), max_wait_s=-1)

"""The encoder actor: ImageBind behind dynamic batching per tower, shared by every session.

Item by item, so no item costs another its embedding: before the batch, each payload loses the
samples its tower cannot take (:func:`encoders.preprocess.without_bad_values`); in the batch,
a non-finite embedding fails its own item; a batch that fails as a whole is tried again item by
item (:class:`pipeline.batching.TowerBatcher`). A tower's answer is a :class:`TowerRows`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import numpy as np
import ray

from pipeline.batching import TowerBatcher

__all__ = ["EncoderActor", "TowerRows", "prepare_ahead_on"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TowerRows:
    """One tower's answer to one call, item by item: ``rows[i]`` the unit-norm embedding of
    payload ``i`` or ``None``, ``spans[i]`` the wall-clock start and end of the forward that
    made it. ``bad``: payload index -> samples left out as bad values (only items that held
    some); ``errors``: payload index -> why the item failed on its own. A ``None`` row not in
    ``errors`` had nothing left once its bad values were left out."""

    rows: list[np.ndarray | None]
    spans: list[tuple[float, float] | None]
    bad: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    def refused(self) -> bool:
        """Every item that reached the tower failed there (nothing to use; worth a retry)."""
        tried = sum(1 for i, r in enumerate(self.rows) if r is not None or i in self.errors)
        return tried > 0 and len(self.errors) == tried


def _failure(exc: BaseException) -> str:
    """What an item or tower failed with, as text; cancellation and interpreter exit go on up."""
    if not isinstance(exc, Exception):
        raise exc
    return f"{type(exc).__name__}: {exc}"


def prepare_ahead_on(setting: str | bool, device: str, torch_threads: int, cores: int) -> bool:
    """``encoders.prepare_ahead``: ``auto`` prepares ahead on a GPU, where preprocessing and the
    host-to-device copy run while the device computes, and on a CPU whose cores the model's
    torch threads leave one free for the second stage: each release's burst of batches then
    costs the longer of the two stages instead of their sum (real-time latency on the 2-core
    machine with one torch thread, bench/RESULTS.md); with every core taken by the model the
    stages would only compete. ``true`` / ``false`` as set."""
    if setting == "auto":
        return str(device).startswith("cuda") or 0 < torch_threads < cores
    return bool(setting)


def _usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@ray.remote(num_cpus=0)
class EncoderActor:
    """Holds one model; batches items per tower across all callers; returns unit-norm rows.
    ``imu_span``: the seconds an IMU window covers (``window.spans.imu.span``), over which its
    samples are resampled into the tower's; ``None``: the tower's own duration.
    ``prepare_ahead``: ``True``, ``False`` or ``"auto"`` (:func:`prepare_ahead_on`, decided on
    the machine the actor runs on)."""

    def __init__(self, model_options: dict[str, Any], max_batch: int, max_wait_ms: float,
                 prepare_ahead: bool | str = False, imu_span: float | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        import torch

        from encoders.imagebind import load

        threads = int(model_options.get("threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        device = model_options["device"]
        self.model = load(
            model_options["config"],
            model_options["checkpoint"],
            device=device,
            precision=model_options["precision"],
            compile=bool(model_options.get("compile", False)),
            seed=int(model_options.get("seed", 0)),
        )
        self.device = torch.device(device)
        self.prepare_ahead = prepare_ahead_on(prepare_ahead, device, torch.get_num_threads(), _usable_cores())
        self.imu_span = imu_span
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        # One thread runs the model, so towers never compete for the device or the cores; a
        # tower's batch is formed when the batcher's runner is free (pipeline/batching.py).
        # prepare_ahead: a second thread preprocesses the next batch while the model runs this
        # one (at most one batch waits, prepared, for the model thread).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._prep_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") if self.prepare_ahead else None
        self._batcher = TowerBatcher(self._run_staged if self.prepare_ahead else self._run_batch, max_batch=max_batch,
                                     max_wait_s=self.max_wait_s, name="encoder",
                                     prepare=self._prepare_batch if self.prepare_ahead else None)
        self._metrics: Any = None  # pipeline.metrics.RayMetrics, made in warmup() (or on the first batch)
        self.items = collections.Counter()
        self.forward_s = collections.Counter()
        self.requests = collections.Counter()  # encode calls received: "with_items" / "empty"

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model.config.name,
            "dim": int(self.model.out_dim),
            "device": str(self.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "modalities": list(self.model.modalities),
            "prepare_ahead": self.prepare_ahead,
        }

    def warmup(self) -> float:
        """One forward per tower on a small synthetic batch, before any stream reads; returns
        the seconds it took. The first call of a tower pays one-off costs (the text tokenizer's
        vocabulary, lazy imports, kernel selection, ``torch.compile``) that would otherwise land
        on the first real windows as latency (about 0.3 s on CPU for imagebind_tiny, far more
        with ``compile``). Not counted in :meth:`stats`."""
        import torch

        examples = {
            "vision": np.zeros((2, 224, 224, 3), dtype=np.uint8),
            "audio": np.zeros(32000, dtype=np.float32),
            "imu": np.concatenate([np.linspace(0.0, 5.0, 1000)[:, None], np.zeros((1000, 6))], axis=1),
            "depth": np.ones((224, 224), dtype=np.float32),
            "thermal": np.full((224, 224), 0.5, dtype=np.float32),
            "text": "warm up",
        }
        self._ray_metrics()  # registering them takes a while: not on the first batch
        t0 = time.perf_counter()
        for modality in self.model.modalities:
            if modality in examples:
                self.model.encode(modality, self._prepare(modality, [examples[modality]]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def stats(self) -> dict[str, Any]:
        return {
            "items": dict(self.items),
            "forward_s": dict(self.forward_s),
            "batch_sizes": {m: list(b) for m, b in self._batcher.batch_sizes.items()},
            "requests": dict(self.requests),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),  # a restarted encoder reports its new process
        }

    # -- stage timing: every row travels with its batch's forward start/end time ------------
    def _forward_timed(self, modality: str, payloads: list[Any]) -> list[Any]:
        """Both stages in this (the forward) thread: ``prepare_ahead`` off."""
        return self._model_timed(modality, *self._prepare_timed(modality, payloads))

    def _ray_metrics(self) -> Any:
        """The encoder's :class:`pipeline.metrics.RayMetrics`, registered on first use."""
        if self._metrics is None:
            from pipeline.metrics import RayMetrics

            self._metrics = RayMetrics()
        return self._metrics

    async def _run_batch(self, modality: str, payloads: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        self._ray_metrics().batch(modality, len(payloads), self._batcher.depth(modality))
        return await loop.run_in_executor(self._pool, self._forward_timed, modality, payloads)

    async def _prepare_batch(self, modality: str, payloads: list[Any]) -> tuple[Any, int, float]:
        """First stage (``prepare_ahead``): preprocess in the prepare thread; returns the input
        tensor, the item count and the seconds it took."""
        loop = asyncio.get_running_loop()
        self._ray_metrics().batch(modality, len(payloads), self._batcher.depth(modality))
        return await loop.run_in_executor(self._prep_pool, self._prepare_timed, modality, payloads)

    def _prepare(self, modality: str, payloads: list[Any]) -> Any:
        """The model's input for ``payloads``, by its towers' preprocessing contracts."""
        from encoders.preprocess import prepare

        return prepare(modality, payloads, self.device, config=self.model.config, imu_duration=self.imu_span)

    def _prepare_timed(self, modality: str, payloads: list[Any]) -> tuple[Any, int, float]:
        t0 = time.perf_counter()
        x = self._prepare(modality, payloads)
        return x, len(payloads), time.perf_counter() - t0

    async def _run_staged(self, modality: str, staged: tuple[Any, int, float]) -> list[Any]:
        """Second stage: the model, in the forward thread."""
        x, n, prep_s = staged
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._model_timed, modality, x, n, prep_s)

    def _model_timed(self, modality: str, x: Any, n: int, prep_s: float) -> list[Any]:
        """Each row with its forward span (or its item's exception); the span starts the
        preprocessing's length before the model did: with ``prepare_ahead``, the time a prepared
        batch waited for this thread counts as queueing."""
        t0 = time.time()
        rows = self._encode_checked(modality, x)
        t1 = time.time()
        self.items[modality] += sum(1 for r in rows if not isinstance(r, Exception))
        self.forward_s[modality] += t1 - t0 + prep_s
        return [r if isinstance(r, Exception) else (r, t0 - prep_s, t1) for r in rows]

    def _encode_checked(self, modality: str, x: Any) -> list[Any]:
        """The batch's rows; a row that is not finite is replaced by its item's exception."""
        emb = self.model.encode(modality, x)
        rows = emb.float().cpu().numpy()
        finite = np.isfinite(rows).all(axis=1)
        return [r if ok else FloatingPointError(f"{modality}: the embedding is not finite")
                for r, ok in zip(rows, finite)]

    async def _submit(self, modality: str, payloads: list[Any]) -> TowerRows:
        """Each payload without its bad values, through the batcher; what each item got."""
        from encoders.preprocess import without_bad_values

        cleaned = [without_bad_values(modality, p) for p in payloads]
        sent = [i for i, (p, _) in enumerate(cleaned) if p is not None]
        outs = await self._batcher.submit_many(modality, [cleaned[i][0] for i in sent], return_exceptions=True)
        rows: list[np.ndarray | None] = [None] * len(payloads)
        spans: list[tuple[float, float] | None] = [None] * len(payloads)
        errors: dict[int, str] = {}
        for i, out in zip(sent, outs):
            if isinstance(out, BaseException):
                errors[i] = _failure(out)
            else:
                rows[i], spans[i] = out[0], (out[1], out[2])
        return TowerRows(rows, spans, {i: n for i, (_, n) in enumerate(cleaned) if n}, errors)

    def _count_request(self, with_items: bool) -> None:
        # An empty request is a Ray round trip for nothing: the aligners do not send them.
        self.requests["with_items" if with_items else "empty"] += 1

    async def encode(self, modality: str, payloads: list[Any]) -> list[np.ndarray | None]:
        """The rows of :meth:`encode_timed`."""
        return (await self.encode_timed(modality, payloads)).rows

    async def encode_timed(self, modality: str, payloads: list[Any]) -> TowerRows:
        """Rows, forward spans and what failed, per item; raises when every item that reached
        the tower failed there (the caller may try another replica)."""
        self._count_request(bool(payloads))
        out = await self._submit(modality, payloads)
        if out.refused():
            raise RuntimeError(next(iter(out.errors.values())))
        return out

    async def encode_many(self, groups: dict[str, list[Any]]) -> dict[str, Any]:
        """:meth:`encode_timed` for several towers in one call, answered once every tower has:
        per modality its :class:`TowerRows`, or the error's text where every item that reached
        that tower failed; the other towers' rows still come. Each tower still batches with
        every other caller's items."""
        self._count_request(any(groups.values()))
        got = {m: out async for m, out in self._answers(groups)}
        return {m: got[m] for m in groups}

    async def encode_each(self, groups: dict[str, list[Any]]) -> AsyncIterator[tuple[str, Any]]:
        """:meth:`encode_many`, each tower's answer yielded as soon as that tower has answered
        (``(modality, TowerRows or error text)``; a Ray streaming generator). An aligner sends
        everything a release of windows needs in this one call and publishes each topic's
        rows as they come, so a fast tower's rows do not wait for a slow tower's."""
        self._count_request(any(groups.values()))
        async for answer in self._answers(groups):
            yield answer

    async def _answers(self, groups: dict[str, list[Any]]) -> AsyncIterator[tuple[str, Any]]:
        """Each tower's answer to ``groups``, in the order the towers finish."""
        async def one(modality: str) -> tuple[str, Any]:
            try:
                out = await self._submit(modality, groups[modality])
            except Exception as exc:
                return modality, _failure(exc)
            return modality, next(iter(out.errors.values())) if out.refused() else out

        for answer in asyncio.as_completed([one(m) for m in groups]):
            yield await answer

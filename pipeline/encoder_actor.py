"""The encoder actor: ImageBind behind dynamic batching per tower, shared by every session."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray

from pipeline.batching import TowerBatcher

__all__ = ["EncoderActor"]

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class EncoderActor:
    """Holds one model; batches items per tower across all callers; returns unit-norm rows.
    ``imu_span``: the seconds an IMU window covers (``window.spans.imu.span``), over which its
    samples are resampled into the tower's; ``None``: the tower's own duration."""

    def __init__(self, model_options: dict[str, Any], max_batch: int, max_wait_ms: float,
                 prepare_ahead: bool = False, imu_span: float | None = None) -> None:
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
        self.imu_span = imu_span
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        # One thread runs the model, so towers never compete for the device or the cores; a
        # tower's batch is formed when the batcher's runner is free (pipeline/batching.py).
        # prepare_ahead: a second thread preprocesses the next batch while the model runs this
        # one (at most one batch waits, prepared, for the model thread).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._prep_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") if prepare_ahead else None
        self._batcher = TowerBatcher(self._run_staged if prepare_ahead else self._run_batch, max_batch=max_batch,
                                     max_wait_s=self.max_wait_s, name="encoder",
                                     prepare=self._prepare_batch if prepare_ahead else None)
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
    def _forward_timed(self, modality: str, payloads: list[Any]) -> list[tuple[np.ndarray, float, float]]:
        """Both stages in this (the forward) thread: ``prepare_ahead`` off."""
        return self._model_timed(modality, *self._prepare_timed(modality, payloads))

    def _ray_metrics(self) -> Any:
        """The encoder's :class:`pipeline.metrics.RayMetrics`, registered on first use."""
        if self._metrics is None:
            from pipeline.metrics import RayMetrics

            self._metrics = RayMetrics()
        return self._metrics

    async def _run_batch(self, modality: str, payloads: list[Any]) -> list[tuple[np.ndarray, float, float]]:
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

    async def _run_staged(self, modality: str, staged: tuple[Any, int, float]) -> list[tuple[np.ndarray, float, float]]:
        """Second stage: the model, in the forward thread."""
        x, n, prep_s = staged
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._model_timed, modality, x, n, prep_s)

    def _model_timed(self, modality: str, x: Any, n: int, prep_s: float) -> list[tuple[np.ndarray, float, float]]:
        """Each row with its forward span, which starts the preprocessing's length before the
        model did: with ``prepare_ahead``, the time a prepared batch waited for this thread
        counts as queueing."""
        t0 = time.time()
        rows = self._encode_checked(modality, x)
        t1 = time.time()
        self.items[modality] += n
        self.forward_s[modality] += t1 - t0 + prep_s
        return [(r, t0 - prep_s, t1) for r in rows]

    def _encode_checked(self, modality: str, x: Any) -> list[np.ndarray]:
        emb = self.model.encode(modality, x)
        rows = emb.float().cpu().numpy()
        if not np.all(np.isfinite(rows)):
            bad = int((~np.isfinite(rows).all(axis=1)).sum())
            raise FloatingPointError(f"{modality}: {bad} of {len(rows)} embeddings are not finite")
        return list(rows)

    async def _submit(self, modality: str, payloads: list[Any]) -> list[tuple[np.ndarray, float, float]]:
        return await self._batcher.submit_many(modality, payloads)

    def _count_request(self, with_items: bool) -> None:
        # An empty request is a Ray round trip for nothing: the aligners do not send them.
        self.requests["with_items" if with_items else "empty"] += 1

    async def encode(self, modality: str, payloads: list[Any]) -> list[np.ndarray]:
        self._count_request(bool(payloads))
        return [row for row, _, _ in await self._submit(modality, payloads)]

    async def encode_timed(self, modality: str, payloads: list[Any]) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
        """``encode`` plus, per row, the wall-clock start and end of the forward that made it."""
        self._count_request(bool(payloads))
        return _rows_and_spans(await self._submit(modality, payloads))

    async def encode_many(self, groups: dict[str, list[Any]]) -> dict[str, Any]:
        """:meth:`encode_timed` for several towers in one call: an aligner sends everything a
        release of windows needs at once (one Ray call instead of one per modality; each tower
        still batches with every other caller's items). Per modality the ``(rows, spans)`` pair,
        or the error's text where that tower's batch failed; the other towers' rows still come."""
        names = list(groups)
        self._count_request(any(groups.values()))
        outs = await asyncio.gather(*(self._submit(m, groups[m]) for m in names), return_exceptions=True)
        result: dict[str, Any] = {}
        for m, out in zip(names, outs):
            if isinstance(out, BaseException):
                if not isinstance(out, Exception):
                    raise out  # cancellation, interpreter exit
                result[m] = f"{type(out).__name__}: {out}"
            else:
                result[m] = _rows_and_spans(out)
        return result


def _rows_and_spans(out: list[tuple[np.ndarray, float, float]]) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
    """``EncoderActor._submit``'s ``(row, t0, t1)`` triples as rows and forward spans."""
    return [row for row, _, _ in out], [(t0, t1) for _, t0, t1 in out]

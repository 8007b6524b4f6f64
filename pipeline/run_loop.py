"""The driver's loop while the sessions run: progress bars, SIGINT/SIGTERM and ``stop_after``,
each stream's end stats as it ends, and each session's summary (one the driver makes where the
session's process died)."""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from typing import Any

from pipeline.stats import SessionResult
from sources.session import SessionSpec

__all__ = ["SourceWatch", "wait_sessions"]

log = logging.getLogger(__name__)


def wait_sessions(done_refs: list[Any], aligners: list[Any], specs: list[SessionSpec], progress: bool | None,
          watch: "SourceWatch", stop_after: float | None = None, publisher: Any = None) -> list[dict[str, Any]]:
    """Every session's summary, once all are done; stops the streams on SIGINT/SIGTERM or at
    ``stop_after`` seconds (live), and at a second signal at once."""
    import ray

    bars = _progress_bars(specs, progress)
    interrupted = {"n": 0}
    last: list[dict[str, Any] | None] = [None] * len(aligners)  # each aligner's latest progress()

    def on_signal(signum: int, frame: Any) -> None:
        interrupted["n"] += 1
        if interrupted["n"] >= 2:
            raise KeyboardInterrupt
        log.warning("stopping: draining in-flight windows (press Ctrl-C again to stop at once)")
        watch.stop()

    old = {}
    if _is_main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
    try:
        pending = list(done_refs)
        stop_at = None if stop_after is None else time.monotonic() + float(stop_after)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            if stop_at is not None and time.monotonic() >= stop_at:  # live: stop_after reached
                log.info("stop_after %.1f s reached: stopping the live sources", stop_after)
                stop_at = None
                watch.stop()
            watch.poll()
            _poll_progress(aligners, last)
            for bar, p in zip(bars, last):
                if p is not None:
                    bar.n = p["windows"]
                    bar.set_postfix(published=p["published"], refresh=False)
                    bar.refresh()
        return [_session_result(ref, spec, publisher, p) for ref, spec, p in zip(done_refs, specs, last)]
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for bar in bars:
            bar.close()


def _poll_progress(aligners: list[Any], last: list[dict[str, Any] | None]) -> None:
    """Each aligner's ``progress()`` into ``last``; one that died keeps its last answer."""
    import ray
    from ray.exceptions import RayActorError

    refs = [a.progress.remote() for a in aligners]
    for i, ref in enumerate(refs):
        try:
            last[i] = ray.get(ref, timeout=5.0)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            pass


def _session_result(ref: Any, spec: SessionSpec, publisher: Any, progress: dict[str, Any] | None) -> dict[str, Any]:
    """The session's summary from its aligner, or, where the aligner's process died (killed,
    crashed, node lost; it was also reading the session's streams), one the driver makes: every
    stream named with the error, so the run exits 3, and the counts the publisher delivered.
    Subscribers get the session's ``end`` with the same errors; windows released but not yet
    published when the process died are lost (counted in ``windows``, missing from ``counts``).
    Other sessions are not affected."""
    import ray
    from ray.exceptions import RayActorError

    try:
        return ray.get(ref)
    except RayActorError as exc:
        error = f"session process died: {str(exc).splitlines()[0]}"
    log.error("session '%s': %s; every stream of the session ends with it", spec.name, error)
    errors = {s.id: error for s in spec.streams}
    windows = int(progress["windows"]) if progress else 0
    counts: dict[str, int] = {}
    if publisher is not None:
        try:
            # The end first: the publisher refuses the session's records after it, so a publish
            # the dead process left in flight cannot change the counts read next.
            ray.get(publisher.end_session.remote(spec.name, windows=windows, errors=errors, missing={}))
            counts = dict(ray.get(publisher.stats.remote())["published"].get(spec.name, {}))
        except Exception as exc:  # the publisher is gone too: the summary still names the streams
            log.error("session '%s': cannot send its end: %s", spec.name, str(exc).splitlines()[0])
    return SessionResult(session=spec.name, windows=windows, counts=counts, dropped={}, missing={}, errors=errors,
                         latency_p50_s=math.nan, latency_p99_s=math.nan).to_dict()



class SourceWatch:
    """Each stream's run call (``AlignerActor.source_run``): collects its end stats as it ends,
    and stops every stream when the run is told to. A stream whose session process died has
    no stats, only the error; the session's result names every such stream (:func:`_session_result`)."""

    def __init__(self) -> None:
        self._runs: dict[Any, tuple[Any, str]] = {}  # run ref -> (aligner, stream)
        self.results: list[dict[str, Any]] = []

    def add(self, run: Any, aligner: Any, stream: str) -> None:
        self._runs[run] = (aligner, stream)

    def stop(self) -> None:
        for aligner, stream in list(self._runs.values()):
            aligner.source_stop.remote(stream)

    def poll(self, final: bool = False) -> None:
        import ray
        from ray.exceptions import RayActorError

        if not self._runs:
            return
        ready, _ = ray.wait(list(self._runs), num_returns=len(self._runs), timeout=None if final else 0)
        for ref in ready:
            _, stream = self._runs.pop(ref)
            try:
                self.results.append(ray.get(ref))
            except RayActorError as exc:  # the session's process died (a reader's errors are in its result)
                self.results.append({"stream": stream, "error": f"session process died: {str(exc).splitlines()[0]}"})



def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress_bars(specs: list[SessionSpec], progress: bool | None) -> list[Any]:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return []
    from tqdm import tqdm

    return [tqdm(desc=s.name, unit="win", position=i, leave=True) for i, s in enumerate(specs)]

"""The driver's loop while the sessions run: when each session's replay clock starts, progress
bars, SIGINT/SIGTERM and ``stop_after``, each stream's end stats as it ends, and each session's
summary (one the driver makes where the session's process died)."""

from __future__ import annotations

import logging
import math
import re
import signal
import sys
import time
from dataclasses import replace
from typing import Any

from pipeline.align import AlignConfig
from pipeline.stats import SessionResult
from sources.session import SessionSpec

__all__ = ["SourceWatch", "error_line", "replay_starts", "session_align", "stagger_phases", "wait_sessions"]

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message without terminal colour codes (Ray colours the task
    names in its errors), for summaries and logs."""
    return _ANSI.sub("", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def wait_sessions(done_refs: list[Any], aligners: list[Any], specs: list[SessionSpec], progress: bool | None,
          watch: "SourceWatch", stop_after: float | None = None, publisher: Any = None) -> list[dict[str, Any]]:
    """Every session's summary, once all are done; stops the streams on SIGINT/SIGTERM or at
    ``stop_after`` seconds (live), and at a second signal at once."""
    import ray

    bars = _progress_bars(specs, progress)
    last: list[dict[str, Any] | None] = [None] * len(aligners)  # each aligner's latest progress()
    signals = _SignalCount()

    def on_signal(signum: int, frame: Any) -> None:
        n = signals.count()
        if n >= 2:
            raise KeyboardInterrupt
        if n == 1:
            log.warning("stopping: draining in-flight windows (press Ctrl-C again to stop at once)")
            watch.stop(interrupt=True)

    old = {}
    if _is_main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
        signals.install()
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
        signals.uninstall()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for bar in bars:
            bar.close()


class _SignalCount:
    """How many SIGINT/SIGTERM arrived, counted at the C level: Python runs a handler once for
    signals that arrive while the main thread is blocked (in ``ray.wait``, say), so two quick
    Ctrl-C would read as one. Each arrival writes a byte to the wakeup fd, which
    :meth:`count` reads."""

    def __init__(self) -> None:
        self._n = 0
        self._pair: tuple[Any, Any] | None = None
        self._old_fd = -1

    def install(self) -> None:
        import socket

        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._pair = (r, w)
        self._old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)

    def count(self) -> int:
        """Signals so far (at least one more than before: this runs in a signal handler)."""
        arrived = 0
        if self._pair is not None:
            try:
                while True:
                    data = self._pair[0].recv(64)
                    if not data:
                        break
                    arrived += len(data)
            except (BlockingIOError, InterruptedError):
                pass
        self._n += max(1, arrived)
        return self._n

    def uninstall(self) -> None:
        if self._pair is None:
            return
        signal.set_wakeup_fd(self._old_fd)
        for sock in self._pair:
            sock.close()
        self._pair = None


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
        error = f"session process died: {error_line(exc)}"
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
            log.error("session '%s': cannot send its end: %s", spec.name, error_line(exc))
    return SessionResult(session=spec.name, windows=windows, counts=counts, dropped={}, missing={}, errors=errors,
                         latency_p50_s=math.nan, latency_p99_s=math.nan).to_dict()



class SourceWatch:
    """Each stream's run call (``AlignerActor.source_run``): collects its end stats as it ends,
    and stops every stream when the run is told to. A stream whose session process died has
    no stats, only the error; the session's result names every such stream (:func:`_session_result`)."""

    def __init__(self) -> None:
        self._runs: dict[Any, tuple[Any, str, bool]] = {}  # run ref -> (aligner, stream, live)
        self.results: list[dict[str, Any]] = []

    def add(self, run: Any, aligner: Any, stream: str, live: bool = False) -> None:
        self._runs[run] = (aligner, stream, live)

    def stop(self, interrupt: bool = False) -> None:
        """Stop every stream still running. ``interrupt`` (a signal): replayed streams end before
        their end, which their sessions report; stopping is a live stream's normal end."""
        for aligner, stream, live in list(self._runs.values()):
            aligner.source_stop.remote(stream, interrupted=interrupt and not live)

    def poll(self, final: bool = False) -> None:
        import ray
        from ray.exceptions import RayActorError

        if not self._runs:
            return
        ready, _ = ray.wait(list(self._runs), num_returns=len(self._runs), timeout=None if final else 0)
        for ref in ready:
            _, stream, _ = self._runs.pop(ref)
            try:
                self.results.append(ray.get(ref))
            except RayActorError as exc:  # the session's process died (a reader's errors are in its result)
                self.results.append({"stream": stream, "error": f"session process died: {error_line(exc)}"})



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


def stagger_phases(n: int, hop: float, stagger: bool) -> list[float] | None:
    """Each of ``n`` sessions' window phase, ``k / n`` of a hop for the k-th (config order);
    ``None`` when the sessions' windows end together (``stagger`` off, or one session).
    Sessions whose windows end in the same instants bring the encoder all their work at once at
    every window end; spread over the hop, it comes a session at a time."""
    return [k * hop / n for k in range(n)] if stagger and n > 1 else None


def replay_starts(start_at: float, live: list[bool], phases: list[float] | None, rate: float) -> list[float]:
    """The wall time each session's replay clock starts: ``start_at``, or with ``phases`` (and
    ``rate`` > 0) that plus the session's phase in wall time, so the replayed sessions' window
    ends spread over the hop (the embeddings do not change, only when each is made). Live
    sessions keep ``start_at``: they are not paced (their phase moves their grid instead)."""
    if phases is None or rate <= 0:
        return [start_at] * len(live)
    return [start_at if is_live else start_at + phase / rate for is_live, phase in zip(live, phases)]


def session_align(align: AlignConfig, live: bool, phase: float | None) -> AlignConfig:
    """A session's window rule: a live session whose grid starts at its first sample
    (``origin: auto``) gets its phase, on the clock every live session of the run shares."""
    if not live or phase is None or align.origin is not None:
        return align
    return replace(align, phase=phase)

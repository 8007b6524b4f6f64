"""The embedding store in a run: the writer's options from the config, its reports in the summaries.

The writer itself (``sinks.store.StoreWriter``) runs in the publisher actor
(pipeline/publisher_actor.py); docs/store.md describes the store.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig

__all__ = ["store_options", "store_results"]


def store_options(cfg: RunConfig, model_opts: dict[str, Any], info: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    """The store writer's options (``sinks.store.StoreWriter``) from ``store``, ``None`` when off:
    what a query needs to rebuild the model goes with them into the store's ``models`` table."""
    st = cfg.store
    if st.uri is None:
        return None
    model = {"model": info["model"], "dim": int(info["dim"]), "config": model_opts["config"],
             "checkpoint": str(model_opts["checkpoint"]), "seed": int(cfg.model.seed), "precision": model_opts["precision"]}
    return {"uri": st.uri, "model": model, "batch_rows": st.batch_rows, "flush_s": st.flush_s,
            "max_pending_rows": st.max_pending_rows, "optimize_every_s": st.optimize_every_s,
            "ann_min_rows": st.ann_min_rows, "run_id": run_id}


def store_results(summaries: list[dict[str, Any]], reports: dict[str, dict[str, Any]] | None) -> None:
    """Each session's store report into its summary; a store error, or rows not written, is the
    summary's ``store_error`` (exit 5)."""
    for summary in summaries:
        rep = (reports or {}).get(summary.get("session"))
        if rep is None:
            continue
        summary["store"] = rep
        lost = int(rep.get("not_written", 0)) + int(rep.get("pending", 0))
        if rep.get("error") or lost:
            summary["store_error"] = f"{rep.get('error') or 'store ' + rep['uri']}; {lost} row(s) not written"

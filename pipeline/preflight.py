"""Checks made before Ray starts: what a Ray started on this machine can place, and whether the
timeline page can go where ``timeline`` says.

Ray queues an actor whose GPUs or custom resources no node offers and waits for a node that
never comes: the run would hang at start with no word. Starting Ray here (no ``ray.address``),
the only node is this machine, so what it lacks is a config error naming the key.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig
from sources.errors import ConfigError

__all__ = ["check_local_placement", "check_timeline_path"]


def check_local_placement(cfg: RunConfig, device: str, gpus_here: int) -> None:
    """Raise :class:`ConfigError` when the encoders on ``device`` (``cuda[:N]`` or ``cpu``,
    resolved from ``model.device``) or the ``ray.*_resources`` cannot be placed on this machine,
    which has ``gpus_here`` GPUs that torch can use."""
    _check_device(device, gpus_here)
    _check_gpus(cfg, device, gpus_here)
    for key in ("source_resources", "encoder_resources", "publisher_resources"):
        _check_custom(key, getattr(cfg.ray, key))


def _check_device(device: str, gpus_here: int) -> None:
    if not device.startswith("cuda"):
        return
    index = device.partition(":")[2]
    wanted = int(index) + 1 if index.isdigit() else 1
    if gpus_here < wanted:
        have = "no GPU that torch can use" if not gpus_here else f"{gpus_here} GPU(s) (cuda:0 to cuda:{gpus_here - 1})"
        raise ConfigError(f"config key 'model.device': {device} asked for, but this machine has {have}; "
                          "use model.device: auto (or cpu), or set ray.address to a cluster with GPUs")


def _check_gpus(cfg: RunConfig, device: str, gpus_here: int) -> None:
    per_actor: Any = cfg.encoders.num_gpus
    if per_actor == "auto":
        per_actor = 1 if device.startswith("cuda") else 0
    if not per_actor:
        return
    wanted = float(per_actor) * int(cfg.encoders.replicas)
    if wanted > gpus_here:
        raise ConfigError(f"config key 'encoders.num_gpus': {cfg.encoders.replicas} encoder(s) x {per_actor} GPU(s) "
                          f"need {wanted:g} GPU(s), this machine has {gpus_here}; lower encoders.num_gpus or "
                          "encoders.replicas, or set ray.address to a cluster with GPUs")


def _check_custom(key: str, resources: dict | None) -> None:
    wanted = {name: amount for name, amount in (resources or {}).items() if amount}
    if wanted:
        names = ", ".join(sorted(str(n) for n in wanted))
        raise ConfigError(f"config key 'ray.{key}': custom resources ({names}) exist only on the nodes of a Ray "
                          "cluster started with `ray start --resources`; the Ray started here has none. Set "
                          "ray.address to that cluster, or remove the key to run here (docs/deploy.md)")


def check_timeline_path(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` when ``timeline`` is a folder or lies below a file: the page
    could never be written there, found before the run rather than after it."""
    from sinks.timeline import page_path_problem

    problem = None if cfg.timeline is None else page_path_problem(cfg.timeline)
    if problem is not None:
        raise ConfigError(f"config key 'timeline': {cfg.timeline} {problem}")

"""Test-wide settings and fixtures.

Under CI (``CI`` set) hypothesis runs derandomized: a CI run is reproducible and a red run can be
replayed exactly; local runs keep exploring new examples (and its database remembers failures).
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import settings

# Ray's metrics export (on with ray[default], which the test extra installs) stays off in the
# test process and everything it starts (Ray clusters, CLI runs): Ray's OpenCensus exporter can
# crash a driver at shutdown (ray-project/ray#36885; one CI run here ended in a segfault after
# every test passed), and it adds load. tests/test_metrics_export.py turns it on in its own child.
os.environ.setdefault("RAY_enable_metrics_collection", "0")

# Under pytest-xdist each worker's Ray keeps to its own temp dir. A ray.init() without an address
# joins the cluster recorded in the temp dir's ray_current_cluster (what `ray start` and
# tests/test_cluster.py's cluster write), so with one shared dir a CLI run of one worker could join
# the other worker's test cluster.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("RAY_TMPDIR", f"/tmp/bindstream-{os.environ['PYTEST_XDIST_WORKER']}")

# The files that take longest (about a minute or more each on the 2-core CI machine, longest
# first) go to the pytest-xdist workers before the others, which keep their order (pyproject's
# --no-loadscope-reorder): the two workers then finish together, not one running the last long
# file alone while the other idles. A file missing here only runs later.
LONGEST_FIRST = (
    "test_interrupts.py",
    "test_record.py",
    "test_pipeline_e2e.py",
    "test_faults.py",
    "test_cli_errors.py",
    "test_hostile_live.py",
    "test_store.py",
    "test_triggers_e2e.py",
    "test_record_safety.py",
    "test_search.py",
    "test_wheel.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort


settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def ray_cluster(_ray_shutdown_at_exit):
    """A local Ray (2 CPUs, as on the CI machine), shared by the modules that use it: the first
    one starts it, and it stops at the end of the run (starting and stopping one per module cost
    about 4 s each). A module that needs a cluster of its own (tests/test_cluster.py) shuts it
    down first; the next module using this fixture starts a fresh one."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from pipeline.config import RayConfig
        from pipeline.run import ray_system_config

        # As `python -m pipeline run` starts it (pipeline.run.ray_init_kwargs): large call
        # arguments inline. tests/test_cluster.py covers the object-store path.
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 _system_config=ray_system_config(RayConfig.max_inline_bytes))
    yield


@pytest.fixture(scope="session")
def _ray_shutdown_at_exit():
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()

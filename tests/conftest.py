"""Test-wide settings and fixtures.

Under CI (``CI`` set) hypothesis runs derandomized: a CI run is reproducible and a red run can be
replayed exactly; local runs keep exploring new examples (and its database remembers failures).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Ray's metrics export (on with ray[default], which the test extra installs) stays off in the
# test process and everything it starts (Ray clusters, CLI runs): Ray's OpenCensus exporter can
# crash a driver at shutdown (ray-project/ray#36885; one CI run here ended in a segfault after
# every test passed), and it adds load. tests/test_metrics_export.py turns it on in its own child.
os.environ.setdefault("RAY_enable_metrics_collection", "0")

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for the tests of one module (2 CPUs, as on the CI machine), shut down after it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()

"""Test-wide settings and fixtures.

Under CI (``CI`` set) hypothesis runs derandomized: a CI run is reproducible and a red run can be
replayed exactly; local runs keep exploring new examples (and its database remembers failures).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

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

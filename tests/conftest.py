"""Test-wide settings.

Under CI (``CI`` set) hypothesis runs derandomized: a CI run is reproducible and a red run can be
replayed exactly; local runs keep exploring new examples (and its database remembers failures).
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

"""A fixture for tests that freeze objects or turn the cycle collector off (StepCollector)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    """Leave the collector as it was and nothing frozen, whatever the test did."""
    was = gc.isenabled()
    yield
    gc.unfreeze()
    gc.collect()
    if was:
        gc.enable()

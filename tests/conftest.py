"""Shared test set-up: hypothesis profiles and one intra-op thread.

``dev`` (default): quick local runs. ``ci``: deterministic, more examples, failures print a
reproduction blob; chosen automatically when ``CI`` is set. ``thorough``: long runs before a
release. Pick one with ``HYPOTHESIS_PROFILE=<name>``. Torch's first calls are slow, so no
profile has a deadline.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one intra-op thread is faster than several, and fair to shared CPUs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Fixtures for tests of tokenreduce living next to other libraries (tiny models, CPU)."""

from __future__ import annotations

import pytest

import tokenreduce as tr


@pytest.fixture(scope="module", autouse=True)
def fresh_registry():
    tr.reset_manager()

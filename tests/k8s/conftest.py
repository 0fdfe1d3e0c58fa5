"""Fixtures for tests/k8s; the helpers themselves live in k8s_helpers.py."""

from __future__ import annotations

import pytest
from k8s_helpers import find_tool


@pytest.fixture(scope="session")
def kubectl() -> str:
    return find_tool("kubectl")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return find_tool("hadolint")

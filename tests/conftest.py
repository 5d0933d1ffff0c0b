"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A small two-site demo cohort with scan indexes and manifests (about 5 s)."""
    from medtl.demo import prepare_demo_data

    return prepare_demo_data(tmp_path_factory.mktemp("demo"), scale=0.06, progress=False)

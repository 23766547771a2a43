"""Shared fixtures: a private kernel cache per test session (never the user's cache)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers like naive_family


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory):
    from alt_jax import runtime

    return runtime.KernelCache(tmp_path_factory.mktemp("kernels"))

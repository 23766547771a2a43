"""Shared fixtures: a private kernel cache per test session (never the user's cache)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers like naive_family


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory):
    from alt_jax import runtime

    return runtime.KernelCache(tmp_path_factory.mktemp("kernels"))


@pytest.fixture
def optimize(kernel_cache):
    """alt_jax.optimize on the session's kernel cache, every op on a kernel (min_flops=0)."""
    import alt_jax

    def make(fn, **kw):
        kw.setdefault("min_flops", 0)
        return alt_jax.optimize(fn, cache=kernel_cache, **kw)
    return make


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in this process, and children started meanwhile get
    its default disposition (exec resets a handled signal, not an ignored one), even when
    the test run itself was started with SIGINT ignored (a background job of a
    non-interactive shell), where Python installs no handler."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

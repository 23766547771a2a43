"""Kernel build, cache and load paths: failure fallback, concurrent builds, cache keys."""
import multiprocessing
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest

import alt_jax
from alt_jax import runtime
from alt_jax.codegen import render
from naive_family import FAMILIES, NAIVE_MATMUL, NaiveKnobs, NaiveSpec, child_build_script


def _src(m=4, k=8, n=8, rows=1):
    spec = NaiveSpec(m, k, n)
    return NAIVE_MATMUL.render(spec, NaiveKnobs(rows), None)


def test_build_then_cache_hit(tmp_path):
    cache = runtime.KernelCache(tmp_path)
    kernel = cache.build(_src())
    assert os.path.exists(kernel.lib) and cache.builds == 1
    again = runtime.KernelCache(tmp_path).build(_src())  # a new process would do this
    assert again == kernel
    a, b = np.ones((4, 8), np.float32), np.full((8, 8), 2, np.float32)
    c = np.zeros((4, 8), np.float32)
    runtime.run_numpy(kernel, [a, b], [c])
    np.testing.assert_array_equal(c, a @ b)


def test_cache_key_changes_with_source_and_flags(tmp_path):
    cache = runtime.KernelCache(tmp_path)
    assert cache.key(_src(rows=1)) != cache.key(_src(rows=2))
    from alt_jax import device
    scalar = runtime.KernelCache(tmp_path, isa=device.SCALAR)
    assert cache.key(_src()) != scalar.key(_src())


def test_compile_error_is_a_build_error_with_the_compiler_message(tmp_path):
    bad = runtime.KernelSource("bad_kernel", "this is not C++;")
    with pytest.raises(runtime.BuildError, match="bad_kernel"):
        runtime.KernelCache(tmp_path).build(bad)


def test_missing_compiler_falls_back_with_one_warning_and_right_answer(tmp_path):
    cache = runtime.KernelCache(tmp_path, compiler=str(tmp_path / "no-such-g++"))
    optimized = alt_jax.optimize(lambda a, b: (a @ b, (2 * a) @ b), families=FAMILIES,
                                 cache=cache, min_flops=0)
    a = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    b = np.random.default_rng(2).standard_normal((8, 8)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = optimized(a, b)
    fallbacks = [c for c in caught if issubclass(c.category, alt_jax.FallbackWarning)]
    assert len(fallbacks) == 1  # one per reason: it names both ops and the reason
    message = str(fallbacks[0].message)
    assert "2 ops run in XLA" in message and message.count("dot_general") == 2
    assert "kernel build failed" in message and "no-such-g++" in message
    np.testing.assert_allclose(got[0], a @ b, rtol=1e-5)
    np.testing.assert_allclose(got[1], (2 * a) @ b, rtol=1e-5)
    assert not optimized.plan_for(a, b).rewritten


def test_two_processes_building_the_same_kernel_both_succeed(tmp_path):
    code = child_build_script(tmp_path, NaiveSpec(16, 32, 24), rows=(3,),
                              then='print("built", cache.builds)')
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert out.startswith("built")
    libs = [f for f in tmp_path.rglob("*.so")]
    assert len(libs) == 1 and not list(tmp_path.rglob(".build-*"))


def test_render_accepts_only_validated_values():
    assert render.render("int x = @N@; bool b = @B@;", {"N": 3, "B": True}) == \
        "int x = 3; bool b = true;"
    for bad in ("1; system(\"rm\")", 1.5, None, "a b"):
        with pytest.raises(render.RenderError):
            render.render("@N@", {"N": bad})
    with pytest.raises(render.RenderError, match="without a value"):
        render.render("@N@ @M@", {"N": 1})
    with pytest.raises(render.RenderError, match="lacks"):
        render.render("@N@", {"N": 1, "M": 2})
    with pytest.raises(render.RenderError, match="outside"):
        render.check_int("ow_tile", 99, 1, 16)


def test_kernel_error_status_is_reported(tmp_path):
    src = runtime.KernelSource("fails", textwrap.dedent("""
        #include "alt_jax/kernel_abi.h"
        extern "C" __attribute__((visibility("default")))
        int32_t fails(const alt_runtime*, const void* const*, void* const*) { return 7; }
    """))
    kernel = runtime.KernelCache(tmp_path).build(src)
    with pytest.raises(RuntimeError, match="status 7"):
        runtime.run_numpy(kernel, [], [])

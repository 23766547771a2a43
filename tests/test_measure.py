"""tuner.measure: the builder, the worker process and the protocol, on the naive matmul and on
hand-written kernels that crash, hang, err or compute the wrong thing."""
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from alt_jax import runtime
from naive_family import NAIVE_MATMUL, NaiveKnobs, NaiveSpec
from tuner import measure as m
from tuner import worker

SPEC = NaiveSpec(16, 32, 24)
# Short repeats and a short timeout keep the file fast; the protocol is the same.
CONFIG = m.MeasureConfig(repeat=3, min_repeat_s=0.002, timeout_s=3.0, num_threads=2)


def _hand_written(name: str, body: str) -> runtime.KernelSource:
    """A kernel with the naive matmul's signature (kernel_abi.h) and the given body."""
    sym = f"measure_test_{name}"
    code = ('#include "alt_jax/kernel_abi.h"\n#include <stdlib.h>\n#include <unistd.h>\n'
            f"ALT_EXPORT int32_t {sym}(const alt_runtime* rt, const void* const* in, "
            f"void* const* out) {{\n{body}\n}}\n")
    return runtime.KernelSource(sym, code)


SEGFAULT = _hand_written("segfault", "*(volatile float*)nullptr = 1.0f; return 0;")
ABORT = _hand_written("abort", "abort(); return 0;")
EXIT = _hand_written("exit", "_exit(7); return 0;")
# volatile: an empty infinite loop is undefined behaviour in C++ and may be removed.
HANG = _hand_written("hang", "volatile int spin = 1; while (spin) {} return 0;")
ZEROS = _hand_written("zeros", f"float* c = (float*)out[0];\n"
                               f"for (int i = 0; i < {SPEC.m * SPEC.n}; ++i) c[i] = 0.0f;\n"
                               f"return 0;")
UNWRITTEN = _hand_written("unwritten", "return 0;")  # leaves the output as it found it
FAILS = _hand_written("fails", "return 3;")
BROKEN = runtime.KernelSource("measure_test_broken", "this is not C++;")


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((SPEC.m, SPEC.k), dtype=np.float32)
    b = rng.standard_normal((SPEC.k, SPEC.n), dtype=np.float32)
    return (a, b), (a.astype(np.float64) @ b).astype(np.float32)


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return m.Builder(runtime.KernelCache(tmp_path_factory.mktemp("measure_kernels")))


@pytest.fixture(scope="module")
def built(builder):
    """Every kernel of the file, compiled once, in parallel."""
    sources = {"good": NAIVE_MATMUL.render(SPEC, NaiveKnobs(4), None), "segfault": SEGFAULT,
               "abort": ABORT, "exit": EXIT, "hang": HANG, "zeros": ZEROS,
               "unwritten": UNWRITTEN, "fails": FAILS}
    kernels = builder.build(list(sources.values()))
    for name, k in zip(sources, kernels):
        assert isinstance(k, runtime.Kernel), (name, k)
    return dict(zip(sources, kernels)), sources


@pytest.fixture(scope="module")
def runner():
    with m.Runner(CONFIG) as r:
        yield r


def _input(source, operands, **kw):
    inputs, expected = operands
    return m.MeasureInput(source, inputs, expected, **kw)


def _check_ok(result):
    assert result.status == "ok", result
    assert len(result.times_s) == CONFIG.repeat and not result.cut
    assert all(t > 0 for t in result.times_s)
    assert min(result.times_s) <= result.median_s <= max(result.times_s)
    assert result.spread == pytest.approx(
        (max(result.times_s) - min(result.times_s)) / result.median_s)
    assert result.error == ""


def test_good_kernel_measures_ok(built, runner, operands):
    kernels, sources = built
    result = runner.measure(kernels["good"], _input(sources["good"], operands))
    _check_ok(result)
    assert result.run_s > 0
    print(f"worker start {runner.start_s:.3f} s, round trip {result.run_s:.3f} s")


@pytest.mark.parametrize("name, signal_name", [("segfault", "SIGSEGV"), ("abort", "SIGABRT"),
                                               ("exit", "status 7")])
def test_crash_costs_one_trial(built, runner, operands, name, signal_name):
    kernels, sources = built
    _check_ok(runner.measure(kernels["good"], _input(sources["good"], operands)))
    starts = runner.starts
    crashed = runner.measure(kernels[name], _input(sources[name], operands))
    assert crashed.status == "crash" and signal_name in crashed.error, crashed
    assert crashed.times_s == () and crashed.median_s is None and crashed.spread is None
    _check_ok(runner.measure(kernels["good"], _input(sources["good"], operands)))
    assert runner.starts == starts + 1  # a fresh worker, transparently


def test_hang_times_out_and_next_measures_ok(built, runner, operands):
    kernels, sources = built
    pid = runner.worker_pid
    t0 = time.monotonic()
    hung = runner.measure(kernels["hang"], _input(sources["hang"], operands))
    assert hung.status == "timeout", hung
    assert time.monotonic() - t0 >= CONFIG.timeout_s
    if pid is not None:  # the hung worker is gone, not left spinning
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    _check_ok(runner.measure(kernels["good"], _input(sources["good"], operands)))


@pytest.mark.parametrize("name, reason", [("zeros", "max |out - ref|"),
                                          ("unwritten", "non-finite output")])
def test_wrong_result(built, runner, operands, name, reason):
    kernels, sources = built
    result = runner.measure(kernels[name], _input(sources[name], operands))
    assert result.status == "wrong_result" and reason in result.error, result
    assert result.times_s == ()


def test_kernel_error_is_run_error(built, runner, operands):
    kernels, sources = built
    result = runner.measure(kernels["fails"], _input(sources["fails"], operands))
    assert result.status == "run_error" and "status 3" in result.error, result


def test_cut_reports_the_probe_alone(built, runner, operands):
    kernels, sources = built
    result = runner.measure(kernels["good"],
                            _input(sources["good"], operands, best_so_far_s=1e-12))
    assert result.status == "ok" and result.cut and len(result.times_s) == 1, result
    assert result.median_s == result.times_s[0]
    # No cut when the candidate is within cut_factor of the best.
    result = runner.measure(kernels["good"], _input(sources["good"], operands,
                                                    best_so_far_s=1e3))
    _check_ok(result)


def test_slow_kernel_gets_fewer_repeats_not_a_timeout(builder, runner, operands):
    """0.5 s a call with a 3 s timeout: check + probe take 1.5 s, three repeats would pass
    the timeout; the worker reports what fits in its budget instead."""
    slow = _hand_written("half_second", "usleep(500000);\n" + _matmul_body())
    (result,) = m.measure(builder, runner, [_input(slow, operands)])
    assert result.status == "ok" and not result.cut, result
    assert 1 <= len(result.times_s) < CONFIG.repeat
    assert result.median_s >= 0.5


def test_worker_killed_while_idle_is_restarted(built, runner, operands):
    kernels, sources = built
    _check_ok(runner.measure(kernels["good"], _input(sources["good"], operands)))
    os.killpg(runner.worker_pid, signal.SIGKILL)
    time.sleep(0.1)
    _check_ok(runner.measure(kernels["good"], _input(sources["good"], operands)))


def test_measure_batch(built, builder, operands, runner):
    """Builds in parallel (identical code once), maps failures to statuses, keeps order."""
    good = NAIVE_MATMUL.render(SPEC, NaiveKnobs(2), None)
    builds = builder.cache.builds
    results = m.measure(builder, runner, [_input(good, operands), _input(BROKEN, operands),
                                          _input(SEGFAULT, operands), _input(good, operands)])
    assert [r.status for r in results] == ["ok", "build_error", "crash", "ok"]
    assert "measure_test_broken" in results[1].error and len(results[1].error) <= 600
    _check_ok(results[0])
    _check_ok(results[3])
    # good compiled once for both inputs (SEGFAULT was already in the cache, BROKEN failed)
    assert builder.cache.builds == builds + 1
    assert results[0].build_s > 0 and results[3].build_s == 0.0


def test_measure_batch_cuts_against_the_batch_best(builder, operands, runner):
    """A workload key lets a later candidate be cut by an earlier one's time."""
    good = NAIVE_MATMUL.render(SPEC, NaiveKnobs(4), None)
    slow = _hand_written("slow", "usleep(20000);\n" + _matmul_body())
    results = m.measure(builder, runner, [_input(good, operands, workload="w"),
                                          _input(slow, operands, workload="w"),
                                          _input(slow, operands)])
    assert [r.status for r in results] == ["ok"] * 3
    assert not results[0].cut and results[1].cut and not results[2].cut


def _matmul_body() -> str:
    return (f"const float* a = (const float*)in[0]; const float* b = (const float*)in[1];\n"
            f"float* c = (float*)out[0];\n"
            f"for (int i = 0; i < {SPEC.m}; ++i) for (int j = 0; j < {SPEC.n}; ++j) {{\n"
            f"  float s = 0; for (int p = 0; p < {SPEC.k}; ++p) s += a[i*{SPEC.k}+p] * "
            f"b[p*{SPEC.n}+j];\n  c[i*{SPEC.n}+j] = s; }}\nreturn 0;")


def test_builder_dedupes_and_keeps_order(tmp_path):
    cache = runtime.KernelCache(tmp_path / "kernels")
    b = m.Builder(cache, max_workers=2)
    one = NAIVE_MATMUL.render(SPEC, NaiveKnobs(1), None)
    same = runtime.KernelSource(one.symbol, one.code, workspace_bytes=64)
    kernels = b.build([one, BROKEN, same])
    assert cache.builds == 1
    assert isinstance(kernels[1], runtime.BuildError)
    assert kernels[0].lib == kernels[2].lib and kernels[0].symbol == one.symbol
    assert (kernels[0].workspace_bytes, kernels[2].workspace_bytes) == (0, 64)
    assert b.build([]) == []
    # candidates run in the worker: the tuning process never maps them
    with open("/proc/self/maps") as f:
        assert kernels[0].lib not in f.read()


def test_keyboard_interrupt_kills_the_worker(built, operands, sigint_raises):
    kernels, sources = built
    with m.Runner(dataclasses.replace(CONFIG, timeout_s=60.0)) as r:
        _check_ok(r.measure(kernels["good"], _input(sources["good"], operands)))
        pid = r.worker_pid
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                r.measure(kernels["hang"], _input(sources["hang"], operands))
        finally:
            timer.cancel()
        assert r.worker_pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        _check_ok(r.measure(kernels["good"], _input(sources["good"], operands)))


def test_close_stops_the_worker(built, operands):
    kernels, sources = built
    r = m.Runner(CONFIG)
    _check_ok(r.measure(kernels["good"], _input(sources["good"], operands)))
    pid = r.worker_pid
    r.close()
    r.close()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_validation(operands):
    (a, b), expected = operands
    src = NAIVE_MATMUL.render(SPEC, NaiveKnobs(1), None)
    with pytest.raises(ValueError, match="float32"):
        m.MeasureInput(src, (a.astype(np.float64), b), expected)
    with pytest.raises(ValueError, match="C-contiguous"):
        m.MeasureInput(src, (a, np.asfortranarray(b)), expected)
    with pytest.raises(ValueError, match="repeat"):
        m.MeasureConfig(repeat=0)
    with pytest.raises(ValueError, match="cut_factor"):
        m.MeasureConfig(cut_factor=0.5)
    with pytest.raises(ValueError, match="status"):
        m.MeasureResult("fine")
    assert m.MeasureConfig().num_threads == (os.cpu_count() or 1)


def test_check_output_edges():
    ref = np.array([1.0, np.inf, np.nan, -2.0], np.float32)
    assert worker.check_output(ref.copy(), ref, 1e-4) is None
    assert "non-finite" in worker.check_output(
        np.array([np.nan, np.inf, np.nan, -2.0], np.float32), ref, 1e-4)
    assert "inf or NaN" in worker.check_output(
        np.array([1.0, -np.inf, np.nan, -2.0], np.float32), ref, 1e-4)
    # tolerance scales with max(1, max|ref|): 1e-4 * 2 here
    assert worker.check_output(np.array([1.0, np.inf, np.nan, -2.00015], np.float32), ref,
                               1e-4) is None
    assert "max |out - ref|" in worker.check_output(
        np.array([1.0, np.inf, np.nan, -2.001], np.float32), ref, 1e-4)


def test_worker_imports_no_jax():
    """The worker module must stay importable without alt_jax / jax (see worker.py)."""
    code = ("import runpy, sys; runpy.run_path(%r, run_name='not_main'); "
            "print('jax' in sys.modules, 'alt_jax' in sys.modules)" % worker.__file__)
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]


def test_cold_copies_rotate_only_the_cold_inputs(operands):
    (a, b), _ = operands
    sets = worker.cold_copies([a, b], (1,), cold_bytes=10 * b.nbytes, max_copies=100)
    assert len(sets) == 9  # with the inputs themselves: 10 x b's bytes
    for s in sets:
        assert s[0] is a and s[1] is not b and np.array_equal(s[1], b)
    assert len(worker.cold_copies([a, b], (1,), 10 * b.nbytes, max_copies=4)) == 3
    assert worker.cold_copies([a, b], (), 10 * b.nbytes, 100) == []
    assert worker.cold_copies([a, b], (1,), 0, 100) == []
    # weights larger than the target still alternate between two sets
    assert len(worker.cold_copies([a, b], (1,), b.nbytes // 2, 100)) == 1


def test_time_cycles_through_the_rotated_input_sets(built, operands):
    """_core.time's calls take the input sets in turn: the warm-up the inputs, the next
    call the first rotated set, and so on; what the last call wrote shows which it read."""
    kernels, _ = built
    (a, b), want = operands
    other = [a, np.ascontiguousarray(2 * b)]
    out = np.empty_like(want)
    runtime.time_numpy(kernels["good"], [a, b], [out], number=1, repeat=1, rotate=[other])
    np.testing.assert_allclose(out, 2 * want, rtol=1e-5, atol=1e-5)
    runtime.time_numpy(kernels["good"], [a, b], [out], number=2, repeat=1, rotate=[other])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rotated input set needs 2 arrays"):
        runtime.time_numpy(kernels["good"], [a, b], [out], number=1, repeat=1, rotate=[[a]])


def test_cold_weights_measure_ok(built, runner, operands):
    kernels, sources = built
    _check_ok(runner.measure(kernels["good"], _input(sources["good"], operands, cold=(1,))))
    with pytest.raises(ValueError, match="cold indices"):
        _input(sources["good"], operands, cold=(2,))

"""The kernel workspace pool (csrc/core/workspace.h): reuse without new mappings, one buffer
shared by threads instead of one per thread, and release of large idle buffers."""
import os
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alt_jax import _core, runtime

MIB = 1 << 20

# Copies in[0] to out[0] through the workspace, touching every page of it (so the pages
# count in RSS): a kernel whose result is right only if the workspace is real and its own.
_COPY_THROUGH = r'''
#include <string.h>
#include "alt_jax/kernel_abi.h"
extern "C" __attribute__((visibility("default")))
int32_t %(sym)s(const alt_runtime* rt, const void* const* in, void* const* out) {
  const float* x = (const float*)in[0];
  float* y = (float*)out[0];
  char* ws = (char*)out[1];
  for (long p = 0; p < %(ws)dL; p += 4096) ws[p] = (char)p;
  memcpy(ws + 64, x, %(n)d * sizeof(float));
  memcpy(y, ws + 64, %(n)d * sizeof(float));
  return ws[0] == 0 ? 0 : 1;
}
'''
N = 256


def copy_kernel(cache, workspace_bytes: int) -> runtime.Kernel:
    sym = f"alt_test_ws_copy_{workspace_bytes}"
    code = _COPY_THROUGH % {"sym": sym, "ws": workspace_bytes, "n": N}
    return cache.build(runtime.KernelSource(sym, code, workspace_bytes=workspace_bytes))


def xla_call(kernel):
    """The kernel under jax.jit, through the FFI handler (XLA picks the calling thread)."""
    return jax.jit(lambda x: runtime.ffi_call(kernel, [x], [jax.ShapeDtypeStruct((N,), jnp.float32)])[0])


@pytest.fixture
def policy():
    """A short idle time for the test; the pool emptied before and the policy restored after."""
    saved = _core.workspace_policy()
    _core.workspace_policy(retain_bytes=MIB, idle_ms=100)
    _core.workspace_trim(0)
    yield
    _core.workspace_policy(*saved)


def test_big_workspace_is_released_once_idle_while_small_kernels_run(kernel_cache, policy):
    big, small = copy_kernel(kernel_cache, 64 * MIB), copy_kernel(kernel_cache, 64 * 1024)
    x = np.arange(N, dtype=np.float32)
    run_big, run_small = xla_call(big), xla_call(small)
    np.testing.assert_array_equal(run_big(x), x)
    assert _core.workspace_stats()["retained_bytes"] >= 64 * MIB
    np.testing.assert_array_equal(run_small(x), x)  # right after: the big one is kept
    assert _core.workspace_stats()["retained_bytes"] >= 64 * MIB
    time.sleep(0.25)
    np.testing.assert_array_equal(run_small(x), x)  # the next call returns the idle one
    stats = _core.workspace_stats()
    assert stats["retained_bytes"] <= MIB and stats["leased_bytes"] == 0


def test_same_size_calls_reuse_one_mapping(kernel_cache, policy):
    kernel = copy_kernel(kernel_cache, 8 * MIB)
    x = np.arange(N, dtype=np.float32)
    run = xla_call(kernel)
    run(x).block_until_ready()
    maps = _core.workspace_stats()["maps"]
    for _ in range(20):
        np.testing.assert_array_equal(run(x), x)
    assert _core.workspace_stats()["maps"] == maps  # no new pages to fault in per call


def test_threads_calling_one_after_another_share_one_buffer(kernel_cache, policy):
    kernel = copy_kernel(kernel_cache, 32 * MIB)
    x = np.arange(N, dtype=np.float32)

    def call():
        y = np.zeros(N, np.float32)
        runtime.run_numpy(kernel, [x], [y], num_threads=1)
        np.testing.assert_array_equal(y, x)

    for _ in range(4):  # the old per-thread arena kept 4 x 32 MiB here
        t = threading.Thread(target=call)
        t.start()
        t.join()
    assert _core.workspace_stats()["retained_bytes"] == 32 * MIB


def test_a_leased_buffer_is_never_lent_twice(kernel_cache, policy):
    kernel = copy_kernel(kernel_cache, 2 * MIB)
    errors = []

    def call(seed):
        x = np.full(N, seed, np.float32)
        for _ in range(50):
            y = np.zeros(N, np.float32)
            runtime.run_numpy(kernel, [x], [y], num_threads=1)
            if not np.array_equal(y, x):
                errors.append(seed)

    threads = [threading.Thread(target=call, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _core.workspace_stats()["leased_bytes"] == 0


def test_rss_returns_after_trim(kernel_cache):
    """In a fresh process: a 64 MiB workspace used from 4 threads, then trimmed."""
    kernel = copy_kernel(kernel_cache, 64 * MIB)
    script = textwrap.dedent(f"""
        import threading, numpy as np
        from alt_jax import _core, runtime
        kernel = runtime.Kernel({kernel.lib!r}, {kernel.symbol!r}, {kernel.workspace_bytes})
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        x = np.arange({N}, dtype=np.float32)
        def call():
            y = np.zeros({N}, np.float32)
            runtime.run_numpy(kernel, [x], [y], num_threads=1)
        call()
        before = rss()
        for _ in range(4):
            t = threading.Thread(target=call); t.start(); t.join()
        used = rss()
        _core.workspace_trim(0)
        print(before, used, rss())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env=dict(os.environ)).stdout
    before, used, trimmed = map(int, out.split())
    assert used - before < 16 * MIB  # the 4 threads added no buffer of their own
    assert used - trimmed >= 60 * MIB


# y = x * 1.5 in parallel chunks: denormal x gives 0 with FTZ/DAZ (XLA's threads), a
# denormal otherwise.
_SCALE = r'''
#include "alt_jax/kernel_abi.h"
extern "C" __attribute__((visibility("default")))
int32_t %(sym)s(const alt_runtime* rt, const void* const* in, void* const* out) {
  const float* x = (const float*)in[0];
  float* y = (float*)out[0];
  alt_parallel_for(rt, %(n)d, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) y[i] = x[i] * 1.5f;
  });
  return 0;
}
'''


def test_host_runs_flush_denormals_as_kernels_under_xla_do(kernel_cache):
    """Tuning times kernels with _core.run/time: their threads must run in XLA's float mode
    (FTZ/DAZ), or a denormal operand computes and times differently there."""
    sym = "alt_test_scale_denormal"
    kernel = kernel_cache.build(runtime.KernelSource(sym, _SCALE % {"sym": sym, "n": N}))
    x = np.full(N, 1e-39, np.float32)  # denormal
    under_xla = np.asarray(xla_call(kernel)(x))
    host = np.zeros(N, np.float32)
    runtime.run_numpy(kernel, [x], [host], num_threads=2)
    np.testing.assert_array_equal(host, under_xla)
    assert _core.mxcsr() & 0x8040 == 0  # the caller's own mode is restored afterwards

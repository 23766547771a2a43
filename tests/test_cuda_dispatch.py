"""optimize() on a GPU: CUDA kernels where the inputs live on a GPU, CPU kernels otherwise
(alt_jax/api.py, ops/registry.cuda_family_table, runtime.cuda_ffi_call, the CUDA FFI handler
csrc/core/ffi_cuda.cc). Without a GPU, optimize(platform="cuda") plans and builds for sm_90
and lowers the program for CUDA: the tests read that StableHLO. `gpu` tests run it.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import alt_jax
from alt_jax import cuda_build, device

pytestmark = pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc not found")


def _net(x, w1, dw, w2, b2):
    """A conv with a fused epilogue, a depthwise conv, and a dense layer with a bias."""
    y = lax.conv_general_dilated(x, w1, (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y)
    y = lax.conv_general_dilated(y, dw, (2, 2), ((1, 1), (1, 1)), feature_group_count=16,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(y.shape[0], -1) @ w2 + b2


def _args(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(2, 16, 16, 8), (3, 3, 8, 16), (3, 3, 1, 16), (8 * 8 * 16, 32), (32,)]
    return [jnp.asarray(rng.standard_normal(s) * 0.2, jnp.float32) for s in shapes]


def test_a_cuda_plan_puts_every_op_on_cuda_kernels(kernel_cache):
    args = _args()
    opt = alt_jax.optimize(_net, platform="cuda", fallback="error", min_flops=0,
                           cache=kernel_cache)
    plan = opt.plan_for(*args)
    families = sorted(d.family for d in plan.decisions if d.on_kernel)
    assert families == ["cuda_conv2d", "cuda_depthwise", "cuda_matmul"], str(plan)
    conv = next(d for d in plan.decisions if d.family == "cuda_conv2d")
    assert conv.spec.epilogue.activation == "relu"  # fused, as on the CPU
    dense = next(d for d in plan.decisions if d.family == "cuda_matmul")
    assert dense.spec.epilogue.shift  # the bias
    hlo = opt.lower(*args).as_text()
    calls = [line for line in hlo.splitlines() if "stablehlo.custom_call" in line]
    assert len(calls) == 3 and all("@alt_jax_cuda_kernel" in c for c in calls), calls
    for lib in re.findall(r'lib = "([^"]+)"', hlo):
        # built by nvcc into the CUDA cache beside the CPU one
        assert os.path.exists(lib) and lib.startswith(str(kernel_cache.cache_dir / "cuda"))
    assert "alt_jax_kernel" not in hlo.replace("alt_jax_cuda_kernel", "")


def test_a_split_k_kernel_gets_its_workspace_from_xla(kernel_cache):
    x = jnp.ones((1, 4096), jnp.float32)
    w = jnp.ones((4096, 256), jnp.float32)
    opt = alt_jax.optimize(lambda x, w: x @ w, platform="cuda", fallback="error", min_flops=0,
                           cache=kernel_cache)
    (d,) = [d for d in opt.plan_for(x, w).decisions if d.on_kernel]
    assert d.knobs.split_k > 1
    hlo = opt.lower(x, w).as_text()
    # the result and a uint8 workspace of split_k partial products
    ws = 4 * d.knobs.split_k * 256
    assert f"tensor<{ws}xui8>" in hlo, hlo


def test_cpu_arrays_keep_cpu_kernels(kernel_cache):
    args = _args()
    opt = alt_jax.optimize(_net, fallback="error", min_flops=0, cache=kernel_cache)
    np.testing.assert_allclose(np.asarray(opt(*args)), np.asarray(jax.jit(_net)(*args)),
                               rtol=1e-4, atol=1e-4)
    plan = opt.plan_for(*args)
    assert all(not d.family.startswith("cuda_") for d in plan.decisions if d.on_kernel)
    with pytest.raises(ValueError, match="platform="):
        alt_jax.optimize(_net, platform="tpu")


def test_a_gpu_is_named_by_model_architecture_and_sms():
    class FakeDevice:
        platform, device_kind, compute_capability, core_count = "gpu", "NVIDIA H200", "9.0", 132

    target = device.CudaTarget.of_jax_device(FakeDevice())
    assert target.name == "sm_90" and target.sms == 132
    assert device.fingerprint(target) == "cuda:NVIDIA H200|arch=sm_90|sms=132"


@pytest.mark.gpu
def test_optimize_on_gpu_arrays_runs_cuda_kernels_and_matches_jit():
    gpu = device.jax_gpu()
    if gpu is None:
        pytest.skip("no GPU visible to jax")
    args = [jax.device_put(a, gpu) for a in _args()]
    opt = alt_jax.optimize(_net, fallback="error", min_flops=0)
    got = opt(*args)
    want = jax.jit(_net)(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    plan = opt.plan_for(*args)
    assert sorted(d.family for d in plan.decisions if d.on_kernel) == [
        "cuda_conv2d", "cuda_depthwise", "cuda_matmul"]


def test_tuning_cuda_workloads_writes_gpu_records_optimize_takes(kernel_cache, tmp_path):
    """The GPU tuning pipeline end to end, with the host emulation standing in for the GPU
    (tuner/measure_cuda.EmulationRunner): the program's CUDA workloads are tuned into
    records keyed by the GPU's fingerprint, every candidate checked against lax, and
    optimize(platform="cuda") then takes its knobs from them."""
    from alt_jax.records import RecordStore
    from tuner import measure_cuda
    from tuner.tune import TuneOptions, tune, workloads_of

    args = _args()
    workloads = workloads_of(_net, *args, platform="cuda", min_flops=0)
    assert sorted({name for w in workloads for name, _ in w.candidates}) == [
        "cuda_conv2d", "cuda_depthwise", "cuda_matmul"]
    target = device.CudaTarget.for_arch("sm_90")
    kind = measure_cuda.GpuKind(target)
    measurer = measure_cuda.CudaMeasurer(target, measure_cuda.EmulationRunner(kernel_cache))
    store = RecordStore(tmp_path / "gpu.jsonl")
    summary = tune(workloads, store, TuneOptions(trials=len(workloads) + 6, batch=2, confirm=0),
                   measurer=measurer, device_kind=kind)
    recs = store.records()
    assert recs and {r["device"] for r in recs} == {"cuda:NVIDIA GPU|arch=sm_90|sms=0"}
    assert {r["status"] for r in recs} <= {"ok", "invalid"}  # none computes something else
    assert sum(r["status"] == "ok" for r in recs) >= len(workloads)
    assert all(t.untuned_s for t in summary.tasks)
    plan = alt_jax.optimize(_net, platform="cuda", min_flops=0, cache=kernel_cache,
                            records=str(store.path)).plan_for(*args)
    assert {d.knobs_from for d in plan.decisions if d.on_kernel} == {"tuned"}, str(plan)


def test_a_wrong_cuda_candidate_costs_its_trial(kernel_cache):
    """A candidate whose kernel computes something else is wrong_result, not a record of
    its speed."""
    from tuner import measure_cuda
    from tuner.tune import workloads_of

    x, w = jnp.ones((4, 64), jnp.float32), jnp.ones((64, 32), jnp.float32)
    (wl,) = workloads_of(lambda x, w: x @ w, x, w, platform="cuda", min_flops=0)
    target = device.CudaTarget.for_arch("sm_90")
    runner = measure_cuda.EmulationRunner(kernel_cache)
    real_output = runner.output
    runner.output = lambda built, inputs, shape: real_output(built, inputs, shape) + 1.0
    family_name, spec = wl.candidates[0]
    from alt_jax.ops import registry

    family = registry.families_by_name()[family_name]
    (result,) = measure_cuda.CudaMeasurer(target, runner)(
        wl, [(family, spec, family.default_knobs(spec))], None)
    assert result.status == "wrong_result" and "max |out - ref|" in result.error


def test_alt_tune_gpu_needs_a_gpu(capsys):
    from tuner import cli

    if device.jax_gpu() is not None:
        pytest.skip("a GPU is here")
    assert cli.main(["alt-tune", "tune", "--model=tiny_cnn", "--gpu"]) == 2
    assert "no GPU visible to jax" in capsys.readouterr().err


@pytest.mark.gpu
def test_tuning_on_the_gpu_times_with_cuda_events(kernel_cache, tmp_path):
    from alt_jax.records import RecordStore
    from tuner import measure_cuda
    from tuner.tune import TuneOptions, tune, workloads_of

    kind = measure_cuda.local_gpu_kind()
    if kind is None:
        pytest.skip("no GPU visible to jax")
    args = _args()
    workloads = workloads_of(_net, *args, platform="cuda", min_flops=0)
    measurer = measure_cuda.CudaMeasurer(
        kind.target, measure_cuda.GpuRunner(kind.target, kernel_cache.cache_dir))
    store = RecordStore(tmp_path / "gpu.jsonl")
    tune(workloads, store, TuneOptions(trials=len(workloads) + 4, batch=2, confirm=0),
         measurer=measurer, device_kind=kind)
    recs = store.records()
    assert {r["device"] for r in recs} == {kind.fingerprint}
    assert all(r["status"] == "ok" for r in recs if r["heuristic"])

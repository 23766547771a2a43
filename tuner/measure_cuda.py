"""Measuring CUDA candidates for the tuner: each is rendered, built by nvcc, run once and
checked against the workload's lax reference, then timed with CUDA events on the GPU
(alt_jax/cuda_run.py). tune(..., measurer=CudaMeasurer(...), device_kind=GpuKind(target))
tunes a program's CUDA workloads (tuner.tune.workloads_of(fn, ..., platform="cuda")) into
records keyed by the GPU's fingerprint, which optimize() reads on that GPU.

Entry points: GpuKind, CudaMeasurer(target, runner, config, seed), GpuRunner (the GPU, CUDA
events), EmulationRunner (the host emulation, wall-clock: the same pipeline on a machine
without a GPU; its times say nothing about a GPU), local_gpu_kind(). A runner builds a
candidate once, then runs it for the check and times it.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from alt_jax import device
from tuner import measure as measure_mod
from tuner.worker import check_output


@dataclasses.dataclass(frozen=True)
class GpuKind:
    """tune()'s device_kind for a GPU: the target kernels are built for, and its records'
    fingerprint (alt_jax.device.fingerprint)."""

    target: device.CudaTarget

    @property
    def fingerprint(self) -> str:
        return device.fingerprint(self.target)


def local_gpu_kind():
    """The GpuKind of the GPU jax sees here, or None."""
    gpu = device.jax_gpu()
    return GpuKind(device.CudaTarget.of_jax_device(gpu)) if gpu is not None else None


class GpuRunner:
    """Builds kernels with nvcc, runs and times them on the GPU through the CUDA runtime."""

    def __init__(self, target: device.CudaTarget, cache_dir=None):
        from alt_jax import cuda_build, cuda_run

        self.gpu = cuda_run.gpu()
        if self.gpu is None:
            raise RuntimeError("no CUDA GPU here: GpuRunner needs one (EmulationRunner runs "
                               "the same pipeline on the host)")
        self.cache = cuda_build.cache_for(target, cache_dir)

    def build(self, src):
        return self.cache.build(src, load=False).lib, src

    def output(self, built, inputs, out_shape) -> np.ndarray:
        lib, src = built
        return self.gpu.run(lib, src, inputs, out_shape)

    def times(self, built, inputs, out_shape, repeat: int, min_repeat_s: float) -> list:
        lib, src = built
        probe = self.gpu.time(lib, src, inputs, out_shape, number=1, repeat=1)[0]
        number = max(1, min(10_000, int(min_repeat_s / max(probe, 1e-7))))
        return self.gpu.time(lib, src, inputs, out_shape, number=number, repeat=repeat)


class EmulationRunner:
    """The host emulation of the same sources (csrc/include/alt_jax/cuda_block.h): checks
    the whole tuning pipeline where there is no GPU. Its times are the emulation's."""

    def __init__(self, cache):
        self.cache = cache  # a runtime.KernelCache for host kernels

    def build(self, src):
        return self.cache.build(src)

    def output(self, kernel, inputs, out_shape) -> np.ndarray:
        from alt_jax import runtime

        out = np.full(out_shape, np.nan, np.float32)
        runtime.run_numpy(kernel, list(inputs), [out])
        return out

    def times(self, kernel, inputs, out_shape, repeat: int, min_repeat_s: float) -> list:
        from alt_jax import runtime

        out = np.empty(out_shape, np.float32)
        return runtime.time_numpy(kernel, list(inputs), [out], number=1, repeat=repeat)


class CudaMeasurer:
    """tune()'s measurer for CUDA families: measurer(workload, [(family, spec, knobs)],
    best_so_far_s) -> [MeasureResult]. A runner builds (build), runs (output) and times
    (times) a kernel. A candidate that does not render is invalid, one that does not build
    build_error, one whose run fails run_error, one that computes something else
    wrong_result: each costs its trial only."""

    def __init__(self, target: device.CudaTarget, runner, config=measure_mod.MeasureConfig(),
                 seed: int = 0):
        from tuner.tune import Harnesses

        self.target, self.runner, self.config = target, runner, config
        self.harnesses = Harnesses(seed)

    def _one(self, harness, family, spec, knobs):
        def failed(status, e):
            return measure_mod.MeasureResult(status, (), f"{type(e).__name__}: {e}")

        start = time.perf_counter()
        try:
            src = family.render(spec, knobs, self.target)
            inputs = [np.ascontiguousarray(np.asarray(x), np.float32)
                      for x in family.kernel_inputs(spec, knobs, list(harness.operands),
                                                    self.target)]
        except Exception as e:  # noqa: BLE001 - a refusal costs this candidate only
            return failed("invalid", e)
        try:
            built = self.runner.build(src)
        except Exception as e:  # noqa: BLE001
            return failed("build_error", e)
        shape = harness.expected.shape
        try:
            got = self.runner.output(built, inputs, shape)
        except Exception as e:  # noqa: BLE001
            return failed("run_error", e)
        wrong = check_output(got, harness.expected, self.config.rtol)
        if wrong:
            return measure_mod.MeasureResult("wrong_result", (), wrong)
        times = self.runner.times(built, inputs, shape, self.config.repeat,
                                  self.config.min_repeat_s)
        return measure_mod.MeasureResult("ok", tuple(times), run_s=time.perf_counter() - start)

    def __call__(self, workload, candidates: list, best_so_far_s) -> list:
        harness = self.harnesses.of(workload)
        return [self._one(harness, family, spec, knobs) for family, spec, knobs in candidates]

    def close(self) -> None:
        pass

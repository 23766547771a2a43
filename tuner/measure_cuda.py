"""Measuring CUDA candidates for the tuner: each is rendered, built by nvcc, run once and
checked against the workload's lax reference, then timed with CUDA events on the GPU
(alt_jax/cuda_run.py). tune(..., measurer=CudaMeasurer(...), device_kind=GpuKind(target))
tunes a program's CUDA workloads (tuner.tune.workloads_of(fn, ..., platform="cuda")) into
records keyed by the GPU's fingerprint, which optimize() reads on that GPU.

Entry points: GpuKind, CudaMeasurer(target, runner, config, seed), GpuRunner (the GPU, CUDA
events), EmulationRunner (the host emulation, wall-clock: the same pipeline on a machine
without a GPU; its times say nothing about a GPU), local_gpu_kind().
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
    def isa(self) -> str:
        return self.target.name

    @property
    def fingerprint(self) -> str:
        return device.fingerprint(self.target)


def local_gpu_kind():
    """The GpuKind of the GPU jax sees here, or None."""
    import jax

    gpus = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" \
        else []
    return GpuKind(device.CudaTarget.of_jax_device(gpus[0])) if gpus else None


class GpuRunner:
    """Runs and times nvcc-built kernels on the GPU through the CUDA runtime."""

    def __init__(self, target: device.CudaTarget, cache_dir=None):
        from alt_jax import cuda_build, cuda_run

        self.gpu = cuda_run.gpu()
        if self.gpu is None:
            raise RuntimeError("no CUDA GPU here: GpuRunner needs one (EmulationRunner runs "
                               "the same pipeline on the host)")
        self.cache = cuda_build.cache_for(target, cache_dir)

    def output(self, src, inputs, out_shape) -> np.ndarray:
        lib = self.cache.build(src, load=False).lib
        return self.gpu.run(lib, src, inputs, out_shape)

    def times(self, src, inputs, out_shape, repeat: int, min_repeat_s: float) -> list:
        lib = self.cache.build(src, load=False).lib
        probe = self.gpu.time(lib, src, inputs, out_shape, number=1, repeat=1)[0]
        number = max(1, min(10_000, int(min_repeat_s / max(probe, 1e-7))))
        return self.gpu.time(lib, src, inputs, out_shape, number=number, repeat=repeat)


class EmulationRunner:
    """The host emulation of the same sources (csrc/include/alt_jax/cuda_block.h): checks
    the whole tuning pipeline where there is no GPU. Its times are the emulation's."""

    def __init__(self, cache):
        self.cache = cache  # a runtime.KernelCache for host kernels

    def output(self, src, inputs, out_shape) -> np.ndarray:
        from alt_jax import runtime

        kernel = self.cache.build(src)
        out = np.full(out_shape, np.nan, np.float32)
        runtime.run_numpy(kernel, list(inputs), [out])
        return out

    def times(self, src, inputs, out_shape, repeat: int, min_repeat_s: float) -> list:
        from alt_jax import runtime

        kernel = self.cache.build(src)
        out = np.empty(out_shape, np.float32)
        return runtime.time_numpy(kernel, list(inputs), [out], number=1, repeat=repeat)


class CudaMeasurer:
    """tune()'s measurer for CUDA families: measurer(workload, [(family, spec, knobs)],
    best_so_far_s) -> [MeasureResult]. A candidate that does not render or build is invalid,
    one that computes something else is wrong_result, one whose launch fails is run_error:
    each costs its trial only."""

    def __init__(self, target: device.CudaTarget, runner, config=measure_mod.MeasureConfig(),
                 seed: int = 0):
        self.target, self.runner, self.config, self.seed = target, runner, config, seed
        self.harnesses: dict = {}

    def _harness(self, workload):
        from tuner.tune import Harness

        h = self.harnesses.get(workload.op_key)
        if h is None:
            h = self.harnesses[workload.op_key] = Harness(workload, self.seed)
        return h

    def __call__(self, workload, candidates: list, best_so_far_s) -> list:
        harness = self._harness(workload)
        out = []
        for family, spec, knobs in candidates:
            start = time.perf_counter()
            try:
                src = family.render(spec, knobs, self.target)
                inputs = [np.ascontiguousarray(np.asarray(x), np.float32)
                          for x in family.kernel_inputs(spec, knobs, list(harness.operands),
                                                        self.target)]
            except Exception as e:  # noqa: BLE001 - a refusal costs this candidate only
                out.append(measure_mod.MeasureResult("invalid", (), f"{type(e).__name__}: {e}"))
                continue
            try:
                got = self.runner.output(src, inputs, harness.expected.shape)
            except Exception as e:  # noqa: BLE001
                status = "build_error" if "nvcc" in str(e) or "failed on" in str(e) else \
                    "run_error"
                out.append(measure_mod.MeasureResult(status, (), f"{type(e).__name__}: {e}"))
                continue
            wrong = check_output(got, harness.expected, self.config.rtol)
            if wrong:
                out.append(measure_mod.MeasureResult("wrong_result", (), wrong))
                continue
            times = self.runner.times(src, inputs, harness.expected.shape, self.config.repeat,
                                      self.config.min_repeat_s)
            out.append(measure_mod.MeasureResult("ok", tuple(times),
                                                 run_s=time.perf_counter() - start))
        return out

    def close(self) -> None:
        pass

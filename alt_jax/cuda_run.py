"""Running nvcc-built kernels (alt_jax/cuda_build.py) on a GPU from numpy, through the CUDA
runtime by ctypes, outside XLA: the `gpu` tests run kernels against lax this way, and the
tuner times candidates with CUDA events (tuner/measure_cuda.py).
Entry points: gpu() -> Gpu or None (arch, run(lib, src, inputs, out_shape),
time(lib, src, inputs, out_shape, number, repeat)).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob

import numpy as np

_H2D, _D2H = 1, 2


def _cudart():
    names = [ctypes.util.find_library("cudart"), "libcudart.so",
             *sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*")),
             *sorted(glob.glob("/usr/local/lib/python3*/dist-packages/nvidia/cuda_runtime/lib/"
                               "libcudart.so*"))]
    for name in names:
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class Gpu:
    def __init__(self, rt):
        self.rt = rt
        major, minor = ctypes.c_int(), ctypes.c_int()
        # cudaDevAttrComputeCapabilityMajor = 75, Minor = 76
        rt.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)
        rt.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)
        self.arch = f"sm_{major.value}{minor.value}"

    @staticmethod
    def _check(code, what):
        if code != 0:
            raise RuntimeError(f"{what}: cudaError {code}")

    def _alloc(self, nbytes, ptrs):
        p = ctypes.c_void_p()
        self._check(self.rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(max(4, nbytes))),
                    "cudaMalloc")
        ptrs.append(p)
        return p

    def _launcher(self, lib, src):
        launch = getattr(ctypes.CDLL(str(lib)), f"{src.symbol}_launch")
        launch.restype = ctypes.c_int32
        return launch

    def _session(self, lib, src, inputs, out_shape, ptrs):
        """(launch(), the output's device pointer, the output array) with inputs copied."""
        rt = self.rt
        ins = []
        for x in inputs:
            x = np.ascontiguousarray(x, np.float32)
            p = self._alloc(x.nbytes, ptrs)
            self._check(rt.cudaMemcpy(p, x.ctypes.data_as(ctypes.c_void_p),
                                      ctypes.c_size_t(x.nbytes), _H2D), "cudaMemcpy")
            ins.append(p)
        out = np.empty(out_shape, np.float32)
        outs = [self._alloc(out.nbytes, ptrs)]
        if src.workspace_bytes:
            outs.append(self._alloc(src.workspace_bytes, ptrs))
        in_arr = (ctypes.c_void_p * max(1, len(ins)))(*[p.value for p in ins])
        out_arr = (ctypes.c_void_p * len(outs))(*[p.value for p in outs])
        fn = self._launcher(lib, src)

        def launch():
            self._check(fn(None, in_arr, out_arr), "launch")
        return launch, outs[0], out

    def run(self, lib, src, inputs, out_shape) -> np.ndarray:
        """Copies inputs to the GPU, launches src's kernel from lib, returns the output."""
        ptrs = []
        try:
            launch, dev_out, out = self._session(lib, src, inputs, out_shape, ptrs)
            launch()
            self._check(self.rt.cudaDeviceSynchronize(), "kernel")
            self._check(self.rt.cudaMemcpy(out.ctypes.data_as(ctypes.c_void_p), dev_out,
                                           ctypes.c_size_t(out.nbytes), _D2H), "cudaMemcpy")
            return out
        finally:
            for p in ptrs:
                self.rt.cudaFree(p)

    def time(self, lib, src, inputs, out_shape, number: int = 10, repeat: int = 5) -> list:
        """Seconds per launch, one entry per repeat of `number` launches, timed with CUDA
        events on the default stream after one warm-up launch."""
        rt = self.rt
        ptrs, events = [], []
        try:
            launch, _, _ = self._session(lib, src, inputs, out_shape, ptrs)
            start, stop = ctypes.c_void_p(), ctypes.c_void_p()
            for e in (start, stop):
                self._check(rt.cudaEventCreate(ctypes.byref(e)), "cudaEventCreate")
                events.append(e)
            launch()
            self._check(rt.cudaDeviceSynchronize(), "kernel")
            times = []
            for _ in range(repeat):
                self._check(rt.cudaEventRecord(start, None), "cudaEventRecord")
                for _ in range(number):
                    launch()
                self._check(rt.cudaEventRecord(stop, None), "cudaEventRecord")
                self._check(rt.cudaEventSynchronize(stop), "kernel")
                ms = ctypes.c_float()
                self._check(rt.cudaEventElapsedTime(ctypes.byref(ms), start, stop),
                            "cudaEventElapsedTime")
                times.append(ms.value / 1e3 / number)
            return times
        finally:
            for e in events:
                rt.cudaEventDestroy(e)
            for p in ptrs:
                rt.cudaFree(p)


def gpu():
    """The first CUDA GPU through the CUDA runtime, or None where there is none."""
    rt = _cudart()
    count = ctypes.c_int(0)
    if rt is None or rt.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    return Gpu(rt)

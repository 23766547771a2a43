"""Running nvcc-built kernels (alt_jax/cuda_build.py) on a GPU from numpy, through the CUDA
runtime by ctypes: what the `gpu` tests and scripts/gpu_check.sh use until kernels run
inside XLA. Entry point: gpu_or_skip() -> Gpu (arch, run(lib, src, inputs, out_shape)).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob

import numpy as np
import pytest

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

    def _check(self, code, what):
        if code != 0:
            raise RuntimeError(f"{what}: cudaError {code}")

    def run(self, lib, src, inputs, out_shape, workspace_bytes=None) -> np.ndarray:
        """Copies inputs to the GPU, launches src's kernel from lib, returns the output."""
        rt = self.rt
        ws = src.workspace_bytes if workspace_bytes is None else workspace_bytes
        ptrs = []
        try:
            for x in inputs:
                x = np.ascontiguousarray(x, np.float32)
                p = ctypes.c_void_p()
                self._check(rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(max(4, x.nbytes))),
                            "cudaMalloc")
                ptrs.append(p)
                self._check(rt.cudaMemcpy(p, x.ctypes.data_as(ctypes.c_void_p),
                                          ctypes.c_size_t(x.nbytes), _H2D), "cudaMemcpy")
            out = np.empty(out_shape, np.float32)
            outs = []
            for nbytes in (out.nbytes, ws) if ws else (out.nbytes,):
                p = ctypes.c_void_p()
                self._check(rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(max(4, nbytes))),
                            "cudaMalloc")
                outs.append(p)
                ptrs.append(p)
            ins = (ctypes.c_void_p * len(inputs))(*[p.value for p in ptrs[:len(inputs)]])
            os_ = (ctypes.c_void_p * len(outs))(*[p.value for p in outs])
            launch = getattr(ctypes.CDLL(str(lib)), f"{src.symbol}_launch")
            launch.restype = ctypes.c_int32
            self._check(launch(None, ins, os_), "launch")
            self._check(rt.cudaDeviceSynchronize(), "kernel")
            self._check(rt.cudaMemcpy(out.ctypes.data_as(ctypes.c_void_p), outs[0],
                                      ctypes.c_size_t(out.nbytes), _D2H), "cudaMemcpy")
            return out
        finally:
            for p in ptrs:
                rt.cudaFree(p)


def gpu_or_skip() -> Gpu:
    rt = _cudart()
    count = ctypes.c_int(0)
    if rt is None or rt.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
        pytest.skip("no CUDA GPU here (the `gpu` tests need one)")
    return Gpu(rt)

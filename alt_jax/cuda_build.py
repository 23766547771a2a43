"""Building CUDA kernel sources with nvcc: the GPU half of codegen/cuda_*.cu (the host half,
the emulation, builds like any CPU kernel through runtime.KernelCache).

Entry points: find_nvcc() -> path or None, CudaKernelCache (a runtime.KernelCache compiling
with nvcc for one device.CudaTarget), cache_for(target), compile_cuda(src, arch, cache_dir)
-> the .so exporting SYMBOL_launch, resource_usage(src, arch) -> ptxas's registers / shared
bytes / spills per kernel, CudaBuildError, ARCHES.
Builds are the CPU cache's: content-addressed (source, headers, nvcc's identity, flags,
arch), published atomically with a digest the loader verifies.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import tempfile

from alt_jax import device, runtime

ARCHES = ("sm_80", "sm_90")  # A100 and H100/H200: what the tests compile for
COMPILE_FLAGS = ("-std=c++17", "-O3")
FLAGS = (*COMPILE_FLAGS, "-Xcompiler", "-fPIC", "-shared")  # a shared library


class CudaBuildError(RuntimeError):
    """nvcc is missing or refused a kernel (the message holds its diagnostics)."""


def find_nvcc():
    """ALT_JAX_NVCC, else nvcc on PATH, else /usr/local/cuda/bin/nvcc; None if none."""
    from alt_jax import config

    for cand in (config.get("nvcc"), shutil.which("nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaBuildError("nvcc not found: install the CUDA toolkit or set ALT_JAX_NVCC")
    return nvcc


def _check_arch(arch: str) -> None:
    if not re.fullmatch(r"sm_\d{2,3}a?", arch):
        raise CudaBuildError(f"arch={arch!r}: give a GPU architecture like sm_80 or sm_90")


class CudaKernelCache(runtime.KernelCache):
    """The kernel cache for one GPU target (device.CudaTarget): the CPU cache's keys,
    atomic publication, digests and verified loading, with nvcc as the compiler and
    SYMBOL_launch as the entry point the CUDA FFI handler calls."""

    SOURCE_SUFFIX = ".cu"
    ENTRY_SUFFIX = "_launch"

    def __init__(self, cache_dir, target: device.CudaTarget, max_bytes: int | None = None):
        _check_arch(target.name)
        super().__init__(cache_dir, compiler=_nvcc(), isa=target, max_bytes=max_bytes)

    def _flags(self) -> tuple[str, ...]:
        return (*FLAGS, f"-arch={self.isa.name}")


def cache_for(target: device.CudaTarget, cache_dir=None) -> CudaKernelCache:
    """The CUDA kernel cache beside the default CPU one (ALT_JAX_CACHE_DIR/cuda)."""
    root = pathlib.Path(cache_dir or runtime.default_cache().cache_dir) / "cuda"
    return CudaKernelCache(root, target)


def compile_cuda(src: runtime.KernelSource, arch: str = "sm_90",
                 cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The shared library of src built by nvcc for arch (cached, not loaded here)."""
    _check_arch(arch)
    cache = cache_for(device.CudaTarget.for_arch(arch), cache_dir)
    try:
        return pathlib.Path(cache.build(src, load=False).lib)
    except runtime.BuildError as e:
        raise CudaBuildError(str(e)) from e


def resource_usage(src: runtime.KernelSource, arch: str = "sm_90") -> list:
    """[{registers, shared_bytes, spill_bytes}] per kernel of src, as ptxas reports them
    (compiling to an object only)."""
    _check_arch(arch)
    nvcc = _nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        cu = pathlib.Path(tmp) / "k.cu"
        cu.write_text(src.code)
        done = subprocess.run([nvcc, *COMPILE_FLAGS, f"-arch={arch}", "-Xptxas", "-v",
                               f"-I{runtime.include_dir()}", "-c", str(cu), "-o",
                               str(pathlib.Path(tmp) / "k.o")], capture_output=True, text=True)
    if done.returncode != 0:
        raise CudaBuildError(f"nvcc -arch={arch} failed on {src.symbol}:\n{done.stderr[-4000:]}")
    usage, spill = [], 0
    for line in done.stderr.splitlines():
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            spill = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            smem = re.search(r"(\d+) bytes smem", line)
            usage.append({"registers": int(m.group(1)),
                          "shared_bytes": int(smem.group(1)) if smem else 0,
                          "spill_bytes": spill})
    return usage

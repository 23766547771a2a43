"""Building CUDA kernel sources with nvcc: the GPU half of codegen/cuda_*.cu (the host half,
the emulation, builds like any CPU kernel through runtime.KernelCache).

Entry points: find_nvcc() -> path or None, compile_cuda(src, arch, cache_dir) -> the .so
exporting SYMBOL_launch, resource_usage(src, arch) -> ptxas's registers / shared bytes /
spills per kernel, CudaBuildError, ARCHES.
A build is content-addressed (source, arch, nvcc's version, flags) and written atomically,
so concurrent builders and interrupted builds never leave a half-written library.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

from alt_jax import runtime

ARCHES = ("sm_80", "sm_90")  # A100 and H100/H200: what the tests compile for
FLAGS = ("-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-shared")


class CudaBuildError(RuntimeError):
    """nvcc is missing or refused a kernel (the message holds its diagnostics)."""


def find_nvcc():
    """ALT_JAX_NVCC, else nvcc on PATH, else /usr/local/cuda/bin/nvcc; None if none."""
    for cand in (os.environ.get("ALT_JAX_NVCC"), shutil.which("nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaBuildError("nvcc not found: install the CUDA toolkit or set ALT_JAX_NVCC")
    return nvcc


def _check_arch(arch: str) -> None:
    if not re.fullmatch(r"sm_\d{2,3}a?", arch):
        raise CudaBuildError(f"arch={arch!r}: give a GPU architecture like sm_80 or sm_90")


def compile_cuda(src: runtime.KernelSource, arch: str = "sm_90",
                 cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The shared library of src built by nvcc for arch (cached: a second call returns the
    first's file)."""
    _check_arch(arch)
    nvcc = _nvcc()
    flags = (*FLAGS, f"-arch={arch}", f"-I{runtime.include_dir()}")
    key = hashlib.sha256(repr((src.code, arch, _nvcc_version(nvcc), flags)).encode()
                         ).hexdigest()[:16]
    root = pathlib.Path(cache_dir or runtime.default_cache().cache_dir) / "cuda"
    root.mkdir(parents=True, exist_ok=True)
    lib = root / f"{src.symbol}-{arch}-{key}.so"
    if lib.exists():
        return lib
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cu = pathlib.Path(tmp) / f"{src.symbol}.cu"
        cu.write_text(src.code)
        out = pathlib.Path(tmp) / "lib.so"
        done = subprocess.run([nvcc, *flags, str(cu), "-o", str(out)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise CudaBuildError(f"nvcc -arch={arch} failed on {src.symbol}:\n"
                                 f"{done.stderr[-4000:]}")
        os.replace(out, lib)  # atomic: readers see the whole library or none
    return lib


def resource_usage(src: runtime.KernelSource, arch: str = "sm_90") -> list:
    """[{registers, shared_bytes, spill_bytes}] per kernel of src, as ptxas reports them
    (compiling to an object only)."""
    _check_arch(arch)
    nvcc = _nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        cu = pathlib.Path(tmp) / "k.cu"
        cu.write_text(src.code)
        done = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v",
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

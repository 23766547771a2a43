"""The one place that knows compilers, flags, the kernel cache and FFI registration.

Entry points: KernelSource, Kernel, BuildError, KernelCache(.build), default_cache(),
ffi_call(kernel, operands, out_avals), run_numpy(...), time_numpy(...).
Source -> g++ -> content-addressed .so (key: source, compiler identity, flags, ISA, jaxlib
version, ABI version) -> dlopen'd by alt_jax._core -> called through one FFI target.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
from typing import Sequence

import numpy as np

from alt_jax import config, device

log = logging.getLogger("alt_jax.runtime")

FFI_TARGET = "alt_jax_kernel"
BASE_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=fast",
              "-fno-math-errno", "-fvisibility=hidden")
_PACKAGE_DIR = pathlib.Path(__file__).parent


@dataclasses.dataclass(frozen=True)
class KernelSource:
    """Generated C++ exporting `symbol` with the alt_runtime ABI (kernel_abi.h)."""

    symbol: str
    code: str
    workspace_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A built kernel: a shared library and the symbol to call in it."""

    lib: str
    symbol: str
    workspace_bytes: int


class BuildError(RuntimeError):
    """A kernel failed to compile or load; the op falls back to XLA."""


def include_dir() -> pathlib.Path:
    """Headers generated kernels include: shipped in the package, or csrc/ in a checkout."""
    for candidate in (_PACKAGE_DIR / "include", _PACKAGE_DIR.parent / "csrc" / "include"):
        if (candidate / "alt_jax" / "kernel_abi.h").exists():
            return candidate
    raise BuildError("alt_jax kernel headers (alt_jax/kernel_abi.h) not found; reinstall alt_jax")


def find_compiler() -> str:
    """ALT_JAX_CXX, else $CXX, else the first of g++ / c++ / clang++ on PATH."""
    explicit = config.get("cxx") or os.environ.get("CXX")
    if explicit:
        return explicit
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    raise BuildError("no C++ compiler found: install g++ or set ALT_JAX_CXX")


@functools.lru_cache(maxsize=None)
def _compiler_identity(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"C++ compiler {compiler!r} cannot be run: {e}") from e
    if out.returncode != 0:
        raise BuildError(f"C++ compiler {compiler!r} --version failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0] if out.stdout else compiler


@functools.lru_cache(maxsize=None)
def _jaxlib_version() -> str:
    import jaxlib

    return getattr(jaxlib, "__version__", None) or jaxlib.version.__version__


@functools.lru_cache(maxsize=None)
def _abi_version() -> int:
    from alt_jax import _core

    return _core.abi_version()


class KernelCache:
    """Builds kernels into cache_dir, keyed by everything that changes the binary."""

    def __init__(self, cache_dir: str | os.PathLike, compiler: str | None = None,
                 isa: device.Isa | None = None):
        self.cache_dir = pathlib.Path(cache_dir)
        self.compiler = compiler
        self.isa = isa
        self._lock = threading.Lock()
        self.builds = 0  # compiles this process ran (cache misses); tests read it
        self.hits = 0

    def _flags(self) -> tuple[str, ...]:
        isa = self.isa or device.detect_isa()
        return BASE_FLAGS + isa.compile_flags

    def key(self, src: KernelSource) -> str:
        """Hash of named parts; each is logged at debug level."""
        compiler = self.compiler or find_compiler()
        headers = "".join(p.read_text() for p in sorted((include_dir() / "alt_jax").glob("*.h")))
        parts = {
            "source": src.code,
            "headers": headers,
            "compiler": _compiler_identity(compiler),
            "flags": " ".join(self._flags()),
            "isa": (self.isa or device.detect_isa()).name,
            "jaxlib": _jaxlib_version(),
            "abi": str(_abi_version()),
        }
        h = hashlib.sha256()
        for name, value in parts.items():
            digest = hashlib.sha256(value.encode()).hexdigest()
            log.debug("kernel %s cache-key part %s=%s", src.symbol, name, digest[:12])
            h.update(f"{name}={digest};".encode())
        return h.hexdigest()[:32]

    def path_for(self, src: KernelSource) -> pathlib.Path:
        key = self.key(src)
        return self.cache_dir / key[:2] / f"{src.symbol}-{key}.so"

    def build(self, src: KernelSource) -> Kernel:
        """Compile (or reuse) and load src; raises BuildError with the compiler's message."""
        lib = self.path_for(src)
        if lib.exists():
            self.hits += 1
        else:
            self._compile(src, lib)
            with self._lock:
                self.builds += 1
        from alt_jax import _core

        try:
            _core.load(str(lib), src.symbol)
        except RuntimeError as e:
            raise BuildError(str(e)) from e
        return Kernel(str(lib), src.symbol, src.workspace_bytes)

    def _compile(self, src: KernelSource, lib: pathlib.Path) -> None:
        compiler = self.compiler or find_compiler()
        lib.parent.mkdir(parents=True, exist_ok=True)
        # Build in a private temp dir, then rename into place: a reader never sees a partial
        # file, and two processes building the same kernel both succeed (last rename wins,
        # both files are identical).
        with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".build-") as tmp:
            cc = pathlib.Path(tmp) / f"{src.symbol}.cc"
            so = pathlib.Path(tmp) / f"{src.symbol}.so"
            cc.write_text(src.code)
            cmd = [compiler, *self._flags(), f"-I{include_dir()}", str(cc), "-o", str(so)]
            log.debug("compiling %s: %s", src.symbol, " ".join(cmd))
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise BuildError(f"compiler {compiler!r} could not run: {e}") from e
            if out.returncode != 0:
                raise BuildError(f"{compiler} failed on {src.symbol}:\n{out.stderr[-4000:]}")
            os.replace(so, lib)


@functools.lru_cache(maxsize=None)
def default_cache() -> KernelCache:
    """The cache the public API uses: ALT_JAX_CACHE_DIR, default ~/.cache/alt_jax/kernels."""
    return KernelCache(config.get("cache_dir"))


_registered = False
_register_lock = threading.Lock()


def register_ffi_target() -> None:
    """Registers the static handler once per process (after the CPU backend is up)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        import jax

        from alt_jax import _core

        jax.devices()  # a rejected registration before backend start breaks the backend
        jax.ffi.register_ffi_target(FFI_TARGET, _core.ffi_handler(), platform="cpu")
        _registered = True


def ffi_call(kernel: Kernel, operands: Sequence, out_avals: Sequence,
             aliases: dict | None = None) -> list:
    """The kernel as a jax op: operands in, one value per out_aval out.

    The workspace is not an XLA buffer: the handler hands the kernel its calling thread's
    reusable arena (csrc/core/workspace.h), so large workspaces cost no page faults per call.
    aliases {operand index: output index}: that output is written into the operand's buffer
    (XLA copies the operand first if anything else still needs it).
    """
    import jax

    register_ffi_target()
    result_shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in out_avals]
    call = jax.ffi.ffi_call(FFI_TARGET, result_shapes, vmap_method="sequential",
                            input_output_aliases=dict(aliases) if aliases else None)
    outs = call(*operands, lib=kernel.lib, sym=kernel.symbol,
                workspace_bytes=np.int64(kernel.workspace_bytes))
    return list(outs)


def run_numpy(kernel: Kernel, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
              num_threads: int = 2) -> None:
    """Runs the kernel on host buffers with alt_jax's own pool (tests, tuning)."""
    from alt_jax import _core

    ins = [np.ascontiguousarray(x) for x in inputs]
    for out in outputs:
        if not out.flags.c_contiguous:
            raise ValueError("run_numpy: outputs must be C-contiguous numpy arrays")
    _core.run(kernel.lib, kernel.symbol, ins, list(outputs), kernel.workspace_bytes, num_threads)


def time_numpy(kernel: Kernel, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
               num_threads: int = 2, number: int = 10, repeat: int = 5) -> list[float]:
    """Seconds per call, one entry per repeat, after a warm-up call."""
    from alt_jax import _core

    ins = [np.ascontiguousarray(x) for x in inputs]
    return list(_core.time(kernel.lib, kernel.symbol, ins, list(outputs), kernel.workspace_bytes,
                           num_threads, number, repeat))

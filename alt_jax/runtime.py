"""The one place that knows compilers, flags, the kernel cache and FFI registration.

Entry points: KernelSource, Kernel, BuildError, KernelCache(.build), default_cache(),
ffi_call(kernel, operands, out_avals), run_numpy(...), time_numpy(...).
Source -> g++ -> content-addressed .so (key: source, compiler identity, flags, ISA, jaxlib
version, ABI version) + its SHA-256 -> verified and dlopen'd by alt_jax._core -> called
through one FFI target. The cache is private, verified, size-bounded (LRU) and any failure of
it is a BuildError (the op runs in XLA): see "The kernel cache on disk" below.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import logging
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
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
    """ALT_JAX_CXX, else $CXX, else the first of g++ / c++ / clang++ on PATH.

    ALT_JAX_CXX / $CXX may be a command line ("ccache g++"): see compiler_argv."""
    explicit = config.get("cxx") or os.environ.get("CXX")
    if explicit:
        return explicit
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    raise BuildError("no C++ compiler found: install g++ or set ALT_JAX_CXX")


def compiler_argv(compiler: str) -> list[str]:
    """The compiler as argv: a path to an existing file as is (it may contain spaces), else
    split as a shell would split it (CXX="ccache g++", quoted paths)."""
    if os.path.isfile(compiler):
        return [compiler]
    try:
        argv = shlex.split(compiler)
    except ValueError as e:
        raise BuildError(f"C++ compiler {compiler!r} is not a valid command line: {e}") from e
    if not argv:
        raise BuildError("the C++ compiler is set to an empty command (ALT_JAX_CXX / CXX)")
    return argv


@functools.lru_cache(maxsize=None)
def _compiler_identity(compiler: str) -> str:
    try:
        out = subprocess.run([*compiler_argv(compiler), "--version"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"C++ compiler {compiler!r} cannot be run: {e}") from e
    if out.returncode != 0:
        raise BuildError(f"C++ compiler {compiler!r} --version failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0] if out.stdout else compiler


def compiler_identity() -> str:
    """The first line of the kernel compiler's --version (records, cache keys)."""
    return _compiler_identity(find_compiler())


def jaxlib_version() -> str:
    return _jaxlib_version()


@functools.lru_cache(maxsize=None)
def _jaxlib_version() -> str:
    import jaxlib

    return getattr(jaxlib, "__version__", None) or jaxlib.version.__version__


@functools.lru_cache(maxsize=None)
def _abi_version() -> int:
    from alt_jax import _core

    return _core.abi_version()


# ---- The kernel cache on disk.
#
# cache_dir/xx/<symbol>-<key>.so and beside it <symbol>-<key>.so.sha256 (the library's
# SHA-256, hex). Directories are 0700 and files 0600 whatever the umask (explicit chmod /
# fchmod, never the umask). A library is published by fsync + rename of a complete file
# (digest first, then the library, then an fsync of the directory) and never written in
# place: a process that has it mapped keeps valid pages (a truncated mapped file is SIGBUS).
# alt_jax._core (csrc/core/kernel_registry.h) loads a library only if it is a regular file of
# ours in a private directory chain and its bytes match the digest; a cached file that fails
# that is rebuilt, and a cache that cannot be used at all (not a directory, not ours,
# read-only, full) makes the op fall back to XLA through BuildError.

DIR_MODE = 0o700
FILE_MODE = 0o600
DIGEST_SUFFIX = ".sha256"
_STALE_BUILD_SECONDS = 3600  # a .build-* dir this old belongs to a process that died

# (st_dev, st_ino) of every library this process has loaded: never evicted (by any
# KernelCache of this process), since jax may still call their kernels.
_loaded_libraries: set[tuple[int, int]] = set()
_loaded_lock = threading.Lock()


def _note_loaded(lib: pathlib.Path) -> None:
    try:
        st = os.stat(lib)
    except OSError:
        return  # evicted by another process after we mapped it: nothing on disk to protect
    with _loaded_lock:
        _loaded_libraries.add((st.st_dev, st.st_ino))


def _is_loaded(st: os.stat_result) -> bool:
    with _loaded_lock:
        return (st.st_dev, st.st_ino) in _loaded_libraries


def _os_error_text(e: OSError) -> str:
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    where = f" at {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{f' ({name})' if name else ''}{where}"


def _make_missing_parents(path: pathlib.Path) -> None:
    """Creates the missing directories above path 0700 (os.makedirs would give them the
    umask's mode, 0777 at umask 000, letting anyone swap the cache below them)."""
    missing = [p for p in path.parents if not os.path.lexists(p)]
    for parent in reversed(missing):
        try:
            os.mkdir(parent, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(parent, DIR_MODE)


def _scan_subdir(subdir: pathlib.Path) -> list[tuple[float, int, pathlib.Path, os.stat_result]]:
    """(mtime, bytes with its digest, path, stat) per library in one cache subdirectory;
    removes build dirs left there by dead processes on the way."""
    libs, now = [], time.time()
    with os.scandir(subdir) as entries:
        for entry in entries:
            path = pathlib.Path(entry.path)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # evicted or renamed by another process meanwhile
            if entry.name.startswith(".build-") and stat.S_ISDIR(st.st_mode):
                if now - st.st_mtime > _STALE_BUILD_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            elif entry.name.endswith(".so") and stat.S_ISREG(st.st_mode):
                size = st.st_size
                try:
                    size += os.lstat(path.with_name(entry.name + DIGEST_SUFFIX)).st_size
                except FileNotFoundError:
                    pass  # a library without digest: rejected on load, still counted
                libs.append((st.st_mtime, size, path, st))
    return libs


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KernelCache:
    """Builds kernels into cache_dir, keyed by everything that changes the binary.

    max_bytes: the size bound (default ALT_JAX_CACHE_MAX_MB); after a build pushes the cache
    over it, least recently used libraries are deleted (a hit marks a library used)."""

    def __init__(self, cache_dir: str | os.PathLike, compiler: str | None = None,
                 isa: device.Isa | None = None, max_bytes: int | None = None):
        # Resolved once: kernel paths are absolute (they travel in FFI attributes) and the
        # directory chain checked is the one written to.
        self.cache_dir = pathlib.Path(os.path.realpath(cache_dir))
        self.compiler = compiler
        self.isa = isa
        self.max_bytes = (config.get("cache_max_mb") << 20) if max_bytes is None else max_bytes
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._ancestors_checked = False
        self.builds = 0  # compiles this process ran (cache misses); tests read it
        self.hits = 0
        self.rejected = 0  # cached files that failed verification and were rebuilt
        self.evicted = 0

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

    def build(self, src: KernelSource, load: bool = True) -> Kernel:
        """Compile (or reuse) and load src; raises BuildError (the op falls back to XLA) with
        the compiler's message, or with what is wrong with the cache directory.
        load=False (the tuner: candidates run in a worker process, which loads and verifies
        them there) compiles and publishes without mapping the library into this process;
        a cached file is then not verified here either."""
        lib = self.path_for(src)
        try:
            kernel = self._load_cached(src, lib, load)
            if kernel is None:
                kernel = self._build_and_load(src, lib, load)
        except OSError as e:
            raise BuildError(
                f"kernel cache {self.cache_dir} is unusable: {_os_error_text(e)}; kernel "
                f"{src.symbol} not built; set ALT_JAX_CACHE_DIR to a writable directory that "
                f"only you can write") from e
        return kernel

    # -- directories

    def _check_ancestors(self) -> None:
        """Every existing directory above the cache is owned by us or root and not writable
        by everybody (unless sticky, like /tmp). Defence in depth, not what makes loading
        sound: whoever can replace an ancestor can only point us at directories they own,
        which the loader rejects, or at another cache of ours, whose files match their keys.
        Group-writable ancestors pass: with user private groups (umask 002) ~/.cache often is."""
        if self._ancestors_checked:
            return
        uid = os.geteuid()
        for parent in self.cache_dir.parents:
            try:
                st = os.stat(parent)
            except FileNotFoundError:
                continue  # created below, by us, private
            sticky = st.st_mode & stat.S_ISVTX
            if st.st_uid not in (uid, 0) or (st.st_mode & 0o002 and not sticky):
                raise BuildError(
                    f"kernel cache {self.cache_dir} is unsafe: {parent} (uid {st.st_uid}, mode "
                    f"{st.st_mode & 0o7777:o}) can be changed by other users; set "
                    f"ALT_JAX_CACHE_DIR to a directory under one only you can write")
        self._ancestors_checked = True

    def _private_dir(self, path: pathlib.Path, *, create: bool, write: bool) -> bool:
        """Makes sure path is a private directory of ours (created 0700; group and other bits
        of an existing one are removed). False if it is missing and not to be created.
        Raises BuildError if it is not ours or lacks the owner permissions needed: checked
        from the mode bits, so that root (which the kernel would let through) sees the same
        read-only cache as everybody else."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                return False
            if path == self.cache_dir:
                _make_missing_parents(path)
            else:
                self._private_dir(path.parent, create=True, write=True)
            try:
                os.mkdir(path, DIR_MODE)
            except FileExistsError:
                pass  # another thread or process made it: checked below like any other
            else:
                os.chmod(path, DIR_MODE)  # mkdir's mode went through the umask
            st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise BuildError(f"kernel cache {self.cache_dir}: {path} is not a directory "
                             f"(a symlink or file); remove it or set ALT_JAX_CACHE_DIR")
        if st.st_uid != os.geteuid():
            raise BuildError(f"kernel cache {self.cache_dir}: {path} belongs to uid "
                             f"{st.st_uid}, not to you; set ALT_JAX_CACHE_DIR to your own")
        if st.st_mode & 0o077:
            log.info("kernel cache: making %s private (mode %o -> %o)", path,
                     st.st_mode & 0o777, st.st_mode & 0o700)
            os.chmod(path, st.st_mode & 0o700)
        needed = stat.S_IRWXU if write else stat.S_IRUSR | stat.S_IXUSR
        if st.st_mode & needed != needed:
            raise BuildError(
                f"kernel cache {self.cache_dir}: {path} is "
                f"{'read-only' if write else 'unreadable'} (mode {st.st_mode & 0o777:o}); "
                f"chmod u+rwx it or set ALT_JAX_CACHE_DIR to a writable directory")
        return True

    def _cache_dirs(self, lib: pathlib.Path, *, create: bool) -> bool:
        self._check_ancestors()
        return (self._private_dir(self.cache_dir, create=create, write=create)
                and self._private_dir(lib.parent, create=create, write=create))

    # -- load, build, publish

    def _load(self, src: KernelSource, lib: pathlib.Path) -> None:
        """Verifies and dlopens lib (csrc/core/kernel_registry.cc); RuntimeError if rejected."""
        from alt_jax import _core

        _core.load(str(lib), src.symbol + self.ENTRY_SUFFIX)
        _note_loaded(lib)

    def _load_cached(self, src: KernelSource, lib: pathlib.Path,
                     load: bool = True) -> Kernel | None:
        """The cached kernel, or None on a miss or when the cached file fails verification
        (it is then rebuilt and atomically replaced)."""
        if not self._cache_dirs(lib, create=False) or not os.path.lexists(lib):
            return None
        if not os.path.lexists(lib.with_name(lib.name + DIGEST_SUFFIX)):
            log.info("kernel cache: %s has no digest (an older alt_jax built it): rebuilding",
                     lib)
            self._count_rejected()
            return None
        try:
            if load:
                self._load(src, lib)
        except RuntimeError as e:
            log.warning("%s", e)
            self._count_rejected()
            return None
        try:
            os.utime(lib)  # least recently used = oldest mtime
        except OSError as e:  # a read-only cache still serves hits
            log.debug("kernel cache: cannot mark %s used: %s", lib, e)
        with self._lock:
            self.hits += 1
        return Kernel(str(lib), src.symbol, src.workspace_bytes)

    def _count_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def _build_and_load(self, src: KernelSource, lib: pathlib.Path,
                        load: bool = True) -> Kernel:
        self._cache_dirs(lib, create=True)
        self._compile(src, lib)
        with self._lock:
            self.builds += 1
        try:
            if load:
                self._load(src, lib)
        except RuntimeError as e:
            raise BuildError(str(e)) from e
        self._evict_over_bound()
        return Kernel(str(lib), src.symbol, src.workspace_bytes)

    SOURCE_SUFFIX = ".cc"  # what the compiler reads (cuda_build.CudaKernelCache: .cu)
    ENTRY_SUFFIX = ""      # appended to the symbol to find the library's entry point

    def _compile(self, src: KernelSource, lib: pathlib.Path) -> None:
        argv = compiler_argv(self.compiler or find_compiler())
        # Build in a private temp dir (mkdtemp: 0700), then rename into place: a reader never
        # sees a partial file, and two processes building the same kernel both succeed (last
        # rename wins, both files are identical).
        with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".build-") as tmp:
            cc = pathlib.Path(tmp) / f"{src.symbol}{self.SOURCE_SUFFIX}"
            so = pathlib.Path(tmp) / f"{src.symbol}.so"
            cc.write_text(src.code)
            cmd = [*argv, *self._flags(), f"-I{include_dir()}", str(cc), "-o", str(so)]
            log.debug("compiling %s: %s", src.symbol, " ".join(cmd))
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise BuildError(f"compiler {argv[0]!r} could not run: {e}") from e
            if out.returncode != 0:
                raise BuildError(f"{' '.join(argv)} failed on {src.symbol}:\n"
                                 f"{out.stderr[-4000:]}")
            self._publish(so, lib)

    @staticmethod
    def _publish(so: pathlib.Path, lib: pathlib.Path) -> None:
        """Makes the compiled so (in a private temp dir beside lib) the cached lib: private
        modes, data on disk before the names (a crash leaves the old file or the new one,
        never an empty or short one), digest renamed before the library (kernel_registry.cc
        opens them in the other order)."""
        fd = os.open(so, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, FILE_MODE)
            digest = hashlib.sha256()
            while chunk := os.read(fd, 1 << 20):
                digest.update(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        digest_tmp = so.with_name(so.name + DIGEST_SUFFIX)
        fd = os.open(digest_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            os.write(fd, (digest.hexdigest() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(digest_tmp, lib.with_name(lib.name + DIGEST_SUFFIX))
        os.replace(so, lib)
        _fsync_dir(lib.parent)

    # -- size bound

    def _scan(self) -> tuple[int, list[tuple[float, int, pathlib.Path, os.stat_result]]]:
        """Total bytes of libraries + digests, and (mtime, bytes, path, stat) per library."""
        libs = []
        with os.scandir(self.cache_dir) as subdirs:
            for sub in subdirs:
                if len(sub.name) == 2 and sub.is_dir(follow_symlinks=False):
                    libs.extend(_scan_subdir(pathlib.Path(sub.path)))
        return sum(size for _, size, _, _ in libs), libs

    def _evict_over_bound(self) -> None:
        """Deletes least recently used libraries until the cache is within max_bytes, never
        one loaded by this process. Unlinking is safe for other processes that have a library
        mapped (the inode lives on); they would rebuild it on their next lookup."""
        with self._evict_lock:
            try:
                self._evict_oldest()
            except OSError as e:
                # The new kernel is built and loaded: a cache over its bound is no reason to
                # run the op in XLA.
                log.warning("kernel cache %s: eviction failed: %s", self.cache_dir,
                            _os_error_text(e))

    def _evict_oldest(self) -> None:
        total, libs = self._scan()
        for _, size, path, st in sorted(libs, key=lambda item: item[0]):
            if total <= self.max_bytes:
                break
            if _is_loaded(st):
                continue
            for victim in (path, path.with_name(path.name + DIGEST_SUFFIX)):
                try:
                    os.unlink(victim)
                except FileNotFoundError:
                    pass  # another process evicted it first
            total -= size
            self.evicted += 1
            log.debug("kernel cache: evicted %s (%d bytes)", path, size)
        if total > self.max_bytes:
            log.info("kernel cache %s holds %d bytes, over its bound of %d: the rest are "
                     "loaded by this process", self.cache_dir, total, self.max_bytes)


@functools.lru_cache(maxsize=None)
def default_cache() -> KernelCache:
    """The cache the public API uses: ALT_JAX_CACHE_DIR, default ~/.cache/alt_jax/kernels."""
    return KernelCache(config.get("cache_dir"))


_registered: set = set()  # FFI targets registered in this process
_register_lock = threading.Lock()


def _register(target: str, handler, platform: str) -> None:
    """Registers handler() for target on platform once per process, after the backends are
    up (a rejected registration before backend start breaks the backend)."""
    with _register_lock:
        if target in _registered:
            return
        import jax

        jax.devices()
        jax.ffi.register_ffi_target(target, handler(), platform=platform)
        _registered.add(target)


def register_ffi_target() -> None:
    """Registers the static CPU handler once per process."""
    from alt_jax import _core

    _register(FFI_TARGET, _core.ffi_handler, "cpu")


CUDA_FFI_TARGET = "alt_jax_cuda_kernel"


def register_cuda_ffi_target() -> None:
    """Registers the CUDA handler (platform "CUDA") once per process; BuildError when this
    alt_jax was built without nvcc (no handler to register)."""
    from alt_jax import _core

    if not hasattr(_core, "cuda_ffi_handler"):
        raise BuildError("alt_jax was built without nvcc: no CUDA FFI handler; install the "
                         "CUDA toolkit and reinstall alt_jax to run kernels on a GPU")
    _register(CUDA_FFI_TARGET, _core.cuda_ffi_handler, "CUDA")


def cuda_ffi_call(kernel: Kernel, operands: Sequence, out_avals: Sequence) -> list:
    """An nvcc-built kernel (cuda_build.CudaKernelCache) as a jax op on the GPU: operands in,
    one value per out_aval out. The workspace is one more result, a device buffer XLA
    allocates (and frees) with the call."""
    import jax

    register_cuda_ffi_target()
    result_shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in out_avals]
    if kernel.workspace_bytes:
        result_shapes.append(jax.ShapeDtypeStruct((kernel.workspace_bytes,), np.uint8))
    call = jax.ffi.ffi_call(CUDA_FFI_TARGET, result_shapes, vmap_method="sequential")
    outs = call(*operands, lib=kernel.lib, sym=kernel.symbol)
    return list(outs)[:len(out_avals)]


def ffi_call(kernel: Kernel, operands: Sequence, out_avals: Sequence,
             aliases: dict | None = None) -> list:
    """The kernel as a jax op: operands in, one value per out_aval out.

    The workspace is not an XLA buffer: the handler hands the kernel a buffer of the shared
    workspace pool (csrc/core/workspace.h), so large workspaces cost no page faults per call.
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
               num_threads: int = 2, number: int = 10, repeat: int = 5,
               rotate: Sequence[Sequence[np.ndarray]] = ()) -> list[float]:
    """Seconds per call, one entry per repeat, after a warm-up call. rotate: more input sets
    (each like inputs) the calls cycle through after inputs (cold weights: see
    tuner.measure.MeasureConfig)."""
    from alt_jax import _core

    ins = [np.ascontiguousarray(x) for x in inputs]
    sets = [[np.ascontiguousarray(x) for x in s] for s in rotate]
    return list(_core.time(kernel.lib, kernel.symbol, ins, list(outputs), kernel.workspace_bytes,
                           num_threads, number, repeat, sets))

"""What CPU this is, for kernel generation and cache/record keys.

Entry points: Isa (frozen), detect_isa(), fingerprint(), last_level_cache_bytes().
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform


@dataclasses.dataclass(frozen=True)
class Isa:
    """The vector instruction set kernels are generated for."""

    name: str                 # "avx512" | "avx2" | "sse2" | "neon" | "scalar"
    vector_floats: int        # fp32 lanes of one vector register: 16, 8, 4 or 1
    vector_registers: int     # architectural vector registers (register-tile budget)
    compile_flags: tuple[str, ...]

    def __post_init__(self):
        if self.vector_floats not in (1, 4, 8, 16):
            raise ValueError(f"Isa.vector_floats must be 1, 4, 8 or 16, got "
                             f"{self.vector_floats}")


# AVX-512 (F + VL + DQ): 16 lanes and 32 zmm registers. The kernels are the same templates
# (GCC vector extensions); -mprefer-vector-width=512 lets the compiler keep 512-bit code.
AVX512 = Isa("avx512", 16, 32, ("-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                                "-mf16c", "-mprefer-vector-width=512"))
AVX2 = Isa("avx2", 8, 16, ("-mavx2", "-mfma", "-mf16c"))
SSE2 = Isa("sse2", 4, 16, ("-msse2",))
NEON = Isa("neon", 4, 32, ())
SCALAR = Isa("scalar", 1, 16, ())
ISAS = {isa.name: isa for isa in (AVX512, AVX2, SSE2, NEON, SCALAR)}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") or line.startswith("Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def detect_isa() -> Isa:
    """The best ISA this CPU runs; ALT_JAX_ISA=<name> forces one (e.g. scalar, for tests)."""
    from alt_jax import config

    forced = config.get("isa")
    if forced:
        return ISAS[forced]
    machine = platform.machine().lower()
    flags = _cpu_flags()
    if machine in ("x86_64", "amd64"):
        if {"avx512f", "avx512vl", "avx512dq", "avx2", "fma"} <= flags:
            return AVX512
        if {"avx2", "fma"} <= flags:
            return AVX2
        return SSE2
    if machine in ("aarch64", "arm64"):
        return NEON
    return SCALAR


@dataclasses.dataclass(frozen=True)
class CudaTarget(Isa):
    """An NVIDIA GPU kernels are generated for: name is its architecture (sm_90), model and
    sms what it is (records are keyed by them: fingerprint). The Isa fields keep the
    planner's bookkeeping uniform; CUDA families read only the architecture."""

    model: str = "NVIDIA GPU"
    sms: int = 0

    @classmethod
    def for_arch(cls, arch: str, model: str = "NVIDIA GPU", sms: int = 0) -> "CudaTarget":
        return cls(arch, 4, 255, (), model, sms)

    @classmethod
    def of_jax_device(cls, dev) -> "CudaTarget":
        """The target of a jax GPU device (device_kind, compute_capability, core_count)."""
        cc = str(getattr(dev, "compute_capability", "9.0")).replace(".", "")
        return cls.for_arch(f"sm_{cc}", str(getattr(dev, "device_kind", "NVIDIA GPU")),
                            int(getattr(dev, "core_count", 0) or 0))


@functools.lru_cache(maxsize=None)
def jax_gpu():
    """The first GPU jax has in this process, or None (a process cannot gain one later)."""
    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend
        return None
    return gpus[0] if gpus else None


@functools.lru_cache(maxsize=None)
def fingerprint(isa: Isa | None = None) -> str:
    """Names this device for tuning records: CPU model, the ISA kernels are generated for
    (this host's, detect_isa(), unless given) and core count; for a GPU (CudaTarget) its
    model, architecture and SM count."""
    if isinstance(isa, CudaTarget):
        return f"cuda:{isa.model}|arch={isa.name}|sms={isa.sms}"
    return f"cpu:{_cpu_model()}|isa={(isa or detect_isa()).name}|cores={os.cpu_count()}"


_DEFAULT_LLC_BYTES = 32 << 20  # what a server core complex has; used when nothing says


def _cache_size(text: str) -> int:
    """Bytes of a sysfs cache size ("32768K", "2M", "1024")."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes() -> int:
    """The largest data cache of CPU 0 (sysfs), or 32 MiB where the system does not say.
    The tuner sizes its cold-weights rotation with it (tuner.measure.MeasureConfig)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(f"{base}/{entry}/type") as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(f"{base}/{entry}/size") as f:
                best = max(best, _cache_size(f.read()))
        except (OSError, ValueError):
            continue
    return best or _DEFAULT_LLC_BYTES

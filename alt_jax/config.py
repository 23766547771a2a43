"""The one registry of alt_jax options: each defined once, with its environment variable.

Entry points: OPTIONS, get(name), Option. Unknown names raise with the list of known ones.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    env: str
    default: object
    parse: Callable[[str], object]
    help: str


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0/true/false), got {text!r}")


def _isa(text: str) -> str:
    from alt_jax.device import ISAS

    if text and text not in ISAS:
        raise ValueError(f"ALT_JAX_ISA={text!r}: choose one of {sorted(ISAS)}")
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alt_jax", "kernels")


OPTIONS = {
    o.name: o
    for o in (
        Option("cache_dir", "ALT_JAX_CACHE_DIR", None, str,
               "where compiled kernels are cached (default: ~/.cache/alt_jax/kernels)"),
        Option("cache_max_mb", "ALT_JAX_CACHE_MAX_MB", 1024, _positive_int,
               "size bound of the kernel cache in MiB; least recently used kernels are "
               "evicted after a build goes over it (never one this process has loaded)"),
        Option("cxx", "ALT_JAX_CXX", None, str,
               "C++ compiler for generated kernels (default: $CXX, then g++, c++, clang++)"),
        Option("isa", "ALT_JAX_ISA", "", _isa,
               "force the vector ISA kernels are generated for (avx512, avx2, sse2, neon, scalar)"),
        Option("min_flops", "ALT_JAX_MIN_FLOPS", None, int,
               "ops below this many flops stay in XLA (default: measured rule in planner)"),
        Option("records", "ALT_JAX_RECORDS", None, str, "tuning records file (JSON lines)"),
        Option("cuda_arch", "ALT_JAX_CUDA_ARCH", "", str,
               "the GPU architecture optimize(platform='cuda') plans for where no GPU is "
               "visible (default sm_90)"),
        Option("nvcc", "ALT_JAX_NVCC", None, str, "nvcc for CUDA kernels (default: on PATH)"),
    )
}


def get(name: str):
    """The option's value: its environment variable if set, else its default."""
    try:
        opt = OPTIONS[name]
    except KeyError:
        raise KeyError(f"unknown alt_jax option {name!r}; known: {sorted(OPTIONS)}") from None
    raw = os.environ.get(opt.env)
    if raw is None or raw == "":
        value = opt.default
    else:
        value = opt.parse(raw)
    if name == "cache_dir" and value is None:
        value = _default_cache_dir()
    return value

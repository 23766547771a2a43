"""Which operator families may rewrite which primitive, in the order they are tried.

Entry points: families_for(primitive), family_table(exclude), cuda_family_table(),
families_by_name().
A more specialised family comes first (depthwise, then Winograd for 3x3 stride-1 convs,
before the general direct conv, which comes last and names the op in records:
planner.op_key). Untuned, a family that cannot run the op
(Unsupported) or whose heuristic prefers another (prefers() is False) passes it to the next;
tuning records choose among all that can run it.
"""
from __future__ import annotations

import functools
import importlib

from jax import lax

_FAMILY_MODULES = {
    lax.conv_general_dilated_p: ("alt_jax.ops.depthwise", "alt_jax.ops.winograd",
                                 "alt_jax.ops.conv2d"),
    lax.dot_general_p: ("alt_jax.ops.matmul",),
}


@functools.lru_cache(maxsize=None)
def families_for(primitive) -> tuple:
    """The OpFamily objects (each module's FAMILY) for primitive; () if none."""
    return tuple(importlib.import_module(m).FAMILY for m in _FAMILY_MODULES.get(primitive, ()))


_CUDA_FAMILY_MODULES = {
    lax.conv_general_dilated_p: ("alt_jax.ops.cuda_depthwise", "alt_jax.ops.cuda_conv2d"),
    lax.dot_general_p: ("alt_jax.ops.cuda_matmul",),
}


def cuda_family_table() -> dict:
    """primitive -> the CUDA families, in the order tried: what optimize() plans with when
    the function's inputs live on a GPU."""
    return {prim: tuple(importlib.import_module(m).FAMILY for m in mods)
            for prim, mods in _CUDA_FAMILY_MODULES.items()}


def family_table(exclude=()) -> dict:
    """primitive -> families in the order tried, without the families named in exclude: the
    `families=` option of alt_jax.optimize (benchmark ablations, e.g. no Winograd)."""
    return {prim: tuple(f for f in families_for(prim) if f.name not in exclude)
            for prim in _FAMILY_MODULES}


def families_by_name() -> dict:
    """Every registered family by name (the names workloads and tuning records use), the
    CUDA ones included."""
    out = {family.name: family for prim in _FAMILY_MODULES for family in families_for(prim)}
    out.update({f.name: f for fams in cuda_family_table().values() for f in fams})
    return out

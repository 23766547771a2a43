"""What the channel-blocked kernel tests share (tests/test_conv2d_blocked.py,
tests/test_winograd_blocked.py): activation layouts by name, a logical NCHW conv put on
them through a family's relayout, and running a kernel against the lax reference.

Entry points: layout(kind, shape), BlockedConv, relerr(a, ref), run_blocked(...).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np
from jax import lax

from alt_jax import runtime
from alt_jax.layout import Layout, channel_blocked, nhwc


def layout(kind: str, shape) -> Layout:
    """A Layout over logical N C H W: NCHW, NHWC, N C/b H W bc ("8c", "16c"), or
    N C/8 H 8c W ("8cW": blocked channels that are not innermost; lhs only)."""
    if kind == "NCHW":
        return Layout("NCHW", shape)
    if kind == "NHWC":
        return nhwc(shape)
    if kind == "8cW":
        return Layout("NCHW", shape).split("C", 8).reorder("N", "C/8", "H", "8c", "W")
    return channel_blocked(Layout("NCHW", shape), "C", int(kind[:-1]))


@dataclasses.dataclass(frozen=True)
class BlockedConv:
    """A logical NCHW conv (rhs in rhs_dn) that `family` runs with its lhs and output in
    other layouts (spec(lhs, out))."""

    family: Any
    n: int
    c: int
    h: int
    w: int
    k: int
    kh: int = 3
    kw: int = 3
    stride: tuple = (1, 1)
    pad: tuple = ((0, 0), (0, 0))
    groups: int = 1
    rhs_dn: str = "OIHW"
    precision: Optional[Any] = None

    def fn(self):
        return lambda x, w: lax.conv_general_dilated(
            x, w, self.stride, self.pad, dimension_numbers=("NCHW", self.rhs_dn, "NCHW"),
            feature_group_count=self.groups, precision=self.precision)

    def operands(self, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.n, self.c, self.h, self.w)).astype(np.float32)
        sizes = dict(O=self.k, I=self.c // self.groups, H=self.kh, W=self.kw)
        w = rng.standard_normal([sizes[d] for d in self.rhs_dn]).astype(np.float32)
        return x, w

    def logical(self):
        return self.family.match(jax.make_jaxpr(self.fn())(*self.operands()).jaxpr.eqns[0])

    def spec(self, lhs: str, out: str, **changes):
        base = self.logical()
        spec = self.family.relayout(base, layout(lhs, (self.n, self.c, self.h, self.w)),
                                    layout(out, (self.n, self.k, base.oh, base.ow)))
        return dataclasses.replace(spec, **changes)


def relerr(a, ref):
    return float(np.abs(a - ref).max() / max(1.0, float(np.abs(ref).max())))


def run_blocked(conv, spec, kernel, rhs=None, x=None, seed=1):
    """(kernel's output, reference), both in spec.out_layout; x: the logical input (the
    conv's operands by default)."""
    x0, w = conv.operands()
    x = x0 if x is None else x
    rng = np.random.default_rng(seed)
    y = np.asarray(jax.jit(conv.fn())(x, w))  # logical N K OH OW
    extra = dict(scale=rng.uniform(0.5, 1.5, spec.k).astype(np.float32),
                 shift=rng.standard_normal(spec.k).astype(np.float32),
                 residual=rng.standard_normal(y.shape).astype(np.float32))
    epi = spec.epilogue
    ref = epi.reference(y, 1, **{n: extra[n] for n in epi.inputs()})
    ref = np.asarray(spec.out_layout.apply(ref))
    phys = {"scale": extra["scale"], "shift": extra["shift"],
            "residual": np.asarray(spec.out_layout.apply(extra["residual"]))}
    lhs = np.asarray(spec.lhs_layout.apply(x))
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [lhs, w if rhs is None else rhs,
                               *(phys[n] for n in epi.inputs())], [out])
    assert out.shape == ref.shape == spec.out_layout.physical_shape
    return out, ref

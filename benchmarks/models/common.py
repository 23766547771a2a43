"""Pieces the zoo's models share: the Model record, layout-aware conv / batch norm / pooling,
and a FLOP count computed from the traced program.

Entry points: Model, Layout, conv, batch_norm, max_pool, count_flops, Params.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where channels live in activations and how weights are stored."""

    name: str  # "nhwc" | "nchw"

    @property
    def dimension_numbers(self):
        return ("NHWC", "HWIO", "NHWC") if self.name == "nhwc" else ("NCHW", "OIHW", "NCHW")

    @property
    def channel_axis(self) -> int:
        return 3 if self.name == "nhwc" else 1

    @property
    def spatial_axes(self) -> tuple:
        return (1, 2) if self.name == "nhwc" else (2, 3)

    def weight_shape(self, kh, kw, cin, cout):
        return (kh, kw, cin, cout) if self.name == "nhwc" else (cout, cin, kh, kw)

    def input_shape(self, batch, hw, c):
        return (batch, hw, hw, c) if self.name == "nhwc" else (batch, c, hw, hw)


@dataclasses.dataclass
class Model:
    name: str
    apply: Callable  # apply(params, x) -> output
    params: Any
    inputs: tuple    # example inputs after params

    @property
    def flops(self) -> int:
        return count_flops(self.apply, self.params, *self.inputs)


class Params:
    """Deterministic random weights: a seeded generator handing out arrays in call order."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape, scale):
        return jnp.asarray(self.rng.standard_normal(shape).astype(np.float32) * scale)

    def uniform(self, shape, lo, hi):
        return jnp.asarray(self.rng.uniform(lo, hi, shape).astype(np.float32))

    def conv(self, layout: Layout, kh, kw, cin, cout):
        return self.normal(layout.weight_shape(kh, kw, cin, cout), np.sqrt(2.0 / (kh * kw * cin)))

    def batch_norm(self, c):
        return {"gamma": self.uniform((c,), 0.5, 1.5), "beta": self.normal((c,), 0.1),
                "mean": self.normal((c,), 0.1), "var": self.uniform((c,), 0.5, 1.5)}


def conv(x, w, layout: Layout, stride=1, padding=None, groups=1):
    kh = w.shape[0] if layout.name == "nhwc" else w.shape[2]
    pad = kh // 2 if padding is None else padding
    return lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad), (pad, pad)],
                                    dimension_numbers=layout.dimension_numbers,
                                    feature_group_count=groups)


def batch_norm(x, p, layout: Layout, eps=1e-5):
    """Inference batch norm as the explicit affine chain Keras/Flax emit."""
    shape = [1] * x.ndim
    shape[layout.channel_axis] = -1
    r = lambda v: v.reshape(shape)
    return (x - r(p["mean"])) * lax.rsqrt(r(p["var"]) + eps) * r(p["gamma"]) + r(p["beta"])


def max_pool(x, layout: Layout, window=3, stride=2, pad=1):
    dims, strides, padding = [1] * 4, [1] * 4, [(0, 0)] * 4
    for a in layout.spatial_axes:
        dims[a], strides[a], padding[a] = window, stride, (pad, pad)
    return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, padding)


def global_avg_pool(x, layout: Layout):
    return jnp.mean(x, axis=layout.spatial_axes)


def count_flops(fn, *args) -> int:
    """2 x multiply-adds of every conv and dot in fn's traced program (nested bodies too)."""
    from alt_jax import jaxpr_pass

    total = 0
    for eqn in jaxpr_pass.walk(jax.make_jaxpr(fn)(*args)):
        out = eqn.outvars[0].aval if eqn.outvars else None
        if eqn.primitive is lax.conv_general_dilated_p:
            rhs = eqn.invars[1].aval
            o_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2 * int(np.prod(out.shape)) * int(np.prod(rhs.shape)) // rhs.shape[o_dim]
        elif eqn.primitive is lax.dot_general_p:
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2 * int(np.prod(out.shape)) * int(np.prod([lhs.shape[d] for d in lc]))
    return total

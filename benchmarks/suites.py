"""Op suites: single convs and matmuls as Models (weights are params, activations inputs),
so the runner treats an op and a network alike.

Entry points: SUITES (name -> builder), build_suite(name) -> [(Model, multiplicity)],
model_ops(model).
A model's suite is derived by tracing it: each unique conv/matmul with its multiplicity.
"""
from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alt_jax import jaxpr_pass
from alt_jax.ops.conv_common import read_conv
from alt_jax.ops.base import Unsupported
from benchmarks import models
from benchmarks.models.common import Model


@dataclasses.dataclass(frozen=True)
class Conv:
    """A 2-D conv workload in the literature's terms (batch 1)."""

    name: str
    c: int
    k: int
    hw: int
    kernel: int
    stride: int = 1
    pad: int | None = None
    groups: int = 1
    dilation: int = 1
    layout: str = "nhwc"

    def model(self) -> Model:
        rng = np.random.default_rng(0)
        pad = self.kernel // 2 if self.pad is None else self.pad
        cin = self.c // self.groups
        if self.layout == "nchw":
            x_shape, w_shape, dn = ((1, self.c, self.hw, self.hw),
                                    (self.k, cin, self.kernel, self.kernel),
                                    ("NCHW", "OIHW", "NCHW"))
        else:
            x_shape, w_shape, dn = ((1, self.hw, self.hw, self.c),
                                    (self.kernel, self.kernel, cin, self.k),
                                    ("NHWC", "HWIO", "NHWC"))
        w = rng.standard_normal(w_shape).astype(np.float32) / np.sqrt(cin * self.kernel ** 2)
        x = rng.standard_normal(x_shape).astype(np.float32)
        stride, dil, groups = self.stride, self.dilation, self.groups

        def apply(w, x):
            return lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                            rhs_dilation=(dil, dil), dimension_numbers=dn,
                                            feature_group_count=groups)
        return Model(f"{self.name} {self.layout.upper()}", apply, jnp.asarray(w),
                     (jnp.asarray(x),))


@dataclasses.dataclass(frozen=True)
class Matmul:
    name: str
    m: int
    k: int
    n: int
    batch: int = 0  # 0: plain 2-D

    def model(self) -> Model:
        rng = np.random.default_rng(0)
        lead = (self.batch,) if self.batch else ()
        a = rng.standard_normal(lead + (self.m, self.k)).astype(np.float32)
        b = (rng.standard_normal(lead + (self.k, self.n)) / np.sqrt(self.k)).astype(np.float32)
        return Model(self.name, lambda b, a: a @ b, jnp.asarray(b), (jnp.asarray(a),))


def _tbg() -> Model:
    """TBG: transpose + batched matmul of attention scores (seq 128, 12 heads, dim 64)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 128, 12, 64)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((1, 128, 12, 64)).astype(np.float32))
    return Model("TBG seq128 h12 d64", lambda k, q: jnp.einsum("bqhd,bkhd->bhqk", q, k), k, (q,))


# issue 2's list: the ResNet-50 conv layers in both program layouts, a depthwise conv,
# three matmuls.
_ISSUE2_CONVS = (Conv("3x3 64->64 @56", 64, 64, 56, 3), Conv("3x3 128->128 @28", 128, 128, 28, 3),
                 Conv("3x3 256->256 @14", 256, 256, 14, 3), Conv("3x3 512->512 @7", 512, 512, 7, 3),
                 Conv("1x1 256->64 @56", 256, 64, 56, 1),
                 Conv("7x7/2 3->64 @224", 3, 64, 224, 7, stride=2),
                 Conv("dw 3x3 C32 @112", 32, 32, 112, 3, groups=32))
_ISSUE2_MATMULS = (Matmul("matmul 1x768x3072", 1, 768, 3072),
                   Matmul("matmul 128x768x768", 128, 768, 768),
                   Matmul("matmul 512x1024x1024", 512, 1024, 1024))

# The single-op workloads of the Ansor / MetaSchedule evaluations that are 2-D convs or
# matmuls (C1D, C3D and T2D stay in XLA by design).
_LITERATURE = (Conv("C2D 7x7/2 3->64 @224", 3, 64, 224, 7, stride=2, pad=3),
               Conv("GRP 3x3/2 64->128 g4 @56", 64, 128, 56, 3, stride=2, pad=1, groups=4),
               Conv("DEP 3x3 C32 @112", 32, 32, 112, 3, pad=1, groups=32),
               Conv("DIL 7x7/2 d2 3->64 @224", 3, 64, 224, 7, stride=2, pad=3, dilation=2),
               Matmul("GMM 128x128x128", 128, 128, 128))


def _describe(eqn) -> str:
    if eqn.primitive is lax.conv_general_dilated_p:
        try:
            g = read_conv(eqn)
        except Unsupported:
            return f"conv {eqn.invars[0].aval.shape}x{eqn.invars[1].aval.shape}"
        kind = "dw " if g.groups == g.c and g.ci == 1 else (f"g{g.groups} " if g.groups > 1 else "")
        return (f"{kind}conv {g.kh}x{g.kw}/{g.stride[0]} {g.c}->{g.k} @{g.h}"
                + (f" d{g.dilation[0]}" if g.dilation[0] > 1 else ""))
    a, b = (v.aval.shape for v in eqn.invars)
    return f"dot {'x'.join(map(str, a))} . {'x'.join(map(str, b))}"


def model_ops(model: Model) -> list:
    """[(Model of one unique conv/matmul, multiplicity)] in first-seen order."""
    closed = jax.make_jaxpr(model.apply)(model.params, *model.inputs)
    seen: dict = collections.OrderedDict()
    for eqn in jaxpr_pass.walk(closed):
        if eqn.primitive not in (lax.conv_general_dilated_p, lax.dot_general_p):
            continue
        key = (eqn.primitive, tuple((v.aval.shape, str(v.aval.dtype)) for v in eqn.invars),
               tuple(sorted((k, repr(v)) for k, v in eqn.params.items())))
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [eqn, 1]
    out = []
    rng = np.random.default_rng(0)
    for eqn, count in seen.values():
        lhs, rhs = (jnp.asarray(rng.standard_normal(v.aval.shape).astype(np.float32) * 0.1)
                    for v in eqn.invars)
        apply = lambda w, x, eqn=eqn: jaxpr_pass.bind_eqn(eqn, [x, w])[0]
        out.append((Model(_describe(eqn), apply, rhs, (lhs,)), count))
    return out


def _from_model(name: str, **kwargs):
    return lambda: model_ops(models.build(name, **kwargs))


def _once(workloads):
    return [(w, 1) for w in workloads]


SUITES = {
    "issue2": lambda: _once([c.model() for conv in _ISSUE2_CONVS for c in
                             (conv, dataclasses.replace(conv, layout="nchw"))]
                            + [m.model() for m in _ISSUE2_MATMULS]),
    "literature": lambda: _once([w.model() for w in _LITERATURE] + [_tbg()]),
    "resnet50_convs": _from_model("resnet50", layout="nhwc"),
    "mobilenet_v2_convs": _from_model("mobilenet_v2", layout="nhwc"),
    "bert_matmuls": _from_model("bert_layer"),
}


def build_suite(name: str) -> list:
    """[(Model, how many times the op occurs in its network)] for the named suite."""
    try:
        return SUITES[name]()
    except KeyError:
        raise ValueError(f"unknown op suite {name!r}; choose from {sorted(SUITES)}") from None

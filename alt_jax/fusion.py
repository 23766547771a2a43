"""Finds the epilogue a conv/matmul kernel can absorb: the chain of per-channel affine steps,
an optional residual add and a pointwise activation that follow it in a flat jaxpr.

Entry points: find_epilogue(jaxpr, anchor, channel_axis, uses) -> EpilogueMatch | None,
uses_of(jaxpr), EpilogueMatch.scale_shift(values) (the folded per-channel vectors).
The activation is recognised by alt_jax.activations: a known spelling whose values agree
with the template's everywhere a wide probe looks (NaN, inf, float32 max included).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from alt_jax import activations, jaxpr_pass
from alt_jax.ops.epilogue import Epilogue

_AFFINE = {lax.add_p: "add", lax.sub_p: "sub", lax.mul_p: "mul", lax.div_p: "div"}
_MAX_REGION = 16        # pointwise equations an activation may take


@dataclasses.dataclass
class EpilogueMatch:
    eqns: list                  # absorbed equations, in program order
    affine: list                # [(kind, operand)] with kind in add/sub/mul/div, x op operand
    residual: Optional[object]  # a Var with the result's shape, or None
    activation: str
    out_var: object             # the value the fused kernel produces

    @property
    def epilogue(self) -> Epilogue:
        has_scale = any(k in ("mul", "div") for k, _ in self.affine)
        has_shift = any(k in ("add", "sub") for k, _ in self.affine)
        return Epilogue(scale=has_scale, shift=has_shift, residual=self.residual is not None,
                        activation=self.activation)

    def scale_shift(self, values, n_channels: int):
        """Folds the affine steps (operand values in order) into per-channel vectors:
        ((x op1 c1) op2 c2 ...) == x * scale + shift."""
        scale = jnp.ones((n_channels,), jnp.float32)
        shift = jnp.zeros((n_channels,), jnp.float32)
        for (kind, _), value in zip(self.affine, values):
            c = jnp.broadcast_to(jnp.reshape(jnp.asarray(value, jnp.float32), (-1,)),
                                 (n_channels,))
            if kind == "add":
                shift = shift + c
            elif kind == "sub":
                shift = shift - c
            elif kind == "mul":
                scale, shift = scale * c, shift * c
            else:
                scale, shift = scale / c, shift / c
        return scale, shift


def uses_of(jaxpr) -> dict:
    """var -> number of uses (equation operands, plus 1 per appearance as a jaxpr output)."""
    jaxpr = jaxpr_pass.open_jaxpr(jaxpr)
    uses: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                uses[v] = uses.get(v, 0) + 1
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            uses[v] = uses.get(v, 0) + 1
    return uses


def _is_scalar(v) -> bool:
    return isinstance(v, jcore.Literal) or int(np.prod(v.aval.shape)) == 1


def _per_channel(v, like, channel_axis: int) -> bool:
    if _is_scalar(v):
        return True
    shape, full = tuple(v.aval.shape), tuple(like.aval.shape)
    return (len(shape) == len(full) and shape[channel_axis] == full[channel_axis] and
            all(s == 1 for i, s in enumerate(shape) if i != channel_axis))


def find_epilogue(jaxpr, anchor, channel_axis: int, uses: dict,
                  taken: frozenset = frozenset()) -> Optional[EpilogueMatch]:
    """The longest fusable chain after anchor (a conv/dot equation) in flat jaxpr, or None.
    Equations whose id() is in `taken` belong to another group and end the chain."""
    eqns = jaxpr_pass.open_jaxpr(jaxpr).eqns
    start = next(i for i, e in enumerate(eqns) if e is anchor)
    consumers: dict = {}
    for e in eqns[start + 1:]:
        for v in e.invars:
            if isinstance(v, jcore.Var):
                consumers.setdefault(v, []).append(e)
    downstream = {anchor.outvars[0]}  # values that depend on the anchor (cycle guard)
    for e in eqns[start + 1:]:
        if any(v in downstream for v in e.invars if isinstance(v, jcore.Var)):
            downstream.update(e.outvars)

    def only_consumer(v):
        users = consumers.get(v, [])
        ok = len(users) == 1 and uses.get(v, 0) == 1 and id(users[0]) not in taken
        return users[0] if ok else None

    cur, absorbed, affine, residual = anchor.outvars[0], [], [], None
    while (e := only_consumer(cur)) is not None and e.primitive in _AFFINE:
        a, b = e.invars
        other = b if a is cur else a
        if other is cur or (isinstance(other, jcore.Var) and other in downstream):
            break
        kind = _AFFINE[e.primitive]
        if _per_channel(other, cur, channel_axis) and (kind in ("add", "mul") or a is cur):
            affine.append((kind, other))
        elif (kind == "add" and isinstance(other, jcore.Var)
              and tuple(other.aval.shape) == tuple(cur.aval.shape)):
            residual = other
        else:
            break
        absorbed.append(e)
        cur = e.outvars[0]
        if residual is not None:
            break

    # The pointwise region after cur: grow in program order while every equation reads
    # only region values and scalars; try the longest prefix that is a known activation.
    region, inside = [], {cur}
    for e in eqns[start + 1:]:
        if len(region) >= _MAX_REGION or id(e) in taken:
            break
        reads = [v for v in e.invars if isinstance(v, jcore.Var)]
        if not any(v in inside for v in reads):
            continue
        if not activations.is_pointwise(e) or not all(v in inside or _is_scalar(v) for v in reads):
            break
        region.append(e)
        inside.update(e.outvars)
    activation = "none"
    for n in range(len(region), 0, -1):
        prefix = region[:n]
        produced = {v for e in prefix for v in e.outvars} | {cur}
        inner_uses = {}
        for e in prefix:
            for v in e.invars:
                if isinstance(v, jcore.Var):
                    inner_uses[v] = inner_uses.get(v, 0) + 1
        last = prefix[-1].outvars[0]
        # every value made inside the region (and cur) is used only inside it, but the last
        if any(uses.get(v, 0) != inner_uses.get(v, 0) for v in produced if v is not last):
            continue
        name = activations.recognise(prefix, cur)
        if name is not None:
            activation, absorbed, cur = name, absorbed + prefix, last
            break
    if not absorbed:
        return None
    return EpilogueMatch(absorbed, affine, residual, activation, cur)

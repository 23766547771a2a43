"""Layout propagation over a flat jaxpr: which layout every value is kept in, and where a
conversion is needed. A value's layout is an alt_jax.layout.Layout over its own axes, named
by role where a kernel gave it one (N C H W for a conv's result, in the value's axis order),
or None: the logical layout, as the program wrote it. Kernels write the layout the planner
chose (channels-last by the fixed rule, N C/8 H W 8c when the graph tuner says so);
elementwise ops, pools, reductions, pads and concatenations run on the laid-out arrays where
the layout lets them (their small broadcast operands follow); everything else, and the
program's outputs, get one conversion back to the logical layout.

Entry points: Propagation(flat, groups, skipped).run(decide) -> itself, where
decide(anchor eqn, layout of its lhs) -> (layout the kernel reads, layout it writes);
.layout(var), .replacements (id(eqn) -> Replacement), .finish(outs), .conversions,
.kernel_in / .kernel_out (id(anchor) -> layout); convert(x, src, dst); role_names;
channels_last(eqn); blocked(eqn, block); LAYOUT_CHOICES and choice_layout(eqn, name);
spec_layout(layout, roles, names, shape); describe(layout).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from alt_jax import jaxpr_pass
from alt_jax import layout as L

_ELEMENTWISE = {lax.add_p, lax.sub_p, lax.mul_p, lax.div_p, lax.max_p, lax.min_p, lax.neg_p,
                lax.exp_p, lax.tanh_p, lax.logistic_p, lax.erf_p, lax.integer_pow_p, lax.pow_p,
                lax.sqrt_p, lax.rsqrt_p, lax.abs_p, lax.convert_element_type_p, lax.select_n_p,
                lax.sign_p, lax.log_p, lax.clamp_p}
_WINDOWED = {lax.reduce_window_max_p, lax.reduce_window_min_p, lax.reduce_window_sum_p}
_REDUCE = {lax.reduce_sum_p, lax.reduce_max_p, lax.reduce_min_p}
_WINDOW_PARAMS = ("window_dimensions", "window_strides", "padding", "base_dilation",
                  "window_dilation")
_TRIVIAL_WINDOW = {"window_dimensions": 1, "window_strides": 1, "padding": (0, 0),
                   "base_dilation": 1, "window_dilation": 1}


def convert(x, src: Optional[L.Layout], dst: Optional[L.Layout]):
    """A value kept in src, as dst (None = the logical layout): one jnp transform."""
    if src == dst:
        return x
    if src is None:
        return dst.apply(x)
    if dst is None:
        return src.invert(x)
    if (src.names, src.shape) == (dst.names, dst.shape):
        return L.convert(src, dst)(x)
    return dst.apply(src.invert(x))  # the same axes, named by different roles


def role_names(positions, roles: str = "NCHW") -> tuple:
    """The role of each array axis from dimension-number positions (roles[i] at axis
    positions[i]): (0, 3, 1, 2) -> N H W C."""
    names = [""] * len(positions)
    for role, axis in zip(roles, positions):
        names[axis] = role
    return tuple(names)


def _out_roles(eqn) -> Optional[tuple]:
    if eqn.primitive is not lax.conv_general_dilated_p:
        return None
    spec = eqn.params["dimension_numbers"].out_spec
    return role_names(spec) if len(spec) == 4 else None


def channels_last(eqn) -> Optional[L.Layout]:
    """A 2-D conv's result kept as N H W C whatever its logical order (the fixed rule);
    None (logical) for other kernels."""
    roles = _out_roles(eqn)
    if roles is None:
        return None
    out = L.Layout(roles, eqn.outvars[0].aval.shape).reorder("N", "H", "W", "C")
    return None if out.permutation == tuple(range(4)) else out


def blocked(eqn, block: int) -> Optional[L.Layout]:
    """A 2-D conv's result kept as N C/block H W block·c; None when its channels are not a
    multiple of block (padded channels would have to stay zero between kernels)."""
    roles = _out_roles(eqn)
    if roles is None or eqn.outvars[0].aval.shape[roles.index("C")] % block:
        return None
    return L.channel_blocked(L.Layout(roles, eqn.outvars[0].aval.shape), "C", block)


# What the graph level may choose for a 2-D conv's result (PlanOptions.layout_plan).
LAYOUT_CHOICES = ("logical", "NHWC", "NC8", "NC16")


def choice_layout(eqn, choice: str) -> Optional[L.Layout]:
    """The layout a LAYOUT_CHOICES name stands for at a 2-D conv's result; a blocked choice
    the channels do not divide falls back to channels-last."""
    if choice == "logical":
        return None
    if choice in ("NC8", "NC16"):
        out = blocked(eqn, int(choice[2:]))
        if out is not None:
            return out
    return channels_last(eqn)


def spec_layout(value_layout: Optional[L.Layout], roles: tuple, names: str,
                shape) -> Optional[L.Layout]:
    """A kernel operand's layout over its canonical names (N C H W) from the value's
    layout, when the value's axes carry the roles the kernel gives them; the logical
    layout's when value_layout is None; None when the roles disagree (convert first)."""
    if value_layout is None:
        return L.permuted(names, [roles.index(n) for n in names],
                          [shape[roles.index(n)] for n in names])
    if value_layout.names != tuple(roles):
        return None
    return value_layout.with_logical_order(names)


def describe(layout: Optional[L.Layout]) -> str:
    """NHWC for a permutation, N C/8 H W 8c otherwise, "logical" for None."""
    if layout is None:
        return "logical"
    return "".join(layout.dims) if layout.permutation is not None else str(layout)


@dataclasses.dataclass
class Conversion:
    where: str     # the equation (or "output") that needed it
    shape: tuple
    src: Optional[L.Layout]
    dst: Optional[L.Layout]
    site: Any = None  # id(eqn) that needed it, or ("output", i): the graph tuner's key

    def __str__(self):
        return f"{self.shape} kept as {describe(self.src)} -> {describe(self.dst)}"

    @property
    def bytes(self) -> int:
        return 4 * math.prod(self.shape)


class Propagation:
    """One forward pass over the flat jaxpr's top level, in program order."""

    def __init__(self, flat, groups: dict, skipped: set, residuals: Optional[dict] = None):
        # groups: id(anchor conv eqn) -> out var the kernel produces (the group's last value)
        # skipped: ids of equations a group computes (not evaluated on their own)
        # residuals: id(anchor) -> the var its fused epilogue adds (read in the out layout)
        self.jaxpr = jaxpr_pass.open_jaxpr(flat)
        self.groups, self.skipped = groups, skipped
        self.residuals = residuals or {}
        # var -> id(anchor) whose written layout the value carries (through elementwise ops,
        # pools, reductions, pads, concatenations): the graph tuner's dependency structure
        self.source: dict = {}
        self.site_vars: dict = {}  # site -> the vars read there (their sources decide it)
        self._site = None
        self.layouts: dict = {}
        self.replacements: dict = {}
        self.conversions: list = []
        self.kernel_in: dict = {}   # id(anchor) -> layout its lhs is read in (None: logical)
        self.kernel_out: dict = {}  # id(anchor) -> layout it writes

    def layout(self, v) -> Optional[L.Layout]:
        if isinstance(v, jcore.Literal):
            return None
        return self.layouts.get(v)

    def _convert_at(self, where: str, v, src, dst, site=None) -> None:
        if src != dst:
            self.conversions.append(Conversion(where, tuple(v.aval.shape), src, dst,
                                               site if site is not None else self._site))

    def _sources_of(self, eqn, site) -> None:
        self._site = site
        self.site_vars[site] = [v for v in eqn.invars if isinstance(v, jcore.Var)]

    def _inherit(self, out, v) -> None:
        if isinstance(v, jcore.Var) and v in self.source:
            self.source[out] = self.source[v]

    def run(self, decide: Callable) -> "Propagation":
        for eqn in self.jaxpr.eqns:
            if id(eqn) in self.groups:
                out_var = self.groups[id(eqn)]
                lhs, rhs = eqn.invars[0], eqn.invars[1]
                residual = self.residuals.get(id(eqn))
                self._site = id(eqn)
                self.site_vars[id(eqn)] = [v for v in (lhs, rhs, residual)
                                           if isinstance(v, jcore.Var)]
                have = self.layout(lhs)
                read, write = decide(eqn, have)
                self._convert_at(eqn.primitive.name, lhs, have, read)
                self._convert_at(eqn.primitive.name, rhs, self.layout(rhs), None)
                self.kernel_in[id(eqn)], self.kernel_out[id(eqn)] = read, write
                if write is not None:
                    self.layouts[out_var] = write
                self.source[out_var] = id(eqn)
            elif id(eqn) in self.skipped:
                continue
            else:
                self._sources_of(eqn, id(eqn))
                self._plan_eqn(eqn)
        # a fused epilogue reads its residual in the layout its kernel writes; the group
        # runs where its last member stood, so the residual may come from a later kernel
        # than the anchor: its layout is known only now
        for eqn in self.jaxpr.eqns:
            residual = self.residuals.get(id(eqn))
            if residual is not None:
                self._convert_at(f"{eqn.primitive.name} residual", residual,
                                 self.layout(residual), self.kernel_out.get(id(eqn)),
                                 site=id(eqn))
        for i, v in enumerate(self.jaxpr.outvars):
            if isinstance(v, jcore.Var):
                self.site_vars[("output", i)] = [v]
                self._convert_at("output", v, self.layout(v), None, site=("output", i))
        return self

    def finish(self, outs) -> list:
        """The program's outputs converted to their logical layouts."""
        return [x if isinstance(v, jcore.Literal) else convert(x, self.layout(v), None)
                for v, x in zip(self.jaxpr.outvars, outs)]

    # -- per equation -----------------------------------------------------------------------
    def _plan_eqn(self, eqn) -> None:
        layouts = [self.layout(v) for v in eqn.invars]
        if all(lay is None for lay in layouts):
            # nothing laid out flows in: the equation runs as written; a value a layout
            # would flow through still names its source (another plan may lay it out)
            if eqn.outvars and (eqn.primitive in _ELEMENTWISE | _WINDOWED | _REDUCE
                                | {lax.concatenate_p, lax.pad_p}
                                or self._pointwise_call(eqn)):
                self._inherit(eqn.outvars[0], next(
                    (v for v in eqn.invars if isinstance(v, jcore.Var) and v in self.source),
                    None))
            return
        if eqn.primitive in _ELEMENTWISE or self._pointwise_call(eqn):
            self._elementwise(eqn)
        elif eqn.primitive in _WINDOWED and len(eqn.invars) == 1:
            self._windowed(eqn)
        elif eqn.primitive in _REDUCE:
            self._reduce(eqn)
        elif eqn.primitive is lax.concatenate_p:
            self._concatenate(eqn)
        elif eqn.primitive is lax.pad_p:
            self._pad(eqn)
        else:
            self._to_logical(eqn)

    @staticmethod
    def _pointwise_call(eqn) -> bool:
        if eqn.primitive is not P.custom_jvp_call_p or len(eqn.invars) != 1:
            return False
        body = jaxpr_pass.open_jaxpr(eqn.params["call_jaxpr"])
        return _pointwise_body(body, set(body.invars))

    def _elementwise(self, eqn) -> None:
        out_shape = tuple(eqn.outvars[0].aval.shape)
        full = [isinstance(v, jcore.Var) and tuple(v.aval.shape) == out_shape
                and len(out_shape) > 0 for v in eqn.invars]
        target = next((self.layout(v) for v, f in zip(eqn.invars, full)
                       if f and self.layout(v) is not None), None)
        if target is None or any(not f and isinstance(v, jcore.Var) and v.aval.shape
                                 for v, f in zip(eqn.invars, full)):
            return self._to_logical(eqn)  # (lax's elementwise operands are full or scalar)
        plans = []
        for v, f in zip(eqn.invars, full):
            if not f:
                plans.append(None)  # a scalar
                continue
            self._convert_at(eqn.primitive.name, v, self.layout(v), target)
            plans.append((self.layout(v), target))
        self.layouts[eqn.outvars[0]] = target
        self._inherit(eqn.outvars[0], next(v for v, f in zip(eqn.invars, full)
                                           if f and self.layout(v) == target))

        def run(invals, eqn=eqn, plans=plans, target=target):
            ins = [x if plan is None else convert(x, *plan) for x, plan in zip(invals, plans)]
            if eqn.primitive is P.custom_jvp_call_p:
                return [_pointwise_call_on(eqn, ins[0], target)]
            return jaxpr_pass.bind_eqn(eqn, ins)
        self.replacements[id(eqn)] = run

    def _physical_params(self, lay: L.Layout, per_axis: dict, trivial: dict):
        """Per-logical-axis params as per-physical-dim ones; None when a dim that mixes or
        splits logical axes has a non-trivial value (a window across a channel block)."""
        if lay.block_strides is None or any(len(o) != 1 for o in lay.origins()):
            return None
        out = {name: [] for name in per_axis}
        for origin, dim in zip(lay.origins(), lay.dims):
            (axis_name,) = origin  # block_strides: every physical dim has one origin
            axis = lay.names.index(axis_name)
            for name, values in per_axis.items():
                value = values[axis]
                if dim != axis_name and value != trivial[name]:
                    return None
                out[name].append(value if dim == axis_name else trivial[name])
        return {name: tuple(v) for name, v in out.items()}

    def _windowed(self, eqn) -> None:
        lay = self.layout(eqn.invars[0])
        per_axis = {n: tuple(eqn.params[n]) for n in _WINDOW_PARAMS
                    if eqn.params.get(n) is not None}
        phys = self._physical_params(lay, per_axis, _TRIVIAL_WINDOW)
        if phys is None:
            return self._to_logical(eqn)
        params = dict(eqn.params, **phys)
        self.layouts[eqn.outvars[0]] = L.Layout(lay.names, eqn.outvars[0].aval.shape,
                                                lay.primitives)
        self._inherit(eqn.outvars[0], eqn.invars[0])
        self.replacements[id(eqn)] = lambda invals, eqn=eqn, params=params: [
            eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))]

    def _reduce(self, eqn) -> None:
        lay = self.layout(eqn.invars[0])
        reduced = {lay.names[a] for a in eqn.params["axes"]}
        if lay.block_strides is None or any(len(o) != 1 for o in lay.origins()):
            return self._to_logical(eqn)
        origins = [next(iter(o)) for o in lay.origins()]
        axes = tuple(i for i, o in enumerate(origins) if o in reduced)
        kept = [n for n in lay.names if n not in reduced]
        out_shape = tuple(eqn.outvars[0].aval.shape)
        # the result: the kept axes, split and ordered as they were
        result = L.Layout(kept, out_shape, tuple(
            p for p in lay.primitives if isinstance(p, L.Split) and p.dim in kept))
        phys = [d for d, o in zip(lay.dims, origins) if o not in reduced]
        if sorted(result.dims) != sorted(phys):
            return self._to_logical(eqn)
        result = result.reorder(*phys) if result.dims != tuple(phys) else result
        self.layouts[eqn.outvars[0]] = None if result.permutation == tuple(
            range(len(kept))) else result
        self._inherit(eqn.outvars[0], eqn.invars[0])
        params = dict(eqn.params, axes=axes)
        self.replacements[id(eqn)] = lambda invals, eqn=eqn, params=params: [
            eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))]

    def _same_chain(self, eqn, shapes_ok: Callable) -> Optional[L.Layout]:
        """The layout every array operand shares (same names and primitives), if any."""
        lays = [self.layout(v) for v in eqn.invars]
        first = lays[0]
        if first is None or first.block_strides is None or any(
                len(o) != 1 for o in first.origins()) or not all(
                lay is not None and lay.names == first.names
                and lay.primitives == first.primitives for lay in lays):
            return None
        return first if shapes_ok(first) else None

    def _concatenate(self, eqn) -> None:
        """Along an unsplit axis, or along a channel block when every operand's channels are
        whole blocks: the blocks of one operand, then the next's (DenseNet's concat)."""
        axis = eqn.params["dimension"]

        def aligned(lay):
            name = lay.names[axis]
            block = lay.block_strides[name][0]
            return all(v.aval.shape[axis] % block == 0 for v in eqn.invars)
        lay = self._same_chain(eqn, aligned)
        if lay is None:
            return self._to_logical(eqn)
        name = lay.names[axis]
        outer = next(i for i, (o, d) in enumerate(zip(lay.origins(), lay.dims))
                     if name in o and (d == name or d.startswith(f"{name}/")))
        out = L.Layout(lay.names, eqn.outvars[0].aval.shape, lay.primitives)
        self.layouts[eqn.outvars[0]] = out
        self._inherit(eqn.outvars[0], eqn.invars[0])
        self.replacements[id(eqn)] = lambda invals, outer=outer: [
            lax.concatenate(list(invals), outer)]

    def _pad(self, eqn) -> None:
        lay = self.layout(eqn.invars[0])
        if lay is None or lay.block_strides is None or self.layout(eqn.invars[1]) is not None:
            return self._to_logical(eqn)
        config = tuple(tuple(c) for c in eqn.params["padding_config"])
        phys = self._physical_params(lay, {"padding_config": config},
                                     {"padding_config": (0, 0, 0)})
        if phys is None:
            return self._to_logical(eqn)
        self.layouts[eqn.outvars[0]] = L.Layout(lay.names, eqn.outvars[0].aval.shape,
                                                lay.primitives)
        self._inherit(eqn.outvars[0], eqn.invars[0])
        self.replacements[id(eqn)] = lambda invals, cfg=phys["padding_config"]: [
            lax.pad(invals[0], invals[1], cfg)]

    def _to_logical(self, eqn) -> None:
        plans = []
        for v in eqn.invars:
            lay = self.layout(v)
            self._convert_at(eqn.primitive.name, v, lay, None)
            plans.append(lay)
        self.replacements[id(eqn)] = lambda invals, eqn=eqn, plans=plans: jaxpr_pass.bind_eqn(
            eqn, [convert(x, lay, None) for x, lay in zip(invals, plans)])


def _pointwise_body(body, derived: set) -> bool:
    """Whether body computes each element from the same element of the values in `derived`
    alone, so that running it on a laid-out array lays out its result: only elementwise
    primitives (through nested jit bodies too), and every operand of rank > 0 comes from
    `derived` (a closed-over full-size constant, or a value from a transpose or reduction,
    would be combined with the laid-out array position by position: a wrong result)."""
    for e in body.eqns:
        ins = [v for v in e.invars if isinstance(v, jcore.Var)]
        if any(v not in derived and len(v.aval.shape) > 0 for v in ins):
            return False
        if e.primitive is P.jit_p:
            inner = jaxpr_pass.open_jaxpr(e.params["jaxpr"])
            inner_derived = {iv for iv, ov in zip(inner.invars, e.invars) if ov in derived}
            if not _pointwise_body(inner, inner_derived):
                return False
        elif e.primitive not in _ELEMENTWISE:
            return False
        derived.update(e.outvars)
    return True


def _pointwise_call_on(eqn, x, layout):
    """A pointwise custom_jvp call (e.g. jax.nn.relu) applied to a laid-out array: the
    primal runs its body on the physical array; the derivative is the original rule's,
    taken on the logical layout, so layouts never change gradients."""
    body = eqn.params["call_jaxpr"]

    def on_physical(xp):
        return jaxpr_pass.evaluate(body, jaxpr_pass.jaxpr_consts(body), [xp], {}, inline=True)[0]

    def original(xp):  # physical in and out, through the original call on the logical layout
        return convert(jaxpr_pass.bind_eqn(eqn, [convert(xp, layout, None)])[0], None, layout)

    return jaxpr_pass.differentiable_as(on_physical, original)(x)

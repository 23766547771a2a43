"""Layout propagation over a flat jaxpr: which physical layout every value is kept in, and
where a conversion is needed. Layouts here are permutations of a value's logical axes
(physical = transpose(logical, perm)); conv kernels read any permutation and write
channels-last, elementwise ops, pools and reductions run on the permuted arrays (their small
broadcast operands are transposed instead), and everything else, and the program's outputs,
get one conversion back to the logical layout.

Entry points: Propagation(flat, kernel_groups).run(conv_out_perm) -> itself;
.perm(var), .replacements (id(eqn) -> Replacement), .finish(outs), .conversions,
.kernel_eqn_view(eqn) (a conv equation as its kernel sees the physical arrays).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from alt_jax import jaxpr_pass

_ELEMENTWISE = {lax.add_p, lax.sub_p, lax.mul_p, lax.div_p, lax.max_p, lax.min_p, lax.neg_p,
                lax.exp_p, lax.tanh_p, lax.logistic_p, lax.erf_p, lax.integer_pow_p, lax.pow_p,
                lax.sqrt_p, lax.rsqrt_p, lax.abs_p, lax.convert_element_type_p, lax.select_n_p,
                lax.sign_p, lax.log_p, lax.clamp_p}
_WINDOWED = {lax.reduce_window_max_p, lax.reduce_window_min_p, lax.reduce_window_sum_p}
_REDUCE = {lax.reduce_sum_p, lax.reduce_max_p, lax.reduce_min_p}
_WINDOW_PARAMS = ("window_dimensions", "window_strides", "padding", "base_dilation",
                  "window_dilation")


def _identity(ndim: int) -> tuple:
    return tuple(range(ndim))


def convert(x, src: tuple, dst: tuple):
    """A physical array kept in perm src, as perm dst: one transpose, never two."""
    if src == dst:
        return x
    return jnp.transpose(x, [src.index(a) for a in dst])


def channels_last(out_spec) -> tuple:
    """The perm that keeps a 2-D conv result as (N, H, W, C) whatever its logical order
    (other ranks keep their logical layout: no kernel takes them)."""
    if len(out_spec) != 4:
        return _identity(len(out_spec))
    n, c, h, w = out_spec
    return (n, h, w, c)


@dataclasses.dataclass
class Conversion:
    where: str     # the equation (or "output") that needed it
    shape: tuple
    src: tuple
    dst: tuple


class Propagation:
    """One forward pass over the flat jaxpr's top level, in program order."""

    def __init__(self, flat, groups: dict, skipped: set):
        # groups: id(anchor conv eqn) -> out var the kernel produces (the group's last value)
        # skipped: ids of equations a group computes (not evaluated on their own)
        self.jaxpr = jaxpr_pass.open_jaxpr(flat)
        self.groups, self.skipped = groups, skipped
        self.perms: dict = {}
        self.replacements: dict = {}
        self.conversions: list = []
        self.kernel_in_perm: dict = {}   # id(anchor) -> perm of its lhs as the kernel reads it
        self.kernel_out_perm: dict = {}  # id(anchor) -> perm the kernel writes

    def perm(self, v) -> tuple:
        if isinstance(v, jcore.Literal):
            return _identity(len(v.aval.shape))
        return self.perms.get(v, _identity(len(v.aval.shape)))

    def run(self, choose_out_perm: Callable) -> "Propagation":
        for eqn in self.jaxpr.eqns:
            if id(eqn) in self.groups:
                out_var = self.groups[id(eqn)]
                self.kernel_in_perm[id(eqn)] = self._kernel_reads(eqn)
                perm = choose_out_perm(eqn)
                self.kernel_out_perm[id(eqn)] = perm
                self.perms[out_var] = perm
            elif id(eqn) in self.skipped:
                continue
            else:
                self._plan_eqn(eqn)
        for v in self.jaxpr.outvars:
            if isinstance(v, jcore.Var) and self.perm(v) != _identity(len(v.aval.shape)):
                self.conversions.append(Conversion("output", tuple(v.aval.shape), self.perm(v),
                                                   _identity(len(v.aval.shape))))
        return self

    def _kernel_reads(self, eqn) -> tuple:
        """The perm a group's kernel reads its lhs in: a 2-D conv reads its lhs in whatever
        layout it is kept (kernel_eqn_view renames the axes); every other kernel (matmul,
        other conv ranks) reads the logical layout, so a permuted lhs is converted back,
        as is a permuted rhs (weights are always read logically)."""
        lhs_perm = self.perm(eqn.invars[0])
        reads_any = (eqn.primitive is lax.conv_general_dilated_p
                     and len(eqn.params["dimension_numbers"].lhs_spec) == 4)
        wanted = lhs_perm if reads_any else _identity(len(lhs_perm))
        for v, want in zip(eqn.invars[:2], (wanted, None)):
            have = self.perm(v)
            want = _identity(len(have)) if want is None else want
            if have != want:
                self.conversions.append(Conversion(eqn.primitive.name, tuple(v.aval.shape),
                                                   have, want))
        return wanted

    def finish(self, outs) -> list:
        """The program's outputs converted to their logical layouts."""
        return [x if isinstance(v, jcore.Literal) else
                convert(x, self.perm(v), _identity(len(v.aval.shape)))
                for v, x in zip(self.jaxpr.outvars, outs)]

    # -- per equation -----------------------------------------------------------------------
    def _plan_eqn(self, eqn) -> None:
        perms = [self.perm(v) for v in eqn.invars]
        if all(p == _identity(len(p)) for p in perms):
            return  # nothing permuted flows in: the equation runs as written
        if eqn.primitive in _ELEMENTWISE or self._pointwise_call(eqn):
            self._elementwise(eqn)
        elif eqn.primitive in _WINDOWED and len(eqn.invars) == 1:
            self._windowed(eqn)
        elif eqn.primitive in _REDUCE:
            self._reduce(eqn)
        else:
            self._to_logical(eqn)

    @staticmethod
    def _pointwise_call(eqn) -> bool:
        if eqn.primitive is not P.custom_jvp_call_p or len(eqn.invars) != 1:
            return False
        body = jaxpr_pass.open_jaxpr(eqn.params["call_jaxpr"])
        return _pointwise_body(body, set(body.invars))

    def _full(self, eqn):
        out_shape = tuple(eqn.outvars[0].aval.shape)
        return [isinstance(v, jcore.Var) and tuple(v.aval.shape) == out_shape
                and len(out_shape) > 0 for v in eqn.invars]

    def _elementwise(self, eqn) -> None:
        full = self._full(eqn)
        target = next((self.perm(v) for v, f in zip(eqn.invars, full)
                       if f and self.perm(v) != _identity(len(self.perm(v)))), None)
        if target is None:
            return self._to_logical(eqn)
        where = f"{eqn.primitive.name}"
        plans = []
        for v, f in zip(eqn.invars, full):
            p = self.perm(v)
            if isinstance(v, jcore.Literal) or len(v.aval.shape) == 0:
                plans.append(None)
            elif f:
                if p != target:
                    self.conversions.append(Conversion(where, tuple(v.aval.shape), p, target))
                plans.append((p, target))
            else:  # a broadcast operand (size-1 dims): transposing it is cheap
                plans.append((p, target))
        self.perms[eqn.outvars[0]] = target

        def run(invals, eqn=eqn, plans=plans, target=target):
            ins = [x if plan is None else convert(x, *plan) for x, plan in zip(invals, plans)]
            if eqn.primitive is P.custom_jvp_call_p:
                return [_pointwise_call_on(eqn, ins[0], target)]
            return jaxpr_pass.bind_eqn(eqn, ins)
        self.replacements[id(eqn)] = run

    def _windowed(self, eqn) -> None:
        p = self.perm(eqn.invars[0])
        params = dict(eqn.params)
        for name in _WINDOW_PARAMS:
            if name in params and params[name] is not None:
                params[name] = tuple(params[name][a] for a in p)
        self.perms[eqn.outvars[0]] = p
        self.replacements[id(eqn)] = lambda invals, eqn=eqn, params=params: [
            eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))]

    def _reduce(self, eqn) -> None:
        p = self.perm(eqn.invars[0])
        axes = tuple(sorted(p.index(a) for a in eqn.params["axes"]))
        kept = [a for a in p if a not in eqn.params["axes"]]
        # the result's logical axes are the kept ones renumbered in logical order
        rank = {a: i for i, a in enumerate(sorted(kept))}
        self.perms[eqn.outvars[0]] = tuple(rank[a] for a in kept)
        params = dict(eqn.params, axes=axes)
        self.replacements[id(eqn)] = lambda invals, eqn=eqn, params=params: [
            eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))]

    def _to_logical(self, eqn) -> None:
        plans = []
        for v in eqn.invars:
            p = self.perm(v)
            if isinstance(v, jcore.Literal) or p == _identity(len(p)):
                plans.append(None)
            else:
                self.conversions.append(Conversion(eqn.primitive.name, tuple(v.aval.shape), p,
                                                   _identity(len(p))))
                plans.append((p, _identity(len(p))))
        self.replacements[id(eqn)] = lambda invals, eqn=eqn, plans=plans: jaxpr_pass.bind_eqn(
            eqn, [x if plan is None else convert(x, *plan) for x, plan in zip(invals, plans)])

    # -- kernels ----------------------------------------------------------------------------
    def kernel_eqn_view(self, eqn, in_perm: tuple, out_perm: tuple):
        """A conv equation as its kernel sees the physical arrays: dimension numbers point at
        the physical axes; shapes are the physical ones (for the family's match())."""
        dn = eqn.params["dimension_numbers"]
        lhs_spec = tuple(in_perm.index(a) for a in dn.lhs_spec)
        out_spec = tuple(out_perm.index(a) for a in dn.out_spec)
        new_dn = lax.ConvDimensionNumbers(lhs_spec, tuple(dn.rhs_spec), out_spec)
        lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
        out = eqn.outvars[0].aval
        phys = lambda aval, perm: types.SimpleNamespace(
            aval=jax.core.ShapedArray(tuple(aval.shape[a] for a in perm), aval.dtype))
        return types.SimpleNamespace(
            primitive=eqn.primitive, params=dict(eqn.params, dimension_numbers=new_dn),
            invars=[phys(lhs, in_perm), types.SimpleNamespace(aval=rhs)],
            outvars=[phys(out, out_perm)])


def _pointwise_body(body, derived: set) -> bool:
    """Whether body computes each element from the same element of the values in `derived`
    alone, so that running it on a permuted array permutes its result: only elementwise
    primitives (through nested jit bodies too), and every operand of rank > 0 comes from
    `derived` (a closed-over full-size constant, or a value from a transpose or reduction,
    would be combined with the permuted array position by position: a wrong result)."""
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


def _pointwise_call_on(eqn, x, perm):
    """A pointwise custom_jvp call (e.g. jax.nn.relu) applied to a permuted array: the primal
    runs its body on the physical array; the derivative is the original rule's, taken on the
    logical layout, so permuting never changes gradients."""
    body = eqn.params["call_jaxpr"]
    logical = tuple(range(len(perm)))

    def on_physical(xp):
        return jaxpr_pass.evaluate(body, jaxpr_pass.jaxpr_consts(body), [xp], {}, inline=True)[0]

    def original(xp):  # physical in and out, through the original call on the logical layout
        return convert(jaxpr_pass.bind_eqn(eqn, [convert(xp, perm, logical)])[0], logical, perm)

    return jaxpr_pass.differentiable_as(on_physical, original)(x)

"""Re-evaluates a jaxpr with planned equations replaced by kernel calls.

Entry points: evaluate(jaxpr, consts, args, replacements), Group, SKIP, inline_calls(closed),
differentiable_as(primal, original), subjaxprs(eqn), walk(jaxpr); for the modules that read
jaxprs on both jax versions: open_jaxpr(jaxpr), jaxpr_consts(jaxpr), bind_eqn(eqn, invals).
Shaped like jax.core.eval_jaxpr: an environment, one loop over equations, higher-order
rules keyed by primitive object; every other equation is re-bound unchanged. Works on
jax 0.10 (ClosedJaxpr) and 0.12 (Jaxpr with .consts): sub-jaxprs are read through
`open_jaxpr` / `jaxpr_consts`, and primitives are matched by identity, never by name.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

# A replacement computes an equation's outputs (a list) from its input values.
Replacement = Callable[[Sequence[Any]], Sequence[Any]]


class _Skip:
    """Marks an equation a Group computes elsewhere (it is not evaluated on its own)."""

    def __repr__(self):
        return "SKIP"


SKIP = _Skip()


class Group:
    """Several equations computed by one call: placed at the group's last equation (so
    every input exists by then), reading `invars` and writing `outvars`; the group's other
    equations are mapped to SKIP."""

    def __init__(self, invars, outvars, fn: Replacement):
        self.invars, self.outvars, self.fn = list(invars), list(outvars), fn


def open_jaxpr(jaxpr):
    """The open Jaxpr of a ClosedJaxpr (0.10) or Jaxpr (0.12, where .jaxpr is itself)."""
    return getattr(jaxpr, "jaxpr", jaxpr)


def jaxpr_consts(jaxpr) -> list:
    """The constants of a ClosedJaxpr (0.10) or Jaxpr (0.12); [] for an open jaxpr."""
    return list(getattr(jaxpr, "consts", ()) or ())


def subjaxprs(eqn) -> list:
    """The (closed or open) jaxprs an equation carries in its params, in a fixed order."""
    found = []
    for value in eqn.params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr)):
                found.append(v)
    return found


def walk(jaxpr) -> Iterator:
    """Every equation of jaxpr and of all nested jaxprs, depth first."""
    for eqn in open_jaxpr(jaxpr).eqns:
        yield eqn
        for sub in subjaxprs(eqn):
            yield from walk(sub)


def evaluate(jaxpr, consts: Sequence, args: Sequence,
             replacements: Mapping[int, Any], inline: bool = False) -> list:
    """Outputs of jaxpr on args, with equations whose id() is in replacements rewritten.

    A replacement is a Replacement (the equation's outputs from its inputs), a Group (placed
    at its last equation), or SKIP. inline=True also inlines every jit / closed_call body.
    """
    jaxpr = open_jaxpr(jaxpr)
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def write(v, value):
        if not isinstance(v, jcore.DropVar):
            env[v] = value

    for v, value in zip(jaxpr.constvars, consts):
        write(v, value)
    for v, value in zip(jaxpr.invars, args):
        write(v, value)
    for eqn in jaxpr.eqns:
        replace = replacements.get(id(eqn))
        if replace is SKIP:
            continue
        if isinstance(replace, Group):
            for v, value in zip(replace.outvars, replace.fn([read(v) for v in replace.invars])):
                write(v, value)
            continue
        invals = [read(v) for v in eqn.invars]
        if replace is not None:
            outvals = list(replace(invals))
        elif inline and eqn.primitive in _INLINED:
            outvals = list(_fn_inline(eqn.params[_INLINED[eqn.primitive]])(*invals))
        elif eqn.primitive in _HIGHER_ORDER and _contains(eqn, replacements):
            outvals = list(_HIGHER_ORDER[eqn.primitive](eqn, invals, replacements))
        else:
            outvals = bind_eqn(eqn, invals)
        for v, value in zip(eqn.outvars, outvals):
            write(v, value)
    return [read(v) for v in jaxpr.outvars]


def bind_eqn(eqn, invals) -> list:
    """eqn's primitive applied to invals with eqn's params and context: its outputs, a list."""
    params = eqn.primitive.get_bind_params(eqn.params)  # one dict on jax 0.10 and 0.12
    with eqn.ctx.manager:  # keeps the equation's context (e.g. attached compute settings)
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _contains(eqn, replacements) -> bool:
    """Whether any equation nested in eqn is replaced (otherwise re-bind it untouched)."""
    return any(id(e) in replacements for sub in subjaxprs(eqn) for e in walk(sub))


def _fn(jaxpr, replacements) -> Callable:
    """jaxpr (closed) as a function of its non-const inputs, with replacements."""
    return lambda *args: evaluate(jaxpr, jaxpr_consts(jaxpr), args, replacements)


def _fn_inline(jaxpr) -> Callable:
    return lambda *args: evaluate(jaxpr, jaxpr_consts(jaxpr), args, {}, inline=True)


def inline_calls(closed):
    """closed re-traced with every jit / closed_call body inlined: one flat level, so that
    fusion and layout propagation see a model body that a jax.jit wrapper nests. Constants
    (closed-over arrays, e.g. weights bound by prepare()) stay constants of the result.
    custom_jvp / custom_vjp calls stay whole: their derivative rules are the user's."""
    avals = [v.aval for v in open_jaxpr(closed).invars]
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
             for a in avals]
    return jax.make_jaxpr(lambda *args: evaluate(closed, jaxpr_consts(closed), args, {},
                                                 inline=True))(*specs)


# --- higher-order primitives -------------------------------------------------------------

def _inline(param: str):
    # jit and closed_call bodies are inlined: the whole rewritten program is jitted once,
    # and XLA inlines nested calls anyway.
    def rule(eqn, invals, replacements):
        return _fn(eqn.params[param], replacements)(*invals)
    return rule


def _remat(eqn, invals, replacements):
    body = _fn(eqn.params["jaxpr"], replacements)
    return jax.checkpoint(lambda *a: body(*a), prevent_cse=eqn.params["prevent_cse"],
                          policy=eqn.params["policy"])(*invals)


def differentiable_as(primal: Callable, original: Callable) -> Callable:
    """primal (a rewritten computation: a kernel call, a rewritten body), differentiated as
    original (what it replaces): the tangent is original's JVP, so the user's custom rules,
    and jvp / grad / vmap, see exactly what they saw before the rewrite."""
    call = jax.custom_jvp(primal)
    call.defjvp(lambda primals, tangents: (call(*primals),
                                           jax.jvp(original, primals, tangents)[1]))
    return call


def _custom_jvp(eqn, invals, replacements):
    body = _fn(eqn.params["call_jaxpr"], replacements)
    wrapped = differentiable_as(lambda *a: tuple(body(*a)),
                                functools.partial(_bind_tuple, eqn))
    return wrapped(*invals)


def _custom_vjp(eqn, invals, replacements):
    body = _fn(eqn.params["call_jaxpr"], replacements)
    original = functools.partial(_bind_tuple, eqn)
    wrapped = jax.custom_vjp(lambda *a: tuple(body(*a)))
    wrapped.defvjp(lambda *a: (wrapped(*a), a),
                   lambda res, ct: jax.vjp(original, *res)[1](ct))
    return wrapped(*invals)


def _bind_tuple(eqn, *invals):
    return tuple(bind_eqn(eqn, invals))


def _scan_groups(params, invals):
    """(consts, carry, xs) operands: counted by num_consts/num_carry on jax 0.10, by the
    flat tree ft_in on jax 0.12."""
    if "ft_in" in params:
        return [list(g) for g in params["ft_in"].update(list(invals)).unpack()]
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    return [invals[:n_consts], invals[n_consts:n_consts + n_carry], invals[n_consts + n_carry:]]


def _scan(eqn, invals, replacements):
    p = eqn.params
    consts, init, xs = _scan_groups(p, invals)
    n_carry = len(init)
    body = _fn(p["jaxpr"], replacements)

    def step(carry, x):
        outs = body(*consts, *carry, *x)
        return list(outs[:n_carry]), list(outs[n_carry:])

    carry, ys = lax.scan(step, list(init), list(xs), length=p["length"],
                         reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]


def _cond(eqn, invals, replacements):
    index, ops = invals[0], invals[1:]
    branches = [_fn(b, replacements) for b in eqn.params["branches"]]
    return lax.switch(index, [lambda *a, f=f: list(f(*a)) for f in branches], *ops)


def _while(eqn, invals, replacements):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
    cond = _fn(p["cond_jaxpr"], replacements)
    body = _fn(p["body_jaxpr"], replacements)
    return lax.while_loop(lambda c: cond(*cond_consts, *c)[0],
                          lambda c: list(body(*body_consts, *c)), list(init))


_INLINED = {P.jit_p: "jaxpr", P.closed_call_p: "call_jaxpr"}

_HIGHER_ORDER: dict = {
    P.jit_p: _inline("jaxpr"),
    P.closed_call_p: _inline("call_jaxpr"),
    P.remat_p: _remat,
    P.custom_jvp_call_p: _custom_jvp,
    P.custom_vjp_call_p: _custom_vjp,
    P.scan_p: _scan,
    P.cond_p: _cond,
    P.while_p: _while,
}

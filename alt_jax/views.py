"""Values that are views of another: the same elements, read at an offset through strides.

A kernel that reads its operands through strides can read a slice, a split piece, a
transpose or a reshape of a value from the value itself, so that XLA copies nothing (GPT-2's
fused QKV projection is split three ways and reshaped into heads: three copies, and a
three-way fork that the thunk executor spreads over the pool threads the kernels use).

Entry points: View, resolve(vars, uses, inside) -> ({var: View}, head eqns).
"""
from __future__ import annotations

import dataclasses

from jax import lax
from jax.extend import core as jcore

from alt_jax.row_program import row_major


@dataclasses.dataclass(frozen=True)
class View:
    """var's element at index i is base's flat element offset + sum(i[a] * strides[a])
    (base read row-major). eqns: the equations from base to var, in program order."""

    var: object
    base: object
    offset: int
    strides: tuple
    eqns: tuple = ()


def _is_view_eqn(eqn) -> bool:
    """An equation whose one output is its first operand's elements, relabelled."""
    p, params = eqn.primitive, eqn.params
    if not isinstance(eqn.invars[0], jcore.Var):
        return False
    if p is lax.reshape_p:
        return params.get("dimensions") is None
    if p is lax.slice_p:
        return params.get("strides") is None or all(s == 1 for s in params["strides"])
    return p in (lax.split_p, lax.transpose_p, lax.squeeze_p)


def _reshaped(shape, strides, new_shape):
    """Strides of new_shape over the same elements as (shape, strides), or None where the
    reshape would need a copy (numpy's no-copy rule: each run of old axes merged or split
    must be contiguous within itself)."""
    old = [(n, s) for n, s in zip(shape, strides) if n != 1]
    new_strides = [0] * len(new_shape)
    big = [j for j, n in enumerate(new_shape) if n != 1]
    i = j = 0
    while i < len(old) and j < len(big):
        i0, j0 = i, j
        a, b = old[i][0], new_shape[big[j]]
        while a != b:
            if a < b:
                i += 1
                a *= old[i][0]
            else:
                j += 1
                b *= new_shape[big[j]]
        for k in range(i0, i):  # the old run is one block of memory
            if old[k][1] != old[k + 1][1] * old[k + 1][0]:
                return None
        stride = old[i][1]
        for jj in range(j, j0 - 1, -1):
            new_strides[big[jj]] = stride
            stride *= new_shape[big[jj]]
        i, j = i + 1, j + 1
    if i != len(old) or j != len(big):
        return None
    return tuple(new_strides)


def _step(shape, offset, strides, eqn, out):
    """(offset, strides) of eqn's output `out` from its operand's, or None."""
    p, params = eqn.primitive, eqn.params
    if p is lax.slice_p:
        start = params["start_indices"]
        return offset + sum(a * s for a, s in zip(start, strides)), strides
    if p is lax.split_p:
        axis, index = params["axis"], eqn.outvars.index(out)
        return offset + sum(params["sizes"][:index]) * strides[axis], strides
    if p is lax.transpose_p:
        return offset, tuple(strides[a] for a in params["permutation"])
    if p is lax.squeeze_p:
        drop = {d % len(shape) for d in params["dimensions"]}
        return offset, tuple(s for a, s in enumerate(strides) if a not in drop)
    new = _reshaped(shape, strides, out.aval.shape)
    return None if new is None else (offset, new)


def _chain(var, uses) -> list:
    """(eqn, its output on the way) from var back towards the first value that is not a
    view, nearest first."""
    steps = []
    while True:
        eqn = uses.producer.get(var)
        if eqn is None or not _is_view_eqn(eqn):
            return steps
        steps.append((eqn, var))
        var = eqn.invars[0]


def _compose(var, steps) -> View:
    """The view of var through steps (nearest first), starting over from the output of any
    step that would need a copy."""
    base = steps[-1][0].invars[0] if steps else var
    offset, strides, used = 0, tuple(row_major(base.aval.shape)), []
    shape = base.aval.shape
    for eqn, out in reversed(steps):
        nxt = _step(shape, offset, strides, eqn, out)
        if nxt is None:
            base, offset, strides, used = out, 0, tuple(row_major(out.aval.shape)), []
        else:
            (offset, strides), used = nxt, used + [eqn]
        shape = out.aval.shape
    return View(var, base, int(offset), tuple(int(s) for s in strides), tuple(used))


def resolve(vars_, uses, inside) -> tuple:
    """Each var of vars_ as a view of the farthest value it is a view of, taking only view
    equations whose every output is read by nothing but other such equations or `inside`
    (the kernel's own equations) and is not a program output: those equations then belong
    to the kernel. Returns ({var: View}, the taken equations in no particular order)."""
    inside = {id(e) for e in inside}
    # first each chain as far as it composes (a reshape that would copy stays in XLA)
    chains = {}
    for v in vars_:
        steps = _chain(v, uses)
        chains[v] = steps[:len(_compose(v, steps).eqns)]
    while True:
        taken = {id(e): e for steps in chains.values() for e, _ in steps}
        allowed = inside | set(taken)
        bad = next((e for e in taken.values()
                    if any(o in uses.outputs
                           or any(id(u) not in allowed for u in uses.users.get(o, []))
                           for o in e.outvars)), None)
        if bad is None:
            break
        # the chains stop short of `bad`: its output becomes their base
        chains = {v: steps[:next((i for i, (e, _) in enumerate(steps) if e is bad), len(steps))]
                  for v, steps in chains.items()}
    views = {v: _compose(v, steps) for v, steps in chains.items()}
    used = {id(e): e for view in views.values() for e in view.eqns}
    return views, list(used.values())

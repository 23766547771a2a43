"""Finding row-wise normalisations in a jaxpr: a layer norm, an RMS norm, a softmax standing
alone, whatever row program ends in one value of its input's shape.

Entry points: find_rownorm(flat, taken) -> [RowNormMatch], RowNormMatch.

What is matched is structural, as for attention (alt_jax/attention.py shares the pieces,
alt_jax/row_program.py): an input X, a region of equations that read X or values computed
from it, with at least one sum or max over one axis of X (the row), and one value Y of X's
shape that leaves the region. Every region equation is row-wise (elementwise on X's shape or
X's shape reduced over the row, a reduction over the row, a broadcast of a row's reduction
back over it, a relabelling of unit axes, a square, rsqrt or sqrt); operands from outside
(gamma, beta, eps, a bias) are read by the kernel through strides. Flax's LayerNorm
(E[x^2] - E[x]^2), a hand-written one (E[(x - mean)^2]), RMSNorm and Keras's come out as row
programs; the kernel runs one equation by equation on each row, as XLA would (to rounding:
its sums run in another order).

Nothing of the region but Y may be needed elsewhere (so no operand from outside is computed
from the region: the kernel can run where Y stood). X is walked back from the reduction
through at most a few elementwise steps with one full-size operand (RMSNorm reduces x * x,
not x), so the kernel reads the earliest such value. Anything the walk does not understand:
no match.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from jax.extend import core as jcore

from alt_jax import row_program
from alt_jax.row_program import (OP_RMAX, OP_RSUM, External, NoMatch, RowProgram, Uses,
                                 Walk, is_f32, step, strides_for)

_BACK_STEPS = 3      # elementwise steps walked back from a reduction to find X
_LOOK_AHEAD = 256    # equations scanned past the region's last one before the walk stops
_KEY = "x"           # the row axis' role


@dataclasses.dataclass(frozen=True)
class RowNormMatch:
    """One row-wise region: X, its equations, Y, and the program the kernel runs per row.
    Strides are (batch..., q, x): the row roles, an always-absent "q" (the executor's
    layout, shared with attention), the row axis."""

    x: object             # the input var
    region: tuple         # the equations, in program order (the last one produces Y)
    out_var: object       # Y
    batch: tuple          # sizes of the row roles (X's other axes longer than 1)
    n: int                # length of a row
    x_strides: tuple
    out_strides: tuple
    externals: tuple      # External per OP_LOAD operand index
    program: RowProgram

    @property
    def eqns(self) -> tuple:
        return self.region

    @property
    def invars(self) -> list:
        return [self.x, *(e.var for e in self.externals)]

    @property
    def operands(self) -> tuple:
        """What a plan shows it reads: X."""
        return (self.x,)


def _row_axis(eqn) -> Optional[int]:
    """The one axis of size > 1 a float32 reduction runs over, or None."""
    if not row_program.reduction(eqn.primitive) or not is_f32(eqn.outvars[0].aval):
        return None
    src = eqn.invars[0]
    if not isinstance(src, jcore.Var):
        return None
    big = [a for a in eqn.params["axes"] if src.aval.shape[a] > 1]
    return big[0] if len(big) == 1 else None


def _candidates(uses: Uses, reduction, taken) -> list:
    """X candidates for a reduction, earliest first: its operand, then back through
    elementwise producers with exactly one operand of that shape (the rest scalars or
    smaller), while those producers are free."""
    v = reduction.invars[0]
    chain = [v]
    for _ in range(_BACK_STEPS):
        p = uses.producer.get(v)
        if p is None or id(p) in taken or len(p.outvars) != 1:
            break
        full = [u for u in p.invars if isinstance(u, jcore.Var) and u.aval.shape == v.aval.shape]
        if len(full) != 1 or not is_f32(full[0].aval) or not row_program.elementwise(p.primitive):
            break
        v = full[0]
        chain.append(v)
    return chain[::-1]


class _Grow:
    """Walks forward from X, taking every row-wise equation that reads the region."""

    def __init__(self, uses, x, axis, taken):
        self.uses, self.x, self.taken = uses, x, taken
        shape = x.aval.shape
        self.n = int(shape[axis])
        roles, batch, i = [], [], 0
        for a, size in enumerate(shape):
            if a == axis:
                roles.append(_KEY)
            elif size > 1:
                roles.append(("b", i))
                batch.append(int(size))
                i += 1
            else:
                roles.append("1")
        self.x_roles, self.batch = roles, tuple(batch)
        self.batch_roles = [("b", j) for j in range(i)]

    def walk(self, eqns, position=None) -> Walk:
        """A walk over eqns (in program order), taking each row-wise equation that reads
        the region; one the walk refuses is left out (its region operands then leave the
        region). With position (eqn id -> index): stop once _LOOK_AHEAD equations pass
        without one taken."""
        walk = Walk(self.uses, key=_KEY, key_size=self.n)
        walk.roles[self.x] = list(self.x_roles)
        walk.slot[self.x] = walk.new_slot()
        last = None
        for eqn in eqns:
            if position is not None and last is not None and (
                    position[id(eqn)] - last > _LOOK_AHEAD):
                break
            reads = [v for v in eqn.invars if isinstance(v, jcore.Var) and v in walk.roles]
            if not reads or id(eqn) in self.taken:
                continue
            saved = walk.snapshot()
            try:
                step(walk, eqn, reads)
            except NoMatch:
                walk.restore(saved)
                continue
            walk.region.append(eqn)
            if position is not None:
                last = position[id(eqn)]
        return walk


def _ancestors(uses: Uses, out, region_ids) -> list:
    """The region equations out depends on (itself included), in program order."""
    seen, stack = set(), [out]
    while stack:
        v = stack.pop()
        p = uses.producer.get(v)
        if p is None or id(p) not in region_ids or id(p) in seen:
            continue
        seen.add(id(p))
        stack.extend(u for u in p.invars if isinstance(u, jcore.Var))
    return seen


def _match_from(flat, uses: Uses, x, axis, taken, position) -> RowNormMatch:
    if not is_f32(x.aval) or x.aval.ndim == 0 or x.aval.shape[axis] < 2:
        raise NoMatch("X is not a float32 array with rows of 2 or more")
    grow = _Grow(uses, x, axis, taken)
    producer = uses.producer.get(x)
    floor = -1 if producer is None else position[id(producer)]
    # forward: every row-wise equation reachable, scanning a window past the last one taken
    eqns = grow.walk(flat.eqns[floor + 1:], position).region
    if not eqns:
        raise NoMatch("nothing row-wise reads X")
    region_ids = {id(e) for e in eqns}
    shape = tuple(x.aval.shape)

    def used_outside(v, members) -> bool:
        return v in uses.outputs or any(id(u) not in members for u in uses.users.get(v, []))

    # Y: a value of X's shape used outside the region; the latest that works
    outs = [e.outvars[0] for e in eqns if tuple(e.outvars[0].aval.shape) == shape
            and used_outside(e.outvars[0], region_ids)]
    for y in reversed(outs):
        members = _ancestors(uses, y, region_ids)
        sliced = [e for e in eqns if id(e) in members]
        values = {v for e in sliced for v in e.outvars}
        if any(used_outside(v, members) for v in values if v is not y):
            continue
        # (the kernel runs where Y stood: an operand from outside is an ancestor of Y, so it
        # could only come from the region through a value used outside it, refused above)
        try:
            return _finish(grow, uses, x, y, sliced)
        except NoMatch:
            continue
    raise NoMatch("no value of X's shape leaves the region alone")


def _finish(grow: _Grow, uses: Uses, x, y, eqns) -> RowNormMatch:
    walk = grow.walk(eqns)
    if len(walk.region) != len(eqns):
        raise NoMatch("the region's slice does not walk on its own")
    ops = walk.code[0::5]
    if OP_RSUM not in ops and OP_RMAX not in ops:
        raise NoMatch("no reduction over the row: elementwise work is XLA's")
    needed = set(grow.batch_roles)
    for var, roles in walk.roles.items():
        if not needed <= set(roles):
            raise NoMatch("a region value lost a row role")
        if any(roles.count(r) > 1 for r in roles if r != "1"):
            raise NoMatch("a role on two axes")
    y_roles = walk.roles[y]
    if _KEY not in y_roles and grow.n > 1:
        raise NoMatch("Y has no row axis")
    order = [*grow.batch_roles, "q", _KEY]
    externals = []
    for (var, dtype), roles in zip(walk.externals, walk.ext_roles):
        if any(r not in order and r != "1" for r in roles):
            raise NoMatch("an external with an axis of its own")
        externals.append(External(var, dtype, strides_for(var.aval.shape, roles, order)))
    full = walk.slot_kinds(_KEY, [e.strides[-1] != 0 for e in externals])
    program = RowProgram.scheduled(full, walk.constants, walk.code, walk.slot[y])
    return RowNormMatch(
        x=x, region=tuple(walk.region), out_var=y, batch=grow.batch, n=grow.n,
        x_strides=strides_for(x.aval.shape, grow.x_roles, order),
        out_strides=strides_for(y.aval.shape, y_roles, order),
        externals=tuple(externals), program=program)


def find_rownorm(flat, taken=frozenset()) -> list:
    """Every row-wise region of flat's top level (an open, inlined jaxpr), in program order;
    equations in taken (other kernels' ids) are never part of one, nor is an equation in
    two."""
    uses = Uses.of(flat)
    position = {id(e): i for i, e in enumerate(flat.eqns)}
    taken = set(taken)
    found = []
    for eqn in flat.eqns:
        if id(eqn) in taken:
            continue
        axis = _row_axis(eqn)
        if axis is None:
            continue
        for x in _candidates(uses, eqn, taken):
            try:
                m = _match_from(flat, uses, x, axis, taken, position)
            except NoMatch:
                continue
            if id(eqn) not in {id(e) for e in m.region}:
                continue  # the region found from here does not hold this reduction
            taken.update(id(e) for e in m.region)
            found.append(m)
            break
    return found

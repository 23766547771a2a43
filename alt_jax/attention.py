"""Finding attention in a jaxpr: out = f(Q K^T) V, with f any row-wise program.

Entry points: find_attention(flat) -> [AttentionMatch], AttentionMatch, RowProgram,
External, the opcodes (OP_*).

What is matched is structural, not a list of known forms: a dot_general D1 (the scores S,
one contracting dim), then a region of equations that read S or values computed from it,
with at least one max or sum over the keys (a normalisation: without one, two chained
matmuls are the matmul family's), then a dot_general D2 that contracts the region's last
value P with V along the key axis.
Every region equation must be row-wise: elementwise on values of S's shape (or S's shape
reduced over the key axis), a max / sum over the key axis, or a relabelling of axes
(transpose, reshape of unit dims, broadcast of a row's reduction back over the keys,
stop_gradient). Operands from outside the region (a mask, a bias, a scale, a causal
predicate) are read by the kernel through strides. The softmax of jax.nn (with its
`max -inf` and stop_gradient), a hand-written one, Flax's and Keras's masking by
jnp.where and scaling before or after the dot all come out as the same row program; the
kernel then runs that program, equation by equation and in order, on each row of S, so it
computes what XLA computes (to rounding: its own exp, and sums in another order).

Every axis carries a role: ("b", i) for D1's i-th batch dim, "q" (the queries), "k" (the
keys), "d" (D1's contraction), "dv" (V's free dim), "1" for any axis of size 1 (a size-1
role needs no axis: its index is always 0). Anything the walk does not understand means no
match, and the equations stay in XLA (or on the matmul kernels).
"""
from __future__ import annotations

import dataclasses
import struct
from typing import Optional

import numpy as np
from jax import lax
from jax.extend import core as jcore

# Row-program opcodes (codegen/attention.cc executes them; keep the two in step).
OP_LOAD, OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_MAX, OP_MIN, OP_EXP, OP_NEG, OP_COPY, \
    OP_SELECT, OP_RMAX, OP_RSUM = range(13)

_BINARY = {lax.add_p: OP_ADD, lax.sub_p: OP_SUB, lax.mul_p: OP_MUL, lax.div_p: OP_DIV,
           lax.max_p: OP_MAX, lax.min_p: OP_MIN}
_UNARY = {lax.exp_p: OP_EXP, lax.neg_p: OP_NEG}
_REDUCE = {lax.reduce_max_p: OP_RMAX, lax.reduce_sum_p: OP_RSUM}
_RELABEL = (lax.transpose_p, lax.reshape_p, lax.broadcast_in_dim_p, lax.stop_gradient_p,
            lax.convert_element_type_p, lax.squeeze_p)


class _NoMatch(Exception):
    pass


@dataclasses.dataclass
class _Uses:
    """Who produces and who reads each var of a flat jaxpr, and its outputs."""

    producer: dict
    users: dict
    outputs: set

    @classmethod
    def of(cls, flat) -> "_Uses":
        producer, users = {}, {}
        for eqn in flat.eqns:
            for v in eqn.outvars:
                producer[v] = eqn
            for v in eqn.invars:
                if isinstance(v, jcore.Var):
                    users.setdefault(v, []).append(eqn)
        return cls(producer, users, {v for v in flat.outvars if isinstance(v, jcore.Var)})


def _f32(aval) -> bool:
    return aval.dtype == np.float32


@dataclasses.dataclass(frozen=True)
class External:
    """An operand from outside the region, read by the kernel at (batch..., q, k) through
    strides (0 along roles it does not vary with). dtype: "f32" or "pred" (a bool array,
    one byte per element). var: the jaxpr value the kernel reads (a broadcast's source
    when the region read a broadcast of it)."""

    var: object
    dtype: str
    strides: tuple  # elements, per role in RowProgram.roles order


@dataclasses.dataclass(frozen=True)
class RowProgram:
    """The region as instructions over slots, run once per row of S (one query).

    Slot 0 is S's row. A slot is a row of Sk floats ("full") or one float per row; a
    constant is a per-row slot filled once. Each instruction is (op, dst, a, b, c): binary
    ops dst = a op b; OP_EXP / OP_NEG / OP_COPY dst = f(a); OP_SELECT dst = a ? c : b
    (lax.select_n(pred, on_false, on_true)); OP_RMAX / OP_RSUM dst = reduce(a) over the row;
    OP_LOAD dst = external a at this row. result: the slot D2 reads (P)."""

    full: tuple          # per slot: True = a row of Sk floats
    constants: tuple     # (slot, float32 bits) pairs, flattened
    instructions: tuple  # (op, dst, a, b, c) per instruction, flattened
    result: int


@dataclasses.dataclass(frozen=True)
class AttentionMatch:
    """One attention: D1 (scores), the region between, D2 (weights times V)."""

    qk: object            # D1
    region: tuple         # the equations between, in program order
    pv: object            # D2
    q: object             # the vars of Q, K and V
    k: object
    v: object
    batch: tuple          # sizes of D1's batch roles
    sq: int
    sk: int
    d: int
    dv: int
    q_strides: tuple      # (batch..., q, d) element strides of Q
    k_strides: tuple      # (batch..., k, d)
    v_strides: tuple      # (batch..., k, dv)
    out_strides: tuple    # (batch..., q, dv) of D2's result
    externals: tuple      # External per OP_LOAD operand index
    program: RowProgram

    @property
    def eqns(self) -> tuple:
        return (self.qk, *self.region, self.pv)

    @property
    def invars(self) -> list:
        return [self.q, self.k, self.v, *(e.var for e in self.externals)]

    @property
    def out_var(self):
        return self.pv.outvars[0]


def _row_major(shape) -> list:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return strides[::-1]


def _operand_roles(shape, batch_dims, contracting, free_role, contract_role,
                   batch_roles) -> list:
    """Roles of a dot_general operand's axes: batch dims -> batch_roles, the contraction ->
    contract_role, the one free dim of size > 1 -> free_role, other size-1 dims "1"."""
    roles = ["1"] * len(shape)
    for axis, role in zip(batch_dims, batch_roles):
        roles[axis] = role
    roles[contracting] = contract_role
    free = [a for a in range(len(shape)) if a not in batch_dims and a != contracting]
    big = [a for a in free if shape[a] > 1]
    if len(big) > 1:
        raise _NoMatch("more than one free dim")
    if big:
        roles[big[0]] = free_role
    for a in range(len(shape)):  # a size-1 axis of any role is "1": its index is always 0
        if shape[a] == 1:
            roles[a] = "1"
    return roles


def _strides_for(shape, roles, wanted) -> tuple:
    strides = _row_major(shape)
    return tuple(next((strides[a] for a, r in enumerate(roles) if r == w), 0) for w in wanted)


def _size_of(shape, roles, role) -> int:
    return next((shape[a] for a, r in enumerate(roles) if r == role), 1)


class _Walk:
    """The region from D1's result to D2, building the row program as it goes."""

    def __init__(self, uses):
        self.uses = uses
        self.key = None            # "x" or "y": the free axis of D1 reductions run over
        self.roles: dict = {}      # region var -> roles per axis
        # region var -> slot; whether a slot is a row of keys is read off the roles once
        # D2 says which free axis is the key (RowProgram.full)
        self.slot: dict = {}
        self.n_slots = 0
        self.constants: list = []
        self.code: list = []
        self.externals: list = []  # (var, dtype) per external
        self.ext_roles: list = []  # per external: roles of its var's axes
        self.ext_slots: list = []  # per external: the slot its OP_LOAD fills
        self.region: list = []

    def new_slot(self) -> int:
        self.n_slots += 1
        return self.n_slots - 1

    def constant(self, value: float) -> int:
        s = self.new_slot()
        bits = struct.unpack("<i", struct.pack("<f", float(np.float32(value))))[0]
        self.constants += [s, bits]
        return s

    def operand(self, v, out_roles) -> int:
        """A slot holding v as seen by an equation whose result has out_roles."""
        if isinstance(v, jcore.Literal):
            if np.shape(v.val) != () or np.asarray(v.val).dtype not in (np.float32, np.float64):
                raise _NoMatch("non-scalar or non-float literal")
            return self.constant(float(np.asarray(v.val)))
        if v in self.slot:
            return self.slot[v]
        return self.external(v, out_roles)

    def external(self, v, out_roles) -> int:
        aval = v.aval
        if aval.dtype == np.bool_:
            dtype = "pred"
        elif aval.dtype == np.float32:
            dtype = "f32"
        else:
            raise _NoMatch(f"external operand of dtype {aval.dtype}")
        if aval.ndim == 0:
            roles, source = [], v
        else:
            if aval.ndim != len(out_roles):
                raise _NoMatch("external operand of another rank")
            roles = []
            for n, r in zip(aval.shape, out_roles):
                if n > 1 and r == "1":
                    raise _NoMatch("external broadcasts the result")
                roles.append(r if n > 1 else "1")
            roles, source = self._peel_broadcast(v, roles)
            if isinstance(source, jcore.Literal):  # a constant spread over the scores
                return self.constant(float(np.asarray(source.val)))
        self.externals.append((source, dtype))
        self.ext_roles.append(roles)
        s = self.new_slot()
        self.ext_slots.append(s)
        self.code += [OP_LOAD, s, len(self.externals) - 1, 0, 0]
        return s

    def _peel_broadcast(self, v, roles):
        """(roles, source) of the value a chain of broadcast_in_dim spreads into v (v from
        outside the region): the kernel reads the small array with stride 0 along the
        broadcast axes instead of XLA materialising the full one; a scalar literal source
        becomes a constant."""
        while True:
            producer = self.uses.producer.get(v)
            if producer is None or producer.primitive is not lax.broadcast_in_dim_p:
                return roles, v
            src = producer.invars[0]
            if isinstance(src, jcore.Literal):
                ok = np.shape(src.val) == () and np.asarray(src.val).dtype in (
                    np.float32, np.float64, np.bool_)
                return (roles, src) if ok else (roles, v)
            if src.aval.dtype != v.aval.dtype:
                return roles, v
            dims = producer.params["broadcast_dimensions"]
            roles = ["1" if src.aval.shape[i] == 1 else roles[d] for i, d in enumerate(dims)]
            v = src

    def emit(self, op, out_var, a=0, b=0, c=0) -> int:
        s = self.new_slot()
        self.slot[out_var] = s
        self.code += [op, s, a, b, c]
        return s


def _merge_roles(shapes_roles, out_shape) -> list:
    """Roles of an elementwise result from its in-region operands' roles, axis by axis."""
    out = []
    for a, n in enumerate(out_shape):
        named = {roles[a] for roles in shapes_roles if roles[a] != "1"}
        if len(named) > 1:
            raise _NoMatch("operands disagree on an axis")
        role = named.pop() if named else "1"
        if n > 1 and role == "1":
            raise _NoMatch("an axis of size > 1 without a role")
        out.append(role if n > 1 else "1")
    return out


def _relabel(eqn, in_roles, key) -> list:
    """Roles of a transpose / reshape / broadcast / identity's result; key: the role the
    region's reductions removed (a broadcast may only add that one back)."""
    p, out_shape = eqn.primitive, eqn.outvars[0].aval.shape
    in_shape = eqn.invars[0].aval.shape
    if p is lax.transpose_p:
        return [in_roles[i] for i in eqn.params["permutation"]]
    if p in (lax.stop_gradient_p, lax.convert_element_type_p):
        return list(in_roles)
    if p is lax.broadcast_in_dim_p:
        out = ["1"] * len(out_shape)
        for i, d in enumerate(eqn.params["broadcast_dimensions"]):
            out[d] = in_roles[i] if in_shape[i] == out_shape[d] else "1"
        new = [a for a, n in enumerate(out_shape) if n > 1 and out[a] == "1"]
        if new:  # a row's reduction spread back over the keys: the one role it lacks
            if len(new) > 1 or key is None or key in in_roles:
                raise _NoMatch("broadcast along more than the key axis")
            out[new[0]] = key
        return out
    # reshape / squeeze / expand_dims: only unit axes may come or go
    kept = [(n, r) for n, r in zip(in_shape, in_roles) if n > 1]
    if [n for n in out_shape if n > 1] != [n for n, _ in kept]:
        raise _NoMatch("a reshape that merges or splits axes")
    roles, it = [], iter(r for _, r in kept)
    for n in out_shape:
        roles.append(next(it) if n > 1 else "1")
    return roles


def _match_at(flat, uses: _Uses, d1) -> AttentionMatch:
    (lc, rc), (lb, rb) = d1.params["dimension_numbers"]
    if len(lc) != 1 or len(rc) != 1:
        raise _NoMatch("D1 contracts more than one dim")
    x, y = d1.invars
    if not (isinstance(x, jcore.Var) and isinstance(y, jcore.Var)):
        raise _NoMatch("a literal operand")
    if not all(_f32(v.aval) for v in (x, y, d1.outvars[0])):
        raise _NoMatch("not float32")
    nb = len(lb)
    batch_roles = [("b", i) for i in range(nb)]
    x_roles = _operand_roles(x.aval.shape, lb, lc[0], "x", "d", batch_roles)
    y_roles = _operand_roles(y.aval.shape, rb, rc[0], "y", "d", batch_roles)
    batch = tuple(int(x.aval.shape[a]) for a in lb)
    s_var = d1.outvars[0]
    s_shape = s_var.aval.shape
    x_free = [a for a in range(x.aval.ndim) if a not in lb and a != lc[0]]
    y_free = [a for a in range(y.aval.ndim) if a not in rb and a != rc[0]]
    s_roles = (["1" if n == 1 else r for n, r in zip(s_shape[:nb], batch_roles)]
               + [x_roles[a] for a in x_free] + [y_roles[a] for a in y_free])

    walk = _Walk(uses)
    walk.roles[s_var] = s_roles
    # which of x / y is the key side is decided by D2's contraction; renamed after it
    walk.slot[s_var] = walk.new_slot()
    start = next(i for i, e in enumerate(flat.eqns) if e is d1)
    d2 = None
    for eqn in flat.eqns[start + 1:]:
        reads = [v for v in eqn.invars if isinstance(v, jcore.Var) and v in walk.roles]
        if not reads:
            continue
        if eqn.primitive is lax.dot_general_p:
            d2 = eqn
            break
        _step(walk, eqn, reads)
        walk.region.append(eqn)
    if d2 is None:
        raise _NoMatch("no second dot_general")
    if walk.key is None:  # nothing normalises the rows: a chain of matmuls, not attention
        raise _NoMatch("no reduction over the keys between the products")
    # D2: P (in the region) against V (outside), contracting P's key axis
    (l2c, r2c), (l2b, r2b) = d2.params["dimension_numbers"]
    a, b = d2.invars
    if isinstance(a, jcore.Var) and a in walk.roles:
        p_var, v_var, pc, vc, pb, vb, p_first = a, b, l2c, r2c, l2b, r2b, True
    else:
        p_var, v_var, pc, vc, pb, vb, p_first = b, a, r2c, l2c, r2b, l2b, False
    if not isinstance(v_var, jcore.Var) or v_var in walk.roles:
        raise _NoMatch("D2 reads the region twice")
    if len(pc) != 1 or not _f32(v_var.aval) or not _f32(d2.outvars[0].aval):
        raise _NoMatch("D2 is not one contraction in float32")
    p_roles = walk.roles[p_var]
    key = p_roles[pc[0]]
    if key not in ("x", "y") or walk.key not in (None, key):
        raise _NoMatch("D2 does not contract the axis the region reduces over")
    query = "y" if key == "x" else "x"
    rename = {key: "k", query: "q"}
    for var in walk.roles:
        walk.roles[var] = [rename.get(r, r) for r in walk.roles[var]]
    walk.ext_roles = [[rename.get(r, r) for r in roles] for roles in walk.ext_roles]
    p_roles = walk.roles[p_var]
    q_var, k_var = (x, y) if key == "y" else (y, x)
    q_roles = [rename.get(r, r) for r in (x_roles if q_var is x else y_roles)]
    k_roles = [rename.get(r, r) for r in (y_roles if k_var is y else x_roles)]
    # every value of the region keeps every batch and query axis (reductions only over keys)
    needed = {r for r in s_roles if r != "1" and r not in ("x", "y")} | (
        {"q"} if _size_of(s_shape, walk.roles[s_var], "q") > 1 else set())
    for var, roles in walk.roles.items():
        if not needed <= set(roles):
            raise _NoMatch("a region value lost a batch or query axis")
        if any(roles.count(r) > 1 for r in roles if r != "1"):
            raise _NoMatch("a role on two axes")
    # D2's batch dims pair P's batch axes with V's; its free dims are q (P) and dv (V)
    v_shape = v_var.aval.shape
    v_roles = ["1"] * len(v_shape)
    for pa, va in zip(pb, vb):
        role = p_roles[pa]
        if role not in batch_roles and role != "1":
            raise _NoMatch("D2 batches over a non-batch axis")
        v_roles[va] = role if v_shape[va] > 1 else "1"
    v_roles[vc[0]] = "k" if v_shape[vc[0]] > 1 else "1"
    p_free = [a for a in range(len(p_roles)) if a not in pb and a != pc[0]]
    if any(p_roles[a] not in ("q", "1") for a in p_free):
        raise _NoMatch("P has a free axis other than the queries")
    batched = {p_roles[pa] for pa in pb}
    if not {r for r in needed if r != "q"} <= batched:
        raise _NoMatch("D2 does not keep every batch axis")
    v_free = [a for a in range(len(v_shape)) if a not in vb and a != vc[0]]
    big = [a for a in v_free if v_shape[a] > 1]
    if len(big) > 1:
        raise _NoMatch("V has more than one free axis")
    for a in big:
        v_roles[a] = "dv"
    out_shape = d2.outvars[0].aval.shape
    out_roles = ([p_roles[pa] for pa in pb]
                 + ([p_roles[a] for a in p_free] + [v_roles[a] for a in v_free] if p_first
                    else [v_roles[a] for a in v_free] + [p_roles[a] for a in p_free]))
    out_roles = [r if n > 1 else "1" for r, n in zip(out_roles, out_shape)]
    # nothing of the region may be needed outside it
    region_vars = set(walk.roles)
    for var in region_vars:
        users = uses.users.get(var, [])
        if any(u is not d2 and all(u is not e for e in walk.region) for u in users):
            raise _NoMatch("a region value is used outside the region")
        if var in uses.outputs or (var is not p_var and any(u is d2 for u in users)):
            raise _NoMatch("a region value is a program output or read twice by D2")
    if "k" not in p_roles:
        raise _NoMatch("P has no key axis")
    roles_order = [*batch_roles, "q", "k"]
    sq = _size_of(s_shape, walk.roles[s_var], "q")
    sk = _size_of(s_shape, walk.roles[s_var], "k")
    if sk < 2:
        raise _NoMatch("a single key")
    externals = []
    for (var, dtype), roles in zip(walk.externals, walk.ext_roles):
        if any(r not in roles_order and r != "1" for r in roles):
            raise _NoMatch("an external varies along d")
        externals.append(External(var, dtype, _strides_for(var.aval.shape, roles,
                                                          roles_order)))
    # a row of keys: a region value with the key axis, an external varying along it;
    # constants are one float per row
    full = [False] * walk.n_slots
    for var, s in walk.slot.items():
        full[s] = "k" in walk.roles[var]
    for s, ext in zip(walk.ext_slots, externals):
        full[s] = ext.strides[-1] != 0
    program = RowProgram(tuple(full), tuple(walk.constants), tuple(walk.code),
                         walk.slot[p_var])
    d = int(x.aval.shape[lc[0]])
    dv = _size_of(v_shape, v_roles, "dv")
    return AttentionMatch(
        qk=d1, region=tuple(walk.region), pv=d2, q=q_var, k=k_var, v=v_var, batch=batch,
        sq=sq, sk=sk, d=d, dv=dv,
        q_strides=_strides_for(q_var.aval.shape, q_roles, [*batch_roles, "q", "d"]),
        k_strides=_strides_for(k_var.aval.shape, k_roles, [*batch_roles, "k", "d"]),
        v_strides=_strides_for(v_shape, v_roles, [*batch_roles, "k", "dv"]),
        out_strides=_strides_for(out_shape, out_roles, [*batch_roles, "q", "dv"]),
        externals=tuple(externals), program=program)


def _step(walk: _Walk, eqn, reads) -> None:
    """One region equation: its result's roles and its instruction."""
    p = eqn.primitive
    if len(eqn.outvars) != 1:
        raise _NoMatch(f"{p.name} has several results")
    out = eqn.outvars[0]
    out_shape = out.aval.shape
    if p is lax.select_n_p:
        pred, *cases = eqn.invars
        if len(cases) != 2 or not isinstance(pred, jcore.Var) or pred in walk.roles:
            raise _NoMatch("select_n other than an outside predicate and two cases")
        if pred.aval.dtype != np.bool_ or not _f32(out.aval):
            raise _NoMatch("select_n on a non-bool predicate")
        walk.roles[out] = _merge_roles([walk.roles[v] for v in reads], out_shape)
        roles = walk.roles[out]
        c = walk.operand(pred, roles)
        a, b = (walk.operand(v, roles) for v in cases)
        walk.emit(OP_SELECT, out, c, a, b)
        return
    if not _f32(out.aval):
        raise _NoMatch(f"{p.name} result is not float32")
    if p in _BINARY:
        walk.roles[out] = _merge_roles([walk.roles[v] for v in reads], out_shape)
        a, b = (walk.operand(v, walk.roles[out]) for v in eqn.invars)
        walk.emit(_BINARY[p], out, a, b)
        return
    if p in _UNARY:
        walk.roles[out] = list(walk.roles[eqn.invars[0]])
        walk.emit(_UNARY[p], out, walk.slot[eqn.invars[0]])
        return
    if p in _REDUCE:
        src = eqn.invars[0]
        roles = walk.roles[src]
        axes = tuple(eqn.params["axes"])
        big = [a for a in axes if src.aval.shape[a] > 1]
        if len(big) != 1 or roles[big[0]] not in ("x", "y"):
            raise _NoMatch("a reduction over other than one free axis of D1")
        if walk.key not in (None, roles[big[0]]):
            raise _NoMatch("reductions over both free axes")
        walk.key = roles[big[0]]
        walk.roles[out] = [r for i, r in enumerate(roles) if i not in axes]
        walk.emit(_REDUCE[p], out, walk.slot[src])
        return
    if p in _RELABEL:
        if p is lax.convert_element_type_p and eqn.invars[0].aval.dtype != np.float32:
            raise _NoMatch("a conversion")
        walk.roles[out] = _relabel(eqn, walk.roles[eqn.invars[0]], walk.key)
        walk.emit(OP_COPY, out, walk.slot[eqn.invars[0]])
        return
    raise _NoMatch(f"{p.name} in the region")


def find_attention(flat) -> list:
    """Every attention of flat's top level (an open, inlined jaxpr), in program order; an
    equation is in at most one."""
    uses = _Uses.of(flat)
    found, taken = [], set()
    for eqn in flat.eqns:
        if eqn.primitive is not lax.dot_general_p or id(eqn) in taken:
            continue
        try:
            m = _match_at(flat, uses, eqn)
        except _NoMatch:
            continue
        if any(id(e) in taken for e in m.eqns):
            continue
        taken.update(id(e) for e in m.eqns)
        found.append(m)
    return found

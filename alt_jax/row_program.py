"""Row programs: a region of a jaxpr that works row by row on one value (elementwise
steps, reductions over the row, broadcasts of a row's reduction back over it), compiled to
instructions over slots that a kernel runs on each row (csrc/include/alt_jax/row_program.h).

Entry points: the opcodes (OP_*), RowProgram, External, Walk (builds a program while it
walks a region), step(walk, eqn, reads), Uses, NoMatch, the role helpers strides_for,
size_of, row_major, merge_roles, relabel, and template_values (a program's placeholders in a
kernel template). Used by alt_jax/attention.py (the program between
the two products of an attention) and alt_jax/rownorm.py (a layer norm and its friends).

Every axis of a region value carries a role: ("b", i) for a row index, the row's own axis
(the one reductions run over: "x" / "y" while an attention's key side is still open, "k"
once known), and "1" for any axis of size 1 (its index is always 0).
"""
from __future__ import annotations

import dataclasses
import struct

import numpy as np
from jax import lax
from jax.extend import core as jcore

# Row-program opcodes (csrc/include/alt_jax/row_program.h executes them; keep the two in
# step).
OP_LOAD, OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_MAX, OP_MIN, OP_EXP, OP_NEG, OP_COPY, \
    OP_SELECT, OP_RMAX, OP_RSUM, OP_RSQRT, OP_SQRT, OP_ABS = range(16)

_BINARY = {lax.add_p: OP_ADD, lax.sub_p: OP_SUB, lax.mul_p: OP_MUL, lax.div_p: OP_DIV,
           lax.max_p: OP_MAX, lax.min_p: OP_MIN}
_UNARY = {lax.exp_p: OP_EXP, lax.neg_p: OP_NEG, lax.rsqrt_p: OP_RSQRT, lax.sqrt_p: OP_SQRT,
          lax.abs_p: OP_ABS}
# x * x: jnp.square (a primitive of its own on newer jax) and x ** 2, x ** 3 (integer_pow)
_SQUARE = getattr(lax, "square_p", None)
_MAX_POW = 4
_REDUCE = {lax.reduce_max_p: OP_RMAX, lax.reduce_sum_p: OP_RSUM}
_RELABEL = (lax.transpose_p, lax.reshape_p, lax.broadcast_in_dim_p, lax.stop_gradient_p,
            lax.convert_element_type_p, lax.squeeze_p)


def elementwise(p) -> bool:
    """Whether a row program takes primitive p as an elementwise step."""
    return p in _BINARY or p in _UNARY or (_SQUARE is not None and p is _SQUARE) or (
        p is lax.integer_pow_p)


def reduction(p) -> bool:
    """Whether a row program takes primitive p as a reduction over the row."""
    return p in _REDUCE


class NoMatch(Exception):
    pass


@dataclasses.dataclass
class Uses:
    """Who produces and who reads each var of a flat jaxpr, and its outputs."""

    producer: dict
    users: dict
    outputs: set

    @classmethod
    def of(cls, flat) -> "Uses":
        producer, users = {}, {}
        for eqn in flat.eqns:
            for v in eqn.outvars:
                producer[v] = eqn
            for v in eqn.invars:
                if isinstance(v, jcore.Var):
                    users.setdefault(v, []).append(eqn)
        return cls(producer, users, {v for v in flat.outvars if isinstance(v, jcore.Var)})


def is_f32(aval) -> bool:
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
    """The region as instructions over slots, run once per row (of an attention's scores S,
    of a row-wise region's input X).

    Slot 0 is that row. A slot is a row of floats ("full") or one float per row; a
    constant is a per-row slot filled once. Each instruction is (op, dst, a, b, c): binary
    ops dst = a op b; OP_EXP / OP_NEG / OP_COPY / OP_RSQRT / OP_SQRT / OP_ABS dst = f(a);
    OP_SELECT dst = a ? c : b (lax.select_n(pred, on_false, on_true)); OP_RMAX / OP_RSUM
    dst = reduce(a) over the row; OP_LOAD dst = external a at this row. Every slot is
    written by one instruction (or is a constant, or slot 0). result: the slot the kernel
    reads at the end. Build one with RowProgram.scheduled()."""

    full: tuple          # per slot: True = a row of floats
    constants: tuple     # (slot, float32 bits) pairs, flattened
    instructions: tuple  # (op, dst, a, b, c) per instruction, flattened
    result: int

    @classmethod
    def scheduled(cls, full, constants, code, result) -> "RowProgram":
        """The program with its instructions reordered (dependencies kept, so it computes
        the same values): loads and per-row steps as early as their operands allow, the rest
        in program order. The kernel runs consecutive row-writing steps and the reductions
        after them as one loop over the row (row_program.h); a per-row step between two of
        them would cut that loop in two and send a row through memory."""
        return cls(tuple(full), tuple(constants), tuple(schedule(code, full)), result)


def operand_slots(op, a, b, c) -> tuple:
    """The slots an instruction reads."""
    if op == OP_LOAD:
        return ()
    if op in _BINARY.values():
        return (a, b)
    if op == OP_SELECT:
        return (a, b, c)
    return (a,)


def schedule(code, full) -> list:
    """code (flattened (op, dst, a, b, c) instructions) reordered as RowProgram.scheduled
    says."""
    instrs = [tuple(code[i:i + 5]) for i in range(0, len(code), 5)]
    written = {ins[1] for ins in instrs}
    ready_slots = set(range(len(full))) - written  # slot 0, constants
    early = [ins[0] == OP_LOAD or (not full[ins[1]] and ins[0] not in (OP_RMAX, OP_RSUM))
             for ins in instrs]
    left, out = list(range(len(instrs))), []
    while left:
        ready = [i for i in left if all(s in ready_slots for s in operand_slots(instrs[i][0],
                                                                               *instrs[i][2:]))]
        if not ready:
            raise ValueError("row program: an instruction reads a slot nothing writes")
        pick = next((i for i in ready if early[i]), ready[0])
        left.remove(pick)
        out.extend(instrs[pick])
        ready_slots.add(instrs[pick][1])
    return out


def row_major(shape) -> list:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return strides[::-1]


def strides_for(shape, roles, wanted, axis_strides=None) -> tuple:
    """Element strides along the wanted roles (0 for a role no axis has), from the axes'
    strides (row-major in shape unless given: a view's, views.py)."""
    strides = row_major(shape) if axis_strides is None else axis_strides
    return tuple(next((strides[a] for a, r in enumerate(roles) if r == w), 0) for w in wanted)


def size_of(shape, roles, role) -> int:
    return next((shape[a] for a, r in enumerate(roles) if r == role), 1)


class Walk:
    """A region walked in program order, building the row program as it goes (an
    attention's: from D1's result to D2; a row-wise region's: from its input on).

    key_size: the row's length when the row axis is known from the start (a row-wise
    region; key is then given too): an elementwise result may then get the row axis from
    an external alone (a per-row scale times a per-column gamma)."""

    def __init__(self, uses, key=None, key_size=None):
        self.uses = uses
        self.key = key             # "x" or "y": the free axis reductions run over
        self.key_size = key_size
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
        self.temps: list = []      # (slot, value whose kind it has) per temp slot
        self.region: list = []

    def temp(self, op, a, b, like) -> int:
        """A slot no jaxpr value names (a step of an expansion): dst = a op b, a row or one
        float per row as the value `like` is."""
        s = self.new_slot()
        self.temps.append((s, like))
        self.code += [op, s, a, b, 0]
        return s

    def slot_kinds(self, key, ext_full) -> tuple:
        """Per slot, whether it holds a row (RowProgram.full): a value or a temp whose roles
        have the key, an external whose strides vary along it (ext_full, in external order);
        constants are one float per row."""
        full = [False] * self.n_slots
        for var, s in self.slot.items():
            full[s] = key in self.roles[var]
        for s, like in self.temps:
            full[s] = key in self.roles[like]
        for s, f in zip(self.ext_slots, ext_full):
            full[s] = bool(f)
        return tuple(full)

    def snapshot(self) -> dict:
        """The walk's state, to go back to when a step is refused half-way (restore)."""
        return {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in vars(self).items()}

    def restore(self, saved: dict) -> None:
        vars(self).update(saved)

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
                raise NoMatch("non-scalar or non-float literal")
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
            raise NoMatch(f"external operand of dtype {aval.dtype}")
        if aval.ndim == 0:
            roles, source = [], v
        else:
            if aval.ndim != len(out_roles):
                raise NoMatch("external operand of another rank")
            roles = []
            for n, r in zip(aval.shape, out_roles):
                if n > 1 and r == "1":
                    raise NoMatch("external broadcasts the result")
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


def merge_roles(shapes_roles, out_shape, key=None, key_size=None) -> list:
    """Roles of an elementwise result from its in-region operands' roles, axis by axis.
    With key_size: one axis of that size no operand names, while none names the key,
    is the key (an external spreads the row over it)."""
    out = []
    for a, n in enumerate(out_shape):
        named = {roles[a] for roles in shapes_roles if roles[a] != "1"}
        if len(named) > 1:
            raise NoMatch("operands disagree on an axis")
        out.append(named.pop() if named and n > 1 else "1")
    missing = [a for a, n in enumerate(out_shape) if n > 1 and out[a] == "1"]
    if (len(missing) == 1 and key_size is not None and out_shape[missing[0]] == key_size
            and key not in out):
        out[missing[0]] = key
    elif missing:
        raise NoMatch("an axis of size > 1 without a role")
    return out


def relabel(eqn, in_roles, key) -> list:
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
                raise NoMatch("broadcast along more than the key axis")
            out[new[0]] = key
        return out
    # reshape / squeeze / expand_dims: only unit axes may come or go
    kept = [(n, r) for n, r in zip(in_shape, in_roles) if n > 1]
    if [n for n in out_shape if n > 1] != [n for n, _ in kept]:
        raise NoMatch("a reshape that merges or splits axes")
    roles, it = [], iter(r for _, r in kept)
    for n in out_shape:
        roles.append(next(it) if n > 1 else "1")
    return roles


def step(walk: Walk, eqn, reads) -> None:
    """One region equation: its result's roles and its instruction."""
    p = eqn.primitive
    if len(eqn.outvars) != 1:
        raise NoMatch(f"{p.name} has several results")
    out = eqn.outvars[0]
    out_shape = out.aval.shape
    if p is lax.select_n_p:
        pred, *cases = eqn.invars
        if len(cases) != 2 or not isinstance(pred, jcore.Var) or pred in walk.roles:
            raise NoMatch("select_n other than an outside predicate and two cases")
        if pred.aval.dtype != np.bool_ or not is_f32(out.aval):
            raise NoMatch("select_n on a non-bool predicate")
        walk.roles[out] = merge_roles([walk.roles[v] for v in reads], out_shape,
                                      walk.key, walk.key_size)
        roles = walk.roles[out]
        c = walk.operand(pred, roles)
        a, b = (walk.operand(v, roles) for v in cases)
        walk.emit(OP_SELECT, out, c, a, b)
        return
    if not is_f32(out.aval):
        raise NoMatch(f"{p.name} result is not float32")
    if p in _BINARY:
        walk.roles[out] = merge_roles([walk.roles[v] for v in reads], out_shape,
                                      walk.key, walk.key_size)
        a, b = (walk.operand(v, walk.roles[out]) for v in eqn.invars)
        walk.emit(_BINARY[p], out, a, b)
        return
    if (p is _SQUARE and _SQUARE is not None) or p is lax.integer_pow_p:
        y = 2 if p is _SQUARE else eqn.params["y"]
        if not 1 <= y <= _MAX_POW:
            raise NoMatch(f"integer_pow y={y}")
        x = eqn.invars[0]
        walk.roles[out] = list(walk.roles[x])
        # jax's own expansion (lax._integer_pow: binary powering), so that the products
        # round as XLA's do
        acc, base = None, walk.slot[x]
        while y > 0:
            if y & 1:
                acc = base if acc is None else walk.temp(OP_MUL, acc, base, like=x)
            y >>= 1
            if y > 0:
                base = walk.temp(OP_MUL, base, base, like=x)
        if acc == walk.slot[x]:
            walk.emit(OP_COPY, out, acc)
        else:
            walk.slot[out] = acc
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
            raise NoMatch("a reduction over other than one free axis of D1")
        if walk.key not in (None, roles[big[0]]):
            raise NoMatch("reductions over both free axes")
        walk.key = roles[big[0]]
        walk.roles[out] = [r for i, r in enumerate(roles) if i not in axes]
        walk.emit(_REDUCE[p], out, walk.slot[src])
        return
    if p in _RELABEL:
        if p is lax.convert_element_type_p and eqn.invars[0].aval.dtype != np.float32:
            raise NoMatch("a conversion")
        walk.roles[out] = relabel(eqn, walk.roles[eqn.invars[0]], walk.key)
        walk.emit(OP_COPY, out, walk.slot[eqn.invars[0]])
        return
    raise NoMatch(f"{p.name} in the region")


def template_values(family: str, spec) -> dict:
    """The row program's placeholders of a kernel template that includes row_program.h
    (NEXT, EXT_STRIDES, EXT_PRED, NSLOT, SLOT_FULL, NCONST, CONSTS, NINSTR, CODE, RESULT),
    from a spec with batch, ext_dtypes, ext_strides (each (batch..., q, k)), slot_full,
    constants, instructions and result. RenderError (naming family) for externals that do
    not fit."""
    from alt_jax.codegen import render as rn

    n = len(spec.batch)
    ext_flat = tuple(s for st in spec.ext_strides for s in st)
    if len(ext_flat) != len(spec.ext_dtypes) * (n + 2):
        raise rn.RenderError(f"{family} external strides do not match the externals")
    for d in spec.ext_dtypes:
        if d not in ("f32", "pred"):
            raise rn.RenderError(f"{family} external dtype {d!r}")
    return {
        "NEXT": len(spec.ext_dtypes), "EXT_STRIDES": ext_flat or (0,),
        "EXT_PRED": tuple(int(d == "pred") for d in spec.ext_dtypes) or (0,),
        "NSLOT": len(spec.slot_full), "SLOT_FULL": tuple(int(f) for f in spec.slot_full),
        "NCONST": len(spec.constants) // 2, "CONSTS": spec.constants or (0,),
        "NINSTR": len(spec.instructions) // 5, "CODE": spec.instructions,
        "RESULT": spec.result,
    }

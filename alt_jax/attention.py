"""Finding attention in a jaxpr: out = f(Q K^T) V, with f any row-wise program.

Entry points: find_attention(flat) -> [AttentionMatch], AttentionMatch. The row program
and its pieces (opcodes, RowProgram, External, the walk) are alt_jax/row_program.py's.

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

from jax import lax
from jax.extend import core as jcore

from alt_jax import views
from alt_jax.row_program import (External, NoMatch, RowProgram, Uses, Walk, is_f32, size_of,
                                 step, strides_for)


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
    tail: tuple = ()      # a transpose of D2's result the kernel writes directly
    head: tuple = ()      # slices / splits / reshapes making Q, K, V of q, k, v (views.py)
    offsets: tuple = (0, 0, 0)  # where Q, K and V start in q, k and v (elements)

    @property
    def eqns(self) -> tuple:
        return (*self.head, self.qk, *self.region, self.pv, *self.tail)

    @property
    def invars(self) -> list:
        return [self.q, self.k, self.v, *(e.var for e in self.externals)]

    @property
    def operands(self) -> tuple:
        """What a plan shows it reads: Q, K and V (or the values they are views of)."""
        return (self.q, self.k, self.v)

    @property
    def out_var(self):
        return (self.tail[-1] if self.tail else self.pv).outvars[0]


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
        raise NoMatch("more than one free dim")
    if big:
        roles[big[0]] = free_role
    for a in range(len(shape)):  # a size-1 axis of any role is "1": its index is always 0
        if shape[a] == 1:
            roles[a] = "1"
    return roles


def _match_at(flat, uses: Uses, d1) -> AttentionMatch:
    (lc, rc), (lb, rb) = d1.params["dimension_numbers"]
    if len(lc) != 1 or len(rc) != 1:
        raise NoMatch("D1 contracts more than one dim")
    x, y = d1.invars
    if not (isinstance(x, jcore.Var) and isinstance(y, jcore.Var)):
        raise NoMatch("a literal operand")
    if not all(is_f32(v.aval) for v in (x, y, d1.outvars[0])):
        raise NoMatch("not float32")
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

    walk = Walk(uses)
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
        step(walk, eqn, reads)
        walk.region.append(eqn)
    if d2 is None:
        raise NoMatch("no second dot_general")
    if walk.key is None:  # nothing normalises the rows: a chain of matmuls, not attention
        raise NoMatch("no reduction over the keys between the products")
    # D2: P (in the region) against V (outside), contracting P's key axis
    (l2c, r2c), (l2b, r2b) = d2.params["dimension_numbers"]
    a, b = d2.invars
    if isinstance(a, jcore.Var) and a in walk.roles:
        p_var, v_var, pc, vc, pb, vb, p_first = a, b, l2c, r2c, l2b, r2b, True
    else:
        p_var, v_var, pc, vc, pb, vb, p_first = b, a, r2c, l2c, r2b, l2b, False
    if not isinstance(v_var, jcore.Var) or v_var in walk.roles:
        raise NoMatch("D2 reads the region twice")
    if len(pc) != 1 or not is_f32(v_var.aval) or not is_f32(d2.outvars[0].aval):
        raise NoMatch("D2 is not one contraction in float32")
    p_roles = walk.roles[p_var]
    key = p_roles[pc[0]]
    if key not in ("x", "y") or walk.key not in (None, key):
        raise NoMatch("D2 does not contract the axis the region reduces over")
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
        {"q"} if size_of(s_shape, walk.roles[s_var], "q") > 1 else set())
    for var, roles in walk.roles.items():
        if not needed <= set(roles):
            raise NoMatch("a region value lost a batch or query axis")
        if any(roles.count(r) > 1 for r in roles if r != "1"):
            raise NoMatch("a role on two axes")
    # D2's batch dims pair P's batch axes with V's; its free dims are q (P) and dv (V)
    v_shape = v_var.aval.shape
    v_roles = ["1"] * len(v_shape)
    for pa, va in zip(pb, vb):
        role = p_roles[pa]
        if role not in batch_roles and role != "1":
            raise NoMatch("D2 batches over a non-batch axis")
        v_roles[va] = role if v_shape[va] > 1 else "1"
    v_roles[vc[0]] = "k" if v_shape[vc[0]] > 1 else "1"
    p_free = [a for a in range(len(p_roles)) if a not in pb and a != pc[0]]
    if any(p_roles[a] not in ("q", "1") for a in p_free):
        raise NoMatch("P has a free axis other than the queries")
    batched = {p_roles[pa] for pa in pb}
    if not {r for r in needed if r != "q"} <= batched:
        raise NoMatch("D2 does not keep every batch axis")
    v_free = [a for a in range(len(v_shape)) if a not in vb and a != vc[0]]
    big = [a for a in v_free if v_shape[a] > 1]
    if len(big) > 1:
        raise NoMatch("V has more than one free axis")
    for a in big:
        v_roles[a] = "dv"
    out_shape = d2.outvars[0].aval.shape
    out_roles = ([p_roles[pa] for pa in pb]
                 + ([p_roles[a] for a in p_free] + [v_roles[a] for a in v_free] if p_first
                    else [v_roles[a] for a in v_free] + [p_roles[a] for a in p_free]))
    out_roles = [r if n > 1 else "1" for r, n in zip(out_roles, out_shape)]
    # a transpose that alone reads the result (heads back beside the features, as einsum
    # writes "bhqk,bkhd->bqhd"): the kernel writes that layout itself, no copy after it
    tail = ()
    readers = uses.users.get(d2.outvars[0], [])
    if (len(readers) == 1 and readers[0].primitive is lax.transpose_p
            and d2.outvars[0] not in uses.outputs):
        tail = (readers[0],)
        out_shape = readers[0].outvars[0].aval.shape
        out_roles = [out_roles[i] for i in readers[0].params["permutation"]]
    # nothing of the region may be needed outside it
    region_vars = set(walk.roles)
    for var in region_vars:
        users = uses.users.get(var, [])
        if any(u is not d2 and all(u is not e for e in walk.region) for u in users):
            raise NoMatch("a region value is used outside the region")
        if var in uses.outputs or (var is not p_var and any(u is d2 for u in users)):
            raise NoMatch("a region value is a program output or read twice by D2")
    if "k" not in p_roles:
        raise NoMatch("P has no key axis")
    roles_order = [*batch_roles, "q", "k"]
    sq = size_of(s_shape, walk.roles[s_var], "q")
    sk = size_of(s_shape, walk.roles[s_var], "k")
    if sk < 2:
        raise NoMatch("a single key")
    externals = []
    for (var, dtype), roles in zip(walk.externals, walk.ext_roles):
        if any(r not in roles_order and r != "1" for r in roles):
            raise NoMatch("an external varies along d")
        externals.append(External(var, dtype, strides_for(var.aval.shape, roles,
                                                          roles_order)))
    # a row of keys: a region value with the key axis, an external varying along it;
    # constants are one float per row
    full = walk.slot_kinds("k", [ext.strides[-1] != 0 for ext in externals])
    program = RowProgram.scheduled(full, walk.constants, walk.code,
                         walk.slot[p_var])
    d = int(x.aval.shape[lc[0]])
    dv = size_of(v_shape, v_roles, "dv")
    # Q, K and V read where they are views of (a split of a fused QKV projection): no copies
    seen, head = views.resolve([q_var, k_var, v_var], uses, (d1, *walk.region, d2, *tail))
    qv, kv, vv = seen[q_var], seen[k_var], seen[v_var]
    order = {id(e): i for i, e in enumerate(flat.eqns)}
    return AttentionMatch(
        qk=d1, region=tuple(walk.region), pv=d2, q=qv.base, k=kv.base, v=vv.base,
        batch=batch, sq=sq, sk=sk, d=d, dv=dv,
        q_strides=strides_for(q_var.aval.shape, q_roles, [*batch_roles, "q", "d"], qv.strides),
        k_strides=strides_for(k_var.aval.shape, k_roles, [*batch_roles, "k", "d"], kv.strides),
        v_strides=strides_for(v_shape, v_roles, [*batch_roles, "k", "dv"], vv.strides),
        out_strides=strides_for(out_shape, out_roles, [*batch_roles, "q", "dv"]),
        externals=tuple(externals), program=program, tail=tail,
        head=tuple(sorted(head, key=lambda e: order[id(e)])),
        offsets=(qv.offset, kv.offset, vv.offset))


def find_attention(flat) -> list:
    """Every attention of flat's top level (an open, inlined jaxpr), in program order; an
    equation is in at most one."""
    uses = Uses.of(flat)
    found, taken = [], set()
    for eqn in flat.eqns:
        if eqn.primitive is not lax.dot_general_p or id(eqn) in taken:
            continue
        try:
            m = _match_at(flat, uses, eqn)
        except NoMatch:
            continue
        if any(id(e) in taken for e in m.eqns):
            continue
        taken.update(id(e) for e in m.eqns)
        found.append(m)
    return found

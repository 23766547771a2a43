"""The matmul family: dot_general as a batched GEMM C[b] = A[b] @ B[b] on generated kernels.

Entry points: FAMILY (MatmulFamily: match, default_knobs, validate, space, render, lower,
pack_weights, kernel_inputs), MatmulSpec, MatmulKnobs; template codegen/matmul.cc (fused
epilogue over N, optional prepacked B).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from alt_jax.codegen import render as rn
from alt_jax.layout import Layout, Reorder, Split, convert
from alt_jax.ops.base import Axis, KnobError, Space, Unsupported, axis_values
from alt_jax.ops.epilogue import Epilogue

_MAX_DIM = 2**40
_MAX_WORKSPACE = 2**31  # bytes; past this a knob choice is refused, not attempted


A_NAMES, B_NAMES = ("B", "M", "K"), ("B", "K", "N")  # the logical dims of A and B


def _sizes(layout: Layout) -> dict:
    return dict(zip(layout.names, layout.shape))


def _linear(layout: Layout, names) -> tuple:
    """Element strides of names in layout's array; 0 for a dim of size 1 (or absent), which
    only ever has index 0. KnobError unless one stride per dim addresses the array."""
    strides = layout.strides()
    if strides is None:
        raise KnobError(f"layout {layout} is not linear in {' '.join(layout.names)}: this "
                        f"kernel addresses A and B by one stride per dim")
    sizes = _sizes(layout)
    return tuple(0 if sizes.get(n, 1) == 1 else strides[n] for n in names)


def _axis_groups(layout: Layout, names) -> tuple:
    """Per name, the physical axes of layout holding its pieces, outermost piece first (()
    for a name layout lacks): the dimension numbers an _operand_layout encodes."""
    owner = {n: n for n in layout.names}
    pieces = Layout(layout.names, layout.shape)  # the split prefix: pieces in group order
    for p in layout.primitives:
        if not isinstance(p, Split):
            break
        i, pieces = pieces.dims.index(p.dim), pieces.then(p)
        owner[pieces.dims[i]] = owner[pieces.dims[i + 1]] = owner[p.dim]
    rest = layout.primitives[len(pieces.primitives):]
    if rest and not (len(rest) == 1 and isinstance(rest[0], Reorder)):
        raise ValueError(f"layout {layout} is not an operand's dims grouped (splits, then a "
                         f"reorder): build the spec with match()")
    axis = {d: i for i, d in enumerate(layout.dims)}
    return tuple(tuple(axis[d] for d in pieces.dims if owner[d] == n) for n in names)


@dataclasses.dataclass(frozen=True)
class MatmulSpec:
    """A dot_general reduced to batch x (M x K) @ (K x N), its operands as Layouts.

    a_layout over ("B", "M", "K") and b_layout over ("B", "K", "N"): the arrays the kernel
    reads, each logical dim split into the operand's dims of its group (batch, free or
    contracting dims, outermost first: the order the kernel flattens them in) and arranged
    in the array's axis order. A dim whose group is empty (size 1, no axis) is left out.
    lhs_source / rhs_source: the equation's operands over the same dims and pieces, the
    layouts lower() converts from. The kernel reads an operand in place (a_layout ==
    lhs_source) when one stride per dim addresses it, else its pieces in group order (a
    transpose). match() builds all four from the dimension numbers; batch, m, n, k,
    a_strides, b_strides, lhs_perm, rhs_perm and rhs_dims are read off them. (Not named
    lhs_layout: for conv specs that is the layout the kernel reads, and the planner reads
    a spec with one as a conv's.)

    epilogue: fused into the store (the planner sets it); its channel is N, so scale and
    shift have length N and index the result's last (flattened rhs free) dims, and the
    residual has the result's shape. prepacked: the rhs operand is pack_weights' output
    for the knobs the kernel is rendered with, not the equation's rhs.
    """

    a_layout: Layout
    b_layout: Layout
    lhs_source: Layout
    rhs_source: Layout
    out_shape: tuple[int, ...]
    epilogue: Epilogue = Epilogue()
    prepacked: bool = False

    def __post_init__(self):
        for field, names in (("a_layout", A_NAMES), ("b_layout", B_NAMES),
                             ("lhs_source", A_NAMES), ("rhs_source", B_NAMES)):
            layout = getattr(self, field)
            if not isinstance(layout, Layout) or layout.names != tuple(
                    n for n in names if n in layout.names):
                raise ValueError(f"MatmulSpec.{field}={layout!r} must be a Layout over "
                                 f"{' '.join(names)} (in that order; a size-1 dim may be "
                                 f"left out)")
        for read, given in (("a_layout", "lhs_source"), ("b_layout", "rhs_source")):
            r, g = getattr(self, read), getattr(self, given)
            if (r.names, r.shape) != (g.names, g.shape):
                raise ValueError(f"MatmulSpec.{read} and {given} must be one logical tensor: "
                                 f"{r.names} {r.shape} vs {g.names} {g.shape}")
        a, b = _sizes(self.a_layout), _sizes(self.b_layout)
        for n in ("B", "K"):
            if a.get(n, 1) != b.get(n, 1):
                raise ValueError(f"MatmulSpec: {n} is {a.get(n, 1)} in A, {b.get(n, 1)} in B")

    @property
    def batch(self) -> int:
        return _sizes(self.a_layout).get("B", 1)

    @property
    def m(self) -> int:
        return _sizes(self.a_layout).get("M", 1)

    @property
    def k(self) -> int:
        return _sizes(self.a_layout).get("K", 1)

    @property
    def n(self) -> int:
        return _sizes(self.b_layout).get("N", 1)

    @functools.cached_property
    def a_strides(self) -> tuple[int, int, int]:
        """Element strides of (batch, m, k) in the array the kernel reads as A."""
        return _linear(self.a_layout, A_NAMES)

    @functools.cached_property
    def b_strides(self) -> tuple[int, int, int]:
        """Element strides of (batch, k, n) in the array the kernel reads as B."""
        return _linear(self.b_layout, B_NAMES)

    @staticmethod
    def _perm(given: Layout, read: Layout):
        if given == read:
            return None
        if sorted(given.dims) != sorted(read.dims):
            raise ValueError(f"{read} is not a transpose of {given}")
        return tuple(given.dims.index(d) for d in read.dims)

    @property
    def lhs_perm(self) -> tuple[int, ...] | None:
        """The transpose taking the equation's lhs to the array the kernel reads, or None."""
        return self._perm(self.lhs_source, self.a_layout)

    @property
    def rhs_perm(self) -> tuple[int, ...] | None:
        return self._perm(self.rhs_source, self.b_layout)

    @functools.cached_property
    def rhs_dims(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(batch dims, contracting dims, free dims) of the equation's rhs, each in the order
        the kernel flattens them."""
        return _axis_groups(self.rhs_source, B_NAMES)

    def workload(self) -> dict:
        """The spec as records key it: the fields it had before layouts described its
        operands, with the same values, so that records tuned then keep their keys."""
        epi = self.epilogue
        return dict(batch=self.batch, m=self.m, n=self.n, k=self.k,
                    a_strides=self.a_strides, b_strides=self.b_strides,
                    lhs_perm=self.lhs_perm, rhs_perm=self.rhs_perm, out_shape=self.out_shape,
                    rhs_dims=self.rhs_dims,
                    epilogue=dataclasses.asdict(epi) if dataclasses.is_dataclass(epi) else epi,
                    prepacked=self.prepacked)


@dataclasses.dataclass(frozen=True, order=True)
class MatmulKnobs:
    """How the GEMM loops; every combination validate() accepts computes the same result.

    mr x nv: register tile (rows x vectors of isa.vector_floats columns); kc: depth of one
    rank-kc update; mc: rows of one L2 block (and of a task when not fuse_b); nc: columns
    of one task; pack_a / pack_b: copy the operand into register-tile panels in the
    workspace (pack_b=False reads B in place and needs it contiguous along N); fuse_b: each
    task packs its own kc x nc slice of B right before use (tasks then own whole column
    blocks) instead of an up-front packing pass; par: "tiles" (tasks are batch x row block
    x column block), "batch" (a task owns whole batch items) or "serial" (the tiles tasks,
    all on the calling thread: for small problems); unroll: k-loop unroll;
    dot: vectorise along k instead of n (needs A and B contiguous along K, e.g. B stored
    [N, K]; nothing packed, kc unused): the tile is mr rows x nv columns of C.
    """

    mr: int = 6
    nv: int = 2
    kc: int = 256
    mc: int = 96
    nc: int = 256
    pack_a: bool = True
    pack_b: bool = True
    fuse_b: bool = False
    dot: bool = False
    par: str = "tiles"
    unroll: int = 4


_PARS = ("tiles", "batch", "serial")


def _is_f32(dtype) -> bool:
    try:
        return np.dtype(dtype) == np.float32
    except TypeError:  # extended dtypes (PRNG keys, ...) are not numpy dtypes
        return False


def _operand_layout(names, groups, shape, order=None) -> Layout:
    """An operand of `shape` as a Layout over names: names[i] is its dims groups[i]
    (outermost first) flattened, split back into them, and arranged as the array whose axes
    are the operand's axes `order` (default: the operand itself). A name whose group is
    empty (size 1, no axis) is left out."""
    present = [(n, tuple(g)) for n, g in zip(names, groups) if g]
    layout = Layout(tuple(n for n, _ in present),
                    tuple(math.prod(shape[d] for d in g) for _, g in present))
    piece = {}
    for name, group in present:
        for d in reversed(group[1:]):  # split the innermost remaining dim off the outer part
            layout = layout.split(name, shape[d])
            i = layout.dims.index(f"{name}/{shape[d]}")
            name, piece[d] = layout.dims[i], layout.dims[i + 1]
        piece[group[0]] = name
    physical = tuple(piece[a] for a in (range(len(shape)) if order is None else order))
    return layout if physical == layout.dims else layout.reorder(*physical)


def _kernel_layout(names, groups, shape, given: Layout) -> Layout:
    """What the kernel reads of an operand in layout `given`: the operand itself where one
    stride per dim addresses it, else the operand transposed into group order (done by XLA
    in lower), where every group is contiguous."""
    if given.strides() is not None:
        return given
    return _operand_layout(names, groups, shape, order=[d for g in groups for d in g])


def _flattens(dims, shape) -> bool:
    """The operand's dims (outermost first) index it as one flattened dim: the ones longer
    than 1 are in axis order with only size-1 axes between them."""
    live = [d for d in dims if shape[d] != 1]
    return all(a < b and all(shape[x] == 1 for x in range(a + 1, b))
               for a, b in zip(live, live[1:]))


def _rearranged(given: Layout, read: Layout, x):
    """x (in layout given) as the kernel reads it (layout read)."""
    return x if given == read else convert(given, read)(x)


class MatmulFamily:
    """OpFamily for jax.lax.dot_general_p (see ops/base.py)."""

    name = "matmul"
    knobs_type = MatmulKnobs
    # K split into kc blocks accumulates in C, overwriting the residual before the last
    # block reads it: the output never shares the residual's buffer
    residual_in_place = False

    @property
    def primitive(self):
        import jax

        return jax.lax.dot_general_p

    # ---------------------------------------------------------------- match
    def match(self, eqn) -> MatmulSpec:
        import jax

        if eqn.primitive is not jax.lax.dot_general_p:
            raise Unsupported(f"primitive {eqn.primitive} is not dot_general")
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lc, rc, lb, rb = (tuple(int(d) for d in x) for x in (lc, rc, lb, rb))
        lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
        out = eqn.outvars[0].aval
        for what, aval in (("lhs", lhs), ("rhs", rhs), ("result", out)):
            if not _is_f32(getattr(aval, "dtype", None)):
                raise Unsupported(f"dot_general {what} dtype {getattr(aval, 'dtype', None)}: "
                                  f"only float32 kernels")
        pet = eqn.params.get("preferred_element_type")
        if pet is not None and not _is_f32(pet):
            raise Unsupported(f"dot_general preferred_element_type={pet}: only float32 kernels")
        try:
            ls, rs = tuple(int(d) for d in lhs.shape), tuple(int(d) for d in rhs.shape)
            out_shape = tuple(int(d) for d in out.shape)
        except TypeError as e:  # symbolic (shape-polymorphic) dims: kernels are per shape
            raise Unsupported(f"dot_general with symbolic shapes {lhs.shape} x {rhs.shape}: "
                              f"kernels are generated for concrete shapes") from e
        if 0 in ls or 0 in rs:
            raise Unsupported(f"dot_general with a zero-size dim (lhs {ls}, rhs {rs})")
        lfree = [d for d in range(len(ls)) if d not in lc and d not in lb]
        rfree = [d for d in range(len(rs)) if d not in rc and d not in rb]
        size = lambda shape, dims: int(np.prod([shape[d] for d in dims], dtype=np.int64))
        batch, m, n, k = size(ls, lb), size(ls, lfree), size(rs, rfree), size(ls, lc)
        for name, v in (("batch", batch), ("M", m), ("N", n), ("K", k)):
            if v > _MAX_DIM:
                raise Unsupported(f"dot_general {name}={v} exceeds {_MAX_DIM}")
        # The contraction sums over pairs, so the pair order is free: take the one that lets
        # the lhs (else the rhs) address K with a single stride. (Sorted outermost first;
        # axes only size-1 axes apart keep the pairs' order.)
        pairs = list(zip(lc, rc))
        orders = [sorted(pairs, key=lambda p: -math.prod(ls[p[0] + 1:])),
                  sorted(pairs, key=lambda p: -math.prod(rs[p[1] + 1:]))]
        lk, rk = [p[0] for p in orders[0]], [p[1] for p in orders[0]]
        for order in orders:
            lk_, rk_ = [p[0] for p in order], [p[1] for p in order]
            if _flattens(lk_, ls) and _flattens(rk_, rs):
                lk, rk = lk_, rk_
                break
        # The one place dimension numbers become layouts.
        lgroups, rgroups = (lb, lfree, lk), (rb, rk, rfree)
        lhs_source = _operand_layout(A_NAMES, lgroups, ls)
        rhs_source = _operand_layout(B_NAMES, rgroups, rs)
        return MatmulSpec(a_layout=_kernel_layout(A_NAMES, lgroups, ls, lhs_source),
                          b_layout=_kernel_layout(B_NAMES, rgroups, rs, rhs_source),
                          lhs_source=lhs_source, rhs_source=rhs_source, out_shape=out_shape)

    def flops(self, spec: MatmulSpec) -> int:
        return 2 * spec.batch * spec.m * spec.n * spec.k

    def prefers(self, spec: MatmulSpec) -> bool:
        return True  # the only dot_general family

    # ---------------------------------------------------------------- knobs
    def default_knobs(self, spec: MatmulSpec, isa) -> MatmulKnobs:
        """The untuned choice (rules and their measurements in _default_knobs)."""
        knobs = self._default_knobs(spec, isa)
        # Below ~2 MFLOP waking the pool costs more than the second core gives back
        # (64x64x64: 15 us serial vs 37 us on 2 threads, XLA 13; 96^3: a tie).
        if self.flops(spec) < 2_000_000:
            knobs = dataclasses.replace(knobs, par="serial")
        return knobs

    def _default_knobs(self, spec: MatmulSpec, isa) -> MatmulKnobs:
        """Heuristic. Measured on the 2-core EPYC Zen3 (AVX2) shared with other jobs:
        jax.jit(ffi_call) interleaved with jax.jit(lax.dot_general), medians.

        B stored [N, K] and M <= 16: dot tiles along k, 2 rows x 4 columns (T16x768x3072:
        0.88 ms vs XLA 1.20; the packed GEMM path took 1.60). M <= 8, B contiguous along N:
        nothing packed, tiles of 1..4 rows x up to 48 columns over kc=8 rows of B (more rows
        at a 4 KiB-multiple stride share one L1 set: 1x768x3072 single thread 0.22 ms at
        kc=8, 0.44 ms at kc=16; 2 threads 0.13 ms vs XLA 0.19). Otherwise 6x16 tiles,
        kc=256, A read in place when its rows are contiguous (12x128x64x128: 0.29 ms vs
        0.34 ms packed, one thread), B packed by each column task into its own L2-sized
        slice (128x768x3072: 7.8 ms vs 8.4 ms packed up front, one thread; a small slice
        also spares the page faults a fresh whole-B workspace costs every call).
        128x768x768: 0.96 ms vs XLA 0.97; 512x1024x1024: 6.15 ms vs 6.27.
        """
        w, regs = isa.vector_floats, isa.vector_registers
        a_sb, a_sm, a_sk = spec.a_strides
        b_contig_n = spec.b_strides[2] == 1 or spec.n == 1
        k_contig = spec.k == 1 or (a_sk == 1 and spec.b_strides[1] == 1)
        row_tiles = -(-spec.m // 4)
        if spec.m <= 16 and not b_contig_n and k_contig:
            # B stored [N, K], few rows: dot-product tiles along k, B streamed once from
            # memory and reused from L1 by every row tile.
            mr = min(spec.m, 2)
            nv = max(1, min(8 if mr == 1 else 4, (regs - 1 - mr) // mr))
            nc = nv * max(1, -(-spec.n // (-(-8 // spec.batch) * nv)))
            return MatmulKnobs(mr=mr, nv=nv, kc=1, mc=mr * -(-spec.m // mr), nc=nc,
                               pack_a=False, pack_b=False, fuse_b=False, dot=True,
                               par="tiles", unroll=2)
        if spec.m <= 8 and b_contig_n:
            mr = -(-spec.m // row_tiles)  # 1..4 rows per tile, tiles as even as possible
            nv = max(1, min(6, (regs - 1) // (mr + 1)))
            nr = nv * w
            # About 4 column tasks in all (dynamic balance on 2 threads).
            nc = nr * max(1, -(-spec.n // (-(-4 // spec.batch) * nr)))
            return MatmulKnobs(mr=mr, nv=nv, kc=min(8, spec.k), mc=mr * row_tiles, nc=nc,
                               pack_a=False, pack_b=False, fuse_b=False, par="tiles",
                               unroll=4)
        mr, nv = (6, 2) if regs >= 16 and w > 1 else (4, 2) if w > 1 else (4, 3)
        max_nc = 256
        if regs >= 32 and w > 1 and spec.k >= 512 and spec.n % (2 * 3 * w) == 0:
            # 32 registers (AVX-512), a deep K and N in whole pairs of 48-wide panels: 8 x 3
            # vectors (24 accumulators), column tasks of 2 panels (an even number of equal
            # tasks for 2 threads). Zen5-class EPYC, 2 threads, cold weights, against the
            # 6 x 2 rule: 128x768x768 1.04-1.10x, 128x768x3072 1.04-1.06x, 128x3072x768
            # 1.03-1.09x, 128x768x2304 1.14x, 512x768x2304 1.10x. It lost where K is 64..256
            # (256^3 0.90x, attention's 12x128x64x128 0.88x) and where N is no multiple of
            # 96 (N = 1024: 11 ragged tasks, 0.92x): those keep 6 x 2.
            mr, nv, max_nc = 8, 3, 2 * 3 * w
        nr = nv * w
        kc = min(256, spec.k)
        pack_a = not (a_sk == 1 or spec.k == 1)
        # Column blocks: B slice kc x nc within half of L2, and about 8 tasks (batch items
        # count) so that dynamic chunks balance 2 threads even when another job takes a core.
        splits = -(-8 // spec.batch)
        nc = nr * max(1, min(max_nc // nr, -(-spec.n // (splits * nr))))
        col_tasks = spec.batch * -(-spec.n // nc)
        if col_tasks >= 4:
            mc = mr * max(1, min(22, -(-spec.m // mr)))
            return MatmulKnobs(mr=mr, nv=nv, kc=kc, mc=mc, nc=nc, pack_a=pack_a, pack_b=True,
                               fuse_b=True, par="tiles", unroll=4)
        # Few columns: split rows too, B packed once up front and shared.
        row_blocks = max(1, -(-4 // col_tasks))
        mc = mr * max(1, min(22, -(-spec.m // (row_blocks * mr))))
        return MatmulKnobs(mr=mr, nv=nv, kc=kc, mc=mc, nc=nc, pack_a=pack_a, pack_b=True,
                           fuse_b=False, par="tiles", unroll=4)

    def validate(self, spec: MatmulSpec, knobs: MatmulKnobs, isa) -> None:
        if not isinstance(knobs, MatmulKnobs):
            raise KnobError(f"knobs must be MatmulKnobs, got {type(knobs).__name__}")
        for name, lo, hi in (("mr", 1, 16), ("nv", 1, 16), ("kc", 1, 1 << 16),
                             ("mc", 1, 1 << 20), ("nc", 1, 1 << 20), ("unroll", 1, 16)):
            v = getattr(knobs, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise KnobError(f"{name}={v!r} must be an int in [{lo}, {hi}]")
        for name in ("pack_a", "pack_b", "fuse_b", "dot"):
            if not isinstance(getattr(knobs, name), bool):
                raise KnobError(f"{name}={getattr(knobs, name)!r} must be a bool")
        if knobs.fuse_b and not knobs.pack_b:
            raise KnobError("fuse_b=True packs B inside the tasks; it needs pack_b=True")
        if knobs.par not in _PARS:
            raise KnobError(f"par={knobs.par!r}: choose one of {_PARS}")
        for layout in (spec.a_layout, spec.b_layout):
            _linear(layout, layout.names)  # KnobError unless one stride per dim addresses it
        if knobs.dot:
            self._validate_dot(spec, knobs, isa)
        else:
            self._validate_gemm(spec, knobs, isa)
        ws = self._workspace_bytes(spec, knobs, isa)
        if ws > _MAX_WORKSPACE:
            raise KnobError(f"workspace of {ws} bytes exceeds {_MAX_WORKSPACE}; pack fewer "
                            f"operands (pack_a=False; pack_b=False if B is contiguous along N)")

    @staticmethod
    def _validate_gemm(spec, knobs, isa) -> None:
        need = knobs.mr * knobs.nv + knobs.nv + 1
        if need > isa.vector_registers:
            raise KnobError(
                f"mr={knobs.mr} x nv={knobs.nv} needs {need} vector registers "
                f"({knobs.mr * knobs.nv} accumulators + {knobs.nv} B vectors + 1 broadcast), "
                f"{isa.name} has {isa.vector_registers}")
        if knobs.mc % knobs.mr:
            raise KnobError(f"mc={knobs.mc} must be a multiple of mr={knobs.mr}")
        nr = knobs.nv * isa.vector_floats
        if knobs.nc % nr:
            raise KnobError(f"nc={knobs.nc} must be a multiple of nr=nv*{isa.vector_floats}={nr}")
        if not knobs.pack_b and spec.b_strides[2] != 1 and spec.n != 1:
            raise KnobError(
                f"pack_b=False reads B in place and needs it contiguous along N; its N stride "
                f"is {spec.b_strides[2]} (B is stored [N, K]): use pack_b=True")

    @staticmethod
    def _validate_dot(spec, knobs, isa) -> None:
        need = knobs.mr * knobs.nv + knobs.mr + 1
        if need > isa.vector_registers:
            raise KnobError(
                f"dot tile mr={knobs.mr} x nv={knobs.nv} needs {need} vector registers "
                f"({knobs.mr * knobs.nv} accumulators + {knobs.mr} A vectors + 1 B vector), "
                f"{isa.name} has {isa.vector_registers}")
        if knobs.pack_a or knobs.pack_b or knobs.fuse_b:
            raise KnobError("dot=True reads A and B in place: set pack_a=pack_b=fuse_b=False")
        if spec.k > 1 and (spec.a_strides[2] != 1 or spec.b_strides[1] != 1):
            raise KnobError(
                f"dot=True needs A and B contiguous along K; their K strides are "
                f"{spec.a_strides[2]} and {spec.b_strides[1]}: use dot=False")
        if knobs.mc % knobs.mr:
            raise KnobError(f"mc={knobs.mc} must be a multiple of mr={knobs.mr}")
        if knobs.nc % knobs.nv:
            raise KnobError(f"nc={knobs.nc} must be a multiple of nv={knobs.nv} with dot=True")

    def space(self, spec: MatmulSpec, isa) -> Space:
        """Layout: whether A and B are copied into register-tile panels (pack_a, pack_b; with
        prepacked weights pack_b is the packed B's layout), B packed per task (fuse_b), dot
        tiles reading both along K in place (dot; offered only where K is contiguous in
        both). Loop: register tile (mr x nv), cache blocks (kc, mc, nc), parallel axis,
        unroll. mc and nc run over multiples of every mr and nr of the space (and the
        heuristic's own), so each is a legal block for every tile; the rest (registers,
        packing combinations, B in place needing N contiguous, the workspace) is
        validate()'s."""
        d = self.default_knobs(spec, isa)
        w = isa.vector_floats

        values = axis_values
        def spanning(unit, size):
            """unit x 1, 2, 4, ...: up to the first block covering size, at most 5."""
            out = [unit]
            while out[-1] < size and len(out) < 5:
                out.append(out[-1] * 2)
            return out

        mrs = values([r for r in (1, 2, 3, 4, 6, 8) if r <= spec.m] or [1], d.mr)
        nvs = values([v for v in (1, 2, 3, 4, 6, 8) if v <= max(1, -(-spec.n // w))], d.nv)
        kcs = values([min(spec.k, c) for c in (8, 32, 64, 128, 256, 512)], d.kc)
        mcs = values(spanning(math.lcm(*mrs), spec.m), d.mc)
        # gemm tiles need nc % (nv * w) == 0, dot tiles nc % nv == 0: multiples of both
        ncs = values(spanning(math.lcm(*nvs) * w, spec.n), d.nc)
        pars = tuple(p for p in _PARS if p != "batch" or spec.batch > 1 or d.par == p)
        k_contig = spec.k == 1 or (spec.a_strides[2] == 1 and spec.b_strides[1] == 1)
        return Space(self.name, MatmulKnobs, (
            Axis("pack_a", (False, True), "layout"),
            Axis("pack_b", (False, True), "layout"),
            Axis("fuse_b", (False, True), "layout"),
            Axis("dot", values([False] + ([True] if k_contig else []), d.dot), "layout"),
            Axis("mr", mrs, "loop"),
            Axis("nv", nvs, "loop"),
            Axis("kc", kcs, "loop"),
            Axis("mc", mcs, "loop"),
            Axis("nc", ncs, "loop"),
            Axis("par", pars, "loop"),
            Axis("unroll", values((1, 2, 4, 8), d.unroll), "loop"),
        ))

    @staticmethod
    def _reads_packed_b(spec, knobs) -> bool:
        """The kernel reads B as pack_weights' panels (else B in place, canonicalised)."""
        return spec.prepacked and knobs.pack_b and not knobs.dot

    @classmethod
    def _workspace_bytes(cls, spec, knobs, isa) -> int:
        """Mirrors WS_FLOATS in matmul.cc (a static_assert there checks the two agree)."""
        cdiv = lambda a, b: -(-a // b)
        nr = knobs.nv * isa.vector_floats
        prepacked = cls._reads_packed_b(spec, knobs)
        fuse = knobs.pack_b and knobs.fuse_b and not prepacked
        a_panels = cdiv(spec.m, knobs.mr) * knobs.mr * spec.k if knobs.pack_a else 0
        b_panels = (cdiv(spec.n, nr) * nr * spec.k
                    if knobs.pack_b and not knobs.fuse_b and not prepacked else 0)
        floats = spec.batch * (a_panels + b_panels)
        if fuse:
            ntasks = (spec.batch if knobs.par == "batch" else
                      spec.batch * cdiv(spec.n, knobs.nc))
            task_cols = cdiv(spec.n, nr) * nr if knobs.par == "batch" else knobs.nc
            slots = 1 if knobs.par == "serial" else min(ntasks, 16)
            floats += slots * min(knobs.kc, spec.k) * task_cols
        return 4 * floats

    # ---------------------------------------------------------------- codegen
    def render(self, spec: MatmulSpec, knobs: MatmulKnobs, isa):
        self.validate(spec, knobs, isa)
        if not isinstance(spec.epilogue, Epilogue):
            raise rn.RenderError(f"spec.epilogue={spec.epilogue!r} must be an Epilogue")
        if not isinstance(spec.prepacked, bool):
            raise rn.RenderError(f"spec.prepacked={spec.prepacked!r} must be a bool")
        epi = spec.epilogue
        # Length-1 axes have no layout: canonical strides, so B may be read in place and
        # k counts as contiguous.
        a_sb, a_sm, a_sk = spec.a_strides
        b_sb, b_sk, b_sn = spec.b_strides
        if spec.n == 1:
            b_sn = 1
        if spec.k == 1:
            a_sk = b_sk = 1
        kc = spec.k if knobs.dot else min(knobs.kc, spec.k)
        values = {
            "W": isa.vector_floats,
            "BATCH": spec.batch, "M": spec.m, "N": spec.n, "K": spec.k,
            "A_SB": a_sb, "A_SM": a_sm, "A_SK": a_sk, "B_SB": b_sb, "B_SK": b_sk, "B_SN": b_sn,
            "MR": knobs.mr, "NV": knobs.nv, "KC": kc, "MC": knobs.mc,
            "NC": knobs.nc, "PACK_A": knobs.pack_a, "PACK_B": knobs.pack_b,
            "FUSE_B": knobs.fuse_b, "DOT": knobs.dot,
            "PAR_BATCH": knobs.par == "batch", "SERIAL": knobs.par == "serial",
            "UNROLL": knobs.unroll,
            "PREPACKED": self._reads_packed_b(spec, knobs),
            "ACT": rn.check_int("epilogue activation code", epi.activation_code, 0, 15),
            "SCALE": epi.scale, "SHIFT": epi.shift, "RESIDUAL": epi.residual,
            "WORKSPACE_BYTES": self._workspace_bytes(spec, knobs, isa),
        }
        # knob tuples that render the same kernel (any kc >= K) share one build
        return rn.kernel_source("matmul.cc", "alt_matmul", values)

    @staticmethod
    def _check_count(spec: MatmulSpec, operands: Sequence) -> tuple:
        """The epilogue inputs' names; ValueError unless operands are lhs, rhs and those."""
        names = spec.epilogue.inputs()
        if len(operands) != 2 + len(names):
            raise ValueError(f"matmul kernel: expected lhs, rhs"
                             f"{''.join(', ' + n for n in names)} ({2 + len(names)} operands), "
                             f"got {len(operands)}")
        return names

    @staticmethod
    def _ffi_operands(spec: MatmulSpec, operands: Sequence) -> list:
        """The arrays the kernel reads, from [lhs, rhs, *epilogue inputs] with the rhs
        already packed when spec.prepacked (pack_weights rearranges it itself): lhs and
        rhs converted from lhs_source / rhs_source to a_layout / b_layout; scale and shift
        flattened to N (they index the flattened rhs free dims), the residual reshaped to
        the result's shape."""
        import jax.numpy as jnp

        names = MatmulFamily._check_count(spec, operands)
        lhs, rhs, *extra = operands
        lhs = _rearranged(spec.lhs_source, spec.a_layout, lhs)
        if not spec.prepacked:
            rhs = _rearranged(spec.rhs_source, spec.b_layout, rhs)
        shapes = {"scale": (spec.n,), "shift": (spec.n,), "residual": spec.out_shape}
        extra = [jnp.reshape(jnp.asarray(x, jnp.float32), shapes[n]) for n, x in zip(names, extra)]
        return [lhs, rhs, *extra]

    def kernel_inputs(self, spec: MatmulSpec, knobs: MatmulKnobs, operands: Sequence,
                      isa) -> list:
        """What the kernel rendered for (spec, knobs, isa) reads, from the equation's
        operands [lhs, rhs (unpacked), *epilogue inputs]: what lower() passes, with the rhs
        packed first when spec.prepacked."""
        self._check_count(spec, operands)
        if spec.prepacked:
            lhs, rhs, *extra = operands
            operands = [lhs, self.pack_weights(spec, knobs, rhs, isa), *extra]
        return self._ffi_operands(spec, operands)

    def lower(self, spec: MatmulSpec, kernel, operands: Sequence,
              reuse_residual: bool = False) -> Sequence:
        """operands: [lhs, rhs, scale?, shift?, residual?] (Epilogue.inputs() order); with
        spec.prepacked the rhs is pack_weights' output and is passed through untouched."""
        import jax
        import jax.numpy as jnp

        from alt_jax import runtime

        if reuse_residual:
            raise ValueError("matmul kernels cannot write into the residual's buffer "
                             "(residual_in_place is False)")
        out = jax.ShapeDtypeStruct(spec.out_shape, jnp.float32)
        return runtime.ffi_call(kernel, self._ffi_operands(spec, operands), [out])

    # ---------------------------------------------------------------- weights
    def pack_weights(self, spec: MatmulSpec, knobs: MatmulKnobs, rhs, isa):
        """The rhs (the equation's, original layout) as the kernel rendered for (spec with
        prepacked=True, knobs, isa) reads it: jnp only, so it traces and XLA fuses it.

        pack_b (not dot): B[batch, k, n] cut into nr-wide panels, zero-padded along N,
        shape [batch, ceil(N/nr), K, nr] (nr = nv * isa.vector_floats). Otherwise the kernel
        reads B in place: the rhs in b_layout, as lower() would pass it.
        """
        import jax.numpy as jnp

        if not (knobs.pack_b and not knobs.dot):
            return _rearranged(spec.rhs_source, spec.b_layout, rhs)
        nr = knobs.nv * isa.vector_floats
        npb = -(-spec.n // nr)
        # rhs_source.invert: the logical B[batch, k, n] (size-1 dims it leaves out aside)
        b = jnp.reshape(spec.rhs_source.invert(rhs), (spec.batch, spec.k, spec.n))
        b = jnp.pad(b, ((0, 0), (0, 0), (0, npb * nr - spec.n)))
        return jnp.transpose(jnp.reshape(b, (spec.batch, spec.k, npb, nr)), (0, 2, 1, 3))


FAMILY = MatmulFamily()

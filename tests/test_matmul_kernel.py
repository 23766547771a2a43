"""Numerics of the matmul family (ops/matmul.py + codegen/matmul.cc) against lax.dot_general.

Entry points: pytest tests/test_matmul_kernel.py [-m slow]. Kernels run through
runtime.run_numpy over a grid of dimension structures and a table of knob tuples; a few go
through runtime.ffi_call inside jax.jit; match() and validate() refusals are checked too;
fused epilogues against Epilogue.reference, prepacked weights against the unpacked kernel.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from alt_jax import device, records, runtime
from epilogue_cases import EPILOGUES as COMMON_EPILOGUES
from alt_jax.layout import Layout, convert
from alt_jax.ops.base import KnobError, Unsupported
from alt_jax.ops.epilogue import ACTIVATIONS, Epilogue
from alt_jax.ops.matmul import FAMILY, MatmulKnobs

ISA = device.detect_isa()
PLAIN = (((1,), (0,)), ((), ()))


@pytest.fixture
def cache(kernel_cache):
    """The session's private kernel cache (conftest.py), never the user's."""
    return kernel_cache


def _eqn(lshape, rshape, dn, dtype=jnp.float32, **kw):
    f = lambda x, y: lax.dot_general(x, y, dn, **kw)
    args = jax.ShapeDtypeStruct(lshape, dtype), jax.ShapeDtypeStruct(rshape, dtype)
    return jax.make_jaxpr(f)(*args).jaxpr.eqns[0]


def _operands(lshape, rshape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(lshape, dtype=np.float32),
            rng.standard_normal(rshape, dtype=np.float32))


def _as_read(spec, a, b):
    """The equation's operands as the kernel reads them: lhs_source -> a_layout and
    rhs_source -> b_layout (what lower() does in jnp)."""
    return (np.asarray(convert(spec.lhs_source, spec.a_layout)(a)),
            np.asarray(convert(spec.rhs_source, spec.b_layout)(b)))


def _rel_err(out, ref):
    return float(np.abs(out - ref).max() / max(1.0, np.abs(ref).max()))


def _check(cache, lshape, rshape, dn, knobs=None):
    a, b = _operands(lshape, rshape)
    spec = FAMILY.match(_eqn(lshape, rshape, dn))
    knobs = knobs if knobs is not None else FAMILY.default_knobs(spec, ISA)
    FAMILY.validate(spec, knobs, ISA)
    kernel = cache.build(FAMILY.render(spec, knobs, ISA))
    x, y = _as_read(spec, a, b)
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [x, y], [out])
    ref = np.asarray(lax.dot_general(a, b, dn, precision=lax.Precision.HIGHEST))
    assert out.shape == ref.shape
    err = _rel_err(out, ref)
    assert err <= 1e-4, f"{lshape} {rshape} {dn} {knobs}: rel err {err}"
    return spec


# (lhs shape, rhs shape, dimension numbers): every structure match() must accept.
GRID = [
    ((7, 13), (13, 17), PLAIN),                                  # plain, odd sizes
    ((1, 255), (255, 33), PLAIN),                                # M = 1
    ((13, 7), (7, 1), PLAIN),                                    # N = 1
    ((17, 1), (1, 19), PLAIN),                                   # K = 1
    ((3, 3), (3, 3), PLAIN),
    ((13, 7), (13, 17), (((0,), (0,)), ((), ()))),               # A stored [K, M]
    ((7, 13), (17, 13), (((1,), (1,)), ((), ()))),               # B stored [N, K]
    ((13, 7), (17, 13), (((0,), (1,)), ((), ()))),               # both transposed
    ((1, 13), (17, 13), (((1,), (1,)), ((), ()))),               # M = 1, B [N, K]
    ((3, 7, 13), (3, 13, 17), (((2,), (1,)), ((0,), (0,)))),     # 'bmk,bkn'
    ((7, 3, 13), (3, 13, 17), (((2,), (1,)), ((1,), (0,)))),     # 'mbk,bkn'
    ((7, 13, 3), (13, 3, 17), (((1,), (0,)), ((2,), (1,)))),     # 'mkb,kbn'
    ((3, 13, 7), (17, 3, 13), (((1,), (2,)), ((0,), (1,)))),     # 'bkm,nbk'
    ((5, 3, 4), (3, 4, 6), (((1, 2), (0, 1)), ((), ()))),        # two contracting dims
    ((5, 3, 4), (4, 3, 6), (((1, 2), (1, 0)), ((), ()))),        # contracting pairs crossed
    ((2, 5, 3, 4), (4, 6, 3), (((2, 3), (2, 0)), ((), ()))),     # two free lhs dims
    ((5, 7), (7, 2, 3), PLAIN),                                  # two free rhs dims
    ((2, 3, 5, 7), (3, 2, 7, 4), (((3,), (2,)), ((0, 1), (1, 0)))),  # two batch dims, crossed
    ((2, 1, 9, 255), (2, 255, 1), (((3,), (1,)), ((0,), (0,)))),  # size-1 dims
]


@pytest.mark.parametrize("lshape,rshape,dn", GRID)
def test_grid_default_knobs(cache, lshape, rshape, dn):
    _check(cache, lshape, rshape, dn)


# Knob tuples across the space: tile shapes, cache blocks, packing, parallel axis, unroll.
KNOBS = [
    MatmulKnobs(mr=6, nv=2, kc=256, mc=96, nc=256, pack_a=True, pack_b=True),
    MatmulKnobs(mr=4, nv=3, kc=5, mc=8, nc=3 * ISA.vector_floats,
                pack_a=False, pack_b=True, par="batch", unroll=1),
    MatmulKnobs(mr=1, nv=6, kc=8, mc=1, nc=6 * ISA.vector_floats, pack_a=False, pack_b=False),
    MatmulKnobs(mr=3, nv=1, kc=7, mc=9, nc=2 * ISA.vector_floats, pack_a=True, pack_b=False,
                par="batch", unroll=8),
    MatmulKnobs(mr=2, nv=4, kc=16, mc=4, nc=4 * ISA.vector_floats, pack_a=False, pack_b=False,
                unroll=2),
    MatmulKnobs(mr=5, nv=2, kc=3, mc=5, nc=2 * ISA.vector_floats, pack_a=True, pack_b=True,
                par="batch"),
    MatmulKnobs(mr=6, nv=2, kc=5, mc=12, nc=2 * ISA.vector_floats, pack_a=True, fuse_b=True),
    MatmulKnobs(mr=4, nv=3, kc=16, mc=8, nc=3 * ISA.vector_floats, pack_a=False, fuse_b=True,
                par="batch", unroll=2),
    MatmulKnobs(mr=6, nv=2, kc=9, mc=6, nc=2 * ISA.vector_floats, pack_a=True, fuse_b=True,
                par="serial"),
]
KNOB_SHAPES = [
    ((19, 37), (37, 29), PLAIN),
    ((3, 9, 11), (3, 11, 53), (((2,), (1,)), ((0,), (0,)))),
    ((11, 2, 23), (2, 23, 18), (((2,), (1,)), ((1,), (0,)))),
    ((1, 40), (40, 70), PLAIN),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: f"mr{k.mr}nv{k.nv}kc{k.kc}"
                         f"{'A' if k.pack_a else ''}{'B' if k.pack_b else ''}"
                         f"{'F' if k.fuse_b else ''}{k.par}")
@pytest.mark.parametrize("lshape,rshape,dn", KNOB_SHAPES)
def test_knob_table(cache, knobs, lshape, rshape, dn):
    spec = FAMILY.match(_eqn(lshape, rshape, dn))
    FAMILY.validate(spec, knobs, ISA)
    _check(cache, lshape, rshape, dn, knobs)


DOT_KNOBS = [
    MatmulKnobs(mr=1, nv=8, kc=1, mc=1, nc=8, pack_a=False, pack_b=False, dot=True),
    MatmulKnobs(mr=4, nv=2, kc=1, mc=8, nc=6, pack_a=False, pack_b=False, dot=True, unroll=1),
    MatmulKnobs(mr=3, nv=3, kc=1, mc=3, nc=9, pack_a=False, pack_b=False, dot=True,
                par="batch", unroll=4),
    MatmulKnobs(mr=2, nv=4, kc=1, mc=2, nc=4, pack_a=False, pack_b=False, dot=True,
                par="serial"),
]
DOT_SHAPES = [
    ((5, 37), (29, 37), (((1,), (1,)), ((), ()))),                 # 'mk,nk'
    ((3, 4, 19), (3, 23, 19), (((2,), (2,)), ((0,), (0,)))),      # 'bmk,bnk'
    ((7, 1), (3, 1), (((1,), (1,)), ((), ()))),                    # K = 1
    ((2, 6), (5, 6), (((1,), (1,)), ((), ()))),                    # K < vector width
]


@pytest.mark.parametrize("knobs", DOT_KNOBS, ids=lambda k: f"dot_mr{k.mr}nv{k.nv}{k.par}")
@pytest.mark.parametrize("lshape,rshape,dn", DOT_SHAPES)
def test_dot_knob_table(cache, knobs, lshape, rshape, dn):
    _check(cache, lshape, rshape, dn, knobs)


def test_dot_needs_k_contiguous():
    spec = FAMILY.match(_eqn((9, 21), (21, 19), PLAIN))  # B contiguous along N, not K
    with pytest.raises(KnobError, match="dot=True needs"):
        FAMILY.validate(spec, DOT_KNOBS[0], ISA)
    with pytest.raises(KnobError, match="dot=True reads"):
        FAMILY.validate(spec, dataclasses.replace(DOT_KNOBS[0], pack_b=True), ISA)
    with pytest.raises(KnobError, match="dot tile"):
        FAMILY.validate(spec, dataclasses.replace(DOT_KNOBS[0], mr=2, nv=8, mc=2), device.AVX2)


def test_pack_b_required_for_transposed_b(cache):
    lshape, rshape, dn = (9, 21), (19, 21), (((1,), (1,)), ((), ()))
    spec = FAMILY.match(_eqn(lshape, rshape, dn))
    with pytest.raises(KnobError, match="pack_b=False"):
        FAMILY.validate(spec, MatmulKnobs(pack_b=False), ISA)
    _check(cache, lshape, rshape, dn, MatmulKnobs(mr=4, nv=2, kc=8, mc=8,
                                                   nc=2 * ISA.vector_floats, pack_a=False))


@pytest.mark.parametrize("m,k,n", [(1, 255, 3 * 8 + 5), (4, 64, 100), (7, 33, 50),
                                   (64, 96, 40)])
def test_default_paths(cache, m, k, n):
    _check(cache, (m, k), (k, n), PLAIN)                          # B contiguous along N
    _check(cache, (m, k), (n, k), (((1,), (1,)), ((), ())))       # B stored [N, K]


@pytest.mark.parametrize("isa", [device.ISAS["avx512"], device.ISAS["avx2"]])
def test_deep_gemm_default_tile(isa):
    """AVX-512's 32 registers take an 8 x 3 tile for deep GEMMs whose N is whole pairs of
    48-wide panels; AVX2 (16 registers) and other N keep 6 x 2."""
    def knobs(m, k, n):
        return FAMILY.default_knobs(FAMILY.match(_eqn((m, k), (k, n), PLAIN)), isa)
    wide = isa.vector_registers >= 32
    assert (knobs(128, 768, 3072).mr, knobs(128, 768, 3072).nv) == ((8, 3) if wide else (6, 2))
    assert (knobs(128, 1024, 1024).mr, knobs(128, 1024, 1024).nv) == (6, 2)
    assert (knobs(256, 256, 288).mr, knobs(256, 256, 288).nv) == (6, 2)


@pytest.mark.skipif(ISA.vector_registers < 32, reason="the 8 x 3 default needs 32 registers")
@pytest.mark.parametrize("m,k,n", [(37, 512, 192), (128, 520, 96)])
def test_deep_gemm_default_computes(cache, m, k, n):
    spec = _check(cache, (m, k), (k, n), PLAIN)
    assert FAMILY.default_knobs(spec, ISA).mr == 8


@pytest.mark.slow
@pytest.mark.parametrize("m,k,n", [(1, 768, 3072), (128, 768, 768), (255, 513, 257),
                                   (97, 1000, 301)])
def test_larger(cache, m, k, n):
    _check(cache, (m, k), (k, n), PLAIN)


@pytest.mark.slow
@pytest.mark.parametrize("knobs", KNOBS)
def test_larger_knob_table(cache, knobs):
    _check(cache, (130, 700), (700, 270), PLAIN, knobs)


# ----------------------------------------------------------------- through jax.jit + FFI
@pytest.mark.parametrize("lshape,rshape,dn", [
    ((33, 65), (65, 47), PLAIN),
    ((1, 129), (129, 200), PLAIN),
    ((7, 4, 13), (4, 13, 17), (((2,), (1,)), ((1,), (0,)))),     # 'mbk,bkn'
    ((4, 13, 7), (4, 17, 13), (((1,), (2,)), ((0,), (0,)))),     # 'bkm,bnk'
    ((2, 3, 5, 7), (3, 2, 7, 4), (((3,), (2,)), ((0, 1), (1, 0)))),  # needs a transpose
])
def test_ffi_call_in_jit(cache, lshape, rshape, dn):
    a, b = _operands(lshape, rshape, seed=1)
    spec = FAMILY.match(_eqn(lshape, rshape, dn))
    kernel = cache.build(FAMILY.render(spec, FAMILY.default_knobs(spec, ISA), ISA))
    out = jax.jit(lambda x, y: FAMILY.lower(spec, kernel, [x, y])[0])(a, b)
    ref = lax.dot_general(a, b, dn, precision=lax.Precision.HIGHEST)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert _rel_err(np.asarray(out), np.asarray(ref)) <= 1e-4


# ----------------------------------------------------------------- match / validate
def test_match_spec_strides():
    spec = FAMILY.match(_eqn((7, 3, 13), (3, 13, 17), (((2,), (1,)), ((1,), (0,)))))
    assert (spec.batch, spec.m, spec.n, spec.k) == (3, 7, 17, 13)
    assert spec.a_layout == spec.lhs_source == Layout("BMK", (3, 7, 13)).reorder("M", "B", "K")
    assert spec.a_strides == (13, 39, 1) and spec.lhs_perm is None
    assert spec.b_strides == (13 * 17, 17, 1) and spec.rhs_perm is None
    spec = FAMILY.match(_eqn((7, 13), (17, 13), (((1,), (1,)), ((), ()))))
    assert spec.b_layout == Layout("KN", (13, 17)).reorder("N", "K")  # no batch dim: no B
    assert spec.b_strides == (0, 1, 13) and spec.rhs_perm is None  # B read as [N, K]
    hash(spec)


def test_match_layouts_group_and_transpose():
    # 'b m1 k0 m2 k1' x 'k1 b k0 n': M = (1, 4) and K = (2, 5) split into the lhs's dims; the
    # lhs's K dims are not adjacent, so the kernel reads it transposed into group order.
    spec = FAMILY.match(_eqn((3, 2, 1, 4, 5), (5, 3, 2, 6), (((1, 4), (2, 0)), ((0,), (1,)))))
    assert str(spec.lhs_source) == "B K/5 M/4 4m 5k" and spec.lhs_source.physical_shape == (
        3, 2, 1, 4, 5)
    assert str(spec.a_layout) == "B M/4 4m K/5 5k" and spec.lhs_perm == (0, 2, 3, 1, 4)
    assert str(spec.rhs_source) == "5k B K/5 N" and str(spec.b_layout) == "B K/5 5k N"
    assert spec.rhs_perm == (1, 2, 0, 3) and spec.rhs_dims == ((1,), (2, 0), (3,))
    assert spec.lhs_source.strides() is None
    assert spec.a_strides == (40, 10, 1) and spec.b_strides == (60, 6, 1)
    # an operand without a batch / free / contracting dim has no such logical dim
    spec = FAMILY.match(_eqn((300,), (), (((), ()), ((), ()))))
    assert spec.a_layout.names == ("M",) and spec.b_layout == Layout((), ())
    assert (spec.batch, spec.m, spec.n, spec.k, spec.rhs_dims) == (1, 300, 1, 1, ((), (), ()))


def test_strides_see_a_dim_cut_into_three_pieces():
    # M = (2, 3, 4) flattened: the chain writes m/4/3 as m/12, and strides() still pairs
    # m/4%3 with it (an operand's group of three dims is one linear dim)
    lay = Layout("MK", (24, 5)).split("M", 4).split("M/4", 3)
    assert lay.dims == ("M/4/3", "3(m/4)", "4m", "K")
    assert lay.strides() == {"M": 5, "K": 1}
    assert lay.reorder("M/4/3", "3(m/4)", "K", "4m").strides() is None
    assert lay.reorder("K", "M/4/3", "3(m/4)", "4m").strides() == {"M": 1, "K": 24}


def test_spec_checks_its_layouts():
    spec = FAMILY.match(_eqn((7, 13), (13, 17), PLAIN))
    with pytest.raises(ValueError, match="one logical tensor"):
        dataclasses.replace(spec, lhs_source=Layout("MK", (13, 7)))
    with pytest.raises(ValueError, match="over B M K"):
        dataclasses.replace(spec, a_layout=Layout("KM", (13, 7)))
    with pytest.raises(ValueError, match="K is 13 in A, 12 in B"):
        dataclasses.replace(spec, b_layout=Layout("KN", (12, 17)),
                            rhs_source=Layout("KN", (12, 17)))
    blocked = Layout("MK", (7, 13)).pad("K", 8).split("K+pad8", 8)
    with pytest.raises(KnobError, match="not linear"):
        FAMILY.validate(dataclasses.replace(spec, a_layout=blocked.reorder(
            "K+pad8/8", "M", "8k"), lhs_source=blocked.reorder("K+pad8/8", "M", "8k")),
            MatmulKnobs(), ISA)


# -- the layouts against the strides / transposes match() computed before them -----------
def _old_row_major(shape):
    return [math.prod(shape[i + 1:]) for i in range(len(shape))]


def _old_group_stride(dims, shape, strides):
    live = [d for d in dims if shape[d] != 1]
    if not live:
        return 0
    for outer, inner in zip(live, live[1:]):
        if strides[outer] != strides[inner] * shape[inner]:
            return None
    return strides[live[-1]]


def _old_operand(shape, groups):
    strides = _old_row_major(shape)
    got = [_old_group_stride(g, shape, strides) for g in groups]
    if all(s is not None for s in got):
        return tuple(got), None
    perm = tuple(d for g in groups for d in g)
    pshape = [shape[d] for d in perm]
    where = {d: i for i, d in enumerate(perm)}
    return tuple(_old_group_stride([where[d] for d in g], pshape, _old_row_major(pshape))
                 for g in groups), perm


def _old_description(ls, rs, dn):
    """(a_strides, b_strides, lhs_perm, rhs_perm, rhs_dims) as match() computed them
    before layouts described the operands: the reference the layouts reproduce."""
    (lc, rc), (lb, rb) = dn
    lfree = [d for d in range(len(ls)) if d not in lc and d not in lb]
    rfree = [d for d in range(len(rs)) if d not in rc and d not in rb]
    pairs = list(zip(lc, rc))
    lst, rst = _old_row_major(ls), _old_row_major(rs)
    orders = [sorted(pairs, key=lambda p: -lst[p[0]]), sorted(pairs, key=lambda p: -rst[p[1]])]
    lk, rk = [p[0] for p in orders[0]], [p[1] for p in orders[0]]
    for order in orders:
        lk_, rk_ = [p[0] for p in order], [p[1] for p in order]
        if (_old_group_stride(lk_, ls, lst) is not None
                and _old_group_stride(rk_, rs, rst) is not None):
            lk, rk = lk_, rk_
            break
    a, lperm = _old_operand(ls, [lb, lfree, lk])
    b, rperm = _old_operand(rs, [rb, rk, rfree])
    return a, b, lperm, rperm, (tuple(rb), tuple(rk), tuple(rfree))


def _random_dot(rng):
    """A dot_general structure: 0-2 batch, 0-3 contracting, 0-3 free dims on each side, sizes
    1-5 (1 often), axes and pairs in random orders."""
    nb, nc, nl, nr = rng.integers(0, 3), rng.integers(0, 4), rng.integers(0, 4), rng.integers(0, 4)
    dims = ([("b", i) for i in range(nb)] + [("k", i) for i in range(nc)]
            + [("l", i) for i in range(nl)] + [("r", i) for i in range(nr)])
    size = {d: int(rng.choice([1, 1, 2, 3, 4, 5])) for d in dims}
    lhs = [d for d in dims if d[0] in "bkl"]
    rhs = [d for d in dims if d[0] in "bkr"]
    lhs, rhs = ([ds[i] for i in rng.permutation(len(ds))] for ds in (lhs, rhs))
    batch = [("b", i) for i in rng.permutation(nb)]
    contract = [("k", i) for i in rng.permutation(nc)]
    dn = ((tuple(lhs.index(d) for d in contract), tuple(rhs.index(d) for d in contract)),
          (tuple(lhs.index(d) for d in batch), tuple(rhs.index(d) for d in batch)))
    return tuple(size[d] for d in lhs), tuple(size[d] for d in rhs), dn


def test_layouts_reproduce_the_old_strides_and_transposes():
    rng = np.random.default_rng(7)
    cases = GRID + KNOB_SHAPES + DOT_SHAPES + PACK_LAYOUTS + [_random_dot(rng) for _ in range(400)]
    transposed = 0
    for i, (ls, rs, dn) in enumerate(cases):
        spec = FAMILY.match(_eqn(ls, rs, dn))
        a, b, lperm, rperm, rhs_dims = _old_description(ls, rs, dn)
        got = (spec.a_strides, spec.b_strides, spec.lhs_perm, spec.rhs_perm, spec.rhs_dims)
        assert got == (a, b, lperm, rperm, rhs_dims), (ls, rs, dn, spec)
        # the layouts are the arrays: the equation's operands, and what the kernel reads
        assert spec.lhs_source.physical_shape == ls and spec.rhs_source.physical_shape == rs
        for layout, shape, perm in ((spec.a_layout, ls, lperm), (spec.b_layout, rs, rperm)):
            assert layout.physical_shape == tuple(shape[d] for d in (perm or range(len(shape))))
        transposed += (lperm is not None) + (rperm is not None)
        for src, dst, perm in ((spec.lhs_source, spec.a_layout, lperm),
                               (spec.rhs_source, spec.b_layout, rperm)):
            assert convert(src, dst).kind == ("identity" if perm is None else "transpose")
        if i % 16 == 0:  # and so are the arrays lower() passes (jnp: a sample, for time)
            x, y = _operands(ls, rs)
            gx, gy = _as_read(spec, x, y)
            np.testing.assert_array_equal(gx, np.transpose(x, lperm) if lperm else x)
            np.testing.assert_array_equal(gy, np.transpose(y, rperm) if rperm else y)
            logical = np.transpose(y, [d for g in rhs_dims for d in g]).reshape(
                spec.batch, spec.k, spec.n)
            np.testing.assert_array_equal(np.reshape(spec.rhs_source.invert(y), logical.shape),
                                          logical)
    assert transposed > 100  # the grid exercises both paths


# -- records keep their keys ---------------------------------------------------------------
_EPI0 = {"activation": "none", "residual": False, "scale": False, "shift": False}
# records.workload(spec) and workload_key("matmul", spec) computed by the code before layouts
# (MatmulSpec fields a_strides, b_strides, lhs_perm, rhs_perm, rhs_dims: dataclasses.asdict).
PINNED_WORKLOADS = [
    (((7, 3, 13), (3, 13, 17), (((2,), (1,)), ((1,), (0,)))), {}, "6c1120b131e02cdbfb25ef8e",
     {"a_strides": [13, 39, 1], "b_strides": [221, 17, 1], "batch": 3, "epilogue": _EPI0,
      "k": 13, "lhs_perm": None, "m": 7, "n": 17, "out_shape": [3, 7, 17],
      "prepacked": False, "rhs_dims": [[0], [1], [2]], "rhs_perm": None}),
    (((2, 3, 5, 7), (3, 2, 7, 4), (((3,), (2,)), ((0, 1), (1, 0)))), {},
     "a635d244f68f484b8e5cc65d",
     {"a_strides": [35, 7, 1], "b_strides": [28, 4, 1], "batch": 6, "epilogue": _EPI0,
      "k": 7, "lhs_perm": None, "m": 5, "n": 4, "out_shape": [2, 3, 5, 4],
      "prepacked": False, "rhs_dims": [[1, 0], [2], [3]], "rhs_perm": [1, 0, 2, 3]}),
    (((2, 1, 9, 255), (2, 255, 1), (((3,), (1,)), ((0,), (0,)))), {},
     "40c04173e2e7e3fd2196b679",
     {"a_strides": [2295, 255, 1], "b_strides": [255, 1, 0], "batch": 2, "epilogue": _EPI0,
      "k": 255, "lhs_perm": None, "m": 9, "n": 1, "out_shape": [2, 1, 9, 1],
      "prepacked": False, "rhs_dims": [[0], [1], [2]], "rhs_perm": None}),
    (((3, 2, 1, 4, 5), (5, 3, 2, 6), (((1, 4), (2, 0)), ((0,), (1,)))),
     dict(epilogue=Epilogue(shift=True, activation="relu"), prepacked=True),
     "8adcc7f9e27cd79342227f49",
     {"a_strides": [40, 10, 1], "b_strides": [60, 6, 1], "batch": 3,
      "epilogue": {"activation": "relu", "residual": False, "scale": False, "shift": True},
      "k": 10, "lhs_perm": [0, 2, 3, 1, 4], "m": 4, "n": 6, "out_shape": [3, 1, 4, 6],
      "prepacked": True, "rhs_dims": [[1], [2, 0], [3]], "rhs_perm": [1, 2, 0, 3]}),
    (((300,), (), (((), ()), ((), ()))), {}, "057a8441d225e2713ad1eefd",
     {"a_strides": [0, 1, 0], "b_strides": [0, 0, 0], "batch": 1, "epilogue": _EPI0,
      "k": 1, "lhs_perm": None, "m": 300, "n": 1, "out_shape": [300], "prepacked": False,
      "rhs_dims": [[], [], []], "rhs_perm": None}),
]


@pytest.mark.parametrize("case,change,key,expected", PINNED_WORKLOADS,
                         ids=[str(p[0][0]) for p in PINNED_WORKLOADS])
def test_workload_keys_are_the_pre_layout_ones(case, change, key, expected):
    spec = dataclasses.replace(FAMILY.match(_eqn(*case)), **change)
    assert records.workload(spec) == expected
    assert list(spec.workload()) == ["batch", "m", "n", "k", "a_strides", "b_strides",
                                     "lhs_perm", "rhs_perm", "out_shape", "rhs_dims",
                                     "epilogue", "prepacked"]  # the old field order
    text = json.dumps({"family": "matmul", "workload": expected}, sort_keys=True)
    assert records.workload_key("matmul", spec) == key == hashlib.sha256(
        text.encode()).hexdigest()[:24]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int32])
def test_match_rejects_dtypes(dtype):
    with pytest.raises(Unsupported, match="dtype"):
        FAMILY.match(_eqn((4, 5), (5, 6), PLAIN, dtype=dtype))


def test_match_rejects_preferred_type():
    eqn = _eqn((4, 5), (5, 6), PLAIN, dtype=jnp.bfloat16, preferred_element_type=jnp.float32)
    with pytest.raises(Unsupported):
        FAMILY.match(eqn)


def test_match_rejects_zero_size():
    with pytest.raises(Unsupported, match="zero-size"):
        FAMILY.match(_eqn((0, 5), (5, 6), PLAIN))
    with pytest.raises(Unsupported, match="zero-size"):
        FAMILY.match(_eqn((4, 0), (0, 6), PLAIN))


def test_match_rejects_other_primitive():
    eqn = jax.make_jaxpr(lambda x: x + 1)(jnp.zeros(3)).jaxpr.eqns[0]
    with pytest.raises(Unsupported):
        FAMILY.match(eqn)


@pytest.mark.parametrize("change,needle", [
    (dict(mr=6, nv=3), "vector registers"),
    (dict(mr=8, nv=2), "vector registers"),
    (dict(mc=100), "multiple of mr"),
    (dict(nc=100), "multiple of nr"),
    (dict(par="rows"), "par="),
    (dict(par="Serial"), "par="),
    (dict(kc=0), "kc=0"),
    (dict(unroll=64), "unroll=64"),
    (dict(pack_a=1), "pack_a"),
    (dict(pack_b=False, fuse_b=True), "fuse_b=True"),
])
def test_validate_rejects(change, needle):
    spec = FAMILY.match(_eqn((64, 64), (64, 64), PLAIN))
    knobs = dataclasses.replace(MatmulKnobs(), **change)
    with pytest.raises(KnobError, match=needle):
        FAMILY.validate(spec, knobs, device.AVX2)


def test_validate_workspace_limit():
    spec = FAMILY.match(_eqn((4096, 8192, 64), (4096, 64, 8192), (((2,), (1,)), ((0,), (0,)))))
    with pytest.raises(KnobError, match="workspace"):
        FAMILY.validate(spec, MatmulKnobs(), device.AVX2)


def test_defaults_validate_and_symbols_differ():
    shapes = [((1, 768), (768, 3072)), ((128, 768), (768, 768)), ((5, 3), (3, 2)),
              ((512, 1024), (1024, 1024))]
    symbols = set()
    for isa in (device.AVX2, device.SSE2, device.SCALAR):
        for ls, rs in shapes:
            spec = FAMILY.match(_eqn(ls, rs, PLAIN))
            knobs = FAMILY.default_knobs(spec, isa)
            FAMILY.validate(spec, knobs, isa)
            symbols.add(FAMILY.render(spec, knobs, isa).symbol)
    assert len(symbols) == 3 * len(shapes)


# ----------------------------------------------------------------- fused epilogue
W = ISA.vector_floats
EPILOGUES = COMMON_EPILOGUES + [
    Epilogue(residual=True),
    Epilogue(scale=True, residual=True, activation="gelu_erf"),
]
FULL = EPILOGUES[2]
assert {e.activation for e in EPILOGUES} == set(ACTIVATIONS)

# (lhs, rhs, dn, knobs or None for the defaults); each has an M and an N remainder tile.
EPI_LAYOUTS = {
    # packed GEMM, K = 37 over kc = 16 (the epilogue rides the last of three updates)
    "gemm": ((19, 37), (37, 29), PLAIN,
             MatmulKnobs(mr=6, nv=2, kc=16, mc=12, nc=2 * W, pack_a=True, fuse_b=True)),
    # B stored [N, K], few rows: dot tiles (defaults)
    "dot": ((7, 13), (17, 13), (((1,), (1,)), ((), ())), None),
    # 'mbk,bkn': batch items, B read in place with single-vector and single-float tails
    "batch": ((11, 2, 23), (2, 23, 18), (((2,), (1,)), ((1,), (0,))),
              MatmulKnobs(mr=4, nv=2, kc=8, mc=8, nc=2 * W, pack_a=False, pack_b=False,
                          par="batch", unroll=2)),
    # two rhs free dims (the channel is their flattening), defaults
    "free2": ((5, 7), (7, 2, 3), PLAIN, None),
}


def _epi_operands(spec, epi, seed=2):
    rng = np.random.default_rng(seed)
    return {"scale": rng.uniform(0.5, 1.5, spec.n).astype(np.float32),
            "shift": rng.standard_normal(spec.n, dtype=np.float32),
            "residual": rng.standard_normal(spec.out_shape, dtype=np.float32)}


def _epi_reference(spec, epi, raw, extra):
    """Epilogue.reference over the flattened channel axis N (the result's last dims)."""
    lead = spec.out_shape[:len(spec.out_shape) - len(spec.rhs_dims[2])]
    y = jnp.reshape(raw, (*lead, spec.n))
    res = extra["residual"].reshape(y.shape)
    out = epi.reference(y, y.ndim - 1, extra["scale"], extra["shift"], res)
    return np.asarray(out).reshape(spec.out_shape)


def _epi_case(layout, epi, prepacked=False, knobs=None, seed=2):
    lshape, rshape, dn, layout_knobs = EPI_LAYOUTS[layout] if isinstance(layout, str) else layout
    spec = dataclasses.replace(FAMILY.match(_eqn(lshape, rshape, dn)), epilogue=epi,
                               prepacked=prepacked)
    knobs = knobs or layout_knobs or FAMILY.default_knobs(spec, ISA)
    a, b = _operands(lshape, rshape, seed)
    extra = _epi_operands(spec, epi, seed)
    raw = lax.dot_general(a, b, dn, precision=lax.Precision.HIGHEST)
    return spec, knobs, a, b, extra, _epi_reference(spec, epi, raw, extra)


def _run_epi(cache, spec, knobs, a, b, extra):
    kernel = cache.build(FAMILY.render(spec, knobs, ISA))
    x, y = _as_read(spec, a, b)
    if spec.prepacked:
        y = np.asarray(FAMILY.pack_weights(spec, knobs, jnp.asarray(b), ISA))
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [x, y, *(extra[n] for n in spec.epilogue.inputs())], [out])
    return out, kernel


@pytest.mark.parametrize("epi", EPILOGUES, ids=Epilogue.describe)
@pytest.mark.parametrize("layout", ["gemm", "dot"])
def test_epilogue(cache, layout, epi):
    spec, knobs, a, b, extra, ref = _epi_case(layout, epi)
    out, _ = _run_epi(cache, spec, knobs, a, b, extra)
    err = _rel_err(out, ref)
    assert err <= 1e-4, f"{layout} {epi.describe()} {knobs}: rel err {err}"


@pytest.mark.parametrize("epi", [FULL, EPILOGUES[3]], ids=Epilogue.describe)
@pytest.mark.parametrize("layout", ["batch", "free2"])
def test_epilogue_more_layouts(cache, layout, epi):
    spec, knobs, a, b, extra, ref = _epi_case(layout, epi)
    out, _ = _run_epi(cache, spec, knobs, a, b, extra)
    assert _rel_err(out, ref) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("epi", EPILOGUES, ids=Epilogue.describe)
@pytest.mark.parametrize("layout", ["batch", "free2"])
def test_epilogue_slow_layouts(cache, layout, epi):
    spec, knobs, a, b, extra, ref = _epi_case(layout, epi)
    out, _ = _run_epi(cache, spec, knobs, a, b, extra)
    assert _rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("knobs", KNOBS[:3] + KNOBS[6:7], ids=str)
def test_epilogue_knob_table(cache, knobs):
    layout = KNOB_SHAPES[1] + (None,)  # 'bmk,bkn', N = 53: an N tail on every tile width
    spec, knobs, a, b, extra, ref = _epi_case(layout, FULL, knobs=knobs)
    out, _ = _run_epi(cache, spec, knobs, a, b, extra)
    assert _rel_err(out, ref) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("knobs", KNOBS + DOT_KNOBS, ids=str)
def test_epilogue_knob_table_slow(cache, knobs):
    layout = (DOT_SHAPES[1] if knobs.dot else KNOB_SHAPES[2]) + (None,)
    epi = Epilogue(scale=True, shift=True, residual=True, activation="silu")
    for prepacked in (False, True):
        spec, knobs, a, b, extra, ref = _epi_case(layout, epi, prepacked, knobs=knobs)
        out, _ = _run_epi(cache, spec, knobs, a, b, extra)
        assert _rel_err(out, ref) <= 1e-4, (knobs, prepacked)


@pytest.mark.parametrize("epi", [FULL, EPILOGUES[3]], ids=Epilogue.describe)
@pytest.mark.parametrize("layout", [
    "gemm", "dot",
    ((2, 3, 5, 7), (3, 2, 7, 4), (((3,), (2,)), ((0, 1), (1, 0))), None),  # rhs transposed
], ids=str)
def test_epilogue_ffi_call_in_jit(cache, layout, epi):
    spec, knobs, a, b, extra, ref = _epi_case(layout, epi, seed=3)
    kernel = cache.build(FAMILY.render(spec, knobs, ISA))
    names = epi.inputs()
    f = jax.jit(lambda x, y, *e: FAMILY.lower(spec, kernel, [x, y, *e])[0])
    out = f(a, b, *(extra[n] for n in names))
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert _rel_err(np.asarray(out), ref) <= 1e-4


def test_epilogue_in_symbol_and_identity_default():
    spec = FAMILY.match(_eqn((19, 37), (37, 29), PLAIN))
    assert spec.epilogue == Epilogue() and spec.epilogue.is_identity and not spec.prepacked
    knobs = FAMILY.default_knobs(spec, ISA)
    symbols = {FAMILY.render(dataclasses.replace(spec, epilogue=e), knobs, ISA).symbol
               for e in [Epilogue()] + EPILOGUES}
    assert len(symbols) == 1 + len(EPILOGUES)


def test_lower_checks_operand_count(cache):
    spec = dataclasses.replace(FAMILY.match(_eqn((4, 5), (5, 6), PLAIN)), epilogue=FULL)
    kernel = cache.build(FAMILY.render(spec, FAMILY.default_knobs(spec, ISA), ISA))
    with pytest.raises(ValueError, match="scale, shift, residual"):
        FAMILY.lower(spec, kernel, [jnp.zeros((4, 5)), jnp.zeros((5, 6))])


# ----------------------------------------------------------------- prepacked weights
PACK_LAYOUTS = [
    KNOB_SHAPES[0],                                                 # plain, odd sizes
    KNOB_SHAPES[2],                                                 # 'mbk,bkn'
    ((13, 7), (17, 13), (((0,), (1,)), ((), ()))),                  # B stored [N, K]
    ((2, 3, 5, 7), (3, 2, 7, 4), (((3,), (2,)), ((0, 1), (1, 0)))),  # rhs needs a transpose
]


# The defaults and packed A / packed-up-front B, per-batch tasks, in-place B, fused B.
PACK_KNOBS = [None, KNOBS[0], KNOBS[1], KNOBS[2], KNOBS[6]]


@pytest.mark.parametrize("knobs", PACK_KNOBS, ids=str)
@pytest.mark.parametrize("lshape,rshape,dn", [PACK_LAYOUTS[0], PACK_LAYOUTS[3]])
def test_prepacked_matches_unpacked(cache, lshape, rshape, dn, knobs):
    _check_prepacked(cache, lshape, rshape, dn, knobs)


@pytest.mark.slow
@pytest.mark.parametrize("knobs", [None, *KNOBS], ids=str)
@pytest.mark.parametrize("lshape,rshape,dn", PACK_LAYOUTS)
def test_prepacked_matches_unpacked_slow(cache, lshape, rshape, dn, knobs):
    _check_prepacked(cache, lshape, rshape, dn, knobs)


def _check_prepacked(cache, lshape, rshape, dn, knobs):
    spec = FAMILY.match(_eqn(lshape, rshape, dn))
    knobs = knobs or FAMILY.default_knobs(spec, ISA)
    if not knobs.pack_b and spec.b_strides[2] != 1 and spec.n != 1:
        pytest.skip("pack_b=False needs B contiguous along N (validate refuses it)")
    pspec = dataclasses.replace(spec, prepacked=True)
    FAMILY.validate(pspec, knobs, ISA)
    a, b = _operands(lshape, rshape)
    x, y = _as_read(spec, a, b)
    k0 = cache.build(FAMILY.render(spec, knobs, ISA))
    k1 = cache.build(FAMILY.render(pspec, knobs, ISA))
    want = np.full(spec.out_shape, np.nan, np.float32)
    got = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(k0, [x, y], [want])
    packed = np.asarray(FAMILY.pack_weights(pspec, knobs, jnp.asarray(b), ISA))
    runtime.run_numpy(k1, [x, packed], [got])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Packing B was the kernel's only B work: the prepacked one asks for none of it.
    nr = knobs.nv * ISA.vector_floats
    if knobs.pack_b and not knobs.dot:
        assert packed.shape == (spec.batch, -(-spec.n // nr), spec.k, nr)
        assert k1.workspace_bytes < k0.workspace_bytes
        if not knobs.pack_a:
            assert k1.workspace_bytes == 0
    else:
        assert k1.workspace_bytes == k0.workspace_bytes


@pytest.mark.parametrize("knobs", [None, KNOBS[0], KNOBS[6]], ids=str)
@pytest.mark.parametrize("lshape,rshape,dn", [PACK_LAYOUTS[1], PACK_LAYOUTS[3]])
def test_prepacked_ffi_call_in_jit(cache, lshape, rshape, dn, knobs):
    """pack_weights traces (it runs inside the jit here) and feeds the prepacked kernel."""
    spec = dataclasses.replace(FAMILY.match(_eqn(lshape, rshape, dn)), prepacked=True,
                               epilogue=FULL)
    knobs = knobs or FAMILY.default_knobs(spec, ISA)
    kernel = cache.build(FAMILY.render(spec, knobs, ISA))
    a, b = _operands(lshape, rshape, seed=4)
    extra = _epi_operands(spec, FULL, seed=4)

    @jax.jit
    def f(x, w, scale, shift, res):
        return FAMILY.lower(spec, kernel, [x, FAMILY.pack_weights(spec, knobs, w, ISA), scale,
                                           shift, res])[0]

    out = f(a, b, extra["scale"], extra["shift"], extra["residual"])
    raw = lax.dot_general(a, b, dn, precision=lax.Precision.HIGHEST)
    assert _rel_err(np.asarray(out), _epi_reference(spec, FULL, raw, extra)) <= 1e-4


def test_prepacked_validates_every_knob_tuple():
    for lshape, rshape, dn in KNOB_SHAPES:
        spec = FAMILY.match(_eqn(lshape, rshape, dn))
        for knobs in KNOBS:
            FAMILY.validate(dataclasses.replace(spec, prepacked=True), knobs, ISA)

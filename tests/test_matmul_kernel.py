"""Numerics of the matmul family (ops/matmul.py + codegen/matmul.cc) against lax.dot_general.

Entry points: pytest tests/test_matmul_kernel.py [-m slow]. Kernels run through
runtime.run_numpy over a grid of dimension structures and a table of knob tuples; a few go
through runtime.ffi_call inside jax.jit; match() and validate() refusals are checked too.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from alt_jax import device, runtime
from alt_jax.ops.base import KnobError, Unsupported
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


def _rel_err(out, ref):
    return float(np.abs(out - ref).max() / max(1.0, np.abs(ref).max()))


def _check(cache, lshape, rshape, dn, knobs=None):
    a, b = _operands(lshape, rshape)
    spec = FAMILY.match(_eqn(lshape, rshape, dn))
    knobs = knobs if knobs is not None else FAMILY.default_knobs(spec, ISA)
    FAMILY.validate(spec, knobs, ISA)
    kernel = cache.build(FAMILY.render(spec, knobs, ISA))
    x = np.transpose(a, spec.lhs_perm) if spec.lhs_perm else a
    y = np.transpose(b, spec.rhs_perm) if spec.rhs_perm else b
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
    assert spec.a_strides == (13, 39, 1) and spec.lhs_perm is None
    assert spec.b_strides == (13 * 17, 17, 1) and spec.rhs_perm is None
    spec = FAMILY.match(_eqn((7, 13), (17, 13), (((1,), (1,)), ((), ()))))
    assert spec.b_strides[1:] == (1, 13) and spec.rhs_perm is None  # B read as [N, K]
    hash(spec)


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

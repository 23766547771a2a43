"""Numerics of the matmul family (ops/matmul.py + codegen/matmul.cc) against lax.dot_general.

Entry points: pytest tests/test_matmul_kernel.py [-m slow]. Kernels run through
runtime.run_numpy over a grid of dimension structures and a table of knob tuples; a few go
through runtime.ffi_call inside jax.jit; match() and validate() refusals are checked too;
fused epilogues against Epilogue.reference, prepacked weights against the unpacked kernel.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from alt_jax import device, runtime
from epilogue_cases import EPILOGUES as COMMON_EPILOGUES
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
    x = np.transpose(a, spec.lhs_perm) if spec.lhs_perm else a
    if spec.prepacked:
        y = np.asarray(FAMILY.pack_weights(spec, knobs, jnp.asarray(b), ISA))
    else:
        y = np.transpose(b, spec.rhs_perm) if spec.rhs_perm else b
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
    x = np.transpose(a, spec.lhs_perm) if spec.lhs_perm else a
    y = np.transpose(b, spec.rhs_perm) if spec.rhs_perm else b
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

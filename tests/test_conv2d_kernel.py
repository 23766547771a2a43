"""Numerics of the conv2d family (alt_jax/ops/conv2d.py + codegen/conv2d.cc) against lax.

Entry points: pytest tests/test_conv2d_kernel.py [-m slow]. Kernels are built into a per-session
temp cache (in parallel, so the file stays fast) and run through runtime.run_numpy; a few cases
go through runtime.ffi_call inside jax.jit. Also: the fused epilogue against
Epilogue.reference, and prepacked weights (pack_weights) against the unpacked kernel.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from alt_jax import device, runtime
from isa_cases import TABLE_ISA
from epilogue_cases import EPILOGUES
from alt_jax.ops import conv2d
from alt_jax.ops.base import KnobError, Unsupported
from alt_jax.ops.epilogue import ACTIVATIONS, Epilogue

FAMILY = conv2d.FAMILY
ISA = TABLE_ISA  # the knob tables' ISA (tests/isa_cases.py)
NCHW = ("NCHW", "OIHW", "NCHW")
NHWC = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class Case:
    dn: tuple
    n: int
    c: int
    h: int
    w: int
    k: int
    kh: int
    kw: int
    stride: tuple = (1, 1)
    pad: tuple = ((0, 0), (0, 0))
    dil: tuple = (1, 1)
    groups: int = 1

    def fn(self):
        return lambda x, w: lax.conv_general_dilated(
            x, w, self.stride, self.pad, rhs_dilation=self.dil, dimension_numbers=self.dn,
            feature_group_count=self.groups)

    def operands(self, seed=0):
        rng = np.random.default_rng(seed)
        lhs = dict(N=self.n, C=self.c, H=self.h, W=self.w)
        rhs = dict(O=self.k, I=self.c // self.groups, H=self.kh, W=self.kw)
        x = rng.standard_normal([lhs[d] for d in self.dn[0]]).astype(np.float32)
        w = rng.standard_normal([rhs[d] for d in self.dn[1]]).astype(np.float32)
        return x, w

    def eqn(self):
        x, w = self.operands()
        return jax.make_jaxpr(self.fn())(x, w).jaxpr.eqns[0]


GRID = [
    Case(NCHW, 1, 3, 13, 17, 7, 3, 3, pad=((1, 1), (1, 1))),
    Case(NHWC, 2, 13, 9, 11, 17, 5, 7, stride=(2, 1), pad=((2, 3), (0, 4))),
    Case(("NHWC", "OIHW", "NCHW"), 1, 7, 8, 8, 13, 1, 1, stride=(2, 2)),
    Case(("NCHW", "HWIO", "NHWC"), 2, 5, 7, 6, 9, 3, 2, pad=((1, 2), (2, 1))),
    Case(("HNWC", "IWOH", "WCNH"), 1, 6, 9, 7, 10, 2, 3, stride=(1, 2), pad=((1, 0), (0, 2))),
    Case(NCHW, 1, 4, 5, 6, 8, 3, 3, pad=((4, 2), (3, 5))),                      # pad > kernel
    Case(NHWC, 1, 8, 12, 12, 16, 3, 3, pad=((2, 2), (2, 2)), dil=(2, 2)),
    Case(NCHW, 1, 5, 15, 14, 9, 3, 2, stride=(2, 3), pad=((1, 0), (2, 1)), dil=(2, 3)),
    Case(NCHW, 1, 8, 10, 10, 12, 3, 3, groups=2),
    Case(NHWC, 2, 16, 7, 9, 32, 3, 3, pad=((1, 1), (1, 1)), groups=4),
    Case(NHWC, 1, 13, 9, 9, 13, 3, 3, pad=((1, 1), (1, 1)), groups=13),       # depthwise
    Case(NCHW, 1, 7, 6, 6, 14, 3, 3, pad=((1, 1), (1, 1)), groups=7),         # multiplier 2
    Case(NHWC, 1, 3, 1, 17, 8, 1, 3, pad=((0, 0), (1, 1))),                   # H = 1
    Case(NCHW, 2, 17, 13, 1, 7, 3, 1, pad=((1, 1), (0, 0))),                  # W = 1
    Case(NCHW, 1, 1, 9, 9, 1, 3, 3),                                          # 1 channel
    Case(NHWC, 1, 17, 6, 7, 33, 3, 3, stride=(2, 2)),
    Case(NHWC, 1, 16, 7, 7, 24, 1, 1),                                        # in-place input
    Case(NCHW, 1, 8, 3, 3, 16, 3, 3),                                         # 1x1 output
    Case(NCHW, 1, 64, 6, 6, 64, 3, 3, pad=((1, 1), (1, 1))),                  # many ic blocks
]

# (ic_block, oc_vecs, ow_tile, chunk_tiles or None = all tiles, ic_chunk or None = all ic
#  blocks, pack_input, weights, oc_outer)
KNOB_TABLE = [
    (1, 1, 1, 1, None, True, "ahead", True),
    (4, 2, 6, None, 1, True, "fused", True),
    (8, 1, 14, 2, None, True, "ahead", False),
    (3, 3, 4, 3, 2, True, "ahead", True),
    (16, 2, 5, 1, None, False, "inplace", False),
    (8, 2, 3, None, None, False, "fused", True),
    (2, 2, 6, 4, 3, True, "inplace", True),
    (4, 2, 6, 5, 3, True, "ahead", False),
    (8, 1, 8, 3, None, True, "ahead", True),      # NCHW output: 8x8 register transpose
    (4, 1, 8, None, 1, True, "fused", False),
]
KNOB_SHAPES = [
    Case(NHWC, 1, 16, 8, 9, 16, 3, 3),
    Case(NHWC, 2, 16, 10, 9, 16, 3, 3, stride=(2, 1), dil=(1, 2)),
    Case(NCHW, 1, 16, 7, 11, 24, 3, 3, pad=((1, 0), (0, 1)), groups=1),
    Case(("NHWC", "OIHW", "NCHW"), 2, 8, 9, 10, 20, 3, 3, pad=((1, 1), (1, 1))),
]


def _knobs(case, row):
    icb, ocv, owt, chunk, ic_chunk, pack_in, weights, oc_outer = row
    spec = FAMILY.match(case.eqn())
    n_tiles = -(-(spec.oh * spec.ow) // owt)
    cgb = -(-spec.cg // icb)
    return conv2d.Conv2dKnobs(icb, ocv, owt, n_tiles if chunk is None else chunk,
                              cgb if ic_chunk is None else ic_chunk, pack_in, weights, oc_outer)


def _knob_jobs():
    """(case, knobs) pairs of the knob table that are legal for the shape."""
    jobs = []
    for case in KNOB_SHAPES:
        spec = FAMILY.match(case.eqn())
        for row in KNOB_TABLE:
            knobs = _knobs(case, row)
            try:
                FAMILY.validate(spec, knobs, ISA)
            except KnobError:
                continue
            jobs.append((case, knobs))
    return jobs


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return runtime.KernelCache(tmp_path_factory.mktemp("conv2d_kernels"), isa=ISA)


@pytest.fixture(scope="session")
def built(cache):
    """Every kernel this file runs, compiled two at a time (g++ runs outside the GIL)."""
    jobs = [(c, None) for c in GRID] + _knob_jobs()

    def build(job):
        case, knobs = job
        spec = FAMILY.match(case.eqn())
        knobs = knobs or FAMILY.default_knobs(spec, ISA)
        return job, (spec, cache.build(FAMILY.render(spec, knobs, ISA)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(build, jobs))


def _relerr(a, ref):
    return float(np.abs(a - ref).max() / max(1.0, float(np.abs(ref).max())))


def _check(case, spec, kernel):
    x, w = case.operands()
    ref = np.asarray(jax.jit(case.fn())(x, w))
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [x, w], [out])
    assert out.shape == ref.shape
    err = _relerr(out, ref)
    assert err <= 1e-4, f"{case} rel err {err}"


@pytest.mark.parametrize("case", GRID, ids=lambda c: f"{c.dn[0]}-{c.dn[1]}-{c.c}x{c.k}-"
                         f"k{c.kh}{c.kw}-s{c.stride}-g{c.groups}")
def test_default_knobs_match_lax(case, built):
    spec, kernel = built[(case, None)]
    _check(case, spec, kernel)


@pytest.mark.parametrize("job", _knob_jobs(), ids=lambda j: f"{j[0].dn[0]}-{j[1]}")
def test_knob_table_matches_lax(job, built):
    case, knobs = job
    spec, kernel = built[job]
    _check(case, spec, kernel)


def test_knob_table_covers_every_mode():
    knobs = [k for _, k in _knob_jobs()]
    assert len(knobs) >= 20
    assert {k.weights for k in knobs} == {"ahead", "fused", "inplace"}
    assert {k.pack_input for k in knobs} == {True, False}
    assert {k.oc_outer for k in knobs} == {True, False}
    assert any(k.ic_chunk < -(-c.c // k.ic_block) for c, k in _knob_jobs())


@pytest.mark.parametrize("dn", [NCHW, NHWC], ids=lambda d: d[0])
def test_ffi_call_inside_jit(dn, cache):
    case = Case(dn, 1, 12, 10, 9, 20, 3, 3, stride=(1, 2), pad=((1, 1), (2, 0)))
    spec = FAMILY.match(case.eqn())
    kernel = cache.build(FAMILY.render(spec, FAMILY.default_knobs(spec, ISA), ISA))
    x, w = case.operands(seed=3)
    ours = jax.jit(lambda a, b: FAMILY.lower(spec, kernel, [a, b])[0])(x, w)
    ref = jax.jit(case.fn())(x, w)
    assert ours.shape == ref.shape
    assert _relerr(np.asarray(ours), np.asarray(ref)) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name,case", [
    ("3x3-64@56", Case(NCHW, 1, 64, 56, 56, 64, 3, 3, pad=((1, 1), (1, 1)))),
    ("3x3-512@7", Case(NHWC, 1, 512, 7, 7, 512, 3, 3, pad=((1, 1), (1, 1)))),
    ("1x1-256@56", Case(NHWC, 1, 256, 56, 56, 64, 1, 1)),
    ("7x7s2", Case(NCHW, 1, 3, 224, 224, 64, 7, 7, stride=(2, 2), pad=((3, 3), (3, 3)))),
])
def test_benchmark_shapes(name, case, cache):
    spec = FAMILY.match(case.eqn())
    kernel = cache.build(FAMILY.render(spec, FAMILY.default_knobs(spec, ISA), ISA))
    _check(case, spec, kernel)


# ---- what match() must leave to XLA ----

def _eqn(f, *args):
    return jax.make_jaxpr(f)(*args).jaxpr.eqns[-1]


def _x(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


@pytest.mark.parametrize("f,args,needle", [
    (lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                           lhs_dilation=(2, 1)),
     (_x(1, 3, 8, 8), _x(4, 3, 3, 3)), "lhs_dilation"),
    (lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID", batch_group_count=2),
     (_x(2, 4, 8, 8), _x(4, 4, 3, 3)), "batch_group_count"),
    (lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID"),
     (_x(1, 3, 8, 8, dtype=jnp.bfloat16), _x(4, 3, 3, 3, dtype=jnp.bfloat16)), "dtype"),
    (lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                           preferred_element_type=jnp.bfloat16),
     (_x(1, 3, 8, 8, dtype=jnp.bfloat16), _x(4, 3, 3, 3, dtype=jnp.bfloat16)), "dtype"),
    (lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((-1, 0), (0, 0))),
     (_x(1, 3, 8, 8), _x(4, 3, 3, 3)), "padding"),
    (lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID"),
     (_x(0, 3, 8, 8), _x(4, 3, 3, 3)), "zero-size"),
    (lambda x, w: lax.conv_general_dilated(x, w, (1,), "VALID"),
     (_x(1, 3, 8), _x(4, 3, 3)), "1-D"),
    (lambda x, w: lax.conv_general_dilated(x, w, (1, 1, 1), "VALID"),
     (_x(1, 3, 4, 4, 4), _x(4, 3, 2, 2, 2)), "3-D"),
    (lambda x, w: lax.dot_general(x, w, (((1,), (0,)), ((), ()))),
     (_x(3, 4), _x(4, 5)), "conv_general_dilated"),
])
def test_match_rejects(f, args, needle):
    with pytest.raises(Unsupported, match=needle):
        FAMILY.match(_eqn(f, *args))


def test_match_is_canonical_and_hashable():
    a = FAMILY.match(Case(NCHW, 1, 8, 9, 9, 16, 3, 3).eqn())
    b = FAMILY.match(Case(NHWC, 1, 8, 9, 9, 16, 3, 3).eqn())
    assert (a.n, a.c, a.h, a.w, a.k, a.oh, a.ow) == (b.n, b.c, b.h, b.w, b.k, b.oh, b.ow)
    assert a.lhs_strides == (648, 81, 9, 1) and b.lhs_strides == (648, 1, 72, 8)
    assert b.rhs_strides == (1, 16, 384, 128)
    assert len({a, b, FAMILY.match(Case(NCHW, 1, 8, 9, 9, 16, 3, 3).eqn())}) == 2
    assert FAMILY.flops(a) == 2 * 16 * 7 * 7 * 8 * 9


# ---- what validate() must refuse ----

@pytest.mark.parametrize("case,changes,needle", [
    (Case(NCHW, 1, 16, 9, 9, 16, 3, 3), dict(ow_tile=7, oc_vecs=2), "vector registers"),
    (Case(NCHW, 1, 4, 9, 9, 16, 3, 3), dict(ic_block=8), "ic_block=8"),
    (Case(NCHW, 1, 16, 9, 9, 16, 3, 3, pad=((1, 1), (1, 1))), dict(pack_input=False),
     "zero padding"),
    (Case(NCHW, 1, 16, 9, 9, 16, 3, 3), dict(weights="inplace"), "contiguous"),
    (Case(NHWC, 1, 16, 9, 9, 12, 3, 3), dict(weights="inplace", oc_vecs=1), "divide"),
    (Case(NCHW, 1, 16, 9, 9, 16, 3, 3), dict(weights="fused", chunk_tiles=1), "chunk_tiles"),
    (Case(NCHW, 1, 16, 9, 9, 16, 3, 3), dict(weights="bogus"), "weights"),
    (Case(NCHW, 1, 16, 9, 9, 4, 3, 3), dict(oc_vecs=2), "oc_vecs=2"),
    (Case(NCHW, 1, 16, 9, 9, 16, 3, 3), dict(chunk_tiles=0), "chunk_tiles=0"),
    (Case(NCHW, 1, 16, 3, 3, 16, 1, 1), dict(ow_tile=10, oc_vecs=1), "ow_tile=10"),
    (Case(NCHW, 1, 64, 9, 9, 16, 3, 3), dict(ic_block=64, ow_tile=6, oc_vecs=2,
                                             chunk_tiles=1), "unrolls"),
    (Case(NCHW, 1, 16, 9, 9, 16, 3, 3), dict(ic_block=True), "must be an int"),
    (Case(NCHW, 1, 16, 9, 9, 16, 3, 3), dict(ic_block=4, ic_chunk=5), "ic_chunk=5"),
])
def test_validate_rejects(case, changes, needle):
    spec = FAMILY.match(case.eqn())
    knobs = dataclasses.replace(FAMILY.default_knobs(spec, ISA), **changes)
    with pytest.raises(KnobError, match=needle):
        FAMILY.validate(spec, knobs, ISA)


def test_symbols_differ_per_variant():
    spec = FAMILY.match(Case(NCHW, 1, 16, 9, 9, 16, 3, 3).eqn())
    k1 = FAMILY.default_knobs(spec, ISA)
    k2 = dataclasses.replace(k1, oc_outer=not k1.oc_outer)
    s1, s2 = FAMILY.render(spec, k1, ISA), FAMILY.render(spec, k2, ISA)
    assert s1.symbol != s2.symbol and s1.symbol in s1.code


def test_default_knobs_are_valid_across_isas():
    for case in GRID:
        spec = FAMILY.match(case.eqn())
        for isa in (device.AVX2, device.SSE2, device.SCALAR):
            FAMILY.validate(spec, FAMILY.default_knobs(spec, isa), isa)


@pytest.mark.parametrize("isa", [device.SSE2, device.SCALAR], ids=lambda i: i.name)
def test_narrow_isas_match_lax(isa, tmp_path):
    """The same template with 4-lane and scalar vectors (the kernel_abi fallbacks)."""
    cache = runtime.KernelCache(tmp_path, isa=isa)
    case = Case(NHWC, 1, 6, 7, 8, 10, 3, 3, stride=(2, 1), pad=((1, 1), (0, 2)), groups=2)
    spec = FAMILY.match(case.eqn())
    _check(case, spec, cache.build(FAMILY.render(spec, FAMILY.default_knobs(spec, isa), isa)))


# ---- fused epilogue: y = act(acc * scale[k] + shift[k] + residual) ----

EPI_COMBOS = EPILOGUES + [
    Epilogue(scale=True, residual=True, activation="gelu_erf"),
]
# residual with the remaining activations (each store path's residual handling is covered above)
EPI_SLOW_COMBOS = [
    Epilogue(residual=True, activation="relu6"),
    Epilogue(shift=True, residual=True, activation="silu"),
    Epilogue(scale=True, shift=True, residual=True, activation="gelu_tanh"),
]
# Both main cases have an oc tail (k % oc_block != 0) and an ow tail (positions % ow_tile);
# their images are narrower than a tile, so each compiles one tile shape plus the tail's.
EPI_CASES = [
    (Case(NCHW, 1, 12, 9, 5, 13, 3, 3, pad=((1, 1), (1, 1))), None),
    (Case(NHWC, 2, 10, 8, 9, 13, 3, 2, stride=(1, 2), pad=((1, 0), (1, 1))), None),
]
# The full epilogue, and a residual with a vector activation, on every other store path.
EPI_EXTRA_COMBOS = [EPI_COMBOS[2], EPI_COMBOS[7]]
EPI_EXTRA_CASES = [
    # NCHW output, 8 x 8 register-transposed stores (and a partial oc block)
    (Case(NCHW, 1, 8, 9, 10, 20, 3, 3, pad=((1, 1), (1, 1))), (4, 1, 8, 3, None, True, "ahead", True)),
    # groups: the channel of the epilogue counts all groups; reduction passes; weights fused
    (Case(NHWC, 1, 16, 7, 9, 36, 3, 3, pad=((1, 1), (1, 1)), groups=2),
     (4, 2, 6, None, 1, True, "fused", True)),
    # tiles wrapping over three rows, transposing into an odd layout
    (Case(("HNWC", "IWOH", "WCNH"), 1, 6, 6, 3, 10, 2, 2, pad=((1, 0), (0, 1))),
     (3, 2, 5, 2, None, True, "ahead", False)),
]


def _epi_jobs(slow=False):
    if slow:
        return [(c, row, e) for c, row in EPI_CASES for e in EPI_SLOW_COMBOS]
    jobs = [(c, row, e) for c, row in EPI_CASES for e in EPI_COMBOS]
    return jobs + [(c, row, e) for c, row in EPI_EXTRA_CASES for e in EPI_EXTRA_COMBOS]


def _epi_id(job):
    case, row, epi = job
    return (f"{case.dn[0]}-{case.dn[2]}-g{case.groups}-"
            f"{'default' if row is None else 'k' + str(row[:3])}-{epi.describe()}")


def _spec_knobs(case, row, **changes):
    spec = dataclasses.replace(FAMILY.match(case.eqn()), **changes)
    knobs = _knobs(case, row) if row else FAMILY.default_knobs(spec, ISA)
    return spec, knobs


def _epi_operands(spec, epi, seed=1):
    rng = np.random.default_rng(seed)
    extra = dict(scale=rng.uniform(0.5, 1.5, spec.k).astype(np.float32),
                 shift=rng.standard_normal(spec.k).astype(np.float32),
                 residual=rng.standard_normal(spec.out_shape).astype(np.float32))
    return [extra[name] for name in epi.inputs()], extra


def _epi_reference(case, spec, epi, extra):
    x, w = case.operands()
    y = jax.jit(case.fn())(x, w)
    return np.asarray(epi.reference(y, spec.out_layout.dims.index("C"), **extra))


@pytest.fixture(scope="session")
def built_epi(cache):
    def build(job):
        case, row, epi = job
        spec, knobs = _spec_knobs(case, row, epilogue=epi)
        return job, (spec, knobs, cache.build(FAMILY.render(spec, knobs, ISA)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(build, _epi_jobs()))


def test_epilogue_cases_have_tails():
    for case, row in EPI_CASES + EPI_EXTRA_CASES:
        spec, knobs = _spec_knobs(case, row)
        assert spec.kg % (knobs.oc_vecs * ISA.vector_floats), (case, "no oc tail")
        assert (spec.oh * spec.ow) % knobs.ow_tile, (case, "no ow tail")
    assert {e.activation for e in EPI_COMBOS} == set(ACTIVATIONS)
    assert {e.activation for e in EPI_COMBOS + EPI_SLOW_COMBOS if e.residual} >= {
        "relu", "relu6", "gelu_tanh", "gelu_erf", "silu"}


def _check_epilogue(job, spec, kernel):
    case, _, epi = job
    extras, named = _epi_operands(spec, epi)
    x, w = case.operands()
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [x, w, *extras], [out])
    ref = _epi_reference(case, spec, epi, {n: named[n] for n in epi.inputs()})
    err = _relerr(out, ref)
    assert err <= 1e-4, f"{case} {epi} rel err {err}"


@pytest.mark.parametrize("job", _epi_jobs(), ids=_epi_id)
def test_epilogue_matches_reference(job, built_epi):
    spec, _, kernel = built_epi[job]
    _check_epilogue(job, spec, kernel)


@pytest.mark.slow
@pytest.mark.parametrize("job", _epi_jobs(slow=True), ids=_epi_id)
def test_epilogue_residual_activations(job, cache):
    case, row, epi = job
    spec, knobs = _spec_knobs(case, row, epilogue=epi)
    _check_epilogue(job, spec, cache.build(FAMILY.render(spec, knobs, ISA)))


def test_epilogue_ffi_call_inside_jit(cache):
    epi = Epilogue(scale=True, shift=True, residual=True, activation="gelu_tanh")
    case = Case(NCHW, 1, 12, 10, 9, 20, 3, 3, stride=(1, 2), pad=((1, 1), (2, 0)))
    spec, knobs = _spec_knobs(case, None, epilogue=epi)
    kernel = cache.build(FAMILY.render(spec, knobs, ISA))
    extras, named = _epi_operands(spec, epi, seed=4)
    x, w = case.operands()
    ours = jax.jit(lambda *ops: FAMILY.lower(spec, kernel, ops)[0])(x, w, *extras)
    ref = _epi_reference(case, spec, epi, named)
    assert _relerr(np.asarray(ours), ref) <= 1e-4
    with pytest.raises(ValueError, match="operands"):
        FAMILY.lower(spec, kernel, [x, w])


def test_epilogue_changes_symbol_and_source():
    spec, knobs = _spec_knobs(Case(NCHW, 1, 16, 9, 9, 16, 3, 3), None)
    variants = [dataclasses.replace(spec, epilogue=e)
                for e in (Epilogue(), *EPI_COMBOS, *EPI_SLOW_COMBOS)]
    variants.append(dataclasses.replace(spec, prepacked=True))
    symbols = {FAMILY.render(s, knobs, ISA).symbol for s in variants}
    assert len(symbols) == len(variants)
    assert FAMILY.match(Case(NCHW, 1, 16, 9, 9, 16, 3, 3).eqn()).epilogue.is_identity


# ---- prepacked weights: pack_weights once, the kernel packs no weights per call ----

def _prepack_jobs():
    """Default knobs plus table rows (every weights mode), in two layouts."""
    jobs = []
    for case in (KNOB_SHAPES[0], KNOB_SHAPES[2]):
        spec = FAMILY.match(case.eqn())
        jobs.append((case, None))
        t8 = [KNOB_TABLE[8]] if spec.out_strides[1] != 1 else []  # 8x8 stores: NCHW output
        for row in [KNOB_TABLE[1], KNOB_TABLE[2], KNOB_TABLE[4], KNOB_TABLE[6]] + t8:
            try:
                FAMILY.validate(spec, _knobs(case, row), ISA)
            except KnobError:
                continue
            jobs.append((case, row))
    return jobs


@pytest.fixture(scope="session")
def built_prepacked(cache):
    def build(job):
        case, row = job
        spec, knobs = _spec_knobs(case, row)
        packed = dataclasses.replace(spec, prepacked=True)
        return job, (spec, knobs, cache.build(FAMILY.render(spec, knobs, ISA)),
                     cache.build(FAMILY.render(packed, knobs, ISA)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(build, _prepack_jobs()))


def test_prepack_jobs_cover_modes():
    jobs = _prepack_jobs()
    modes = {(_spec_knobs(c, r)[1].weights) for c, r in jobs}
    assert modes == {"ahead", "fused", "inplace"}
    assert {c.dn[0] for c, _ in jobs} == {"NHWC", "NCHW"}
    assert all(sum(1 for c2, r in jobs if c2 == c and r) >= 3 for c, _ in jobs)


@pytest.mark.parametrize("job", _prepack_jobs(),
                         ids=lambda j: f"{j[0].dn[0]}-{j[0].dn[1]}-"
                                       f"{'default' if j[1] is None else j[1]}")
def test_prepacked_matches_unpacked(job, built_prepacked):
    case, _ = job
    spec, knobs, plain, packed = built_prepacked[job]
    x, w = case.operands()
    wp = np.asarray(FAMILY.pack_weights(spec, knobs, w, ISA))
    assert wp.shape == FAMILY.packed_weight_shape(spec, knobs, ISA)
    a = np.full(spec.out_shape, np.nan, np.float32)
    b = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(plain, [x, w], [a])
    runtime.run_numpy(packed, [x, wp], [b])
    ref = np.asarray(jax.jit(case.fn())(x, w))
    assert _relerr(a, ref) <= 1e-4 and _relerr(b, a) <= 1e-6
    if knobs.weights == "inplace":
        assert packed.workspace_bytes == plain.workspace_bytes
    else:
        assert packed.workspace_bytes < plain.workspace_bytes
        if not knobs.pack_input:
            assert packed.workspace_bytes == 0


def test_prepacked_only_weight_packing_needs_no_workspace(cache):
    case = Case(NCHW, 1, 16, 7, 7, 24, 1, 1)  # 1x1 NCHW: input read in place, OIHW packed
    spec, knobs = _spec_knobs(case, None)
    assert not knobs.pack_input and knobs.weights != "inplace"
    plain = FAMILY.render(spec, knobs, ISA)
    packed = FAMILY.render(dataclasses.replace(spec, prepacked=True), knobs, ISA)
    assert plain.workspace_bytes > 0 and packed.workspace_bytes == 0
    kernel = cache.build(packed)
    x, w = case.operands()
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [x, np.asarray(FAMILY.pack_weights(spec, knobs, w, ISA))], [out])
    assert _relerr(out, np.asarray(jax.jit(case.fn())(x, w))) <= 1e-4


def test_prepacked_with_epilogue_inside_jit(cache):
    """pack_weights traces under jit; prepacked and the epilogue compose."""
    epi = Epilogue(scale=True, shift=True, residual=True, activation="relu")
    case = Case(NHWC, 2, 12, 9, 10, 20, 3, 3, pad=((1, 1), (1, 1)))
    spec, knobs = _spec_knobs(case, None, epilogue=epi, prepacked=True)
    kernel = cache.build(FAMILY.render(spec, knobs, ISA))
    extras, named = _epi_operands(spec, epi, seed=5)
    x, w = case.operands()
    ours = jax.jit(lambda a, b, *e: FAMILY.lower(spec, kernel,
                                                 [a, FAMILY.pack_weights(spec, knobs, b, ISA),
                                                  *e])[0])(x, w, *extras)
    assert _relerr(np.asarray(ours), _epi_reference(case, spec, epi, named)) <= 1e-4


def test_validate_accepts_prepacked_and_epilogue_everywhere():
    for case, knobs in _knob_jobs():
        spec = FAMILY.match(case.eqn())
        for changes in (dict(prepacked=True), dict(epilogue=EPI_COMBOS[2], prepacked=True)):
            FAMILY.validate(dataclasses.replace(spec, **changes), knobs, ISA)
    for case in GRID:
        spec = dataclasses.replace(FAMILY.match(case.eqn()), prepacked=True)
        FAMILY.validate(spec, FAMILY.default_knobs(spec, ISA), ISA)


@pytest.mark.parametrize("isa", [device.SSE2, device.SCALAR], ids=lambda i: i.name)
def test_narrow_isas_epilogue_and_prepacked(isa, tmp_path):
    cache = runtime.KernelCache(tmp_path, isa=isa)
    epi = Epilogue(scale=True, shift=True, residual=True, activation="silu")
    case = Case(NCHW, 1, 6, 7, 8, 10, 3, 3, stride=(2, 1), pad=((1, 1), (0, 2)), groups=2)
    spec = dataclasses.replace(FAMILY.match(case.eqn()), epilogue=epi, prepacked=True)
    knobs = FAMILY.default_knobs(spec, isa)
    kernel = cache.build(FAMILY.render(spec, knobs, isa))
    extras, named = _epi_operands(spec, epi)
    x, w = case.operands()
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [x, np.asarray(FAMILY.pack_weights(spec, knobs, w, isa)), *extras],
                      [out])
    assert _relerr(out, _epi_reference(case, spec, epi, named)) <= 1e-4

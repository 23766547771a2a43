"""Depthwise kernels against lax: a spec grid, a knob table, jit/FFI, Unsupported, KnobError,
fused epilogues (every activation, scale/shift/residual) and prepacked weights.

Run: python3 -m pytest tests/test_depthwise_kernel.py   (add -m slow for the wide grid)
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alt_jax import device, runtime
from isa_cases import TABLE_ISA
from epilogue_cases import EPILOGUES as COMMON_EPILOGUES
from alt_jax.ops.base import KnobError, Unsupported
from alt_jax.ops.depthwise import FAMILY, DepthwiseKnobs
from alt_jax.ops.epilogue import ACTIVATIONS, Epilogue

ISA = TABLE_ISA  # the knob tables' ISA (tests/isa_cases.py)
TOL = 1e-4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return runtime.KernelCache(tmp_path_factory.mktemp("dw_kernels"), isa=ISA)


def _conv_fn(dn, stride, padding, dilation, groups, lhs_dilation=(1, 1), batch_groups=1):
    def f(x, w):
        return jax.lax.conv_general_dilated(
            x, w, stride, padding, lhs_dilation=lhs_dilation, rhs_dilation=dilation,
            dimension_numbers=dn, feature_group_count=groups,
            batch_group_count=batch_groups, precision=jax.lax.Precision.HIGHEST)
    return f


def _case(n, c, mult, hw, k, stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1),
          dn=("NHWC", "HWIO", "NHWC"), seed=0):
    """(spec, f, x, w) for a depthwise conv given logical sizes and string layouts."""
    lhs_sizes = dict(N=n, C=c, H=hw[0], W=hw[1])
    rhs_sizes = dict(O=c * mult, I=1, H=k[0], W=k[1])
    rng = np.random.default_rng(seed)
    x = rng.standard_normal([lhs_sizes[a] for a in dn[0]]).astype(np.float32)
    w = rng.standard_normal([rhs_sizes[a] for a in dn[1]]).astype(np.float32)
    f = _conv_fn(dn, stride, padding, dilation, c)
    eqn = jax.make_jaxpr(f)(x, w).jaxpr.eqns[0]
    return FAMILY.match(eqn), f, x, w


def _check(cache, spec, f, x, w, knobs, isa=ISA):
    FAMILY.validate(spec, knobs, isa)
    kernel = cache.build(FAMILY.render(spec, knobs, isa))
    ref = np.asarray(jax.jit(f)(x, w))
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [x, w], [out])
    err = np.abs(out - ref).max() / max(1.0, np.abs(ref).max())
    assert err <= TOL, f"rel err {err} for {spec} with {knobs}"


NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")
MIXED = [("NHWC", "OIHW", "NCHW"), ("NCHW", "HWIO", "NHWC"), ("CHWN", "IHWO", "HWNC")]

# (n, c, mult, (h, w), (kh, kw), stride, padding, dilation, dimension numbers)
GRID = [
    (1, 32, 1, (12, 12), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), NHWC),
    (1, 32, 1, (12, 12), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), NCHW),
    (2, 16, 1, (9, 11), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), NHWC),
    (2, 13, 1, (9, 11), (3, 3), (2, 1), ((0, 2), (1, 0)), (1, 1), NCHW),
    (1, 7, 2, (8, 10), (3, 3), (1, 2), ((1, 1), (1, 1)), (1, 1), NHWC),
    (1, 3, 2, (8, 10), (5, 7), (1, 1), ((2, 2), (3, 3)), (1, 1), NCHW),
    (1, 17, 1, (10, 9), (5, 7), (2, 2), ((4, 1), (0, 5)), (1, 1), NHWC),
    (1, 1, 1, (7, 7), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), NHWC),
    (2, 1, 2, (6, 5), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), NCHW),
    (1, 24, 1, (11, 13), (3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2), NHWC),
    (1, 9, 1, (11, 13), (3, 3), (2, 1), ((1, 3), (2, 0)), (2, 3), NCHW),
    (1, 16, 1, (6, 6), (3, 3), (1, 1), ((5, 4), (4, 6)), (1, 1), NHWC),   # pad > kernel
    (1, 8, 1, (5, 5), (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), NHWC),
    (2, 5, 1, (5, 5), (1, 1), (2, 2), ((1, 0), (0, 1)), (1, 1), NCHW),
    (1, 32, 1, (1, 9), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), NHWC),   # H = 1
    (1, 12, 1, (9, 1), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), NCHW),   # W = 1
    (1, 13, 1, (9, 1), (3, 1), (1, 1), ((1, 1), (0, 0)), (1, 1), NHWC),
    (2, 16, 1, (10, 10), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), MIXED[0]),
    (1, 7, 2, (9, 8), (3, 3), (2, 2), ((1, 2), (0, 1)), (1, 1), MIXED[1]),
    (2, 17, 1, (8, 9), (5, 7), (1, 2), ((2, 2), (3, 3)), (2, 1), MIXED[2]),
]


def _grid_id(case):
    n, c, m, hw, k, s, p, d, dn = case
    return f"n{n}c{c}m{m}_{hw[0]}x{hw[1]}_k{k[0]}x{k[1]}_s{s[0]}{s[1]}_d{d[0]}{d[1]}_{dn[0]}{dn[1]}"


def _spec_case(case):
    n, c, m, hw, k, s, p, d, dn = case
    return _case(n, c, m, hw, k, s, p, d, dn)


@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_default_knobs_match_lax(cache, case):
    spec, f, x, w = _spec_case(case)
    _check(cache, spec, f, x, w, FAMILY.default_knobs(spec, ISA))


@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_packed_knobs_match_lax(cache, case):
    """The packed path for every grid case (the default may read in place)."""
    spec, f, x, w = _spec_case(case)
    knobs = FAMILY.default_knobs(spec, ISA)
    _check(cache, spec, f, x, w, DepthwiseKnobs(knobs.c_block, min(3, spec.ow), 2 if spec.oh > 1
                                                else 1, True, not knobs.c_inner))


# Knob tuples spanning block sizes, register tiles, row blocks, both paths and task splits.
KNOB_TABLE = [
    DepthwiseKnobs(c_block=8, ow_tile=1, oh_rows=1, pack=True, c_inner=False),
    DepthwiseKnobs(c_block=8, ow_tile=15, oh_rows=3, pack=False, c_inner=True),
    DepthwiseKnobs(c_block=16, ow_tile=7, oh_rows=2, pack=True, c_inner=True),
    DepthwiseKnobs(c_block=16, ow_tile=4, oh_rows=5, pack=False, c_inner=False),
    DepthwiseKnobs(c_block=24, ow_tile=4, oh_rows=1, pack=True, c_inner=False),
    DepthwiseKnobs(c_block=32, ow_tile=3, oh_rows=4, pack=False, c_inner=True),
    DepthwiseKnobs(c_block=32, ow_tile=2, oh_rows=7, pack=True, c_inner=True),
]

KNOB_SPECS = [
    (2, 96, 1, (17, 19), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), NHWC),
    (1, 48, 1, (17, 35), (3, 3), (2, 2), ((0, 1), (1, 0)), (1, 1), NHWC),
    (1, 17, 2, (13, 20), (5, 7), (2, 1), ((2, 3), (3, 4)), (1, 2), NCHW),  # packs only
    (1, 24, 1, (9, 37), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), MIXED[0]),  # NCHW out
]


@pytest.mark.parametrize("knobs", KNOB_TABLE, ids=lambda k: "_".join(
    str(int(v)) for v in (k.c_block, k.ow_tile, k.oh_rows, k.pack, k.c_inner)))
@pytest.mark.parametrize("case", KNOB_SPECS, ids=_grid_id)
def test_knob_table_matches_lax(cache, case, knobs):
    spec, f, x, w = _spec_case(case)
    try:
        FAMILY.validate(spec, knobs, ISA)
    except KnobError as e:
        pytest.skip(f"illegal for this spec: {e}")
    _check(cache, spec, f, x, w, knobs)


@pytest.mark.parametrize("isa", [device.SSE2, device.SCALAR], ids=lambda i: i.name)
def test_narrow_isas_match_lax(tmp_path, isa):
    cache = runtime.KernelCache(tmp_path, isa=isa)
    spec, f, x, w = _case(1, 13, 2, (9, 8), (3, 3), (2, 1), ((1, 0), (2, 1)), dn=NCHW)
    _check(cache, spec, f, x, w, FAMILY.default_knobs(spec, isa), isa)
    spec, f, x, w = _case(1, 16, 1, (9, 8), (3, 3))
    _check(cache, spec, f, x, w, DepthwiseKnobs(2 * isa.vector_floats, 3, 2, False, True), isa)


@pytest.mark.parametrize("isa", [device.AVX2, device.AVX512], ids=lambda i: i.name)
@pytest.mark.parametrize("c,rows", [(13, 8), (16, 5), (16, 8)])
def test_one_column_packed_input(tmp_path, isa, c, rows):
    """A one-column input packed into blocks of 16 channels, >= 5 rows per task: g++ 12 -O3
    auto-vectorized the packing copy into garbage (rel err 1e11 or NaN) until pack_rows was
    kept scalar. Compiled for each ISA; run where the CPU has it."""
    if isa.name not in {i.name for i in (device.AVX2, device.AVX512)} or not _runs(isa):
        pytest.skip(f"this CPU does not run {isa.name}")
    cache = runtime.KernelCache(tmp_path, isa=isa)
    spec, f, x, w = _case(1, c, 1, (9, 1), (3, 1), padding=((1, 1), (0, 0)))
    _check(cache, spec, f, x, w, DepthwiseKnobs(16, 1, rows, True, True), isa)


def _runs(isa) -> bool:
    """Whether this CPU executes isa's kernels (the detected ISA is the widest it runs)."""
    order = [device.SCALAR.name, device.SSE2.name, device.AVX2.name, device.AVX512.name]
    have = device.detect_isa().name
    return have in order and order.index(isa.name) <= order.index(have)


@pytest.mark.slow
@pytest.mark.parametrize("dn", [NHWC, NCHW] + MIXED, ids=lambda d: "".join(d))
@pytest.mark.parametrize("c,mult", [(1, 1), (3, 2), (13, 1), (40, 1), (17, 2)])
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_wide_grid(cache, dn, c, mult, stride):
    for n, hw, k, pad, dil in [(2, (13, 11), (3, 3), ((1, 1), (1, 1)), (1, 1)),
                               (1, (7, 12), (5, 7), ((3, 0), (2, 5)), (2, 1))]:
        spec, f, x, w = _case(n, c, mult, hw, k, stride, pad, dil, dn)
        knob_list = [FAMILY.default_knobs(spec, ISA)]
        for cb, tile, rows, pack, inner in itertools.product(
                (8, 16, 32), (1, 3, 8), (1, 3), (False, True), (False, True)):
            knobs = DepthwiseKnobs(cb, tile, rows, pack, inner)
            try:
                FAMILY.validate(spec, knobs, ISA)
            except KnobError:
                continue
            knob_list.append(knobs)
        for knobs in knob_list[::5]:
            _check(cache, spec, f, x, w, knobs)


# ---- the real path: FFI custom call inside jax.jit ----

@pytest.mark.parametrize("case", [GRID[0], GRID[3], GRID[19]], ids=_grid_id)
def test_ffi_call_inside_jit(cache, case):
    spec, f, x, w = _spec_case(case)
    kernel = cache.build(FAMILY.render(spec, FAMILY.default_knobs(spec, ISA), ISA))

    @jax.jit
    def g(x, w):
        (y,) = FAMILY.lower(spec, kernel, [x, w])
        return y * 2.0 + 1.0  # an XLA epilogue around the custom call

    ref = np.asarray(jax.jit(f)(x, w)) * 2.0 + 1.0
    out = np.asarray(g(jnp.asarray(x), jnp.asarray(w)))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() / max(1.0, np.abs(ref).max()) <= TOL


# ---- what match() must reject ----

def _eqn(f, *args):
    return jax.make_jaxpr(f)(*args).jaxpr.eqns[-1]


def _reject(f, *args, words=()):
    with pytest.raises(Unsupported) as e:
        FAMILY.match(_eqn(f, *args))
    for word in words:
        assert word in str(e.value)


def test_rejects_grouped_and_dense_convs():
    x = np.zeros((1, 8, 8, 8), np.float32)
    _reject(_conv_fn(NHWC, (1, 1), "SAME", (1, 1), 1), x, np.zeros((3, 3, 8, 8), np.float32),
            words=("not depthwise",))
    _reject(_conv_fn(NHWC, (1, 1), "SAME", (1, 1), 4), x, np.zeros((3, 3, 2, 8), np.float32),
            words=("feature_group_count=4",))


def test_rejects_dilation_batch_groups_dtypes_and_shapes():
    x = np.zeros((2, 8, 8, 8), np.float32)
    w = np.zeros((3, 3, 1, 8), np.float32)
    _reject(_conv_fn(NHWC, (1, 1), ((1, 1), (1, 1)), (1, 1), 8, lhs_dilation=(2, 1)), x, w,
            words=("lhs_dilation",))
    _reject(_conv_fn(NHWC, (1, 1), ((1, 1), (1, 1)), (1, 1), 1, batch_groups=2), x,
            np.zeros((3, 3, 8, 8), np.float32), words=("batch_group_count",))
    for dt in (jnp.bfloat16, jnp.float16):
        _reject(_conv_fn(NHWC, (1, 1), "SAME", (1, 1), 8), x.astype(dt), w.astype(dt),
                words=("float32",))
    _reject(_conv_fn(NHWC, (1, 1), "SAME", (1, 1), 8), np.zeros((0, 8, 8, 8), np.float32), w,
            words=("zero-size",))
    _reject(_conv_fn(NHWC, (1, 1), ((-1, 0), (0, 0)), (1, 1), 8), x, w, words=("negative",))
    x1 = np.zeros((1, 8, 4), np.float32)
    _reject(_conv_fn(("NWC", "WIO", "NWC"), (1,), "SAME", (1,), 4), x1,
            np.zeros((3, 1, 4), np.float32), words=("spatial",))
    x3 = np.zeros((1, 4, 4, 4, 2), np.float32)
    _reject(_conv_fn(("NDHWC", "DHWIO", "NDHWC"), (1, 1, 1), "SAME", (1, 1, 1), 2), x3,
            np.zeros((3, 3, 3, 1, 2), np.float32), words=("spatial",))


def test_rejects_other_primitives():
    _reject(lambda a, b: a @ b, np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32))


# ---- what validate() must reject ----

@pytest.mark.parametrize("knobs,words", [
    (DepthwiseKnobs(12, 4, 1, True, True), "c_block=12"),
    (DepthwiseKnobs(40, 1, 1, True, True), "c_block=40"),
    (DepthwiseKnobs(16, 8, 1, True, True), "vector registers"),
    (DepthwiseKnobs(8, 16, 1, True, True), "vector registers"),
    (DepthwiseKnobs(8, 4, 0, True, True), "oh_rows=0"),
    (DepthwiseKnobs(8, 4, 11, True, True), "oh_rows=11"),
    (DepthwiseKnobs(8, 11, 1, True, True), "ow_tile=11 exceeds"),
    (DepthwiseKnobs(8, 4, 1, 1, True), "pack=1"),
])
def test_validate_rejects_illegal_knobs(knobs, words):
    spec, *_ = _case(1, 24, 1, (10, 10), (3, 3))
    with pytest.raises(KnobError) as e:
        FAMILY.validate(spec, knobs, ISA)
    assert words in str(e.value)


def test_validate_rejects_in_place_input_it_cannot_read():
    knobs = DepthwiseKnobs(8, 4, 1, False, True)
    spec, *_ = _case(1, 16, 1, (10, 10), (3, 3), dn=NCHW)
    with pytest.raises(KnobError, match="unit-stride"):
        FAMILY.validate(spec, knobs, ISA)
    spec, *_ = _case(1, 8, 2, (10, 10), (3, 3))
    with pytest.raises(KnobError, match="multiplier"):
        FAMILY.validate(spec, knobs, ISA)
    spec, *_ = _case(1, 12, 1, (10, 10), (3, 3))
    with pytest.raises(KnobError, match="divide"):
        FAMILY.validate(spec, knobs, ISA)


def test_symbols_differ_per_variant_and_spec_is_hashable():
    spec, *_ = _case(1, 16, 1, (10, 10), (3, 3))
    a = FAMILY.render(spec, DepthwiseKnobs(8, 4, 1, True, True), ISA)
    b = FAMILY.render(spec, DepthwiseKnobs(8, 4, 2, True, True), ISA)
    assert a.symbol != b.symbol
    assert hash(spec) == hash(_case(1, 16, 1, (10, 10), (3, 3))[0])
    assert FAMILY.flops(spec) == 2 * 16 * 10 * 10 * 9


# ---- fused epilogue: y = act(conv * scale[k] + shift[k] + residual) ----

EPILOGUES = COMMON_EPILOGUES + [
    Epilogue(residual=True, activation="silu"),
]
assert {e.activation for e in EPILOGUES} == set(ACTIVATIONS)

# (case, knobs or None for the defaults): each has a remainder tile
EPI_CASES = [
    # in place, NHWC: border pixels, an overlapping last tile (interior 17, ow_tile 4)
    ((2, 48, 1, (17, 19), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), NHWC), None),
    # packed NCHW: 13 channels (a partial block), transposed stores and leftover columns
    ((2, 13, 1, (9, 11), (3, 3), (2, 1), ((0, 2), (1, 0)), (1, 1), NCHW),
     DepthwiseKnobs(8, 8, 2, True, False)),
]
EPI_CASES_SLOW = [
    # in place, tile wider than the interior (7 columns): single-column tail
    ((1, 16, 1, (9, 9), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), NHWC),
     DepthwiseKnobs(8, 8, 2, False, True)),
    # channels-last output with a partial block (14 channels, multiplier 2)
    ((1, 7, 2, (8, 10), (3, 3), (1, 2), ((1, 1), (1, 1)), (1, 1), NHWC),
     DepthwiseKnobs(16, 3, 2, True, True)),
    ((2, 17, 1, (8, 9), (5, 7), (1, 2), ((2, 2), (3, 3)), (2, 1), MIXED[2]), None),
    ((1, 24, 1, (9, 37), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), MIXED[0]),
     DepthwiseKnobs(8, 15, 3, True, True)),
]


def _epi_inputs(spec, epi, seed=1):
    rng = np.random.default_rng(seed)
    extra = {"scale": (0.5 + rng.random(spec.k)).astype(np.float32),
             "shift": rng.standard_normal(spec.k).astype(np.float32),
             "residual": rng.standard_normal(spec.out_shape).astype(np.float32)}
    return [extra[name] for name in epi.inputs()], extra


def _rel_err(out, ref):
    return np.abs(out - ref).max() / max(1.0, np.abs(ref).max())


def _check_epilogue(cache, case, knobs, epi, jit):
    spec, f, x, w = _spec_case(case)
    spec = dataclasses.replace(spec, epilogue=epi)
    knobs = knobs or FAMILY.default_knobs(spec, ISA)
    FAMILY.validate(spec, knobs, ISA)
    kernel = cache.build(FAMILY.render(spec, knobs, ISA))
    extra, named = _epi_inputs(spec, epi)
    ref = np.asarray(epi.reference(jax.jit(f)(x, w), spec.out_layout.dims.index("C"), named["scale"],
                                   named["shift"], named["residual"]))
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [x, w, *extra], [out])
    assert _rel_err(out, ref) <= TOL, f"{epi.describe()}: rel err {_rel_err(out, ref)} " \
        f"for {spec} with {knobs}"
    if jit:
        g = jax.jit(lambda *ops: FAMILY.lower(spec, kernel, ops)[0])
        out = np.asarray(g(x, w, *extra))
        assert _rel_err(out, ref) <= TOL, f"{epi.describe()} under jit: {_rel_err(out, ref)}"


@pytest.mark.parametrize("epi", EPILOGUES, ids=Epilogue.describe)
@pytest.mark.parametrize("case,knobs", EPI_CASES, ids=lambda v: _grid_id(v) if
                         isinstance(v, tuple) and len(v) == 9 else None)
def test_epilogue_matches_reference(cache, case, knobs, epi):
    _check_epilogue(cache, case, knobs, epi, jit=True)


@pytest.mark.slow
@pytest.mark.parametrize("epi", EPILOGUES, ids=Epilogue.describe)
@pytest.mark.parametrize("case,knobs", EPI_CASES_SLOW, ids=lambda v: _grid_id(v) if
                         isinstance(v, tuple) and len(v) == 9 else None)
def test_epilogue_more_layouts(cache, case, knobs, epi):
    _check_epilogue(cache, case, knobs, epi, jit=False)


@pytest.mark.parametrize("isa", [device.SSE2, device.SCALAR], ids=lambda i: i.name)
def test_epilogue_on_narrow_isas(tmp_path, isa):
    cache = runtime.KernelCache(tmp_path, isa=isa)
    epi = Epilogue(scale=True, shift=True, residual=True, activation="gelu_erf")
    in_place = DepthwiseKnobs(2 * isa.vector_floats, 3, 2, False, True)
    for case, knobs in [(EPI_CASES[1][0], None), (EPI_CASES[0][0], in_place)]:
        spec, f, x, w = _spec_case(case)
        spec = dataclasses.replace(spec, epilogue=epi)
        knobs = knobs or FAMILY.default_knobs(spec, isa)
        kernel = cache.build(FAMILY.render(spec, knobs, isa))
        extra, named = _epi_inputs(spec, epi)
        ref = np.asarray(epi.reference(jax.jit(f)(x, w), spec.out_layout.dims.index("C"), named["scale"],
                                       named["shift"], named["residual"]))
        out = np.full(spec.out_shape, np.nan, np.float32)
        runtime.run_numpy(kernel, [x, w, *extra], [out])
        assert _rel_err(out, ref) <= TOL, f"{isa.name} {knobs}: {_rel_err(out, ref)}"


def test_epilogue_changes_symbol_and_operand_count():
    spec, *_ = _case(1, 16, 1, (10, 10), (3, 3))
    knobs = FAMILY.default_knobs(spec, ISA)
    symbols = {FAMILY.render(dataclasses.replace(spec, epilogue=e), knobs, ISA).symbol
               for e in [Epilogue()] + EPILOGUES}
    symbols.add(FAMILY.render(dataclasses.replace(spec, prepacked=True), knobs, ISA).symbol)
    assert len(symbols) == len(EPILOGUES) + 2
    kernel = runtime.Kernel("unused.so", "unused", 0)
    with pytest.raises(ValueError, match="scale"):
        FAMILY.lower(dataclasses.replace(spec, epilogue=EPILOGUES[1]), kernel, [1, 2, 3])


# ---- prepacked weights: pack_weights once, the kernel reads the panels ----

PREPACK_SPECS = [KNOB_SPECS[0], KNOB_SPECS[2]]  # NHWC (in place or packed), NCHW (packed)


# default knobs plus >= 3 table rows legal for each spec (both paths, 8..24-wide blocks)
PREPACK_KNOBS = [None] + [KNOB_TABLE[i] for i in (0, 2, 3, 4)] + [
    pytest.param(KNOB_TABLE[i], marks=pytest.mark.slow) for i in (1, 5, 6)]


@pytest.mark.parametrize("knobs", PREPACK_KNOBS, ids=lambda k: "default" if k is None
                         else "_".join(str(int(v)) for v in (k.c_block, k.ow_tile, k.oh_rows,
                                                             k.pack, k.c_inner)))
@pytest.mark.parametrize("case", PREPACK_SPECS, ids=_grid_id)
def test_prepacked_matches_unpacked(cache, case, knobs):
    spec, f, x, w = _spec_case(case)
    knobs = knobs or FAMILY.default_knobs(spec, ISA)
    try:
        FAMILY.validate(spec, knobs, ISA)
    except KnobError as e:
        pytest.skip(f"illegal for this spec: {e}")
    pre = dataclasses.replace(spec, prepacked=True)
    FAMILY.validate(pre, knobs, ISA)
    plain_k = cache.build(FAMILY.render(spec, knobs, ISA))
    pre_k = cache.build(FAMILY.render(pre, knobs, ISA))
    packed = np.asarray(FAMILY.pack_weights(pre, knobs, jnp.asarray(w), ISA))
    assert packed.shape == FAMILY.packed_weight_shape(spec, knobs, ISA)
    a = np.full(spec.out_shape, np.nan, np.float32)
    b = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(plain_k, [x, w], [a])
    runtime.run_numpy(pre_k, [x, packed], [b])
    np.testing.assert_array_equal(a, b)
    assert _rel_err(b, np.asarray(jax.jit(f)(x, w))) <= TOL
    # the weights were the only thing packed unless the input is packed too
    assert pre_k.workspace_bytes < plain_k.workspace_bytes
    if not knobs.pack:
        assert pre_k.workspace_bytes == 0


def test_prepacked_with_epilogue_under_jit(cache):
    """pack_weights traced inside jit, feeding a prepacked kernel with a full epilogue."""
    case = (1, 32, 1, (14, 14), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), NHWC)
    spec, f, x, w = _spec_case(case)
    epi = Epilogue(scale=True, shift=True, residual=True, activation="relu6")
    spec = dataclasses.replace(spec, epilogue=epi, prepacked=True)
    knobs = FAMILY.default_knobs(spec, ISA)
    kernel = cache.build(FAMILY.render(spec, knobs, ISA))
    extra, named = _epi_inputs(spec, epi)

    @jax.jit
    def g(x, w, *extra):
        return FAMILY.lower(spec, kernel, [x, FAMILY.pack_weights(spec, knobs, w, ISA), *extra])[0]

    ref = np.asarray(epi.reference(jax.jit(f)(x, w), spec.out_layout.dims.index("C"), named["scale"],
                                   named["shift"], named["residual"]))
    assert _rel_err(np.asarray(g(x, w, *extra)), ref) <= TOL
    with pytest.raises(ValueError, match="rhs shape"):
        FAMILY.pack_weights(spec, knobs, jnp.zeros((3, 3, 1, 16)), ISA)

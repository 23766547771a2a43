"""Winograd F(2x2, 3x3) and F(4x4, 3x3) kernels against lax: layouts, partial tiles, channel tails, padding,
fused epilogues, prepacked and per-call filter transforms, narrow ISAs; what match() declines
and what validate() rejects.

Run: python3 -m pytest tests/test_winograd_kernel.py
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from alt_jax import device, runtime
from isa_cases import TABLE_ISA
from alt_jax.ops import winograd
from alt_jax.ops.base import KnobError, Unsupported
from alt_jax.ops.epilogue import Epilogue
from alt_jax.ops.winograd import FAMILY, WinogradKnobs
from epilogue_cases import EPILOGUES

ISA = TABLE_ISA  # the knob tables' ISA (tests/isa_cases.py)
TOL = 1e-4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return runtime.KernelCache(tmp_path_factory.mktemp("winograd_kernels"), isa=ISA)


def _conv(dn, padding, stride=(1, 1), dilation=(1, 1), groups=1):
    def f(x, w):
        return jax.lax.conv_general_dilated(
            x, w, stride, padding, rhs_dilation=dilation, dimension_numbers=dn,
            feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)
    return f


def _case(n, c, k, hw, padding=((1, 1), (1, 1)), dn=("NHWC", "HWIO", "NHWC"), seed=0, **kw):
    sizes = {"lhs": dict(N=n, C=c, H=hw[0], W=hw[1]),
             "rhs": dict(O=k, I=c // kw.get("groups", 1), H=3, W=3)}
    rng = np.random.default_rng(seed)
    x = rng.standard_normal([sizes["lhs"][a] for a in dn[0]]).astype(np.float32)
    w = rng.standard_normal([sizes["rhs"][a] for a in dn[1]]).astype(np.float32)
    f = _conv(dn, padding, **kw)
    return f, x, w, jax.make_jaxpr(f)(x, w).jaxpr.eqns[0]


def _run(cache, spec, knobs, ops, isa=ISA):
    kernel = cache.build(FAMILY.render(spec, knobs, isa))
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, ops, [out])
    return out


def _rel_err(got, want):
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


GRID = [
    # n, c, k, (h, w), padding, dimension numbers
    (1, 16, 16, (8, 8), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),
    (2, 12, 20, (7, 9), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),   # odd: partial tiles
    (1, 9, 5, (6, 5), ((0, 2), (2, 0)), ("NCHW", "OIHW", "NCHW")),     # asymmetric padding
    (1, 8, 24, (10, 6), ((0, 0), (0, 0)), ("NCHW", "HWIO", "NHWC")),   # VALID, mixed layouts
]


@pytest.mark.parametrize("n,c,k,hw,padding,dn", GRID)
@pytest.mark.parametrize("prepacked", [False, True])
@pytest.mark.parametrize("out_tile", winograd.OUT_TILES)
def test_matches_lax(cache, n, c, k, hw, padding, dn, prepacked, out_tile):
    f, x, w, eqn = _case(n, c, k, hw, padding, dn)
    spec = dataclasses.replace(FAMILY.match(eqn), prepacked=prepacked)
    knobs = dataclasses.replace(FAMILY.default_knobs(spec, ISA), out_tile=out_tile)
    rhs = np.asarray(FAMILY.pack_weights(spec, knobs, w, ISA)) if prepacked else w
    assert _rel_err(_run(cache, spec, knobs, [x, rhs]), np.asarray(f(x, w))) <= TOL


@pytest.mark.parametrize("knobs", [WinogradKnobs(4, 3, False), WinogradKnobs(1, 1, True),
                                   WinogradKnobs(14, 1, True), WinogradKnobs(5, 2, False, 4),
                                   WinogradKnobs(1, 3, True, 4)])
def test_every_valid_knob_choice_matches_lax(cache, knobs):
    f, x, w, eqn = _case(1, 11, 19, (9, 7))
    spec = FAMILY.match(eqn)
    FAMILY.validate(spec, knobs, ISA)
    assert _rel_err(_run(cache, spec, knobs, [x, w]), np.asarray(f(x, w))) <= TOL


@pytest.mark.parametrize("epi", EPILOGUES, ids=lambda e: e.describe())
@pytest.mark.parametrize("out_tile", winograd.OUT_TILES)
def test_fused_epilogue(cache, epi, out_tile):
    f, x, w, eqn = _case(1, 10, 21, (7, 8), dn=("NCHW", "OIHW", "NCHW"), seed=1)
    spec = dataclasses.replace(FAMILY.match(eqn), epilogue=epi, prepacked=True)
    knobs = dataclasses.replace(FAMILY.default_knobs(spec, ISA), out_tile=out_tile)
    rng = np.random.default_rng(2)
    extra = {"scale": rng.standard_normal(21).astype(np.float32),
             "shift": rng.standard_normal(21).astype(np.float32),
             "residual": rng.standard_normal(spec.out_shape).astype(np.float32)}
    ops = [x, np.asarray(FAMILY.pack_weights(spec, knobs, w, ISA))]
    ops += [extra[n] for n in epi.inputs()]
    want = epi.reference(np.asarray(f(x, w)), 1, **{n: extra[n] for n in epi.inputs()})
    assert _rel_err(_run(cache, spec, knobs, ops), np.asarray(want)) <= TOL


@pytest.mark.parametrize("isa", [device.SSE2, device.SCALAR], ids=lambda i: i.name)
@pytest.mark.parametrize("out_tile", winograd.OUT_TILES)
def test_narrow_isas_match_lax(isa, tmp_path, out_tile):
    cache = runtime.KernelCache(tmp_path, isa=isa)
    f, x, w, eqn = _case(1, 6, 9, (5, 6))
    spec = dataclasses.replace(FAMILY.match(eqn), prepacked=True,
                               epilogue=Epilogue(shift=True, activation="relu"))
    knobs = dataclasses.replace(FAMILY.default_knobs(spec, isa), out_tile=out_tile)
    shift = np.linspace(-1, 1, 9).astype(np.float32)
    ops = [x, np.asarray(FAMILY.pack_weights(spec, knobs, w, isa)), shift]
    want = np.maximum(np.asarray(f(x, w)) + shift, 0)
    assert _rel_err(_run(cache, spec, knobs, ops, isa), want) <= TOL


def test_runs_under_jit_through_the_ffi(cache):
    f, x, w, eqn = _case(1, 8, 8, (6, 6))
    spec = FAMILY.match(eqn)
    kernel = cache.build(FAMILY.render(spec, FAMILY.default_knobs(spec, ISA), ISA))
    got = jax.jit(lambda a, b: FAMILY.lower(spec, kernel, [a, b])[0])(x, w)
    assert _rel_err(np.asarray(got), np.asarray(f(x, w))) <= TOL
    with pytest.raises(ValueError, match="operand rhs has shape"):
        FAMILY.lower(spec, kernel, [x, w[:1]])


@pytest.mark.parametrize("kw,reason", [
    (dict(stride=(2, 2)), "3x3 stride-1"),
    (dict(dilation=(2, 1)), "3x3 stride-1"),
    (dict(groups=2), "feature_group_count=2"),
])
def test_declines_what_it_does_not_compute(kw, reason):
    *_, eqn = _case(1, 8, 8, (9, 9), **kw)
    with pytest.raises(Unsupported, match=reason):
        FAMILY.match(eqn)


def test_prefers_only_where_it_measured_faster():
    """Few outputs or channels: the direct conv is faster, a heuristic (prefers), not a
    refusal (match takes the conv, so the tuner may still measure Winograd there)."""
    for n, c, k, hw in [(1, 64, 64, (7, 7)),     # ResNet-50's 512@7 shape class: no gain
                        (1, 32, 64, (14, 14)), (1, 64, 48, (14, 14)), (4, 16, 16, (8, 8))]:
        spec = FAMILY.match(_case(n, c, k, hw)[3])
        assert not FAMILY.prefers(spec), (c, k, hw)
    spec = FAMILY.match(_case(1, 64, 64, (14, 14))[3])
    assert spec.k == 64 and FAMILY.prefers(spec)
    assert (winograd.MIN_CHANNELS, winograd.MIN_OUTPUTS) == (64, 14 * 14)


def test_validate_rejects_illegal_knobs():
    spec = FAMILY.match(_case(1, 8, 8, (6, 6))[3])
    with pytest.raises(KnobError, match="vector registers"):
        FAMILY.validate(spec, WinogradKnobs(tile_block=8, oc_vecs=2), ISA)
    with pytest.raises(KnobError, match="tile_block"):
        FAMILY.validate(spec, WinogradKnobs(tile_block=0), ISA)
    with pytest.raises(KnobError, match="kb_outer"):
        FAMILY.validate(spec, WinogradKnobs(kb_outer=1), ISA)
    with pytest.raises(KnobError, match="out_tile=3"):
        FAMILY.validate(spec, WinogradKnobs(out_tile=3), ISA)


@pytest.mark.parametrize("c,k,hw", [(64, 64, (56, 56)), (128, 128, (28, 28)),
                                    (256, 256, (14, 14)), (512, 512, (7, 7))])
def test_f4x4_error_stays_well_inside_the_tolerance(cache, c, k, hw):
    """F(4x4, 3x3) on ResNet-50's 3x3 shapes with unit-variance data and He-scaled weights
    (as the zoo's): its error, relative to max |out|, stays below a fifth of TOL (measured
    0.7e-5 to 1.2e-5 here, 8x to 15x F(2x2, 3x3)'s on the same data: the transforms' larger
    entries, up to 8 in A and 5 in B, amplify rounding); a wrong matrix entry would be orders
    of magnitude off."""
    f, x, w, eqn = _case(1, c, k, hw, seed=3)
    w *= np.float32(np.sqrt(2.0 / (9 * c)))
    spec = dataclasses.replace(FAMILY.match(eqn), prepacked=True)
    want = np.asarray(f(x, w))
    errs = {}
    for out_tile in winograd.OUT_TILES:
        knobs = dataclasses.replace(FAMILY.default_knobs(spec, ISA), out_tile=out_tile)
        packed = np.asarray(FAMILY.pack_weights(spec, knobs, w, ISA))
        errs[out_tile] = _rel_err(_run(cache, spec, knobs, [x, packed]), want)
    assert errs[4] <= TOL / 5, errs
    assert errs[2] <= TOL / 50, errs


def test_default_output_tile_follows_the_tile_count():
    """F(4x4) where the batch has MIN_F4_TILES 4x4 tiles (28x28 and up at batch 1), F(2x2)
    below, where its smaller filter panels measured faster."""
    for n, hw, want in [(1, (56, 56), 4), (1, (28, 28), 4), (1, (14, 14), 2), (1, (7, 7), 2),
                        (4, (14, 14), 4)]:
        spec = FAMILY.match(_case(n, 64, 64, hw)[3])
        assert FAMILY.default_knobs(spec, ISA).out_tile == want, (n, hw)
    assert winograd.MIN_F4_TILES == 49


def test_space_has_balanced_tile_blocks():
    """49 tiles (14x14 at F(2x2), 28x28 at F(4x4)) split 7 x 7: the space has tile_block 7,
    which no register budget names, and every block in it is a legal knob somewhere."""
    for hw in [(14, 14), (28, 28)]:
        spec = FAMILY.match(_case(1, 64, 64, hw)[3])
        assert 7 in FAMILY.space(spec, device.AVX512).axis("tile_block").values
    assert winograd._balanced_block(49, 8) == 7 and winograd._balanced_block(49, 9) == 9
    assert winograd._balanced_block(196, 9) == 9 and winograd._balanced_block(5, 16) == 5

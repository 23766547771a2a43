"""Winograd F(2x2, 3x3) kernels against lax: layouts, partial tiles, channel tails, padding,
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
def test_matches_lax(cache, n, c, k, hw, padding, dn, prepacked):
    f, x, w, eqn = _case(n, c, k, hw, padding, dn)
    spec = dataclasses.replace(FAMILY.match(eqn), prepacked=prepacked)
    knobs = FAMILY.default_knobs(spec, ISA)
    rhs = np.asarray(FAMILY.pack_weights(spec, knobs, w, ISA)) if prepacked else w
    assert _rel_err(_run(cache, spec, knobs, [x, rhs]), np.asarray(f(x, w))) <= TOL


@pytest.mark.parametrize("knobs", [WinogradKnobs(4, 3, False), WinogradKnobs(1, 1, True),
                                   WinogradKnobs(14, 1, True)])
def test_every_valid_knob_choice_matches_lax(cache, knobs):
    f, x, w, eqn = _case(1, 11, 19, (9, 7))
    spec = FAMILY.match(eqn)
    FAMILY.validate(spec, knobs, ISA)
    assert _rel_err(_run(cache, spec, knobs, [x, w]), np.asarray(f(x, w))) <= TOL


@pytest.mark.parametrize("epi", EPILOGUES, ids=lambda e: e.describe())
def test_fused_epilogue(cache, epi):
    f, x, w, eqn = _case(1, 10, 21, (7, 8), dn=("NCHW", "OIHW", "NCHW"), seed=1)
    spec = dataclasses.replace(FAMILY.match(eqn), epilogue=epi, prepacked=True)
    knobs = FAMILY.default_knobs(spec, ISA)
    rng = np.random.default_rng(2)
    extra = {"scale": rng.standard_normal(21).astype(np.float32),
             "shift": rng.standard_normal(21).astype(np.float32),
             "residual": rng.standard_normal(spec.out_shape).astype(np.float32)}
    ops = [x, np.asarray(FAMILY.pack_weights(spec, knobs, w, ISA))]
    ops += [extra[n] for n in epi.inputs()]
    want = epi.reference(np.asarray(f(x, w)), 1, **{n: extra[n] for n in epi.inputs()})
    assert _rel_err(_run(cache, spec, knobs, ops), np.asarray(want)) <= TOL


@pytest.mark.parametrize("isa", [device.SSE2, device.SCALAR], ids=lambda i: i.name)
def test_narrow_isas_match_lax(isa, tmp_path):
    cache = runtime.KernelCache(tmp_path, isa=isa)
    f, x, w, eqn = _case(1, 6, 9, (5, 6))
    spec = dataclasses.replace(FAMILY.match(eqn), prepacked=True,
                               epilogue=Epilogue(shift=True, activation="relu"))
    knobs = FAMILY.default_knobs(spec, isa)
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

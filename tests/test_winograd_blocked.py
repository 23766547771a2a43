"""Winograd (alt_jax/ops/winograd.py + codegen/winograd.cc) reading a channel-blocked lhs and
writing a channel-blocked output (N C/b H W bc, b = 8 or 16) against lax.

Entry points: pytest tests/test_winograd_blocked.py. A spec is matched from a logical (NCHW)
equation and moved onto other activation layouts with FAMILY.relayout; the kernel reads
lhs_layout.apply(x) and must write out_layout.apply(lax conv of x). Kernels are built into a
per-session cache two at a time and run through runtime.run_numpy. Covered: every lhs in
{NCHW, NHWC, 8c, 16c} x output in {NHWC, 8c, 16c} at F(2x2) and F(4x4) with partial tiles
and pad 1, an asymmetric pad with a partial oc block, a blocked lhs whose block is not
innermost, every epilogue kind (a residual in the output's layout), oc_vecs that do not
divide the output's blocks, prepacked weights, the in-kernel fallback (an input beyond the
transforms' safe range, a NaN) on blocked layouts, 4- / 16- / 1-lane ISAs, and what relayout
/ validate refuse.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses

import jax
import numpy as np
import pytest
from jax import lax

from alt_jax import device, runtime
from alt_jax.layout import Layout, channel_blocked, nchw_c
from alt_jax.ops import winograd
from alt_jax.ops.base import KnobError, Unsupported
from alt_jax.ops.epilogue import Epilogue
from blocked_cases import BlockedConv, layout, relerr, run_blocked
from isa_cases import DETECTED, TABLE_ISA

FAMILY = winograd.FAMILY
ISA = TABLE_ISA  # 8 lanes here: b = 8 is one vector, b = 16 two
TOL = 1e-4
LHS_KINDS = ("NCHW", "NHWC", "8c", "16c")
OUT_KINDS = ("NHWC", "8c", "16c")
# beyond both transforms' safe range (codegen/winograd.cc: F(2x2)'s product limit with these
# filters is ~1e34, F(4x4)'s input limit ~1.7e36), well inside XLA's (its sums stay finite)
BIG = 1e37


def Conv(*args, **kw) -> BlockedConv:
    """A 3x3 stride-1 conv, padded by 1 unless told (lax at HIGHEST precision)."""
    kw.setdefault("pad", ((1, 1), (1, 1)))
    return BlockedConv(FAMILY, *args, precision=lax.Precision.HIGHEST, **kw)


# 7 x 9 outputs: partial tiles at F(2x2) and F(4x4); two images
PAD1 = Conv(2, 16, 7, 9, 32)
# asymmetric padding, 6 x 5 outputs; 24 output channels: a partial oc block (2 x 8 lanes)
ASYM = Conv(1, 32, 6, 5, 24, pad=((0, 2), (2, 0)))
SHAPES = {"pad1": PAD1, "asym": ASYM}

EPILOGUES = [
    Epilogue(),
    Epilogue(scale=True, shift=True, activation="relu"),
    Epilogue(scale=True, shift=True, residual=True, activation="relu"),
    Epilogue(residual=True),
    Epilogue(shift=True, activation="gelu_tanh"),  # a vector activation
]
KNOB_EPILOGUE = Epilogue(scale=True, shift=True, residual=True, activation="relu")


def _jobs():
    """(shape, lhs, out, out_tile, epilogue, knob changes): every layout pair at both output
    tiles on PAD1 (the epilogue rotating), a few pairs on ASYM, and oc blocks that neither
    divide nor lie in the output's blocks."""
    jobs = []
    for i, (lhs, out, m) in enumerate((a, b, m) for a in LHS_KINDS for b in OUT_KINDS
                                      for m in winograd.OUT_TILES):
        jobs.append(("pad1", lhs, out, m, EPILOGUES[i % len(EPILOGUES)], ()))
    for i, (lhs, out, m) in enumerate([("16c", "8c", 2), ("8c", "8c", 4), ("NCHW", "8c", 4),
                                       ("16c", "NHWC", 2), ("8cW", "8c", 2), ("8cW", "NHWC", 4),
                                       ("4c", "4c", 4)]):
        jobs.append(("asym", lhs, out, m, EPILOGUES[(i + 2) % len(EPILOGUES)], ()))
    # 24 output channels per register tile against blocks of 16 (a partial oc block too)
    jobs.append(("pad1", "16c", "16c", 2, KNOB_EPILOGUE,
                 (("tile_block", 4), ("oc_vecs", 3), ("kb_outer", False))))
    jobs.append(("pad1", "8c", "16c", 4, KNOB_EPILOGUE, (("tile_block", 1), ("oc_vecs", 1))))
    return jobs


JOBS = _jobs()


def _job_id(job):
    name, lhs, out, m, epi, changes = job
    extra = "".join(f"-{k}{int(v)}" for k, v in changes)
    return f"{name}-{lhs}-{out}-F{m}{extra}-{epi.describe()}"


def _job_spec(job, isa=ISA, **spec_changes):
    name, lhs, out, m, epi, changes = job
    spec = SHAPES[name].spec(lhs, out, epilogue=epi, **spec_changes)
    knobs = dataclasses.replace(FAMILY.default_knobs(spec, isa), out_tile=m, **dict(changes))
    FAMILY.validate(spec, knobs, isa)
    return spec, knobs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return runtime.KernelCache(tmp_path_factory.mktemp("winograd_blocked"), isa=ISA)


@pytest.fixture(scope="module")
def built(cache):
    """Every job's kernel, compiled two at a time."""
    def build(job):
        spec, knobs = _job_spec(job)
        return job, (spec, knobs, cache.build(FAMILY.render(spec, knobs, ISA)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(build, JOBS))


@pytest.mark.parametrize("job", JOBS, ids=_job_id)
def test_blocked_layouts_match_lax(job, built):
    spec, knobs, kernel = built[job]
    out, ref = run_blocked(SHAPES[job[0]], spec, kernel)
    err = relerr(out, ref)
    assert err <= TOL, f"{_job_id(job)} {knobs}: rel err {err}"


def _poisoned(conv, value):
    """The conv's input with `value` at one element: the last image, channel 13 (inside the
    second block of 8), an interior position."""
    x, _ = conv.operands()
    x = x.copy()
    x[-1, 13, conv.h // 2, conv.w // 2] = value
    return x


def _assert_fallback_matches(out, ref, what):
    """Element by element (the fallback's sums differ from XLA's only in order): a Winograd
    tile holding the big input would smear ~BIG * eps over outputs it does not reach."""
    assert np.array_equal(np.isnan(out), np.isnan(ref)), what
    ok = ~np.isnan(ref)
    bound = TOL * np.maximum(1.0, np.abs(ref[ok]))
    assert np.all(np.abs(out[ok] - ref[ok]) <= bound), (
        what, float(np.max(np.abs(out[ok] - ref[ok]) / bound)))


@pytest.mark.parametrize("job", [j for j in JOBS if j[0] == "pad1"], ids=_job_id)
def test_fallback_beyond_the_safe_range(job, built):
    """One input beyond the transforms' safe range: the kernel computes the plain
    convolution (direct_item), through the blocked addressing of lhs, output and residual."""
    spec, knobs, kernel = built[job]
    out, ref = run_blocked(PAD1, spec, kernel, x=_poisoned(PAD1, BIG))
    assert np.abs(ref).max() > 1e30  # the big value reached the output
    _assert_fallback_matches(out, ref, _job_id(job))


@pytest.mark.parametrize("job", [j for j in JOBS if j[:3] in {("pad1", "8c", "16c"),
                                                              ("asym", "8cW", "8c")}],
                         ids=_job_id)
def test_fallback_on_nan(job, built):
    """A NaN input: NaN exactly where XLA's windows reach it, nowhere else."""
    spec, knobs, kernel = built[job]
    conv = SHAPES[job[0]]
    out, ref = run_blocked(conv, spec, kernel, x=_poisoned(conv, np.nan))
    assert np.isnan(ref).any() and not np.isnan(ref).all()
    _assert_fallback_matches(out, ref, _job_id(job))


def test_jobs_cover_the_paths():
    """Every layout pair at both output tiles, every epilogue kind on a blocked output,
    oc_vecs 1-3, partial oc blocks (the grid must not silently shrink)."""
    specs = [(j, *_job_spec(j)) for j in JOBS]
    pairs = {(j[1], j[2], k.out_tile) for j, s, k in specs if j[0] == "pad1"}
    assert pairs == {(a, b, m) for a in LHS_KINDS for b in OUT_KINDS
                     for m in winograd.OUT_TILES}
    blocked = [(s, k) for j, s, k in specs if s.out_layout.strides() is None]
    assert {(s.epilogue.scale, s.epilogue.shift, s.epilogue.residual, s.epilogue.activation)
            for s, _ in blocked} >= {(False, False, False, "none"), (True, True, False, "relu"),
                                     (True, True, True, "relu"), (False, False, True, "none"),
                                     (False, True, False, "gelu_tanh")}
    assert {k.oc_vecs for _, k in blocked} == {1, 2, 3}
    vw = ISA.vector_floats
    assert any(s.k % (k.oc_vecs * vw) for s, k in blocked)  # partial oc block
    assert any(s.padding[0][0] != s.padding[0][1] for s, _ in blocked)
    assert all(s.oh % k.out_tile or s.ow % k.out_tile for s, k in blocked)  # partial tiles


def test_prepacked_weights(cache):
    """The packed U (and the packed filter copy the fallback reads) with blocked layouts."""
    job = ("pad1", "16c", "8c", 4, KNOB_EPILOGUE, ())
    spec, knobs = _job_spec(job, prepacked=True)
    kernel = cache.build(FAMILY.render(spec, knobs, ISA))
    _, w = PAD1.operands()
    packed = np.asarray(FAMILY.pack_weights(spec, knobs, w, ISA))
    out, ref = run_blocked(PAD1, spec, kernel, rhs=packed)
    assert relerr(out, ref) <= TOL
    out, ref = run_blocked(PAD1, spec, kernel, rhs=packed, x=_poisoned(PAD1, BIG))
    _assert_fallback_matches(out, ref, "prepacked")


def test_ffi_call_inside_jit(cache):
    spec = PAD1.spec("8c", "16c")
    kernel = cache.build(FAMILY.render(spec, FAMILY.default_knobs(spec, ISA), ISA))
    x, w = PAD1.operands()
    got = jax.jit(lambda a, b: FAMILY.lower(spec, kernel, [a, b])[0])(
        spec.lhs_layout.apply(x), w)
    ref = spec.out_layout.apply(jax.jit(PAD1.fn())(x, w))
    assert got.shape == spec.out_layout.physical_shape == (2, 2, 7, 9, 16)
    assert relerr(np.asarray(got), np.asarray(ref)) <= TOL


@pytest.mark.parametrize("isa", [device.AVX512, device.SSE2, device.SCALAR],
                         ids=lambda i: i.name)
def test_other_vector_widths(isa, tmp_path):
    """16 lanes (8c blocks narrower than a vector: loads concatenated from two blocks,
    stores split per block; 24 channels: a partial vector stored lane by lane), 4 lanes
    (blocks of whole vectors) and 1, with the fallback."""
    if isa.name == device.AVX512.name and DETECTED.name != device.AVX512.name:
        pytest.skip("needs an AVX-512 CPU")
    cache = runtime.KernelCache(tmp_path, isa=isa)
    cases = {device.AVX512.name: [("pad1", "8c", "8c", 4), ("pad1", "16c", "8c", 2),
                                  ("asym", "8c", "8c", 2)],
             device.SSE2.name: [("pad1", "8c", "16c", 4), ("asym", "16c", "8c", 2)],
             device.SCALAR.name: [("pad1", "16c", "8c", 2)]}[isa.name]
    for i, (name, lhs, out, m) in enumerate(cases):
        job = (name, lhs, out, m, KNOB_EPILOGUE if i % 2 == 0 else EPILOGUES[4], ())
        spec, knobs = _job_spec(job, isa)
        kernel = cache.build(FAMILY.render(spec, knobs, isa))
        got, ref = run_blocked(SHAPES[name], spec, kernel)
        assert relerr(got, ref) <= TOL, (isa.name, job)
        if i == 0:
            conv = SHAPES[name]
            got, ref = run_blocked(conv, spec, kernel, x=_poisoned(conv, BIG))
            _assert_fallback_matches(got, ref, (isa.name, job))


# ---- what relayout and validate refuse ----

def test_relayout_refuses_what_the_template_cannot_address():
    conv = PAD1
    x_shape, o_shape = (conv.n, conv.c, conv.h, conv.w), (conv.n, conv.k, conv.h, conv.w)
    base = conv.logical()
    asym = ASYM.logical()
    with pytest.raises(Unsupported, match="blocks H"):  # N H/2 C W 2h
        FAMILY.relayout(asym, channel_blocked(Layout("NCHW", asym.lhs_layout.shape), "H", 2))
    with pytest.raises(Unsupported, match="blocks H"):
        FAMILY.relayout(asym, None, channel_blocked(Layout("NCHW", asym.out_layout.shape),
                                                    "H", 3))
    with pytest.raises(Unsupported, match="pads"):  # 16 channels padded to 24
        FAMILY.relayout(base, nchw_c(x_shape, 12))
    with pytest.raises(Unsupported, match="pads"):  # 24 output channels padded to 32
        FAMILY.relayout(ASYM.logical(), None, nchw_c((1, 24, 6, 5), 16))
    with pytest.raises(Unsupported, match="over"):  # another logical tensor
        FAMILY.relayout(base, layout("8c", (1, 16, 7, 9)))
    c24 = Conv(1, 24, 6, 6, 24)
    with pytest.raises(Unsupported, match="power of two"):
        FAMILY.relayout(c24.logical(), layout("12c", (1, 24, 6, 6)))
    with pytest.raises(Unsupported, match="power of two"):
        FAMILY.relayout(c24.logical(), None, layout("12c", (1, 24, 6, 6)))
    with pytest.raises(Unsupported, match="contiguous"):  # N C/8 H 8c W: blocks not innermost
        FAMILY.relayout(base, None, layout("8cW", o_shape))
    # a blocked lhs may keep its channels strided (read lane by lane)
    assert FAMILY.relayout(base, layout("8cW", x_shape)).lhs_layout.strides() is None
    # blocks of 4 (a power of two) are addressed too
    assert FAMILY.relayout(base, layout("4c", x_shape), layout("4c", o_shape))


def test_validate_and_defaults_refuse_layouts_the_template_cannot_address():
    spec = ASYM.spec("16c", "8c")
    knobs = FAMILY.default_knobs(spec, ISA)
    odd = dataclasses.replace(spec, lhs_layout=channel_blocked(
        Layout("NCHW", spec.lhs_layout.shape), "H", 2))
    with pytest.raises(KnobError, match="blocks H"):
        FAMILY.validate(odd, knobs, ISA)
    with pytest.raises(Unsupported, match="blocks H"):
        FAMILY.default_knobs(odd, ISA)
    odd = dataclasses.replace(spec, out_layout=layout("8cW", spec.out_layout.shape))
    with pytest.raises(KnobError, match="contiguous"):
        FAMILY.validate(odd, knobs, ISA)


@pytest.mark.parametrize("isa", [device.AVX512, device.AVX2, device.SSE2, device.SCALAR],
                         ids=lambda i: i.name)
def test_defaults_are_legal_and_in_the_space(isa):
    """Every oc_vecs / tile_block of the space is legal on blocked layouts (the stores go
    vector by vector), and the default is one of them."""
    for conv in SHAPES.values():
        for lhs in LHS_KINDS:
            for out in ("8c", "16c"):
                if conv.k % int(out[:-1]):
                    continue
                spec = conv.spec(lhs, out)
                knobs = FAMILY.default_knobs(spec, isa)
                FAMILY.validate(spec, knobs, isa)
                space = FAMILY.space(spec, isa)
                for axis in space.axes:
                    assert getattr(knobs, axis.name) in axis.values, (lhs, out, axis)
                values = dict((a.name, a.values) for a in space.axes)
                for ocv in values["oc_vecs"]:
                    budget = (isa.vector_registers - ocv - 1) // ocv
                    FAMILY.validate(spec, dataclasses.replace(
                        knobs, oc_vecs=ocv, tile_block=min(budget, 16)), isa)


def test_linear_layouts_render_as_before():
    """A permutation layout renders unblocked (LHS_CB / OUT_KB = all channels, outer stride
    0) with the strides it always had; a blocked one with its block and outer stride."""
    spec = PAD1.spec("NHWC", "NCHW")
    code = FAMILY.render(spec, FAMILY.default_knobs(spec, ISA), ISA).code
    assert "LHS_CB = 16, LHS_CBS = 0;" in code and "OUT_KB = 32, OUT_KBS = 0;" in code
    ln, lc, lh, lw = spec.lhs_strides
    assert f"LHS_N = {ln}, LHS_C = {lc}, LHS_H = {lh}, LHS_W = {lw};" in code
    on, ok, oh, ow = spec.out_strides
    assert f"OUT_N = {on}, OUT_K = {ok}, OUT_H = {oh}, OUT_W = {ow};" in code
    blocked = PAD1.spec("8c", "16c")
    code = FAMILY.render(blocked, FAMILY.default_knobs(blocked, ISA), ISA).code
    assert f"LHS_CB = 8, LHS_CBS = {7 * 9 * 8};" in code and "LHS_C = 1," in code
    assert f"OUT_KB = 16, OUT_KBS = {7 * 9 * 16};" in code and "OUT_K = 1," in code

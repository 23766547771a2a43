"""conv2d (alt_jax/ops/conv2d.py + codegen/conv2d.cc) reading a channel-blocked lhs and
writing a channel-blocked output (N C/b H W bc, b = 8 or 16) against lax.

Entry points: pytest tests/test_conv2d_blocked.py. A spec is matched from a logical (NCHW)
equation and moved onto other activation layouts with FAMILY.relayout; the kernel reads
lhs_layout.apply(x) and must write out_layout.apply(lax conv of x). Kernels are built into a
per-session cache two at a time (like test_conv2d_kernel.py) and run through
runtime.run_numpy. Covered: every lhs in {NCHW, NHWC, 8c, 16c} x output in {NHWC, 8c, 16c}
on 1x1, 3x3 padded, 3x3 stride 2 and grouped convs with default knobs, the epilogues
(scale/shift/activation, a residual in the output's layout), knob variants (oc_vecs 1-3,
ow_tile, packed and in-place input, every weights mode, reduction passes), prepacked
weights, narrower and wider ISAs, and what relayout / validate refuse.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses

import jax
import numpy as np
import pytest

from alt_jax import device, runtime
from alt_jax.layout import Layout, channel_blocked, nchw_c
from alt_jax.ops import conv2d
from alt_jax.ops.base import KnobError, Unsupported
from alt_jax.ops.epilogue import Epilogue
from blocked_cases import BlockedConv, layout, relerr, run_blocked
from isa_cases import DETECTED, TABLE_ISA

FAMILY = conv2d.FAMILY
ISA = TABLE_ISA  # 8 lanes here: b = 8 is one vector, b = 16 two
LHS_KINDS = ("NCHW", "NHWC", "8c", "16c")
OUT_KINDS = ("NHWC", "8c", "16c")


def Conv(*args, **kw) -> BlockedConv:
    return BlockedConv(FAMILY, *args, **kw)


ONE_BY_ONE = Conv(1, 32, 6, 7, 48, 1, 1, rhs_dn="HWIO")                     # in place
PADDED = Conv(2, 16, 7, 9, 32, 3, 3, pad=((1, 1), (1, 1)))                 # packed
STRIDED = Conv(1, 48, 9, 11, 32, 3, 3, stride=(2, 2))                      # in place
GROUPED = Conv(1, 32, 8, 8, 32, 3, 3, groups=2, rhs_dn="HWIO")             # 16 per group
SHAPES = {"1x1": ONE_BY_ONE, "3x3p1": PADDED, "3x3s2": STRIDED, "g2": GROUPED}

EPILOGUES = [
    Epilogue(),
    Epilogue(scale=True, shift=True, activation="relu"),
    Epilogue(scale=True, shift=True, residual=True, activation="relu"),
    Epilogue(shift=True, residual=True, activation="gelu_tanh"),  # vector activation
    Epilogue(residual=True, activation="relu6"),
]


def _default_jobs():
    """(shape, lhs, out, epilogue, None): every layout pair on each shape (grouped: the
    blocked outputs), the epilogue rotating over the pairs."""
    jobs = []
    for name, conv in SHAPES.items():
        outs = OUT_KINDS if name != "g2" else ("8c", "16c")
        for i, (lhs, out) in enumerate((a, b) for a in LHS_KINDS for b in outs):
            jobs.append((name, lhs, out, EPILOGUES[(i + len(jobs)) % len(EPILOGUES)], None))
    return jobs


# (ic_block or "b" = the lhs's block, oc_vecs, ow_tile, chunk_tiles or None = all tiles,
#  ic_chunk or None = one pass, pack_input, weights, oc_outer)
KNOB_ROWS = [
    ("b", 1, 8, None, None, False, "ahead", True),
    ("b", 2, 5, None, None, False, "fused", False),
    ("b", 3, 4, 3, 1, False, "ahead", True),      # reduction passes; 3 x 8 lanes
    ("b", 2, 6, 2, None, False, "inplace", True),  # rhs read in place (HWIO)
    (4, 2, 6, None, None, True, "ahead", True),
    (16, 1, 7, 1, 2, True, "fused", False),
    (8, 3, 3, 2, None, True, "ahead", False),
    (12, 1, 8, None, 2, True, "ahead", True),     # ic blocks across layout blocks, a tail
]
KNOB_PAIRS = [("8c", "8c"), ("16c", "16c"), ("8c", "16c"), ("16c", "8c"), ("NHWC", "16c"),
              ("8cW", "8c")]
KNOB_EPILOGUE = Epilogue(scale=True, shift=True, residual=True, activation="relu")


def _knobs(spec, row):
    icb, ocv, owt, chunk, ic_chunk, pack_in, weights, oc_outer = row
    if icb == "b":
        icb = spec.lhs_layout.block_strides["C"][0]
        icb = min(icb, 8) if icb == spec.c else icb  # unblocked lhs: any block will do
    n_tiles = -(-(spec.oh * spec.ow) // owt)
    cgb = -(-spec.cg // icb)
    if chunk is None or weights == "fused":
        chunk = n_tiles
    return conv2d.Conv2dKnobs(icb, ocv, owt, chunk, cgb if ic_chunk is None else ic_chunk,
                              pack_in, weights, oc_outer)


def _knob_jobs():
    """(shape, lhs, out, epilogue, knobs) of the rows legal for each shape and pair."""
    jobs = []
    for name in ("1x1", "3x3s2"):
        for lhs, out in KNOB_PAIRS:
            for i, row in enumerate(KNOB_ROWS):
                epi = KNOB_EPILOGUE if i % 2 else Epilogue(shift=True, activation="silu")
                spec = SHAPES[name].spec(lhs, out, epilogue=epi)
                knobs = _knobs(spec, row)
                try:
                    FAMILY.validate(spec, knobs, ISA)
                except KnobError:
                    continue
                jobs.append((name, lhs, out, epi, knobs))
    return jobs


def _job_id(job):
    name, lhs, out, epi, knobs = job
    k = "default" if knobs is None else (f"icb{knobs.ic_block}-ocv{knobs.oc_vecs}-"
                                         f"owt{knobs.ow_tile}-{'pack' if knobs.pack_input else 'inplace'}"
                                         f"-{knobs.weights}")
    return f"{name}-{lhs}-{out}-{k}-{epi.describe()}"


def _job_spec(job):
    name, lhs, out, epi, knobs = job
    spec = SHAPES[name].spec(lhs, out, epilogue=epi)
    return spec, knobs or FAMILY.default_knobs(spec, ISA)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return runtime.KernelCache(tmp_path_factory.mktemp("conv2d_blocked"), isa=ISA)


@pytest.fixture(scope="session")
def built(cache):
    """Every kernel of the default and knob grids, compiled two at a time."""
    def build(job):
        spec, knobs = _job_spec(job)
        return job, (spec, knobs, cache.build(FAMILY.render(spec, knobs, ISA)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(build, _default_jobs() + _knob_jobs()))


@pytest.mark.parametrize("job", _default_jobs() + _knob_jobs(), ids=_job_id)
def test_default_knobs_and_knob_variants_match_lax(job, built):
    spec, knobs, kernel = built[job]
    out, ref = run_blocked(SHAPES[job[0]], spec, kernel)
    err = relerr(out, ref)
    assert err <= 1e-4, f"{_job_id(job)} {knobs}: rel err {err}"


def test_grids_cover_the_paths():
    """Blocked inputs read in place and packed, blocked outputs with partial oc blocks,
    every oc_vecs, weights mode and epilogue kind (the grids must not silently shrink)."""
    jobs = [(j, *_job_spec(j)) for j in _default_jobs() + _knob_jobs()]
    blocked = lambda lay: lay.strides() is None
    in_place = {k.pack_input for _, s, k in jobs if blocked(s.lhs_layout)}
    assert in_place == {True, False}
    assert any(not k.pack_input and s.lhs_layout.block_strides["C"][0] == 16 for _, s, k in jobs)
    outs = [(s, k) for _, s, k in jobs if blocked(s.out_layout)]
    assert {k.oc_vecs for _, k in outs} == {1, 2, 3}
    assert any(s.kg % (k.oc_vecs * ISA.vector_floats) for s, k in outs)  # partial oc block
    assert {k.weights for _, k in outs} == {"ahead", "fused", "inplace"}
    assert {k.ic_chunk < -(-s.cg // k.ic_block) for s, k in outs} == {True, False}
    assert {(e.scale, e.shift, e.residual) for (_, _, _, e, _), s, _ in jobs
            if blocked(s.out_layout)} >= {(False, False, False), (True, True, False),
                                          (True, True, True), (False, True, True),
                                          (False, False, True)}
    assert len({k.ow_tile for _, k in outs}) >= 5
    assert any(s.groups > 1 and not k.pack_input for _, s, k in jobs)


def test_prepacked_weights(cache):
    spec, knobs = _job_spec(("3x3s2", "16c", "8c", KNOB_EPILOGUE, None))
    packed = dataclasses.replace(spec, prepacked=True)
    kernel = cache.build(FAMILY.render(packed, knobs, ISA))
    x, w = STRIDED.operands()
    out, ref = run_blocked(STRIDED, packed, kernel,
                    rhs=np.asarray(FAMILY.pack_weights(packed, knobs, w, ISA)))
    assert relerr(out, ref) <= 1e-4


def test_ffi_call_inside_jit(cache):
    spec = ONE_BY_ONE.spec("8c", "16c")
    kernel = cache.build(FAMILY.render(spec, FAMILY.default_knobs(spec, ISA), ISA))
    x, w = ONE_BY_ONE.operands()
    got = jax.jit(lambda a, b: FAMILY.lower(spec, kernel, [a, b])[0])(
        spec.lhs_layout.apply(x), w)
    ref = spec.out_layout.apply(jax.jit(ONE_BY_ONE.fn())(x, w))
    assert got.shape == spec.out_layout.physical_shape == (1, 3, 6, 7, 16)
    assert relerr(np.asarray(got), np.asarray(ref)) <= 1e-4


@pytest.mark.parametrize("isa", [device.SSE2, device.AVX512], ids=lambda i: i.name)
def test_other_vector_widths(isa, tmp_path):
    """4 lanes (blocks of whole vectors) and 16 (8c blocks narrower than a vector: stores
    split per block), with a residual and a partial oc block."""
    if isa.name == device.AVX512.name and DETECTED.name != device.AVX512.name:
        pytest.skip("needs an AVX-512 CPU")
    cache = runtime.KernelCache(tmp_path, isa=isa)
    epi = Epilogue(scale=True, residual=True, activation="silu")
    # partial oc blocks: 4 lanes x 6 = 24 of 32 channels; 16 lanes x 2 = 32 of 48
    partial = {device.SSE2.name: (PADDED, "16c", "8c", dict(oc_vecs=6, ow_tile=1)),
               device.AVX512.name: (ONE_BY_ONE, "8c", "8c", dict(oc_vecs=2))}[isa.name]
    for conv, lhs, out, changes in [(ONE_BY_ONE, "16c", "8c", {}), partial,
                                    (STRIDED, "8c", "16c", {})]:
        spec = conv.spec(lhs, out, epilogue=epi)
        knobs = dataclasses.replace(FAMILY.default_knobs(spec, isa), **changes)
        FAMILY.validate(spec, knobs, isa)
        if changes:
            assert spec.kg % (knobs.oc_vecs * isa.vector_floats)
        got, ref = run_blocked(conv, spec, cache.build(FAMILY.render(spec, knobs, isa)))
        assert relerr(got, ref) <= 1e-4, (isa.name, lhs, out, knobs)


# ---- what relayout and validate refuse ----

def test_relayout_refuses_what_the_template_cannot_address():
    def logical(conv):
        return FAMILY.match(jax.make_jaxpr(conv.fn())(*conv.operands()).jaxpr.eqns[0])

    conv = ONE_BY_ONE
    x_shape, o_shape = (conv.n, conv.c, conv.h, conv.w), (conv.n, conv.k, conv.h, conv.w)
    base = logical(conv)
    with pytest.raises(Unsupported, match="blocks H"):  # N H/2 C W 2h
        FAMILY.relayout(base, channel_blocked(Layout("NCHW", x_shape), "H", 2))
    with pytest.raises(Unsupported, match="blocks H"):
        FAMILY.relayout(base, None, channel_blocked(Layout("NCHW", o_shape), "H", 3))
    with pytest.raises(Unsupported, match="pads"):  # 32 channels padded to 36
        FAMILY.relayout(base, nchw_c(x_shape, 12))
    with pytest.raises(Unsupported, match="over"):  # another logical tensor
        FAMILY.relayout(base, layout("8c", (1, 32, 6, 8)))
    c24 = Conv(1, 24, 6, 6, 24, 1, 1)
    with pytest.raises(Unsupported, match="power of two"):
        FAMILY.relayout(logical(c24), None, layout("12c", (1, 24, 6, 6)))
    with pytest.raises(Unsupported, match="contiguous"):  # N C/8 H 8c W: blocks not innermost
        FAMILY.relayout(base, None, Layout("NCHW", o_shape).split("C", 8).reorder(
            "N", "C/8", "H", "8c", "W"))
    # a blocked lhs may keep its channels strided: N C/8 H 8c W is read (packed or in place)
    assert FAMILY.relayout(base, Layout("NCHW", x_shape).split("C", 8).reorder(
        "N", "C/8", "H", "8c", "W"))
    # groups of 8 channels inside blocks of 16
    g4 = Conv(1, 32, 6, 6, 32, 3, 3, groups=4)
    spec = FAMILY.match(jax.make_jaxpr(g4.fn())(*g4.operands()).jaxpr.eqns[0])
    with pytest.raises(Unsupported, match="straddle"):
        FAMILY.relayout(spec, layout("16c", (1, 32, 6, 6)))
    with pytest.raises(Unsupported, match="straddle"):
        FAMILY.relayout(spec, None, layout("16c", (1, 32, 4, 4)))
    assert FAMILY.relayout(spec, layout("8c", (1, 32, 6, 6)), layout("8c", (1, 32, 4, 4)))


def test_validate_refuses_illegal_blocked_knobs():
    spec = ONE_BY_ONE.spec("16c", "16c")
    knobs = FAMILY.default_knobs(spec, ISA)
    assert (knobs.ic_block, knobs.pack_input) == (16, False)
    with pytest.raises(KnobError, match="ic_block=16"):
        FAMILY.validate(spec, dataclasses.replace(knobs, ic_block=8, ic_chunk=1), ISA)
    FAMILY.validate(spec, dataclasses.replace(knobs, ic_block=8, ic_chunk=1, pack_input=True),
                    ISA)
    with pytest.raises(KnobError, match="divide one another"):  # 24 channels vs blocks of 16
        FAMILY.validate(spec, dataclasses.replace(knobs, oc_vecs=3, ow_tile=4), ISA)
    # the spec's layouts are checked too (records may hold any layout)
    odd = dataclasses.replace(spec, lhs_layout=channel_blocked(
        Layout("NCHW", spec.lhs_layout.shape), "H", 2))
    with pytest.raises(KnobError, match="blocks H"):
        FAMILY.validate(odd, knobs, ISA)
    with pytest.raises(Unsupported, match="blocks H"):
        FAMILY.default_knobs(odd, ISA)


@pytest.mark.parametrize("isa", [device.AVX512, device.AVX2, device.SSE2, device.SCALAR],
                         ids=lambda i: i.name)
def test_defaults_are_legal_and_in_the_space(isa):
    for name, conv in SHAPES.items():
        for lhs in LHS_KINDS:
            for out in ("8c", "16c"):
                spec = conv.spec(lhs, out)
                knobs = FAMILY.default_knobs(spec, isa)
                FAMILY.validate(spec, knobs, isa)
                space = FAMILY.space(spec, isa)
                for axis in space.axes:
                    assert getattr(knobs, axis.name) in axis.values, (name, lhs, out, axis)
                if lhs in ("8c", "16c") and conv.pad == ((0, 0), (0, 0)):
                    assert not knobs.pack_input and knobs.ic_block == int(lhs[:-1])
                # no oc_vecs in the space that no other knob could make legal
                b = spec.out_layout.block_strides["C"][0]
                vw = isa.vector_floats
                for ocv in dict((a.name, a.values) for a in space.axes)["oc_vecs"]:
                    assert conv2d._tile_fits_blocks(b, ocv * vw, vw)


def test_linear_layouts_render_as_before():
    """A permutation layout renders unblocked (LHS_CB / OUT_KB = all channels) with the
    strides it always had."""
    conv = PADDED
    spec = conv.spec("NHWC", "NHWC")
    values, _ = FAMILY._values(spec, FAMILY.default_knobs(spec, ISA), ISA)
    assert (values["LHS_CB"], values["LHS_CBS"], values["OUT_KB"], values["OUT_KBS"]) == (
        16, 0, 32, 0)
    assert (values["LHS_N"], values["LHS_C"], values["LHS_H"], values["LHS_W"]) == \
        spec.lhs_strides
    blocked = conv.spec("8c", "16c")
    values, _ = FAMILY._values(blocked, FAMILY.default_knobs(blocked, ISA), ISA)
    assert (values["LHS_CB"], values["LHS_CBS"], values["LHS_C"], values["LHS_W"]) == (
        8, 7 * 9 * 8, 1, 8)
    assert (values["OUT_KB"], values["OUT_KBS"], values["OUT_K"]) == (16, 7 * 9 * 16, 1)

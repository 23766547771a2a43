"""Each family's search space (OpFamily.space) and the rest of the family protocol the tuner
uses: the heuristic's choice is a point of the space, axes are named and kinded as ALT's
two levels (layout / loop), random legal points compute what lax computes when run on
kernel_inputs(...), and illegal ones fail validate() with KnobError and nothing else.

Entry points: pytest tests/test_space.py. Kernels are built two at a time into one private
cache and run through runtime.run_numpy.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import math
import zlib
from typing import Callable

import jax
import numpy as np
import pytest
from jax import lax

from alt_jax import device, runtime
from alt_jax.ops import conv2d, depthwise, matmul, winograd
from alt_jax.ops.base import KnobError, Space
from alt_jax.ops.epilogue import Epilogue
from naive_family import NAIVE_MATMUL

ISA = device.detect_isa()
HIGHEST = lax.Precision.HIGHEST
FULL = Epilogue(scale=True, shift=True, residual=True, activation="relu")
NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")
PLAIN = (((1,), (0,)), ((), ()))
POINTS = 6  # random legal points built and run per case (fewer if the space is smaller)

# What the tuner (and loop-only ablation) relies on: which knobs are layout decisions.
KINDS = {
    "conv2d": dict(ic_block="layout", oc_vecs="layout", pack_input="layout", weights="layout",
                   ow_tile="loop", chunk_tiles="loop", ic_chunk="loop", oc_outer="loop"),
    "depthwise": dict(c_block="layout", pack="layout", ow_tile="loop", oh_rows="loop",
                      c_inner="loop"),
    "winograd": dict(out_tile="layout", oc_vecs="layout", tile_block="loop", kb_outer="loop"),
    "matmul": dict(pack_a="layout", pack_b="layout", fuse_b="layout", dot="layout", mr="loop",
                   nv="loop", kc="loop", mc="loop", nc="loop", par="loop", unroll="loop"),
    "naive_matmul": dict(rows_per_task="loop"),
}
FAMILIES = [conv2d.FAMILY, depthwise.FAMILY, winograd.FAMILY, matmul.FAMILY, NAIVE_MATMUL]


@dataclasses.dataclass(frozen=True)
class Case:
    """One equation (fn on lhs/rhs shapes) for one family, with the epilogue and prepacking
    the planner could give it."""

    name: str
    family: object
    fn: Callable
    shapes: tuple
    epilogue: Epilogue = Epilogue()
    prepacked: bool = False
    channel_axis: int | None = None  # the result's channel axis (conv); None: matmul's N

    def spec(self, isa=ISA):
        args = [jax.ShapeDtypeStruct(s, np.float32) for s in self.shapes]
        spec = self.family.match(jax.make_jaxpr(self.fn)(*args).jaxpr.eqns[0])
        if hasattr(spec, "epilogue"):
            spec = dataclasses.replace(spec, epilogue=self.epilogue, prepacked=self.prepacked)
        return spec

    def __str__(self):
        return f"{self.family.name}-{self.name}"


def _conv(dn, stride=(1, 1), pad=((0, 0), (0, 0)), groups=1):
    return lambda x, w: lax.conv_general_dilated(
        x, w, stride, pad, dimension_numbers=dn, feature_group_count=groups, precision=HIGHEST)


def _dot(dn):
    return lambda a, b: lax.dot_general(a, b, dn, precision=HIGHEST)


PAD1 = ((1, 1), (1, 1))
CASES = [
    Case("nhwc-pad-full-prepacked", conv2d.FAMILY, _conv(NHWC, pad=PAD1),
         ((1, 8, 9, 16), (3, 3, 16, 24)), FULL, True, 3),
    Case("nchw-stride-groups", conv2d.FAMILY, _conv(NCHW, stride=(2, 2), groups=2),
         ((2, 8, 9, 10), (12, 4, 3, 3)), channel_axis=1),
    Case("nhwc-1x1", conv2d.FAMILY, _conv(NHWC), ((1, 7, 7, 16), (1, 1, 16, 16)),
         channel_axis=3),
    Case("nhwc-full-prepacked", depthwise.FAMILY, _conv(NHWC, pad=PAD1, groups=32),
         ((1, 10, 10, 32), (3, 3, 1, 32)), FULL, True, 3),
    Case("nchw-stride-pad", depthwise.FAMILY,
         _conv(NCHW, stride=(2, 1), pad=((0, 2), (1, 0)), groups=13),
         ((1, 13, 9, 11), (13, 1, 3, 3)), channel_axis=1),
    Case("nhwc-full-prepacked", winograd.FAMILY, _conv(NHWC, pad=PAD1),
         ((1, 8, 8, 16), (3, 3, 16, 24)), FULL, True, 3),
    Case("nchw-valid", winograd.FAMILY, _conv(NCHW), ((1, 9, 10, 6), (5, 9, 3, 3)),
         channel_axis=1),
    Case("plain-full-prepacked", matmul.FAMILY, _dot(PLAIN), ((19, 37), (37, 29)), FULL, True),
    Case("rhs-transposed", matmul.FAMILY, _dot((((1,), (1,)), ((), ()))), ((7, 13), (17, 13))),
    Case("batched-perm-prepacked", matmul.FAMILY, _dot((((3,), (2,)), ((0, 1), (1, 0)))),
         ((2, 3, 5, 7), (3, 2, 7, 4)), Epilogue(scale=True, shift=True), True),
    Case("plain", NAIVE_MATMUL, _dot(PLAIN), ((8, 16), (16, 12))),
]


def _operands(case, seed=0):
    """[lhs, rhs, *epilogue inputs] as the equation (and its fused epilogue) reads them, and
    the lax reference of the whole group."""
    rng = np.random.default_rng(seed)
    x, w = (rng.standard_normal(s).astype(np.float32) for s in case.shapes)
    raw = np.asarray(jax.jit(case.fn)(x, w))
    epi = case.epilogue
    n = raw.shape[case.channel_axis] if case.channel_axis is not None else case.spec().n
    named = {"scale": rng.uniform(0.5, 1.5, n).astype(np.float32),
             "shift": rng.standard_normal(n).astype(np.float32),
             "residual": rng.standard_normal(raw.shape).astype(np.float32)}
    extra = {k: named[k] for k in epi.inputs()}
    if epi.is_identity:
        ref = raw
    elif case.channel_axis is not None:
        ref = epi.reference(raw, case.channel_axis, **extra)
    else:  # matmul: the channel is N, the flattened rhs free dims at the end of the result
        spec = case.spec()
        lead = raw.shape[:raw.ndim - len(spec.rhs_dims[2])]
        res = extra.get("residual")
        ref = epi.reference(raw.reshape(*lead, n), len(lead), extra.get("scale"),
                            extra.get("shift"), None if res is None else res.reshape(*lead, n))
    return [x, w, *extra.values()], np.asarray(ref).reshape(raw.shape)


def _draw(space, rng):
    return space.make({a.name: a.values[rng.integers(len(a.values))] for a in space.axes})


def _legal_points(case, n):
    """n distinct random points of the case's space that validate() accepts (seeded)."""
    spec = case.spec()
    space = case.family.space(spec, ISA)
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    points = []
    for _ in range(5000):
        knobs = _draw(space, rng)
        try:
            case.family.validate(spec, knobs, ISA)
        except KnobError:
            continue
        if knobs not in points:
            points.append(knobs)
        if len(points) == min(n, space.size):
            break
    return spec, points


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(case, knobs) -> (spec, kernel) for POINTS random legal points of every case."""
    cache = runtime.KernelCache(tmp_path_factory.mktemp("space_kernels"))
    jobs = []
    for case in CASES:
        spec, points = _legal_points(case, POINTS)
        jobs += [(case, spec, knobs) for knobs in points]

    def build(job):
        case, spec, knobs = job
        return (case, knobs), (spec, cache.build(case.family.render(spec, knobs, ISA)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(build, jobs))


def _run(kernel, inputs, shape):
    out = np.full(shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [np.asarray(a, np.float32) for a in inputs], [out])
    return out


def _relerr(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# ---- the space itself ----

@pytest.mark.parametrize("case", CASES, ids=str)
def test_space_holds_the_default_and_kinds_every_knob(case):
    fam, spec = case.family, case.spec()
    space = fam.space(spec, ISA)
    assert isinstance(space, Space) and space.family == fam.name
    assert space.knobs_type is fam.knobs_type
    assert space.contains(fam.default_knobs(spec, ISA))
    assert space.size > 1
    assert space.size == math.prod(len(a.values) for a in space.axes)
    assert {a.name: a.kind for a in space.axes} == KINDS[fam.name]
    assert all(len(a.values) <= 10 for a in space.axes), space
    assert fam.space(spec, ISA) == space  # deterministic: the tuner may rebuild it


@pytest.mark.parametrize("isa", [device.AVX2, device.SSE2, device.SCALAR], ids=lambda i: i.name)
def test_default_is_a_point_of_the_space_on_every_isa(isa):
    for case in CASES:
        spec = case.spec()
        assert case.family.space(spec, isa).contains(case.family.default_knobs(spec, isa)), case


@pytest.mark.parametrize("c,hw,dn", [(64, 56, NHWC), (128, 28, NCHW), (512, 7, NHWC)])
def test_resnet50_3x3_space_size(c, hw, dn):
    shapes = ((1, hw, hw, c), (3, 3, c, c)) if dn == NHWC else ((1, c, hw, hw), (c, c, 3, 3))
    spec = Case("resnet", conv2d.FAMILY, _conv(dn, pad=PAD1), shapes).spec()
    space = conv2d.FAMILY.space(spec, device.AVX2)
    assert 1_000 <= space.size <= 10_000_000, space.size
    assert space.contains(conv2d.FAMILY.default_knobs(spec, device.AVX2))
    # weights="fused" needs chunk_tiles == the tiles of its ow_tile: each ow_tile has one
    positions = spec.oh * spec.ow
    for ow in space.axis("ow_tile").values:
        assert -(-positions // ow) in space.axis("chunk_tiles").values


@pytest.mark.parametrize("family", FAMILIES[:4], ids=lambda f: f.name)
def test_illegal_points_raise_knob_error_and_legal_ones_render(family):
    """validate() is the tuner's filter: on any point it raises KnobError or nothing (any
    other exception fails here). Legal points are common enough for rejection sampling
    (the tuner draws up to 200), and each renders."""
    illegal = 0
    for case in [c for c in CASES if c.family is family]:
        spec = case.spec()
        space = family.space(spec, ISA)
        rng = np.random.default_rng(1)
        legal = []
        for _ in range(300):
            knobs = _draw(space, rng)
            try:
                family.validate(spec, knobs, ISA)
            except KnobError:
                illegal += 1
                continue
            legal.append(knobs)
        assert len(legal) >= 15, f"{case}: {len(legal)} legal of 300 draws"
        for knobs in legal[:10]:
            assert family.render(spec, knobs, ISA).symbol
        # and one point off every axis (an int knob far out of range) is a KnobError too, so
        # the check runs even where every drawn point is legal (depthwise at 16 lanes)
        default = family.default_knobs(spec, ISA)
        name = next(a.name for a in space.axes if isinstance(getattr(default, a.name), int)
                    and not isinstance(getattr(default, a.name), bool))
        with pytest.raises(KnobError):
            family.validate(spec, dataclasses.replace(default, **{name: 10**6}), ISA)
        illegal += 1
    assert illegal > 0


# ---- random legal points compute what lax computes ----

@pytest.mark.parametrize("case", CASES, ids=str)
def test_random_points_match_lax(case, built):
    ops, ref = _operands(case)
    points = [(knobs, v) for (c, knobs), v in built.items() if c == case]
    assert len(points) == min(POINTS, case.family.space(case.spec(), ISA).size)
    for knobs, (spec, kernel) in points:
        inputs = case.family.kernel_inputs(spec, knobs, ops, ISA)
        out = _run(kernel, inputs, ref.shape)
        err = _relerr(out, ref)
        assert err <= 1e-4, f"{case} {knobs}: rel err {err}"


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5], CASES[9]], ids=str)
def test_kernel_inputs_is_what_lower_passes(case, built):
    """lower() (operands with the rhs packed, as the planner passes them) and run_numpy on
    kernel_inputs() run the kernel on the same arrays."""
    ops, ref = _operands(case, seed=3)
    (knobs, (spec, kernel)), *_ = [(k, v) for (c, k), v in built.items() if c == case]
    fam = case.family
    x, w, *extra = ops
    lowered = jax.jit(lambda x, w, *e: fam.lower(
        spec, kernel, [x, fam.pack_weights(spec, knobs, w, ISA), *e])[0])(x, w, *extra)
    direct = _run(kernel, fam.kernel_inputs(spec, knobs, ops, ISA), ref.shape)
    np.testing.assert_array_equal(np.asarray(lowered), direct)
    assert _relerr(direct, ref) <= 1e-4
    with pytest.raises(ValueError, match="operands"):
        fam.kernel_inputs(spec, knobs, ops[:-1], ISA)


# ---- the rest of the protocol ----

def test_prefers_is_true_except_for_small_winograd():
    for case in CASES:
        assert case.family.prefers(case.spec()) == (case.family is not winograd.FAMILY), case
    big = Case("resnet", winograd.FAMILY, _conv(NHWC, pad=PAD1),
               ((1, 14, 14, 64), (3, 3, 64, 64))).spec()
    assert winograd.FAMILY.prefers(big)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_protocol_isa_is_required(family):
    """One source of truth for the ISA: the caller's (no detect_isa() default)."""
    assert dataclasses.is_dataclass(family.knobs_type)
    for method in ("pack_weights", "kernel_inputs", "space"):
        isa = inspect.signature(getattr(family, method)).parameters["isa"]
        assert isa.default is inspect.Parameter.empty, (family.name, method)
    shape = getattr(family, "packed_weight_shape", None)
    if shape is not None:
        assert inspect.signature(shape).parameters["isa"].default is inspect.Parameter.empty

"""Special and extreme values through the conv kernels give what jax.jit gives: the same NaN
and inf positions (and signs), finite values within tolerance.

Winograd's transforms mix a 4x4 (6x6) input patch and a 3x3 filter, so one inf becomes
inf - inf over a tile and values near 3e38 overflow: the kernel checks the values it reads
and computes the plain convolution for such calls, with no check in the graph. The depthwise
kernel's in-place path skips padded taps, where XLA forms 0 * w (NaN for an inf weight): it
adds those 0 * w itself. Normal values still run on the kernels.

Run: python3 -m pytest tests/test_edge_numerics.py
"""
from __future__ import annotations


import dataclasses

import jax
import numpy as np
import pytest

import alt_jax
from alt_jax import device, jaxpr_pass, runtime
from isa_cases import TABLE_ISA
from alt_jax.ops import depthwise
from alt_jax.ops.depthwise import DepthwiseKnobs
from alt_jax.ops.epilogue import Epilogue

ISA = TABLE_ISA  # the knob tables' ISA (tests/isa_cases.py)
TOL = 1e-4
NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return runtime.KernelCache(tmp_path_factory.mktemp("edge_kernels"), isa=ISA)


def _conv(x, w, dn, padding=((1, 1), (1, 1)), stride=(1, 1), dilation=(1, 1), groups=1):
    return jax.lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=dilation,
                                        dimension_numbers=dn, feature_group_count=groups,
                                        precision=jax.lax.Precision.HIGHEST)


def assert_same_numerics(got, want, tol=TOL):
    """Identical NaN positions, identical infs (sign included), finite values close."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    nan_diff = np.isnan(got) != np.isnan(want)
    assert not nan_diff.any(), f"{nan_diff.sum()} NaN positions differ (XLA has " \
                               f"{np.isnan(want).sum()} NaNs, got {np.isnan(got).sum()})"
    inf_diff = np.isinf(got) != np.isinf(want)
    inf_diff |= np.isinf(want) & (got != want)
    assert not inf_diff.any(), f"{inf_diff.sum()} inf positions or signs differ"
    finite = np.isfinite(want)
    assert finite.any(), "the case should leave some finite outputs to compare"
    err = np.abs(got[finite] - want[finite]).max() / max(1.0, np.abs(want[finite]).max())
    assert err <= tol, f"finite outputs differ: rel err {err:.3g}"


def _optimize(fn, cache):
    # an op the guard sends to XLA is still planned on its kernel: no FallbackWarning
    return alt_jax.optimize(fn, cache=cache, min_flops=0, fallback="error", records=False)


def _assert_on_the_kernel(fn, family, x, w, cache):
    """fn's one op runs on family's kernel: the optimized result is bit-identical to that
    kernel run directly (so a guard chose the kernel), and close to XLA's."""
    opt = _optimize(fn, cache)
    decision, = opt.plan_for(x, w).decisions
    assert decision.family == family and decision.on_kernel
    direct = np.full(decision.spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(decision.kernel, [x, w], [direct])
    got = np.asarray(opt(x, w))
    np.testing.assert_array_equal(got, direct)
    assert_same_numerics(got, jax.jit(fn)(x, w))
    return opt


def _families(opt, *args) -> list:
    return [d.family if d.on_kernel else None for d in opt.plan_for(*args).decisions]


# ---- Winograd ----

def _winograd_case(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 16, 16, 64)).astype(np.float32)
    w = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
    return x, w


def _winograd_fn(x, w):
    return _conv(x, w, NHWC)


def _check_winograd_kernels(cache, x, w):
    """Each output tile, filter packed or transformed per call, run directly."""
    from alt_jax.ops.winograd import FAMILY, OUT_TILES

    eqn = jax.make_jaxpr(_winograd_fn)(x, w).jaxpr.eqns[0]
    want = jax.jit(_winograd_fn)(x, w)
    for out_tile in OUT_TILES:
        for prepacked in (False, True):
            spec = dataclasses.replace(FAMILY.match(eqn), prepacked=prepacked)
            knobs = dataclasses.replace(FAMILY.default_knobs(spec, ISA), out_tile=out_tile)
            kernel = cache.build(FAMILY.render(spec, knobs, ISA))
            ops = FAMILY.kernel_inputs(spec, knobs, [x, w], ISA)
            got = np.full(spec.out_shape, np.nan, np.float32)
            runtime.run_numpy(kernel, [np.asarray(a) for a in ops], [got])
            assert_same_numerics(got, want)


def _check_winograd_args(cache, x, w):
    _check_winograd_kernels(cache, x, w)
    opt = _optimize(_winograd_fn, cache)
    assert _families(opt, x, w) == ["winograd"]
    assert_same_numerics(opt(x, w), jax.jit(_winograd_fn)(x, w))


def _check_winograd_const(cache, x, w):
    """w a constant of the program (packed once): safe_operands checks it with numpy."""
    fn = lambda x: _winograd_fn(x, w)
    opt = _optimize(fn, cache)
    assert _families(opt, x) == ["winograd"]
    assert_same_numerics(opt(x), jax.jit(fn)(x))


def test_winograd_inf_input(cache):
    x, w = _winograd_case()
    x[0, 5, 5, 3] = np.inf
    x[0, 9, 12, 7] = -np.inf
    _check_winograd_args(cache, x, w)
    _check_winograd_const(cache, x, w)


def test_winograd_nan_input(cache):
    x, w = _winograd_case()
    x[0, 6, 6, 3] = np.nan
    x[0, 15, 15, 0] = np.nan  # the last element: XLA's CPU max reduction would drop it
    _check_winograd_args(cache, x, w)
    _check_winograd_const(cache, x, w)


def test_winograd_inputs_near_float_max(cache):
    """A corner near 3e38 with small weights: XLA's sums stay finite, the transforms do not."""
    x, w = _winograd_case()
    x[0, :6, :6, :] = np.sign(x[0, :6, :6, :]) * np.float32(3e38)
    w *= np.float32(1e-3 / 64)
    _check_winograd_args(cache, x, w)
    _check_winograd_const(cache, x, w)


def test_winograd_weights_near_float_max(cache):
    x, w = _winograd_case()
    x *= np.float32(1e-3 / 64)
    w[:, :, :, 5] = np.sign(w[:, :, :, 5]) * np.float32(3e38)
    _check_winograd_args(cache, x, w)
    _check_winograd_const(cache, x, w)


@pytest.mark.parametrize("tap", [(1, 1), (0, 0), (2, 1)])
def test_winograd_inf_weight(cache, tap):
    x, w = _winograd_case()
    w[tap[0], tap[1], 3, 4] = np.inf
    w[tap[1], tap[0], 9, 2] = -np.inf
    _check_winograd_args(cache, x, w)
    _check_winograd_const(cache, x, w)


def test_winograd_nan_weight(cache):
    x, w = _winograd_case()
    w[1, 2, 3, 4] = np.nan
    _check_winograd_args(cache, x, w)
    _check_winograd_const(cache, x, w)


@pytest.mark.parametrize("epi", [Epilogue(scale=True, shift=True, residual=True,
                                          activation="relu"),
                                 Epilogue(shift=True, activation="silu")],
                         ids=lambda e: e.describe())
def test_winograd_fallback_applies_the_fused_epilogue(cache, epi):
    """An inf input sends the call to the kernel's plain convolution; its outputs still go
    through the fused epilogue, in the kernel's order (scale, shift, residual, activation)."""
    from alt_jax.ops.winograd import FAMILY, OUT_TILES

    x, w = _winograd_case(seed=4)
    x[0, 7, 2, 9] = np.inf
    rng = np.random.default_rng(5)
    extra = {"scale": rng.uniform(0.5, 1.5, 64).astype(np.float32),
             "shift": rng.standard_normal(64).astype(np.float32),
             "residual": rng.standard_normal((1, 16, 16, 64)).astype(np.float32)}
    extra = [extra[n] for n in epi.inputs()]
    want = epi.reference(jax.jit(_winograd_fn)(x, w), 3, **dict(zip(epi.inputs(), extra)))
    eqn = jax.make_jaxpr(_winograd_fn)(x, w).jaxpr.eqns[0]
    for out_tile in OUT_TILES:
        for prepacked in (False, True):
            spec = dataclasses.replace(FAMILY.match(eqn), prepacked=prepacked, epilogue=epi)
            knobs = dataclasses.replace(FAMILY.default_knobs(spec, ISA), out_tile=out_tile)
            kernel = cache.build(FAMILY.render(spec, knobs, ISA))
            ops = FAMILY.kernel_inputs(spec, knobs, [x, w, *extra], ISA)
            got = np.full(spec.out_shape, np.nan, np.float32)
            runtime.run_numpy(kernel, [np.asarray(a) for a in ops], [got])
            assert_same_numerics(got, want)


def test_winograd_needs_no_check_in_the_graph(cache):
    """The kernel checks its values itself: the optimized program is the kernel call alone,
    with constant and with traced weights (no lax.cond, no pass over the input)."""
    from alt_jax.ops.winograd import FAMILY

    assert not hasattr(FAMILY, "safe_operands")
    x, w = _winograd_case()
    for fn, args in ((_winograd_fn, (x, w)), (lambda x: _winograd_fn(x, w), (x,))):
        opt = _optimize(fn, cache)
        assert _families(opt, *args) == ["winograd"]
        prims = {e.primitive.name for e in jaxpr_pass.walk(jax.make_jaxpr(opt)(*args))}
        assert "cond" not in prims and "reduce_and" not in prims, prims


def test_winograd_fallback_is_per_call(cache):
    """One program, two calls: the out-of-range one is exact through the fallback, the next
    normal one runs the transforms again (bit-identical to the kernel on the same values)."""
    x, w = _winograd_case(seed=2)
    opt = _assert_on_the_kernel(_winograd_fn, "winograd", x, w, cache)
    first = np.asarray(opt(x, w))
    bad = x.copy()
    bad[0, 3, 4, 5] = np.inf
    assert_same_numerics(opt(bad, w), jax.jit(_winograd_fn)(bad, w))
    np.testing.assert_array_equal(opt(x, w), first)


def test_winograd_normal_values_run_on_the_kernel(cache):
    """Bit-identical to the kernel run directly (so the guard chose it), close to XLA."""
    x, w = _winograd_case(seed=1)
    _assert_on_the_kernel(_winograd_fn, "winograd", x, w, cache)
    const = _optimize(lambda x: _winograd_fn(x, w), cache)
    assert _families(const, x) == ["winograd"]
    assert_same_numerics(const(x), jax.jit(_winograd_fn)(x, w))


# ---- depthwise ----

def _depthwise_nhwc(x, w):
    return _conv(x, w, NHWC, groups=x.shape[-1])


def _depthwise_nchw_after_conv(x, w1, wd):
    """An NCHW program whose depthwise conv reads the pointwise conv's channels-last result
    (propagated layouts): the in-place path, as in MobileNet."""
    y = _conv(x, w1, NCHW, padding=((0, 0), (0, 0)))
    return _conv(y, wd, NCHW, groups=wd.shape[0])


def _inf_on_border_taps(w, channel_axis, tap_axes):
    """inf / -inf / NaN weights on taps that meet padding (and one interior tap)."""
    w = w.copy()
    for ch, tap, value in ((5, (0, 0), np.inf), (7, (2, 1), -np.inf), (9, (1, 2), np.nan),
                           (11, (1, 1), np.inf)):
        index = [0] * w.ndim
        index[channel_axis] = ch
        index[tap_axes[0]], index[tap_axes[1]] = tap
        w[tuple(index)] = value
    return w


@pytest.mark.parametrize("as_constant", [False, True])
def test_depthwise_inf_weight_next_to_padding_nhwc(cache, as_constant):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 16, 16, 32)).astype(np.float32)
    w = _inf_on_border_taps(rng.standard_normal((3, 3, 1, 32)).astype(np.float32), 3, (0, 1))
    if as_constant:
        fn, args = (lambda x: _depthwise_nhwc(x, w)), (x,)
    else:
        fn, args = _depthwise_nhwc, (x, w)
    opt = _optimize(fn, cache)
    assert _families(opt, *args) == ["depthwise"]
    assert_same_numerics(opt(*args), jax.jit(fn)(*args))


def test_depthwise_inf_weight_next_to_padding_nchw(cache):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 16, 16, 16)).astype(np.float32)
    w1 = rng.standard_normal((32, 16, 1, 1)).astype(np.float32)
    wd = _inf_on_border_taps(rng.standard_normal((32, 1, 3, 3)).astype(np.float32), 0, (2, 3))
    opt = _optimize(_depthwise_nchw_after_conv, cache)
    plan = opt.plan_for(x, w1, wd)
    assert [d.family for d in plan.decisions] == ["conv2d", "depthwise"]
    assert plan.decisions[1].layouts.startswith("reads NHWC")
    assert_same_numerics(opt(x, w1, wd), jax.jit(_depthwise_nchw_after_conv)(x, w1, wd))


# in-place knobs (the path that skips padded taps) over strides, dilations, uneven padding,
# border columns wider than a tile and rows clipped on both sides
IN_PLACE = [
    # (h, w), (kh, kw), stride, padding, dilation, knobs
    ((12, 12), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), DepthwiseKnobs(16, 4, 2, False, True)),
    ((11, 13), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), DepthwiseKnobs(8, 3, 3, False, False)),
    ((9, 10), (5, 5), (1, 2), ((2, 3), (4, 1)), (2, 1), DepthwiseKnobs(16, 2, 1, False, True)),
    ((3, 9), (5, 3), (1, 1), ((3, 3), (1, 1)), (1, 1), DepthwiseKnobs(8, 4, 2, False, True)),
]


@pytest.mark.parametrize("hw,k,stride,padding,dilation,knobs", IN_PLACE)
def test_depthwise_in_place_path_forms_xla_padded_products(cache, hw, k, stride, padding,
                                                          dilation, knobs):
    rng = np.random.default_rng(4)
    c = 16
    x = rng.standard_normal((1, *hw, c)).astype(np.float32)
    w = rng.standard_normal((*k, 1, c)).astype(np.float32)
    for ch, tap, value in ((1, (0, 0), np.inf), (3, (k[0] - 1, k[1] - 1), -np.inf),
                           (6, (0, k[1] - 1), np.nan), (12, (k[0] // 2, 0), np.inf)):
        w[tap[0], tap[1], 0, ch] = value
    fn = lambda x, w: _conv(x, w, NHWC, padding, stride, dilation, groups=c)
    spec = depthwise.FAMILY.match(jax.make_jaxpr(fn)(x, w).jaxpr.eqns[0])
    depthwise.FAMILY.validate(spec, knobs, ISA)
    kernel = cache.build(depthwise.FAMILY.render(spec, knobs, ISA))
    out = np.full(spec.out_shape, 7.0, np.float32)
    runtime.run_numpy(kernel, [x, w], [out])
    assert_same_numerics(out, jax.jit(fn)(x, w))


def test_depthwise_normal_values_run_on_the_kernel(cache):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 16, 16, 32)).astype(np.float32)
    w = rng.standard_normal((3, 3, 1, 32)).astype(np.float32)
    _assert_on_the_kernel(_depthwise_nhwc, "depthwise", x, w, cache)


# ---- direct conv2d and matmul: padding is materialised / there is none; pinned here ----

@pytest.mark.parametrize("dn,stride", [(NHWC, (1, 1)), (NCHW, (2, 2))])
def test_conv2d_special_values(cache, dn, stride):
    rng = np.random.default_rng(6)
    lhs_shape = (1, 14, 14, 16) if dn == NHWC else (1, 16, 14, 14)
    rhs_shape = (3, 3, 16, 32) if dn == NHWC else (32, 16, 3, 3)
    x = rng.standard_normal(lhs_shape).astype(np.float32)
    w = rng.standard_normal(rhs_shape).astype(np.float32)
    x.flat[37], x.flat[500] = np.inf, np.nan
    w.flat[0], w.flat[777] = -np.inf, np.nan
    fn = lambda x, w: _conv(x, w, dn, stride=stride)
    opt = _optimize(fn, cache)
    assert _families(opt, x, w) == ["conv2d"]
    assert_same_numerics(opt(x, w), jax.jit(fn)(x, w))


def test_matmul_special_values(cache):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((50, 70)).astype(np.float32)
    b = rng.standard_normal((70, 90)).astype(np.float32)
    a[3, 4], b[10, 20], b[11, 21] = np.inf, -np.inf, np.nan
    fn = lambda a, b: jax.numpy.dot(a, b, precision="highest")
    opt = _optimize(fn, cache)
    assert _families(opt, a, b) == ["matmul"]
    assert_same_numerics(opt(a, b), jax.jit(fn)(a, b))


# A padded 1x1 conv with a non-finite weight: XLA rewrites some such convs into a
# multiply and a pad of the output (0 on the padded rows, where a conv forms 0 * inf =
# NaN): always with <= 2 input channels per group, and for others depending on the program
# around the conv. The direct families send them to XLA
# (conv_common.finite_weights_if_padded_1x1); larger windows stay on the kernels.
@pytest.mark.parametrize("c,k,kh", [(1, 1, 1), (2, 3, 1), (8, 8, 1), (3, 5, 3)])
@pytest.mark.parametrize("as_constant", [False, True])
def test_padded_conv_with_an_inf_weight_matches_xla(cache, c, k, kh, as_constant):
    rng = np.random.default_rng(c * 10 + k)
    x = rng.standard_normal((1, 6, 5, c)).astype(np.float32)
    w = rng.standard_normal((kh, kh, c, k)).astype(np.float32)
    w[0, 0, 0, 0] = -np.inf
    fn = lambda x, w: _conv(x, w, NHWC, padding=((1, 0), (0, 2)))
    want = np.asarray(jax.jit(fn)(x, w))
    opt = _optimize(lambda x: fn(x, w), cache) if as_constant else _optimize(fn, cache)
    got = np.asarray(opt(x) if as_constant else opt(x, w))
    for special in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(special(got), special(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["conv2d", "depthwise"])
def test_direct_conv_guard_only_checks_padded_1x1_convs(family):
    from alt_jax.ops import conv2d
    fam = {"conv2d": conv2d.FAMILY, "depthwise": depthwise.FAMILY}[family]
    c = 4

    def spec_of(kh, padding):
        w = np.ones((kh, kh, 1 if family == "depthwise" else c, c), np.float32)
        groups = c if family == "depthwise" else 1
        eqn = jax.make_jaxpr(lambda x: _conv(x, w, NHWC, padding=padding, groups=groups))(
            np.ones((1, 6, 6, c), np.float32)).eqns[0]
        return fam.match(eqn), w

    bad = lambda w: np.where(np.arange(w.size).reshape(w.shape) == 0, np.inf, w)
    for kh, padding in ((1, ((0, 0), (0, 0))), (3, ((1, 1), (1, 1)))):
        spec, w = spec_of(kh, padding)
        assert fam.safe_operands(spec, None, bad(w)) is None
    spec, w = spec_of(1, ((1, 0), (0, 0)))
    assert fam.safe_operands(spec, None, bad(w)) is False
    assert fam.safe_operands(spec, None, w) is True

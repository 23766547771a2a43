"""CUDA kernels (alt_jax/ops/cuda_matmul.py + codegen/cuda_matmul.cu), proven here without a
GPU: every kernel is also compiled for the host as an emulation (csrc/include/alt_jax/
cuda_block.h: each block's threads run phase by phase, shared memory checked for races,
global accesses for bounds) and checked against lax; nvcc compiles them for sm_80 and sm_90
(skipped where nvcc is absent). Tests marked `gpu` run the nvcc-built kernels on a GPU and
are skipped without one (`pytest -m gpu` on a GPU machine).
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib

import jax
import numpy as np
import pytest
from jax import lax

from alt_jax import cuda_build, runtime
from alt_jax.ops.base import KnobError
from alt_jax.ops.cuda_common import CudaTileKnobs
from alt_jax.ops.cuda_matmul import FAMILY
from alt_jax.ops.epilogue import Epilogue
from alt_jax.ops.matmul import FAMILY as CPU_MATMUL
from test_matmul_kernel import PLAIN, _as_read, _eqn, _operands

BATCHED = (((2,), (1,)), ((0,), (0,)))        # (b, m, k) x (b, k, n)
B_TRANSPOSED = (((1,), (1,)), ((), ()))       # (m, k) x (n, k): B contiguous along K
A_TRANSPOSED = (((0,), (0,)), ((), ()))       # (k, m) x (k, n): A contiguous along M

nvcc_needed = pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc not found")


def _gpu_or_skip():
    from alt_jax import cuda_run

    gpu = cuda_run.gpu()
    if gpu is None:
        pytest.skip("no CUDA GPU here (the `gpu` tests need one)")
    return gpu


def _spec(lshape, rshape, dn, epilogue=Epilogue()):
    return dataclasses.replace(CPU_MATMUL.match(_eqn(lshape, rshape, dn)), epilogue=epilogue)


def _epilogue_operands(spec, seed=1):
    rng = np.random.default_rng(seed)
    ops = {"scale": rng.uniform(0.5, 1.5, spec.n).astype(np.float32),
           "shift": rng.standard_normal(spec.n).astype(np.float32),
           "residual": rng.standard_normal(spec.out_shape).astype(np.float32)}
    return [ops[name] for name in spec.epilogue.inputs()]


def _reference(spec, a, b, dn, extra):
    y = np.asarray(lax.dot_general(a, b, dn, precision=lax.Precision.HIGHEST))
    named = dict(zip(spec.epilogue.inputs(), extra))
    y = y.reshape(spec.batch, spec.m, spec.n) if spec.batch > 1 else y.reshape(spec.m, spec.n)
    out = spec.epilogue.reference(y, channel_axis=-1, scale=named.get("scale"),
                                  shift=named.get("shift"),
                                  residual=None if "residual" not in named
                                  else named["residual"].reshape(y.shape))
    return np.asarray(out).reshape(spec.out_shape)


def _emulate(cache, spec, knobs, a, b, extra):
    kernel = cache.build(FAMILY.render(spec, knobs))
    x, y = _as_read(spec, a, b)
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [x, y, *extra], [out])
    return out


SHAPES = [  # (lhs, rhs, dimension numbers): ragged against every tile size used below
    ((37, 29), (29, 45), PLAIN),
    ((1, 300), (300, 70), PLAIN),          # a decode step: one row, deep K
    ((3, 33, 40), (3, 40, 19), BATCHED),
    ((20, 24), (36, 24), B_TRANSPOSED),
    ((24, 20), (24, 36), A_TRANSPOSED),
    ((64, 64), (64, 128), PLAIN),          # whole tiles
]
KNOBS = [
    CudaTileKnobs(),                                                   # 64x64, 2 stages
    CudaTileKnobs(stages=1),
    CudaTileKnobs(mc=16, nc=32, kc=8, mr=2, nr=2, wm=16, wn=8),        # small tiles
    CudaTileKnobs(mc=32, nc=128, kc=32, mr=8, nr=4, wm=32, wn=32),     # 4 warps, 8x4 each
    CudaTileKnobs(split_k=3),
    CudaTileKnobs(mc=16, nc=64, kc=16, mr=2, nr=4, wm=16, wn=16, split_k=4, stages=1),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: f"{k.mc}x{k.nc}x{k.kc}-{k.mr}x{k.nr}"
                         f"-s{k.stages}-k{k.split_k}")
@pytest.mark.parametrize("lshape,rshape,dn", SHAPES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v[0], int) else None)
def test_emulated_kernels_match_lax(kernel_cache, lshape, rshape, dn, knobs):
    spec = _spec(lshape, rshape, dn)
    FAMILY.validate(spec, knobs)
    a, b = _operands(lshape, rshape)
    out = _emulate(kernel_cache, spec, knobs, a, b, [])
    ref = _reference(spec, a, b, dn, [])
    err = np.abs(out - ref).max() / max(1.0, np.abs(ref).max())
    assert err <= 1e-4, f"{lshape} {rshape} {knobs}: rel err {err}"


@pytest.mark.parametrize("vec", [2, 4])
@pytest.mark.parametrize("lshape,rshape,dn", [((36, 40), (40, 72), PLAIN),
                                              ((3, 12, 16), (3, 16, 20), BATCHED),
                                              ((20, 24), (36, 24), B_TRANSPOSED)])
def test_vector_loads_match_lax(kernel_cache, lshape, rshape, dn, vec):
    spec = _spec(lshape, rshape, dn)
    knobs = CudaTileKnobs(vec=vec)
    FAMILY.validate(spec, knobs)
    a, b = _operands(lshape, rshape)
    out = _emulate(kernel_cache, spec, knobs, a, b, [])
    np.testing.assert_allclose(out, _reference(spec, a, b, dn, []), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("epilogue", [
    Epilogue(scale=True, shift=True, activation="relu"),
    Epilogue(shift=True, residual=True, activation="gelu_tanh"),
    Epilogue(residual=True, activation="silu"),
    Epilogue(shift=True, activation="gelu_erf"),
    Epilogue(scale=True, activation="relu6"),
], ids=Epilogue.describe)
@pytest.mark.parametrize("split_k", [1, 2])
def test_fused_epilogues_match_their_reference(kernel_cache, epilogue, split_k):
    lshape, rshape = (2, 21, 30), (2, 30, 27)
    spec = _spec(lshape, rshape, BATCHED, epilogue)
    knobs = CudaTileKnobs(split_k=split_k)
    a, b = _operands(lshape, rshape)
    extra = _epilogue_operands(spec)
    out = _emulate(kernel_cache, spec, knobs, a, b, extra)
    np.testing.assert_allclose(out, _reference(spec, a, b, BATCHED, extra), rtol=1e-4,
                               atol=1e-4)


def test_default_knobs_are_valid_and_split_a_deep_thin_product():
    for lshape, rshape, dn in SHAPES:
        spec = _spec(lshape, rshape, dn)
        FAMILY.validate(spec, FAMILY.default_knobs(spec))
    thin = FAMILY.default_knobs(_spec((1, 4096), (4096, 768), PLAIN))
    assert thin.split_k > 1 and thin.mc == 16 and thin.vec == 4
    big = FAMILY.default_knobs(_spec((512, 768), (768, 3072), PLAIN))
    assert big.split_k == 1 and (big.mc, big.nc) == (64, 64)


@pytest.mark.parametrize("knobs,message", [
    (CudaTileKnobs(wm=32, wn=32), "not 32"),
    (CudaTileKnobs(mc=128, nc=128, kc=32, wm=32, wn=16), "shared memory"),
    (CudaTileKnobs(mc=128, nc=256, wm=32, wn=16), "threads a block"),
    (CudaTileKnobs(vec=4), "unit-stride dim"),
    (CudaTileKnobs(stages=3), "stages=3"),
    (CudaTileKnobs(mc=48, wm=32), "multiple of wm"),
])
def test_invalid_knobs_are_refused_with_the_reason(knobs, message):
    spec = _spec((37, 29), (29, 45), PLAIN)  # K = 29: no whole vectors of 4
    with pytest.raises(KnobError, match=message):
        FAMILY.validate(spec, knobs)


# ---- convolutions ----------------------------------------------------------------------------
from alt_jax.ops import conv2d as cpu_conv2d  # noqa: E402
from alt_jax.ops.cuda_conv2d import FAMILY as CONV  # noqa: E402
from blocked_cases import BlockedConv, relerr, run_blocked  # noqa: E402


def Conv(*args, **kw) -> BlockedConv:
    return BlockedConv(cpu_conv2d.FAMILY, *args, **kw)


CONVS = {
    "1x1": Conv(1, 32, 6, 7, 48, 1, 1, rhs_dn="HWIO"),
    "3x3p1": Conv(2, 16, 7, 9, 24, 3, 3, pad=((1, 1), (1, 1))),
    "3x3s2": Conv(1, 24, 9, 11, 32, 3, 3, stride=(2, 2), pad=((0, 1), (1, 0))),
    "g2": Conv(1, 32, 8, 8, 32, 3, 3, groups=2, rhs_dn="HWIO", pad=((1, 1), (1, 1))),
    "7x7s2": Conv(1, 3, 23, 23, 16, 7, 7, stride=(2, 2), pad=((3, 3), (3, 3)), rhs_dn="HWIO"),
}
LAYOUT_PAIRS = [("NCHW", "NHWC"), ("NHWC", "NHWC"), ("8c", "8c"), ("16c", "NHWC"),
                ("NHWC", "16c")]


def _conv_check(kernel_cache, conv, spec, knobs):
    CONV.validate(spec, knobs)
    kernel = kernel_cache.build(CONV.render(spec, knobs))
    out, ref = run_blocked(conv, spec, kernel)
    err = relerr(out, ref)
    assert err <= 1e-4, f"{spec.lhs_layout} -> {spec.out_layout} {knobs}: rel err {err}"


@pytest.mark.parametrize("lhs,out", LAYOUT_PAIRS, ids=lambda v: v)
@pytest.mark.parametrize("name", list(CONVS))
def test_emulated_convs_on_every_layout_match_lax(kernel_cache, name, lhs, out):
    conv = CONVS[name]
    if name == "7x7s2" and "c" in lhs + out and lhs not in ("NCHW", "NHWC"):
        pytest.skip("3 input channels do not fill a channel block")
    try:
        spec = conv.spec(lhs, out, epilogue=Epilogue(scale=True, shift=True, activation="relu"))
    except Exception as e:  # noqa: BLE001 - a layout the spec cannot take (channel blocks)
        pytest.skip(f"{lhs} -> {out}: {e}")
    _conv_check(kernel_cache, conv, spec, CONV.default_knobs(spec))


CONV_KNOBS = [
    CudaTileKnobs(stages=1),
    CudaTileKnobs(mc=16, nc=32, kc=8, mr=2, nr=2, wm=16, wn=8),
    CudaTileKnobs(mc=32, nc=128, kc=32, mr=8, nr=4, wm=32, wn=32),
    CudaTileKnobs(split_k=3),
    CudaTileKnobs(vec=4),
    CudaTileKnobs(vec=2, split_k=2, stages=1),
]


@pytest.mark.parametrize("knobs", CONV_KNOBS, ids=lambda k: f"{k.mc}x{k.nc}x{k.kc}-s{k.stages}"
                         f"-v{k.vec}-k{k.split_k}")
@pytest.mark.parametrize("name", ["3x3p1", "g2"])
def test_emulated_conv_knob_variants_match_lax(kernel_cache, name, knobs):
    conv = dataclasses.replace(CONVS[name], rhs_dn="HWIO")
    spec = conv.spec("NHWC", "NHWC", epilogue=Epilogue(shift=True, residual=True,
                                                       activation="gelu_tanh"))
    _conv_check(kernel_cache, conv, spec, knobs)


def test_dilated_conv_in_nhwc_matches_lax(kernel_cache):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 13, 12, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 12)).astype(np.float32)
    f = lambda x, w: lax.conv_general_dilated(x, w, (1, 2), ((2, 2), (1, 3)), rhs_dilation=(2, 3),
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))
    import jax
    spec = cpu_conv2d.FAMILY.match(jax.make_jaxpr(f)(x, w).jaxpr.eqns[0])
    kernel = kernel_cache.build(CONV.render(spec, CONV.default_knobs(spec)))
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel, [x, w], [out])
    ref = np.asarray(f(x, w))
    assert relerr(out, ref) <= 1e-4


def test_conv_vector_loads_need_contiguous_channels():
    spec = CONVS["3x3p1"].spec("NCHW", "NHWC")  # channels strided: pixels are contiguous
    with pytest.raises(KnobError, match="contiguous in whole vectors"):
        CONV.validate(spec, CudaTileKnobs(vec=4))
    assert CONV.default_knobs(spec).vec == 1
    nhwc = dataclasses.replace(CONVS["3x3p1"], rhs_dn="HWIO").spec("NHWC", "NHWC")
    assert CONV.default_knobs(nhwc).vec == 4


# ---- depthwise ------------------------------------------------------------------------------
from alt_jax.ops import conv_common, depthwise as cpu_depthwise  # noqa: E402
from alt_jax.ops.cuda_depthwise import FAMILY as DEPTHWISE, CudaDepthwiseKnobs  # noqa: E402


class _DepthwiseOnAnyLayout:
    """The CPU depthwise family's match, with channel-blocked layouts allowed (the CUDA
    template addresses them by block strides)."""

    match = staticmethod(cpu_depthwise.FAMILY.match)

    @staticmethod
    def relayout(spec, lhs, out):
        return conv_common.relayout(spec, lhs, out, blocked=True)


def Depthwise(n, c, h, w, mult=1, **kw) -> BlockedConv:
    return BlockedConv(_DepthwiseOnAnyLayout, n, c, h, w, c * mult, groups=c, **kw)


DEPTHWISE_CASES = {
    "3x3p1": Depthwise(2, 32, 9, 11, pad=((1, 1), (1, 1)), rhs_dn="HWIO"),
    "3x3s2": Depthwise(1, 24, 12, 13, stride=(2, 2), pad=((0, 1), (1, 1)), rhs_dn="HWIO"),
    "5x5m2": Depthwise(1, 8, 10, 9, mult=2, kh=5, kw=5, pad=((2, 2), (2, 2))),
    "7x7": Depthwise(1, 16, 15, 14, kh=7, kw=7, pad=((3, 3), (3, 3)), rhs_dn="HWIO"),
}
DEPTHWISE_KNOBS = [
    None,                                                        # the default
    CudaDepthwiseKnobs(c_block=16, ow_threads=4, ow_tile=3, oh_rows=2),
    CudaDepthwiseKnobs(c_block=32, ow_threads=2, ow_tile=4, oh_rows=3, stage_input=True),
    CudaDepthwiseKnobs(c_block=64, ow_threads=2, ow_tile=2, oh_rows=1, vec=4, stage_input=True),
    CudaDepthwiseKnobs(c_block=8, ow_threads=16, ow_tile=1, oh_rows=5, vec=2),
]


@pytest.mark.parametrize("knobs", DEPTHWISE_KNOBS, ids=lambda k: "default" if k is None else
                         f"c{k.c_block}-t{k.ow_threads}x{k.ow_tile}-r{k.oh_rows}-v{k.vec}"
                         f"{'-staged' if k.stage_input else ''}")
@pytest.mark.parametrize("name", list(DEPTHWISE_CASES))
@pytest.mark.parametrize("lhs,out", [("NHWC", "NHWC"), ("NCHW", "8c"), ("8c", "NHWC")],
                         ids=lambda v: v)
def test_emulated_depthwise_matches_lax(kernel_cache, lhs, out, name, knobs):
    conv = DEPTHWISE_CASES[name]
    spec = conv.spec(lhs, out, epilogue=Epilogue(scale=True, shift=True, activation="relu6"))
    if knobs is None:
        knobs = DEPTHWISE.default_knobs(spec)
        DEPTHWISE.validate(spec, knobs)  # the default is always valid
    else:
        try:
            DEPTHWISE.validate(spec, knobs)
        except KnobError as e:  # vectors need contiguous channels; staging needs mult 1
            assert knobs.vec > 1 or knobs.stage_input, e
            pytest.skip(str(e))
    kernel = kernel_cache.build(DEPTHWISE.render(spec, knobs))
    got, ref = run_blocked(conv, spec, kernel)
    assert relerr(got, ref) <= 1e-4, f"{lhs} -> {out} {knobs}"


def test_depthwise_refusals_name_the_limit():
    spec = DEPTHWISE_CASES["5x5m2"].spec("NHWC", "NHWC")
    with pytest.raises(KnobError, match="multiplier"):
        DEPTHWISE.validate(spec, CudaDepthwiseKnobs(stage_input=True))
    with pytest.raises(KnobError, match="threads a block"):
        DEPTHWISE.validate(spec, CudaDepthwiseKnobs(c_block=128, ow_threads=16))
    big = DEPTHWISE_CASES["7x7"].spec("NHWC", "NHWC")
    with pytest.raises(KnobError, match="shared memory"):
        DEPTHWISE.validate(big, CudaDepthwiseKnobs(c_block=64, ow_threads=16, ow_tile=4,
                                                   stage_input=True))


# ---- the emulation's own checks: races and bounds -------------------------------------------
_PROBE = """
#include "alt_jax/cuda_block.h"
namespace {
struct Shared { float s[64]; };
struct Thread { float v; };
constexpr int NT = 32;
}
ALT_EXPORT int32_t SYMBOL(const alt_runtime* rt, const void* const* inputs, void* const* outputs) {
  const float* in = static_cast<const float*>(inputs[0]);
  float* out = static_cast<float*>(outputs[0]);
  return alt_emulate_grid<Thread, Shared, NT>(rt, 1, 1, 1, [&](alt_block<Thread, Shared, NT>& blk) {
    blk.each([&](Thread&, int tid) { ALT_SH_ST(blk, s, tid, ALT_GLD(blk, in, tid + OFFSET, 32)); });
    if (BARRIER) blk.sync();
    blk.each([&](Thread& t, int tid) { t.v = ALT_SH_LD(blk, s, (tid + NEIGHBOUR) % NT); });
    blk.sync();
    blk.each([&](Thread& t, int tid) { ALT_GST(blk, out, tid, NT, t.v); });
  });
}
"""


def _probe(cache, template, **defines):
    code = "".join(f"#define {k} {v}\n" for k, v in defines.items()) + template
    symbol = "alt_probe_" + hashlib.sha256(code.encode()).hexdigest()[:12]
    kernel = cache.build(runtime.KernelSource(symbol, code.replace("SYMBOL", symbol)))
    x = np.arange(64, dtype=np.float32)
    out = np.full(32, np.nan, np.float32)
    try:
        runtime.run_numpy(kernel, [x], [out])
        return None, out
    except Exception as e:  # noqa: BLE001 - the kernel's status comes back as an error
        return str(e), out


def test_the_emulation_finds_a_missing_barrier_and_an_out_of_bounds_read(kernel_cache):
    err, out = _probe(kernel_cache, _PROBE, OFFSET=0, BARRIER=1, NEIGHBOUR=1)
    assert err is None and list(out) == [float((i + 1) % 32) for i in range(32)]
    # no barrier between writing s[i] and reading s[i + 1]: a race, though the emulation's
    # thread order would have given the right numbers
    err, _ = _probe(kernel_cache, _PROBE, OFFSET=0, BARRIER=0, NEIGHBOUR=1)
    assert err is not None and "101" in err
    err, _ = _probe(kernel_cache, _PROBE, OFFSET=0, BARRIER=0, NEIGHBOUR=0)  # its own: fine
    assert err is None
    err, _ = _probe(kernel_cache, _PROBE, OFFSET=1, BARRIER=1, NEIGHBOUR=1)  # in[32]
    assert err is not None and "102" in err


# ---- nvcc -------------------------------------------------------------------------------------
COMPILED = [
    (((128, 768), (768, 768), PLAIN), CudaTileKnobs(vec=4),
     Epilogue(shift=True, activation="gelu_tanh")),
    (((1, 4096), (4096, 768), PLAIN), None, Epilogue(shift=True)),     # split K
    (((3, 33, 40), (3, 40, 19), BATCHED), CudaTileKnobs(stages=1, mc=32, nc=32, wm=16, wn=16,
                                                          mr=2, nr=4),
     Epilogue(residual=True, activation="relu")),
]


@nvcc_needed
@pytest.mark.parametrize("arch", cuda_build.ARCHES)
@pytest.mark.parametrize("case", range(len(COMPILED)))
def test_nvcc_compiles_every_setting_without_spills(arch, case, tmp_path):
    (lshape, rshape, dn), knobs, epilogue = COMPILED[case]
    spec = _spec(lshape, rshape, dn, epilogue)
    knobs = knobs or FAMILY.default_knobs(spec)
    src = FAMILY.render(spec, knobs)
    lib = cuda_build.compile_cuda(src, arch, tmp_path)
    assert lib.exists() and cuda_build.compile_cuda(src, arch, tmp_path) == lib  # cached
    assert hasattr(ctypes.CDLL(str(lib)), f"{src.symbol}_launch")
    usage = cuda_build.resource_usage(src, arch)
    assert usage and all(u["spill_bytes"] == 0 for u in usage), usage
    shared = max(u["shared_bytes"] for u in usage)
    assert shared == 4 * knobs.stages * knobs.kc * (knobs.mc + knobs.nc)


def test_nvcc_errors_are_reported_with_the_kernel(tmp_path, monkeypatch):
    if cuda_build.find_nvcc() is None:
        with pytest.raises(cuda_build.CudaBuildError, match="nvcc not found"):
            cuda_build.compile_cuda(runtime.KernelSource("alt_x", "int x;"), "sm_90", tmp_path)
        return
    bad = runtime.KernelSource("alt_broken", "this is not CUDA;")
    with pytest.raises(cuda_build.CudaBuildError, match="alt_broken"):
        cuda_build.compile_cuda(bad, "sm_90", tmp_path)
    with pytest.raises(cuda_build.CudaBuildError, match="sm_80"):
        cuda_build.compile_cuda(bad, "80", tmp_path)


# ---- on a GPU -----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(COMPILED)))
def test_gpu_kernels_match_lax(case, tmp_path):
    gpu = _gpu_or_skip()
    (lshape, rshape, dn), knobs, epilogue = COMPILED[case]
    spec = _spec(lshape, rshape, dn, epilogue)
    knobs = knobs or FAMILY.default_knobs(spec)
    src = FAMILY.render(spec, knobs)
    lib = cuda_build.compile_cuda(src, gpu.arch, tmp_path)
    a, b = _operands(lshape, rshape)
    x, y = _as_read(spec, a, b)
    extra = _epilogue_operands(spec)
    out = gpu.run(lib, src, [x, y, *extra], spec.out_shape)
    np.testing.assert_allclose(out, _reference(spec, a, b, dn, extra), rtol=1e-4, atol=1e-4)


CONV_COMPILED = [  # (conv, lhs, out, knobs or None for the default, epilogue)
    ("3x3p1", "NHWC", "NHWC", CudaTileKnobs(vec=4), Epilogue(shift=True, activation="relu")),
    ("g2", "8c", "8c", None, Epilogue(scale=True, shift=True, residual=True,
                                      activation="relu")),
    ("7x7s2", "NCHW", "NHWC", CudaTileKnobs(split_k=2, stages=1), Epilogue()),
]


def _conv_case(case):
    name, lhs, out, knobs, epilogue = CONV_COMPILED[case]
    conv = CONVS[name]
    if knobs is not None and knobs.vec > 1:
        conv = dataclasses.replace(conv, rhs_dn="HWIO")
    spec = conv.spec(lhs, out, epilogue=epilogue)
    return conv, spec, knobs or CONV.default_knobs(spec)


DEPTHWISE_COMPILED = [  # (case, lhs, out, knobs or None for the default)
    ("3x3p1", "NHWC", "NHWC", None),
    ("3x3s2", "NHWC", "8c", CudaDepthwiseKnobs(c_block=32, ow_threads=4, ow_tile=2, oh_rows=2,
                                               stage_input=True)),
    ("5x5m2", "NCHW", "NCHW", None),
]


def _depthwise_case(case):
    name, lhs, out, knobs = DEPTHWISE_COMPILED[case]
    conv = DEPTHWISE_CASES[name]
    spec = conv.spec(lhs, out, epilogue=Epilogue(shift=True, activation="relu"))
    return conv, spec, knobs or DEPTHWISE.default_knobs(spec)


CONV_LIKE_COMPILED = ([("conv", i) for i in range(len(CONV_COMPILED))]
                      + [("depthwise", i) for i in range(len(DEPTHWISE_COMPILED))])


def _conv_like_case(kind, i):
    """(family, conv, spec, knobs) of a conv or depthwise setting compiled for the GPU."""
    if kind == "conv":
        return (CONV, *_conv_case(i))
    return (DEPTHWISE, *_depthwise_case(i))


@nvcc_needed
@pytest.mark.parametrize("arch", cuda_build.ARCHES)
@pytest.mark.parametrize("case", CONV_LIKE_COMPILED, ids=lambda c: f"{c[0]}{c[1]}")
def test_nvcc_compiles_conv_and_depthwise_settings_without_spills(arch, case, tmp_path):
    family, _, spec, knobs = _conv_like_case(*case)
    src = family.render(spec, knobs)
    assert hasattr(ctypes.CDLL(str(cuda_build.compile_cuda(src, arch, tmp_path))),
                   f"{src.symbol}_launch")
    usage = cuda_build.resource_usage(src, arch)
    assert usage and all(u["spill_bytes"] == 0 for u in usage), usage


@pytest.mark.gpu
@pytest.mark.parametrize("case", CONV_LIKE_COMPILED, ids=lambda c: f"{c[0]}{c[1]}")
def test_gpu_convs_and_depthwise_match_lax(case, tmp_path, monkeypatch):
    gpu = _gpu_or_skip()
    family, conv, spec, knobs = _conv_like_case(*case)
    src = family.render(spec, knobs)
    lib = cuda_build.compile_cuda(src, gpu.arch, tmp_path)

    def on_gpu(kernel, inputs, outputs):  # run_blocked's kernel call, made on the GPU
        outputs[0][...] = gpu.run(lib, src, inputs, outputs[0].shape)

    monkeypatch.setattr(runtime, "run_numpy", on_gpu)
    out, ref = run_blocked(conv, spec, kernel=None)
    assert relerr(out, ref) <= 1e-4


# ---- the CPU kernels' own grids -------------------------------------------------------------
import test_conv2d_kernel as cpu_conv_tests  # noqa: E402
import test_depthwise_kernel as cpu_depthwise_tests  # noqa: E402
import test_matmul_kernel as cpu_matmul_tests  # noqa: E402

THIN = CudaTileKnobs(mc=16, nc=32, kc=8, mr=2, nr=2, wm=16, wn=8, stages=1, split_k=2)


@pytest.mark.parametrize("knobs", [None, THIN], ids=["default", "thin-split"])
@pytest.mark.parametrize("lshape,rshape,dn", cpu_matmul_tests.GRID)
def test_cuda_matmul_on_the_cpu_matmul_grid(kernel_cache, lshape, rshape, dn, knobs):
    """Every dimension structure the CPU matmul's grid covers (transposed operands, batch
    dims, several contracting dims, size-1 dims), emulated."""
    spec = _spec(lshape, rshape, dn)
    knobs = (dataclasses.replace(knobs, split_k=min(knobs.split_k, spec.k)) if knobs
             else FAMILY.default_knobs(spec))  # K = 1 has one slice to split
    FAMILY.validate(spec, knobs)
    a, b = _operands(lshape, rshape)
    out = _emulate(kernel_cache, spec, knobs, a, b, [])
    ref = _reference(spec, a, b, dn, [])
    assert np.abs(out - ref).max() / max(1.0, np.abs(ref).max()) <= 1e-4


@pytest.mark.parametrize("knobs", [None, THIN], ids=["default", "thin-split"])
@pytest.mark.parametrize("case", cpu_conv_tests.GRID, ids=str)
def test_cuda_conv_on_the_cpu_conv_grid(kernel_cache, case, knobs):
    """Every case of the CPU conv's grid (any dimension numbers, strides, padding beyond
    the kernel, dilation, groups, H or W of 1), emulated; depthwise cases included."""
    spec = cpu_conv2d.FAMILY.match(case.eqn())
    depth = spec.kh * spec.kw * spec.cg
    knobs = (dataclasses.replace(knobs, split_k=min(knobs.split_k, depth)) if knobs
             else CONV.default_knobs(spec))
    CONV.validate(spec, knobs)
    x, w = case.operands()
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel_cache.build(CONV.render(spec, knobs)), [x, w], [out])
    ref = np.asarray(lax.conv_general_dilated(
        x, w, case.stride, case.pad, rhs_dilation=case.dil, dimension_numbers=case.dn,
        feature_group_count=case.groups, precision=lax.Precision.HIGHEST))
    assert relerr(out, ref) <= 1e-4


@pytest.mark.parametrize("case", cpu_depthwise_tests.GRID, ids=cpu_depthwise_tests._grid_id)
def test_cuda_depthwise_on_the_cpu_depthwise_grid(kernel_cache, case):
    spec, f, x, w = cpu_depthwise_tests._spec_case(case)
    knobs = DEPTHWISE.default_knobs(spec)
    out = np.full(spec.out_shape, np.nan, np.float32)
    runtime.run_numpy(kernel_cache.build(DEPTHWISE.render(spec, knobs)), [x, w], [out])
    assert relerr(out, np.asarray(jax.jit(f)(x, w))) <= 1e-4

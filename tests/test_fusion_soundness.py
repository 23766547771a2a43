"""Fused activations never change results: what fuses (alt_jax/activations.py), and what the
fused kernels compute at the edges (csrc/include/alt_jax/epilogue.h) against jax.jit.

Entry points: pytest tests/test_fusion_soundness.py. Recognition is tested on jaxprs (no
kernels): equal spellings fuse, bounded or rounded look-alikes do not, each of the two checks
(structure, wide probe) refuses them on its own. The header is tested on EDGE_VALUES for every
activation, vector width and ISA; whole programs (matmul, 1x1 conv, depthwise conv) with
inf / NaN / huge pre-activations against jax.jit of the unfused program.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import alt_jax
from alt_jax import activations, device, fusion, jaxpr_pass, runtime
from alt_jax.ops.epilogue import ACTIVATIONS, Epilogue
from epilogue_cases import EDGE_VALUES

ISA = device.detect_isa()


def _bert_gelu(y):  # benchmarks/models/bert.py's spelling
    return 0.5 * y * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y ** 3)))


EQUAL_SPELLINGS = [
    ("relu", jax.nn.relu), ("relu", lambda y: jnp.maximum(y, 0)),
    ("relu", lambda y: jnp.maximum(0.0, y)),
    ("relu6", jax.nn.relu6), ("relu6", lambda y: jnp.clip(y, 0, 6)),
    ("relu6", lambda y: jnp.clip(y, 0.0, 6.0)), ("relu6", lambda y: lax.clamp(0.0, y, 6.0)),
    ("relu6", lambda y: jnp.minimum(jnp.maximum(y, 0.0), 6.0)),
    ("gelu_tanh", lambda y: jax.nn.gelu(y, approximate=True)), ("gelu_tanh", _bert_gelu),
    ("gelu_erf", lambda y: jax.nn.gelu(y, approximate=False)),
    ("gelu_erf", lambda y: 0.5 * y * (1.0 + lax.erf(y / math.sqrt(2.0)))),
    ("silu", jax.nn.silu), ("silu", jax.nn.swish), ("silu", lambda y: y * jax.nn.sigmoid(y)),
    ("silu", lambda y: jax.nn.sigmoid(y) * y),
]

# (what a probe on [-8, 8] took it for, the look-alike)
LOOK_ALIKES = [
    ("relu", lambda y: jnp.clip(y, 0.0, 10.0)),
    ("relu", lambda y: jnp.minimum(jax.nn.relu(y), 8.0)),
    ("relu", lambda y: jnp.clip(y, 0, 100)),
    ("relu6", lambda y: jnp.clip(y, 0.0, 6.0000005)),        # differs on (6, 6.0000005]
    ("relu", lambda y: jax.nn.relu(y.astype(jnp.bfloat16).astype(jnp.float32))),
    ("relu", lambda y: jnp.maximum(y, 1e-30)),
    ("silu", lambda y: y * jax.nn.sigmoid(y) + 1e-9),
    ("gelu_tanh", lambda y: jax.nn.gelu(jnp.minimum(y, 1e4), approximate=True)),
]


def _region(fn):
    """fn's equations as the planner sees them (calls inlined) and the value they start from."""
    jaxpr = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((4, 8), jnp.float32))
    flat = jaxpr_pass.open_jaxpr(jaxpr_pass.inline_calls(jaxpr))
    return flat.eqns, flat.invars[0]


@pytest.mark.parametrize("name,fn", EQUAL_SPELLINGS, ids=lambda v: v if isinstance(v, str) else "")
def test_equal_spellings_are_recognised(name, fn):
    eqns, x = _region(fn)
    assert activations.recognise(eqns, x) == name
    assert activations.spelling_of(activations.structure_of(eqns, x)) == name
    assert activations.probe_agrees(eqns, x, name)


@pytest.mark.parametrize("lookalike,fn", LOOK_ALIKES,
                         ids=lambda v: v if isinstance(v, str) else "")
def test_look_alikes_are_refused_by_each_check(lookalike, fn):
    eqns, x = _region(fn)
    assert activations.recognise(eqns, x) is None
    for name in ACTIVATIONS[1:]:
        assert not activations.probe_agrees(eqns, x, name), name
    assert activations.spelling_of(activations.structure_of(eqns, x)) is None, lookalike


@pytest.mark.parametrize("fn,fused", [
    (lambda y: jnp.clip(y, 0.0, 10.0), "relu"),          # relu fused, the min left to XLA
    (lambda y: jnp.minimum(jax.nn.relu(y), 8.0), "relu"),
    (lambda y: lax.clamp(0.0, y, 10.0), "none"),         # one equation: nothing to split off
])
def test_bounded_activation_keeps_its_bound_out_of_the_kernel(fn, fused):
    w = np.ones((8, 8), np.float32)
    jaxpr = jax.make_jaxpr(lambda a: fn(a @ w))(jax.ShapeDtypeStruct((4, 8), jnp.float32))
    flat = jaxpr_pass.open_jaxpr(jaxpr_pass.inline_calls(jaxpr))
    match = fusion.find_epilogue(flat, flat.eqns[0], 1, fusion.uses_of(flat))
    activation = match.activation if match else "none"
    assert activation == fused
    if match is not None:
        assert match.out_var is not flat.outvars[0]  # the bound is applied after the kernel


# ------------------------------------------------------------ the header, value by value
_HARNESS = r'''
#include "alt_jax/kernel_abi.h"
#include "alt_jax/epilogue.h"
template <int W, int ACT>
static void apply(const float* x, float* y) {
  for (int i = 0; i < @N@; i += W) vstore<W>(y + i, alt_activate<W, ACT>(vload<W>(x + i)));
}
template <int ACT>
static void widths(const float* x, void* const* out) {
  apply<1, ACT>(x, static_cast<float*>(out[4 * (ACT - 1)]));
  apply<4, ACT>(x, static_cast<float*>(out[4 * (ACT - 1) + 1]));
  apply<8, ACT>(x, static_cast<float*>(out[4 * (ACT - 1) + 2]));
  apply<16, ACT>(x, static_cast<float*>(out[4 * (ACT - 1) + 3]));
}
ALT_EXPORT int32_t alt_activation_edges(const alt_runtime*, const void* const* in,
                                        void* const* out) {
  const float* x = static_cast<const float*>(in[0]);
  widths<ALT_ACT_RELU>(x, out);
  widths<ALT_ACT_RELU6>(x, out);
  widths<ALT_ACT_GELU_TANH>(x, out);
  widths<ALT_ACT_GELU_ERF>(x, out);
  widths<ALT_ACT_SILU>(x, out);
  return 0;
}
'''
WIDTHS = (1, 4, 8, 16)


def _edge_inputs() -> np.ndarray:
    x = np.asarray(EDGE_VALUES, np.float32)
    return np.pad(x, (0, -len(x) % 16), constant_values=1.0)


def _flush_denormals(x):
    x = np.array(x, np.float32)
    tiny = np.abs(x) < np.finfo(np.float32).tiny
    x[tiny] = np.copysign(np.float32(0), x[tiny])
    return x


def assert_same_values(got, want, context, exact=False, zero_signs=True):
    """NaN where want is NaN, the same infinities, the sign of zeros where both are zero
    (zero_signs), finite values equal (exact) or within 1e-6 + 1e-5 relative. Denormals
    count as zeros: XLA flushes them, a kernel does as its thread's MXCSR says."""
    got, want = _flush_denormals(got), _flush_denormals(want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"NaNs, {context}")
    inf = np.isinf(want)
    np.testing.assert_array_equal(np.isinf(got), inf, err_msg=f"infinities, {context}")
    np.testing.assert_array_equal(got[inf], want[inf], err_msg=f"infinities, {context}")
    zeros = (got == 0) & (want == 0) & zero_signs
    np.testing.assert_array_equal(np.signbit(got[zeros]), np.signbit(want[zeros]),
                                  err_msg=f"sign of zero, {context}")
    finite = np.isfinite(want)
    if exact:
        np.testing.assert_array_equal(got[finite], want[finite], err_msg=context)
    else:
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6,
                                   err_msg=context)


# the ISAs this CPU executes, widest first (an AVX-512 CPU runs AVX2 code too)
_RUNS = {device.AVX512.name: (device.AVX512, device.AVX2), device.AVX2.name: (device.AVX2,)}


@pytest.mark.parametrize("isa", [device.AVX512, device.AVX2, device.SSE2, device.SCALAR],
                         ids=lambda i: i.name)
def test_header_activations_match_xla_at_the_edges(tmp_path, isa):
    if isa in (device.AVX512, device.AVX2) and isa not in _RUNS.get(ISA.name, ()):
        pytest.skip(f"this CPU runs {ISA.name}, not {isa.name}")
    x = _edge_inputs()
    src = runtime.KernelSource("alt_activation_edges", _HARNESS.replace("@N@", str(x.size)))
    kernel = runtime.KernelCache(tmp_path, isa=isa).build(src)
    names = ACTIVATIONS[1:]
    outs = [np.full(x.size, 7.0, np.float32) for _ in range(len(names) * len(WIDTHS))]
    runtime.run_numpy(kernel, [x], outs, num_threads=1)
    for i, name in enumerate(names):
        want = np.asarray(jax.jit(lambda v: Epilogue(activation=name).reference(v, 0))(x))
        for j, width in enumerate(WIDTHS):
            assert_same_values(outs[len(WIDTHS) * i + j], want, f"{isa.name} {name} W={width}",
                               exact=name in ("relu", "relu6"))


# ---------------------------------------------------- whole programs, fused vs jax.jit
N_EDGES = len(EDGE_VALUES)


def _edge_bias():
    """One channel per edge value: the bias makes the pre-activation take it exactly."""
    return np.asarray(EDGE_VALUES, np.float32)


def _rows_with_specials(shape):
    """Random inputs with inf, NaN, -inf and a huge value in a few rows (batch items)."""
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    flat = x.reshape(shape[0], -1)
    flat[1, 0], flat[2, 1], flat[3, 2] = np.inf, np.nan, -np.inf
    flat[4, 3] = 3.0e38
    return x


ACTS = {
    "relu": jax.nn.relu, "relu6": jax.nn.relu6,
    "gelu_tanh": lambda y: jax.nn.gelu(y, approximate=True),
    "gelu_erf": lambda y: jax.nn.gelu(y, approximate=False), "silu": jax.nn.silu,
}


def _program(kind, act):
    rng = np.random.default_rng(1)
    b = _edge_bias()
    if kind == "matmul":
        w = rng.uniform(-1, 1, (16, N_EDGES)).astype(np.float32)
        x = _rows_with_specials((6, 16))
        return (lambda a: act(a @ w + b)), x
    dn = ("NHWC", "HWIO", "NHWC")
    if kind == "conv1x1":
        w = rng.uniform(-1, 1, (1, 1, 8, N_EDGES)).astype(np.float32)
        groups = 1
        x = _rows_with_specials((6, 3, 3, 8))
    else:  # depthwise 3x3, one filter per channel
        w = rng.uniform(-1, 1, (3, 3, 1, N_EDGES)).astype(np.float32)
        groups = N_EDGES
        x = _rows_with_specials((6, 5, 5, N_EDGES))

    def f(a):
        y = lax.conv_general_dilated(a, w, (1, 1), "VALID", dimension_numbers=dn,
                                     feature_group_count=groups)
        return act(y + b)
    return f, x


# every activation on the matmul; on the convs the ones with exp inside, the rest with -m slow
_SLOW = pytest.mark.slow
EDGE_PROGRAMS = [("matmul", a) for a in ACTIVATIONS[1:]] + [
    pytest.param(kind, act, marks=() if act in ("gelu_erf", "silu") else _SLOW)
    for kind in ("conv1x1", "depthwise") for act in ACTIVATIONS[1:]]


@pytest.mark.parametrize("kind,act", EDGE_PROGRAMS)
def test_fused_activation_matches_jit_on_edge_values(kernel_cache, kind, act):
    f, x = _program(kind, ACTS[act])
    optimized = alt_jax.optimize(f, cache=kernel_cache, min_flops=0, fallback="error")
    (decision,) = optimized.plan_for(x).rewritten
    assert decision.spec.epilogue.activation == act, decision
    want = np.asarray(jax.jit(f)(x))
    got = np.asarray(optimized(x))
    # the kernel sums the pre-activation in another order than XLA: zero signs may differ
    assert_same_values(got, want, f"{kind} {act}", zero_signs=False)
    assert np.isnan(want).any()
    assert act == "relu6" or np.isinf(want).any()

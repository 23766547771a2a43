"""The planner never changes what a program computes and never breaks it: layouts handed to
kernels that read the logical layout, dot_generals of any shape, heuristic knobs that fail
their own validate(), and families that fail in unexpected ways (the op runs in XLA, with one
FallbackWarning naming it)."""
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import alt_jax
from alt_jax import planner
from naive_family import NaiveKnobs, NaiveMatmul, NaiveSpec

NCHW = ("NCHW", "OIHW", "NCHW")


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(1e-30, np.abs(want).max()))


def _arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NCHW)


def _fallback_messages(caught) -> list:
    return [str(w.message) for w in caught if issubclass(w.category, planner.FallbackWarning)]


# -- layouts: a kernel that reads the logical layout gets it ------------------------------

@pytest.mark.parametrize("einsum", ["nchw,kc->nhwk", "kc,nchw->nkhw", "nchw,wv->nchv"])
def test_nchw_conv_feeding_a_matmul_gives_it_the_logical_layout(optimize, einsum):
    # The conv's result is kept channels-last; the matmul was matched on the logical shape,
    # so it must read the logical array (once: one conversion, which explain() lists).
    x, w, p = _arrays((2, 16, 12, 12), (32, 16, 3, 3), (24, 32) if "kc" in einsum else (12, 12))
    operands = (lambda y: (p, y)) if einsum.startswith("kc") else (lambda y: (y, p))
    f = jax.jit(lambda x, w, p: jnp.einsum(einsum, *operands(jax.nn.relu(_conv(x, w)))))
    optimized = optimize(f, fallback="error")
    assert _rel_err(optimized(x, w, p), f(x, w, p)) <= 1e-5
    plan = optimized.plan_for(x, w, p)
    assert len(plan.rewritten) == 2
    assert [c.where for c in plan.conversions] == ["dot_general"]


def test_channels_last_residual_and_affine_reach_a_matmul_group_logically(optimize):
    # dot (N,C,H,K)x(K,W) -> (N,C,H,W), + a channels-last conv result as the fused residual
    x, w, a, p, b = _arrays((2, 8, 10, 10), (8, 8, 3, 3), (2, 8, 10, 16), (16, 10), (10,))
    f = jax.jit(lambda x, w, a, p, b: jax.nn.relu(
        (jnp.einsum("nchk,kw->nchw", a, p) * 2.0 + b) + _conv(x, w)))
    optimized = optimize(f, fallback="error")
    assert _rel_err(optimized(x, w, a, p, b), f(x, w, a, p, b)) <= 1e-5


def _custom_pointwise(body):
    fn = jax.custom_jvp(body)
    fn.defjvp(lambda primals, tangents: (body(*primals), tangents[0]))
    return fn


@pytest.mark.parametrize("case", ["cumsum", "transpose", "channel_max", "constant"])
def test_custom_jvp_calls_that_are_not_pointwise_see_the_logical_layout(optimize, case):
    # A custom_jvp call whose body hides a layout-dependent op in a nested jit (or mixes in
    # a full-size constant) must not run on the channels-last array.
    c = _arrays((2, 32, 8, 8), seed=3)[0]
    body = {"cumsum": lambda u: jnp.cumsum(u, axis=1),
            "transpose": lambda u: jnp.transpose(u, (0, 1, 3, 2)) * 2.0,
            "channel_max": lambda u: u - jnp.max(u, axis=1, keepdims=True),
            "constant": lambda u: u * c}[case]
    g = _custom_pointwise(lambda t: jax.jit(body)(t))
    x, w = _arrays((2, 16, 8, 8), (32, 16, 3, 3))
    f = jax.jit(lambda x, w: g(_conv(x, w)))
    optimized = optimize(f, fallback="error")
    assert _rel_err(optimized(x, w), f(x, w)) <= 1e-5


def test_a_pointwise_custom_jvp_call_still_runs_channels_last(optimize):
    g = _custom_pointwise(lambda t: jax.jit(lambda u: jnp.tanh(u) * 2.0 + 1.0)(t))
    x, w = _arrays((2, 16, 8, 8), (32, 16, 3, 3))
    f = jax.jit(lambda x, w: g(_conv(x, w)))
    optimized = optimize(f, fallback="error")
    assert _rel_err(optimized(x, w), f(x, w)) <= 1e-5
    assert optimized.plan_for(x, w).conversions[0].where == "output"  # not at the call


# -- dot_generals of any shape ------------------------------------------------------------

@pytest.mark.parametrize("einsum, shapes", [
    ("mk,k->m", [(64, 128), (128,)]),                          # matrix-vector: no rhs free dim
    ("k,kn->n", [(256,), (256, 64)]),
    ("btd,dhk->bthk", [(2, 16, 32), (32, 4, 8)]),              # two rhs free dims
    ("bqhd,bkhd->bhqk", [(2, 16, 4, 8), (2, 16, 4, 8)]),       # attention scores
    ("bhqk,bkhd->bqhd", [(2, 4, 16, 16), (2, 16, 4, 8)]),
    ("bd,dhk->bhk", [(4, 32), (32, 4, 8)]),
])
def test_dot_generals_with_any_number_of_rhs_free_dims_run(optimize, einsum, shapes):
    args = _arrays(*shapes)
    # + bias and relu: the planner looks for a fusable epilogue after each of them
    f = jax.jit(lambda a, b: jax.nn.relu(jnp.einsum(einsum, a, b) + 0.5))
    optimized = optimize(f, fallback="error")
    assert _rel_err(optimized(*args), f(*args)) <= 1e-5
    assert len(optimized.plan_for(*args).rewritten) == 1


# -- knobs that fail validate() -----------------------------------------------------------

def test_heuristic_knobs_over_the_workspace_limit_fall_back_with_one_warning(optimize):
    # Planning only (abstract inputs): the 4 GB workspace is never allocated.
    spec = jax.ShapeDtypeStruct((4096, 512, 512), jnp.float32)
    f = jax.jit(lambda a, b: jnp.einsum("bkm,bkn->bmn", a, b))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = optimize(f, min_flops=None).plan_for(spec, spec)
    (decision,) = plan.decisions
    assert not decision.on_kernel and "workspace" in decision.reason
    (message,) = _fallback_messages(caught)
    assert "dot_general f32[4096,512,512], f32[4096,512,512]" in message
    assert "workspace" in message


def test_a_family_whose_heuristic_fails_validate_passes_the_op_on(optimize):
    class Refusing(NaiveMatmul):
        name = "refusing"

        def default_knobs(self, spec, isa):
            return NaiveKnobs(rows_per_task=spec.m + 1)  # validate() rejects it

    a, b = _arrays((64, 32), (32, 48))
    families = {lax.dot_general_p: (Refusing(), NaiveMatmul())}
    f = jax.jit(lambda a, b: a @ b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimized = optimize(f, families=families)
        assert _rel_err(optimized(a, b), f(a, b)) <= 1e-5
    (decision,) = optimized.plan_for(a, b).decisions
    assert decision.family == "naive_matmul" and decision.on_kernel
    assert not _fallback_messages(caught)


# -- a family failing in any other way costs its op the kernel, not the program -----------

@dataclasses.dataclass(frozen=True)
class _PackableSpec(NaiveSpec):
    prepacked: bool = False


class _Broken(NaiveMatmul):
    """The naive matmul, failing in one chosen method (pack_weights runs for a constant rhs,
    whose spec asks for prepacking)."""

    name = "broken"

    def __init__(self, where: str):
        self.where = where

    def _maybe_fail(self, method):
        if method == self.where:
            raise ZeroDivisionError(f"injected failure in {method}")

    def match(self, eqn):
        self._maybe_fail("match")
        return _PackableSpec(**dataclasses.asdict(super().match(eqn)))

    def flops(self, spec):
        self._maybe_fail("flops")
        return super().flops(spec)

    def default_knobs(self, spec, isa):
        self._maybe_fail("default_knobs")
        return super().default_knobs(spec, isa)

    def validate(self, spec, knobs, isa):
        self._maybe_fail("validate")
        return super().validate(spec, knobs, isa)

    def render(self, spec, knobs, isa):
        self._maybe_fail("render")
        return super().render(spec, knobs, isa)

    def pack_weights(self, spec, knobs, rhs, isa):
        self._maybe_fail("pack_weights")
        return rhs


_METHODS = ["match", "flops", "default_knobs", "validate", "render", "pack_weights"]


@pytest.mark.parametrize("where", _METHODS)
def test_an_unexpected_family_failure_runs_the_op_in_xla_with_one_warning(optimize, where):
    a, b = _arrays((64, 32), (32, 48))
    f = jax.jit(lambda a: jnp.tanh(a @ b))  # b is a constant: its weights may be prepacked
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimized = optimize(f, families={lax.dot_general_p: (_Broken(where),)})
        assert _rel_err(optimized(a), f(a)) <= 1e-6
    (decision,) = optimized.plan_for(a).decisions
    assert not decision.on_kernel
    (message,) = _fallback_messages(caught)
    assert "dot_general f32[64,32], f32[32,48] -> f32[64,48]" in message
    assert f"ZeroDivisionError: injected failure in {where}" in message


@pytest.mark.parametrize("where", ["validate", "pack_weights"])
def test_an_unexpected_family_failure_raises_with_fallback_error(optimize, where):
    a, b = _arrays((64, 32), (32, 48))
    optimized = optimize(jax.jit(lambda a: a @ b), fallback="error",
                         families={lax.dot_general_p: (_Broken(where),)})
    with pytest.raises(planner.FallbackError, match=f"injected failure in {where}"):
        optimized(a)


def test_a_working_family_is_used_after_a_broken_one(optimize):
    a, b = _arrays((64, 32), (32, 48))
    f = jax.jit(lambda a, b: a @ b)
    optimized = optimize(f, fallback="error",
                         families={lax.dot_general_p: (_Broken("render"), NaiveMatmul())})
    assert _rel_err(optimized(a, b), f(a, b)) <= 1e-5
    assert optimized.plan_for(a, b).decisions[0].family == "naive_matmul"


@pytest.mark.parametrize("fn", [
    lambda x: lax.dot_general(x, np.float32(2.0), (((), ()), ((), ()))),        # rhs Literal
    lambda x: lax.dot_general(x, np.float32(2.0), (((), ()), ((), ()))) + 1.0,  # + a Literal
    lambda x: jnp.sum(x * x) + 3.0,
], ids=["literal_rhs", "literal_rhs_then_add", "scalar_dot_plus_literal"])
def test_scalar_literal_operands_are_not_taken_for_variables(fn):
    # A scalar constant is a Literal in the jaxpr (unhashable on jax 0.10): it is neither a
    # packable constant weight nor a residual buffer.
    x = np.linspace(-1, 1, 300, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = alt_jax.optimize(fn, min_flops=0)(x)
    np.testing.assert_allclose(got, jax.jit(fn)(x), rtol=1e-5)

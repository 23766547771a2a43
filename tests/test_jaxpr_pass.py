"""The pass and the API on their own: a naive test family stands in for the real templates,
so these pin down tracing, nesting, caching, fallbacks and differentiation."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import alt_jax
from alt_jax import planner
from naive_family import FAMILIES

RNG = np.random.default_rng(0)


def _mats(*shapes):
    return [(RNG.standard_normal(s) * 0.3).astype(np.float32) for s in shapes]


@pytest.fixture
def opt(kernel_cache):
    def make(fn, **kw):
        kw.setdefault("fallback", "silent")
        return alt_jax.optimize(fn, families=FAMILIES, cache=kernel_cache, min_flops=0, **kw)
    return make


def _custom_calls(fn, *args):
    return jax.jit(fn).lower(*args).as_text().count("custom_call @alt_jax_kernel(")


def nested(x, w):
    h = jax.nn.relu(x @ w)                                     # custom_jvp body around relu
    h = lax.scan(lambda c, _: (jnp.tanh(c @ w), None), h, None, length=2)[0]
    h = jax.checkpoint(lambda t: t @ w)(h)
    h = lax.cond(h.sum() > 0, lambda t: t @ w, lambda t: t - 1.0, h)
    return jax.jit(lambda t: t @ w)(h)


def test_every_matmul_in_nested_bodies_becomes_a_custom_call(opt):
    x, w = _mats((8, 16), (16, 16))
    optimized = opt(nested)
    np.testing.assert_allclose(optimized(x, w), nested(x, w), rtol=1e-4, atol=1e-5)
    plan = optimized.plan_for(x, w)
    assert len(plan.rewritten) == 5 and not plan.left_to_xla
    assert _custom_calls(optimized, x, w) == 5
    assert _custom_calls(nested, x, w) == 0


def test_while_loop_body_is_rewritten(opt):
    def f(x, w):
        return lax.while_loop(lambda c: c[1] < 3, lambda c: (jnp.tanh(c[0] @ w), c[1] + 1),
                              (x, 0))[0]
    x, w = _mats((4, 8), (8, 8))
    optimized = opt(f)
    np.testing.assert_allclose(optimized(x, w), f(x, w), rtol=1e-4, atol=1e-5)
    assert _custom_calls(optimized, x, w) == 1


def test_second_call_hits_the_cache_and_does_not_retrace(opt):
    traced = []

    def f(x, w):
        traced.append(1)
        return x @ w
    optimized = opt(f)
    x, w = _mats((4, 8), (8, 8))
    optimized(x, w)
    optimized(x + 1, w)
    assert len(traced) == 1 and optimized.cache_info() == {"signatures": 1, "traces": 1}
    optimized(*_mats((5, 8), (8, 8)))  # a new shape is a new signature
    assert len(traced) == 2 and optimized.cache_info()["signatures"] == 2


def test_pytrees_in_and_out_and_jit_wrapped_functions(opt):
    @jax.jit
    def f(params, x):
        return {"out": x @ params["w"], "aux": (params["b"] * 2,)}
    params = {"w": _mats((8, 8))[0], "b": np.ones(3, np.float32)}
    x = _mats((4, 8))[0]
    got, want = opt(f)(params, x), f(params, x)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    np.testing.assert_allclose(got["out"], want["out"], rtol=1e-4, atol=1e-5)


def test_works_under_jit_grad_jvp_and_vmap(opt):
    def f(x, w):
        return jnp.tanh(x @ w) @ w
    x, w = _mats((4, 8), (8, 8))
    optimized = opt(f)
    np.testing.assert_allclose(jax.jit(optimized)(x, w), f(x, w), rtol=1e-4, atol=1e-5)
    for argnums in (0, 1):
        g = jax.grad(lambda *a: optimized(*a).sum(), argnums=argnums)(x, w)
        g_ref = jax.grad(lambda *a: f(*a).sum(), argnums=argnums)(x, w)
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    t, t_ref = (jax.jvp(lambda a: fn(a, w), (x,), (x,))[1] for fn in (optimized, f))
    np.testing.assert_allclose(t, t_ref, rtol=1e-4, atol=1e-5)
    xs = np.stack([x, 2 * x, -x])
    np.testing.assert_allclose(jax.vmap(lambda a: optimized(a, w))(xs),
                               jax.vmap(lambda a: f(a, w))(xs), rtol=1e-4, atol=1e-5)


def test_unsupported_op_warns_once_and_stays_correct(kernel_cache):
    def f(i, x, w):
        return i @ i, x @ w
    i = np.arange(9, dtype=np.int32).reshape(3, 3)
    x, w = _mats((4, 8), (8, 8))
    optimized = alt_jax.optimize(f, families=FAMILIES, cache=kernel_cache, min_flops=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = optimized(i, x, w)
        optimized(i, x, w)
    fallbacks = [c for c in caught if issubclass(c.category, alt_jax.FallbackWarning)]
    assert len(fallbacks) == 1
    assert "dot_general" in str(fallbacks[0].message) and "int32" in str(fallbacks[0].message)
    np.testing.assert_array_equal(got[0], i @ i)
    np.testing.assert_allclose(got[1], x @ w, rtol=1e-4, atol=1e-5)


def test_fallback_error_mode_raises(kernel_cache):
    i = np.ones((3, 3), np.int32)
    optimized = alt_jax.optimize(lambda a: a @ a, families=FAMILIES, cache=kernel_cache,
                                 min_flops=0, fallback="error")
    with pytest.raises(planner.FallbackError, match="int32"):
        optimized(i)


def test_size_rule_leaves_small_ops_to_xla_and_explain_says_why(kernel_cache, capsys):
    x, w = _mats((2, 4), (4, 4))
    optimized = alt_jax.optimize(lambda a, b: a @ b, families=FAMILIES, cache=kernel_cache,
                                 min_flops=10_000)
    plan = optimized.explain(x, w)
    assert not plan.rewritten and "too small" in plan.left_to_xla[0].reason
    assert "too small" in capsys.readouterr().out
    np.testing.assert_allclose(optimized(x, w), x @ w, rtol=1e-5)


def test_static_argnums(opt):
    def f(x, w, times):
        for _ in range(times):
            x = x @ w
        return x
    x, w = _mats((4, 8), (8, 8))
    optimized = opt(f, static_argnums=(2,))
    np.testing.assert_allclose(optimized(x, w, 3), f(x, w, 3), rtol=1e-4, atol=1e-5)
    assert len(optimized.plan_for(x, w, 2).rewritten) == 2


def test_decorator_forms(kernel_cache):
    @alt_jax.optimize
    def plain(x):
        return x * 2

    @alt_jax.optimize(fallback="silent", cache=kernel_cache)
    def configured(x):
        return x * 3
    assert float(plain(np.float32(1))) == 2 and float(configured(np.float32(1))) == 3
    with pytest.raises(ValueError, match="fallback"):
        alt_jax.optimize(lambda x: x, fallback="loud")

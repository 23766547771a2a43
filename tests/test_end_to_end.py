"""optimize() with the real kernel families: whole small programs become custom calls,
stay correct, and what the kernels do not cover is left to XLA, still right."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import alt_jax

RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _rel_err(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return np.abs(got - want).max() / max(1.0, np.abs(want).max())


def _custom_call_count(fn, *args):
    return jax.jit(fn).lower(*args).as_text().count("custom_call @alt_jax_kernel(")


def small_cnn(params, x):
    dn = ("NCHW", "OIHW", "NCHW")
    y = lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dn)
    y = jax.nn.relu(y + params["b1"][None, :, None, None])
    y = lax.conv_general_dilated(y, params["dw"], (2, 2), [(1, 1), (1, 1)],
                                 dimension_numbers=dn, feature_group_count=16)
    y = lax.conv_general_dilated(y, params["c2"], (1, 1), "VALID", dimension_numbers=dn)
    y = jnp.mean(jax.nn.relu(y), axis=(2, 3))
    return y @ params["fc"]


CNN_PARAMS = {"c1": _normal(16, 3, 3, 3, scale=0.3), "b1": _normal(16, scale=0.1),
              "dw": _normal(16, 1, 3, 3, scale=0.3), "c2": _normal(32, 16, 1, 1, scale=0.25),
              "fc": _normal(32, 10, scale=0.2)}


def mlp(params, x):
    return jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"]


MLP_PARAMS = {"w1": _normal(64, 128, scale=0.1), "b1": _normal(128, scale=0.1),
              "w2": _normal(128, 10, scale=0.1)}


@pytest.mark.parametrize("model,params,x", [
    (small_cnn, CNN_PARAMS, _normal(2, 3, 16, 16)),
    (mlp, MLP_PARAMS, _normal(8, 64)),
])
def test_every_conv_and_matmul_becomes_a_custom_call_without_retracing(
        optimize, model, params, x):
    traces = []

    def counted(p, x):
        traces.append(1)
        return model(p, x)
    optimized = optimize(jax.jit(counted), fallback="error")
    assert _rel_err(optimized(params, x), model(params, x)) <= 1e-4
    optimized(params, x + 1)
    assert len(traces) == 1
    plan = optimized.plan_for(params, x)
    n_ops = sum(1 for e in jax.make_jaxpr(model)(params, x).jaxpr.eqns
                if e.primitive in (lax.conv_general_dilated_p, lax.dot_general_p))
    assert len(plan.rewritten) == n_ops and not plan.left_to_xla
    assert _custom_call_count(optimized, params, x) == n_ops
    assert len(traces) == 1  # lowering reused the cached plan


def test_grad_through_optimized_cnn(optimize):
    x = _normal(2, 3, 16, 16)
    loss = lambda p, x: jnp.sum(small_cnn(p, x) ** 2)
    optimized = optimize(loss, fallback="error")
    g = jax.grad(optimized)(CNN_PARAMS, x)
    g_ref = jax.grad(loss)(CNN_PARAMS, x)
    for k in CNN_PARAMS:
        assert _rel_err(g[k], g_ref[k]) <= 1e-4, k


def _conv(dn=("NCHW", "OIHW", "NCHW"), **kw):
    return lambda x, w: lax.conv_general_dilated(x, w, dimension_numbers=dn, **kw)


UNSUPPORTED = [
    ("lhs dilation", _conv(window_strides=(1, 1), padding=[(1, 1), (1, 1)],
                           lhs_dilation=(2, 2)), (_normal(1, 4, 5, 5), _normal(6, 4, 3, 3))),
    ("batch_group_count", _conv(window_strides=(1, 1), padding="VALID", batch_group_count=2),
     (_normal(2, 4, 6, 6), _normal(6, 4, 3, 3))),
    ("integer conv", _conv(window_strides=(1, 1), padding="SAME"),
     (RNG.integers(-3, 3, (1, 2, 5, 5), dtype=np.int32),
      RNG.integers(-3, 3, (3, 2, 3, 3), dtype=np.int32))),
    ("integer matmul", lambda a, b: a @ b,
     (RNG.integers(-3, 3, (4, 5), dtype=np.int32), RNG.integers(-3, 3, (5, 6), dtype=np.int32))),
    ("bf16 matmul", lambda a, b: a @ b,
     (_normal(4, 8).astype(jnp.bfloat16), _normal(8, 8).astype(jnp.bfloat16))),
    ("zero-size conv", _conv(window_strides=(1, 1), padding="SAME"),
     (_normal(0, 3, 5, 5), _normal(4, 3, 3, 3))),
    ("zero-size matmul", lambda a, b: a @ b, (_normal(4, 0), _normal(0, 6))),
    ("3-D conv", lambda x, w: lax.conv_general_dilated(x, w, (1, 1, 1), "SAME"),
     (_normal(1, 2, 4, 4, 4), _normal(3, 2, 3, 3, 3))),
]


@pytest.mark.parametrize("name,fn,args", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_ops_are_left_to_xla_and_still_right(optimize, name, fn, args):
    optimized = optimize(fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = optimized(*args)
    plan = optimized.plan_for(*args)
    assert not plan.rewritten and plan.left_to_xla, name
    assert plan.left_to_xla[0].reason
    assert sum(issubclass(c.category, alt_jax.FallbackWarning) for c in caught) == 1
    want = jax.jit(fn)(*args)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-2 if "bf16" in name else 1e-5, atol=1e-5)


def test_explain_lists_kernels_and_reasons(optimize, capsys):
    def f(x, w, i):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME"), i @ i
    x, w = _normal(1, 4, 8, 8), _normal(8, 4, 3, 3)
    i = np.ones((3, 3), np.int32)
    plan = optimize(f, fallback="silent").explain(x, w, i)
    out = capsys.readouterr().out
    assert len(plan.rewritten) == 1 and len(plan.left_to_xla) == 1
    assert "conv_general_dilated" in out and "kernel:" in out and "XLA:" in out

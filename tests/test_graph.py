"""The graph half: layout propagation, epilogue fusion and weights packed once, on whole
networks and on the small patterns they are made of."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import alt_jax
from alt_jax.ops import registry
from benchmarks import models
from benchmarks.models import common


def _rel_err(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def _custom_calls(fn, *args):
    return jax.jit(fn).lower(*args).as_text().count("custom_call @alt_jax_kernel(")


@pytest.fixture
def optimize(kernel_cache):
    def make(fn, **kw):
        kw.setdefault("fallback", "error")
        return alt_jax.optimize(fn, cache=kernel_cache, **kw)
    return make


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_resnet50_has_at_most_two_activation_conversions(optimize, layout):
    model = models.build("resnet50", layout=layout)
    args = (model.params, *model.inputs)
    optimized = optimize(jax.jit(model.apply))
    assert _rel_err(optimized(*args), jax.jit(model.apply)(*args)) <= 1e-4
    plan = optimized.plan_for(*args)
    assert len(plan.rewritten) == 54 and not plan.left_to_xla
    assert len(plan.conversions) <= 2, plan.conversions
    # every conv absorbs its BN (and ReLU / residual), the classifier its bias
    assert all(not d.spec.epilogue.is_identity for d in plan.rewritten)
    if layout == "nchw":
        assert all("writes NHWC" in d.layouts for d in plan.rewritten if d.layouts)


def mobilenet_block(layout):
    """1x1 expand, depthwise 3x3, 1x1 project, residual (MobileNetV2's inverted residual)."""
    L = common.Layout(layout)
    p = common.Params(3)
    c, hidden = 16, 96
    params = {"expand": p.conv(L, 1, 1, c, hidden), "bn1": p.batch_norm(hidden),
              "dw": p.conv(L, 3, 3, 1, hidden), "bn2": p.batch_norm(hidden),
              "project": p.conv(L, 1, 1, hidden, c), "bn3": p.batch_norm(c)}
    relu6 = lambda x: jnp.minimum(jnp.maximum(x, 0.0), 6.0)

    def apply(params, x):
        y = relu6(common.batch_norm(common.conv(x, params["expand"], L), params["bn1"], L))
        y = relu6(common.batch_norm(common.conv(y, params["dw"], L, groups=hidden),
                                    params["bn2"], L))
        y = common.batch_norm(common.conv(y, params["project"], L), params["bn3"], L)
        return x + y
    x = common.Params(4).normal(L.input_shape(1, 28, c), 1.0)
    return apply, params, x


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_mobilenet_block_fuses_and_converts_at_most_twice(optimize, layout):
    apply, params, x = mobilenet_block(layout)
    optimized = optimize(apply, min_flops=0)
    assert _rel_err(optimized(params, x), apply(params, x)) <= 1e-4
    plan = optimized.plan_for(params, x)
    assert len(plan.conversions) <= 2
    epilogues = [d.spec.epilogue.describe() for d in plan.rewritten]
    assert epilogues == ["scale+shift+relu6", "scale+shift+relu6", "scale+shift+residual"]
    assert [d.family for d in plan.rewritten] == ["conv2d", "depthwise", "conv2d"]
    assert _custom_calls(optimized, params, x) == 3


def test_fused_group_differentiates_like_the_original(optimize):
    apply, params, x = mobilenet_block("nchw")
    loss = lambda p, x: jnp.sum(apply(p, x) ** 2)
    g = jax.grad(optimize(loss, min_flops=0), argnums=(0, 1))(params, x)
    g_ref = jax.grad(loss, argnums=(0, 1))(params, x)
    for got, want in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        assert _rel_err(got, want) <= 1e-4


def test_bert_bias_gelu_and_residual_fuse_into_matmuls(optimize):
    model = models.build("bert_layer")
    args = (model.params, *model.inputs)
    optimized = optimize(jax.jit(model.apply))
    assert _rel_err(optimized(*args), jax.jit(model.apply)(*args)) <= 1e-4
    epilogues = sorted(d.spec.epilogue.describe() for d in optimized.plan_for(*args).rewritten
                       if d.primitive == "dot_general")
    assert "shift+gelu_tanh" in epilogues and epilogues.count("shift+residual") == 2


def test_prepare_packs_weights_once(optimize, monkeypatch):
    calls = []
    for family in {f for prim in (lax.conv_general_dilated_p, lax.dot_general_p)
                   for f in registry.families_for(prim)}:
        original = type(family).pack_weights

        def counting(self, *a, _original=original, **kw):
            calls.append(type(self).__name__)
            return _original(self, *a, **kw)
        monkeypatch.setattr(type(family), "pack_weights", counting)
    model = models.build("tiny_cnn", layout="nchw")
    prepared = optimize(model.apply, min_flops=0).prepare(model.params)
    want = jax.jit(model.apply)(model.params, *model.inputs)
    for _ in range(3):
        assert _rel_err(prepared(*model.inputs), want) <= 1e-4
    plan = prepared.plan_for(*model.inputs)
    packed = [d for d in plan.rewritten if d.spec.prepacked]
    assert len(packed) == 3 and len(calls) == 3  # once per weight, not once per call


@pytest.mark.parametrize("switch", ["fuse", "propagate", "pack_weights"])
def test_each_graph_optimisation_can_be_switched_off(optimize, switch):
    model = models.build("tiny_cnn", layout="nchw")
    optimized = optimize(model.apply, min_flops=0, **{switch: False}).prepare(model.params)
    assert _rel_err(optimized(*model.inputs),
                    jax.jit(model.apply)(model.params, *model.inputs)) <= 1e-4
    plan = optimized.plan_for(*model.inputs)
    convs = [d for d in plan.rewritten if d.family == "conv2d"]
    if switch == "fuse":
        assert all(d.spec.epilogue.is_identity for d in plan.rewritten)
    elif switch == "propagate":
        assert all(d.layouts == "reads NCHW, writes NCHW" for d in convs)
    else:
        assert not any(d.spec.prepacked for d in plan.rewritten)


def test_an_op_that_needs_the_logical_layout_costs_one_conversion(optimize):
    dn = ("NCHW", "OIHW", "NCHW")
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)

    def f(x):
        y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
        z = jnp.tanh(y) * 2.0                       # elementwise: stays channels-last
        return jnp.cumsum(z, axis=3), z[:, :, ::2]  # cumsum / slicing want the logical layout
    x = np.random.default_rng(1).standard_normal((1, 4, 10, 10)).astype(np.float32)
    optimized = optimize(f, min_flops=0)
    for got, want in zip(optimized(x), f(x)):
        assert _rel_err(got, want) <= 1e-5
    conversions = optimized.plan_for(x).conversions
    assert len(conversions) == 2 and {c.where for c in conversions} == {"cumsum", "slice"}


def test_fused_activation_keeps_nan_where_jax_does(optimize):
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    x[3, 5] = np.nan
    w = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    b = np.zeros(32, np.float32)
    f = lambda x: jnp.minimum(jax.nn.relu(x @ w + b), 6.0)
    optimized = optimize(f, min_flops=0)
    assert optimized.plan_for(x).rewritten[0].spec.epilogue.describe() == "shift+relu6"
    got, want = np.asarray(optimized(x)), np.asarray(f(x))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[3]).all()


def _aliased_calls(fn, *args):
    return jax.jit(fn).lower(*args).as_text().count("output_operand_aliases")


@pytest.mark.parametrize("case", ["last_reader", "read_after", "kernel_input"])
def test_fused_residual_reuses_its_buffer_only_when_safe(optimize, case):
    rng = np.random.default_rng(0)
    dn = ("NHWC", "HWIO", "NHWC")
    w1, w2 = (rng.standard_normal((3, 3, 8, 8)).astype(np.float32) for _ in range(2))
    w3 = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)  # a 1x1 reads its input in place
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

    def block(x):
        h = jax.nn.relu(conv(x, w1))          # the residual: an intermediate
        if case == "kernel_input":            # the add's conv reads h too
            return jax.nn.relu(conv(h, w3) + h)
        z = jax.nn.relu(conv(h, w2))          # h's first reader
        y = jax.nn.relu(conv(z, w3) + h)      # its last reader: the fused add
        return (y, h * 2.0) if case == "read_after" else y
    x = rng.standard_normal((1, 12, 12, 8)).astype(np.float32)
    optimized = optimize(block, min_flops=0)
    for got, want in zip(jax.tree_util.tree_leaves(optimized(x)),
                         jax.tree_util.tree_leaves(block(x))):
        assert _rel_err(got, want) <= 1e-5
    last = optimized.plan_for(x).rewritten[-1]
    assert last.spec.epilogue.describe() == "residual+relu"
    # Read after the add, y over h would need a copy; as the kernel's own input, tiles written
    # early would overwrite inputs other tiles still read: the kernel then gets a fresh buffer.
    reuses = case == "last_reader"
    assert _aliased_calls(optimized, x) == int(reuses)
    assert ("over its residual's buffer" in last.layouts) == reuses


def test_residual_that_is_a_program_input_is_not_overwritten(optimize):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
    f = lambda x: lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                           dimension_numbers=("NCHW", "OIHW", "NCHW")) + x
    x = rng.standard_normal((1, 8, 16, 16)).astype(np.float32)
    before = x.copy()
    optimized = optimize(f, min_flops=0, propagate=False)
    assert _rel_err(optimized(x), f(x)) <= 1e-5
    assert _aliased_calls(optimized, x) == 0
    np.testing.assert_array_equal(x, before)

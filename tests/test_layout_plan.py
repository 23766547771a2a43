"""The graph level: every layout a conv may write between kernels, forced on whole networks
and on the patterns between kernels (pools, concatenations, pads, reductions), computes
what jax.jit computes; conversions appear only where a consumer needs one; a stored plan is
replayed by optimize()."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import alt_jax
from alt_jax import layout_plans, propagate
from benchmarks import models
from benchmarks.models import common


def _rel_err(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


@pytest.fixture
def optimize(kernel_cache):
    def make(fn, **kw):
        kw.setdefault("fallback", "error")
        kw.setdefault("records", False)
        return alt_jax.optimize(fn, cache=kernel_cache, **kw)
    return make


def _forced(optimize, model, choice):
    args = (model.params, *model.inputs)
    optimized = optimize(jax.jit(model.apply), layout_plan=choice)
    err = _rel_err(optimized(*args), jax.jit(model.apply)(*args))
    return optimized.plan_for(*args), err


@pytest.mark.parametrize("choice", ["NC8", "NC16", "logical"])
def test_resnet50_under_each_forced_layout(optimize, choice):
    plan, err = _forced(optimize, models.build("resnet50", layout="nchw"), choice)
    assert err <= 1e-4
    assert len(plan.rewritten) == 54 and not plan.left_to_xla
    convs = [d for d in plan.rewritten if d.primitive == "conv_general_dilated"]
    if choice != "logical":
        block = choice[2:]
        assert all(d.layouts.endswith(f"writes N C/{block} H W {block}c") or
                   f"writes N C/{block} H W {block}c," in d.layouts for d in convs)
        # only the pooled features, before the classifier's matmul, leave the blocks
        assert [c.where for c in plan.conversions] == ["dot_general"]
    else:
        assert not plan.conversions


@pytest.mark.parametrize("choice", propagate.LAYOUT_CHOICES)
@pytest.mark.parametrize("name", ["mobilenet_v2", "bert_layer", "resnet18"])
def test_zoo_models_under_each_forced_layout(optimize, name, choice):
    plan, err = _forced(optimize, models.build(name), choice)
    assert err <= 1e-4 and not plan.left_to_xla


def dense_block(layout_name="nchw", growth=16, c0=32, layers=3):
    """DenseNet-style: each layer's BN-ReLU-conv3x3 output is concatenated onto its input
    along the channels; then a transition (1x1 conv, 2x2 average pool)."""
    L = common.Layout(layout_name)
    p = common.Params(7)
    params, c = {}, c0
    for i in range(layers):
        params[f"conv{i}"] = p.conv(L, 3, 3, c, growth)
        params[f"bn{i}"] = p.batch_norm(growth)
        c += growth
    params["trans"] = p.conv(L, 1, 1, c, 32)
    axis = L.channel_axis

    def apply(params, x):
        y = jax.nn.relu(common.conv(x, params["stem"], L))
        for i in range(layers):
            z = jax.nn.relu(common.batch_norm(common.conv(y, params[f"conv{i}"], L),
                                              params[f"bn{i}"], L))
            y = jnp.concatenate([y, z], axis=axis)
        t = common.conv(y, params["trans"], L)
        win = [1, 1, 1, 1]
        for a in L.spatial_axes:
            win[a] = 2
        pooled = lax.reduce_window(t, 0.0, lax.add, win, win, "VALID") / 4.0
        padded = lax.pad(pooled, 0.0, [(0, 0, 0) if a not in L.spatial_axes else (1, 1, 0)
                                       for a in range(4)])
        return jnp.mean(padded, axis=tuple(L.spatial_axes))
    params["stem"] = p.conv(L, 3, 3, 8, c0)
    x = common.Params(8).normal(L.input_shape(1, 16, 8), 1.0)
    return apply, params, x


@pytest.mark.parametrize("choice", propagate.LAYOUT_CHOICES)
@pytest.mark.parametrize("layout_name", ["nchw", "nhwc"])
def test_dense_block_concatenates_blocked_channels(optimize, choice, layout_name):
    apply, params, x = dense_block(layout_name)
    optimized = optimize(apply, min_flops=0, layout_plan=choice)
    assert _rel_err(optimized(params, x), apply(params, x)) <= 1e-4
    plan = optimized.plan_for(params, x)
    assert len(plan.rewritten) == 5 and not plan.left_to_xla
    if choice in ("NC8", "NC16"):
        # 32 + 16k channels are whole blocks: concatenations, the pool, the pad and the
        # mean run on the blocks; the only conversion is the program's output
        assert [c.where for c in plan.conversions] == ["output"], plan.conversions
        assert str(plan.conversions[0].src) == f"N C/{choice[2:]} {choice[2:]}c"


def test_unaligned_concatenation_converts_once_per_operand(optimize):
    """Channels that are not whole blocks cannot be concatenated block-wise: each operand
    goes back to the logical layout first (two conversions), and the result is right."""
    w1 = np.random.default_rng(0).standard_normal((12, 4, 3, 3)).astype(np.float32) * 0.2
    w2 = np.random.default_rng(1).standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.2

    def f(x):
        a = lax.conv_general_dilated(x, w1, (1, 1), "SAME")  # 12 channels: not blocked
        b = lax.conv_general_dilated(x, w2, (1, 1), "SAME")  # 16 channels: N C/8 H W 8c
        return jnp.concatenate([b, a], axis=1)
    x = np.random.default_rng(2).standard_normal((1, 4, 12, 12)).astype(np.float32)
    optimized = optimize(f, min_flops=0, layout_plan="NC8")
    assert _rel_err(optimized(x), f(x)) <= 1e-4
    plan = optimized.plan_for(x)
    assert sorted(c.where for c in plan.conversions) == ["concatenate", "concatenate"]
    assert [d.layouts.split("writes ")[1] for d in plan.rewritten] == ["NHWC", "N C/8 H W 8c"]


def test_a_window_across_channels_is_not_run_on_blocks(optimize):
    """A pool over the channel axis would mix blocks: it gets the logical layout."""
    w = np.random.default_rng(0).standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.2

    def f(x):
        y = lax.conv_general_dilated(x, w, (1, 1), "SAME")
        return lax.reduce_window(y, -jnp.inf, lax.max, (1, 3, 1, 1), (1, 1, 1, 1), "SAME")
    x = np.random.default_rng(2).standard_normal((1, 4, 12, 12)).astype(np.float32)
    optimized = optimize(f, min_flops=0, layout_plan="NC8")
    assert _rel_err(optimized(x), f(x)) <= 1e-4
    assert [c.where for c in optimized.plan_for(x).conversions] == ["reduce_window_max"]


def test_plan_by_position_and_stored_plan_replayed(optimize, tmp_path, kernel_cache):
    model = models.build("tiny_cnn", layout="nchw")
    args = (model.params, *model.inputs)
    base = optimize(jax.jit(model.apply))
    convs = [d.where for d in base.plan_for(*args).rewritten
             if d.primitive == "conv_general_dilated"]
    chosen = {convs[0]: "NC16", convs[1]: "NC8"}
    plan = optimize(jax.jit(model.apply), layout_plan=chosen).plan_for(*args)
    writes = [d.layouts.split("writes ")[1] for d in plan.rewritten if d.where in chosen]
    assert writes[:2] == ["N C/16 H W 16c", "N C/8 H W 8c"]
    # stored beside the records, for this program on this device: optimize replays it
    from alt_jax import device, jaxpr_pass

    records = tmp_path / "r.jsonl"
    records.write_text("")
    closed = jax.make_jaxpr(jax.jit(model.apply))(*args)
    key = layout_plans.program_key(jaxpr_pass.inline_calls(closed))
    layout_plans.store(layout_plans.path_for(records), key,
                       device.fingerprint(kernel_cache.isa or device.detect_isa()),
                       {"plan": chosen})
    replayed = alt_jax.optimize(jax.jit(model.apply), records=str(records), cache=kernel_cache,
                                fallback="error")
    assert _rel_err(replayed(*args), jax.jit(model.apply)(*args)) <= 1e-4
    again = [d.layouts.split("writes ")[1] for d in replayed.plan_for(*args).rewritten
             if d.where in chosen]
    assert again == writes


def test_unknown_layout_names_are_refused(optimize):
    with pytest.raises(ValueError, match="layout_plan names"):
        optimize(lambda x: x, layout_plan="NC7")

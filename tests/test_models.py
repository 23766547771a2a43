"""The benchmark model zoo: every model builds deterministically, runs under jax.jit to a
finite output of the right shape, has the FLOP count its closed form gives, and runs the same
through alt_jax.optimize."""
import functools

import jax
import numpy as np
import pytest

import alt_jax
from benchmarks import models
from benchmarks.models import bert, gpt2, mobilenet_v2

VISION = {"resnet18", "resnet50", "mobilenet_v2"}


@functools.cache
def _model(name, layout="nhwc"):
    return models.build(name, layout=layout)


@functools.cache
def _reference(name):
    """The model's outputs under jax.jit, as a list of numpy arrays (its pytree's leaves)."""
    m = _model(name)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.jit(m.apply)(m.params,
                                                                              *m.inputs))]


SEQ = {"bert_layer_384": 384, "gpt2_block_512": 512}


def _expected_shapes(name, batch):
    if name == "tiny_cnn":
        return [(batch, 10)]
    if name in VISION:
        return [(batch, 1000)]
    if name == "gpt2_decode":  # the block's output, the new token's keys and values
        return [(batch, 1, gpt2.HIDDEN)] + [(batch, 1, gpt2.HEADS, gpt2.HEAD_DIM)] * 2
    return [(batch, SEQ.get(name, bert.SEQ), bert.HIDDEN)]


def _mobilenet_v2_flops(batch=1):
    """2 x MACs of MobileNetV2's convs and classifier, from the (t, c, n, s) table alone."""
    hw, cin = 112, 32
    macs = hw * hw * 9 * 3 * cin  # stem 3x3/2
    for t, c, n, s in mobilenet_v2._CONFIG:
        for i in range(n):
            hidden, stride = cin * t, (s if i == 0 else 1)
            if t != 1:
                macs += hw * hw * cin * hidden  # 1x1 expand
            hw //= stride
            macs += hw * hw * 9 * hidden + hw * hw * hidden * c  # depthwise 3x3, 1x1 project
            cin = c
    macs += hw * hw * cin * 1280 + 1280 * 1000  # 1x1 head, classifier
    return 2 * macs * batch


def _bert_flops(layers, batch=1, s=128, h=768, f=3072, keys=None):
    """A transformer layer: 4 projections, the MLP's two matmuls, the two attention
    products (s queries x `keys` keys; a prompt attends to itself). GPT-2's block has the
    same matmuls (its fused QKV projection is 3 of the 4)."""
    keys = s if keys is None else keys
    per_layer = 4 * 2 * s * h * h + 2 * 2 * s * h * f + 2 * 2 * s * keys * h
    return layers * per_layer * batch


# name -> (expected FLOPs, relative tolerance)
EXPECTED_FLOPS = {
    "resnet18": (3.63e9, 0.01),
    "resnet50": (8.18e9, 0.01),
    "mobilenet_v2": (_mobilenet_v2_flops(), 0.01),
    "bert_layer": (_bert_flops(1), 0.0),
    "bert_12": (_bert_flops(12), 0.0),
    "bert_layer_384": (_bert_flops(1, s=384), 0.0),
    "gpt2_block": (_bert_flops(1), 0.0),
    "gpt2_block_512": (_bert_flops(1, s=512), 0.0),
    "gpt2_decode": (_bert_flops(1, s=1, keys=512), 0.0),
    # conv 3x3 3->16 @16, conv 3x3/2 16->32 to 8x8, dense 32->10
    "tiny_cnn": (2 * (16 * 16 * 16 * 3 * 9 + 8 * 8 * 32 * 16 * 9 + 32 * 10), 0.0),
}


def test_every_model_has_a_flop_expectation():
    assert set(EXPECTED_FLOPS) == set(models.MODELS)
    assert 0.59e9 <= _mobilenet_v2_flops() <= 0.61e9  # the paper's ~300M multiply-adds


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_flop_count_matches_closed_form(name):
    want, rtol = EXPECTED_FLOPS[name]
    assert _model(name).flops == pytest.approx(want, rel=rtol)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_runs_under_jit_to_a_finite_output(name):
    outs = _reference(name)
    assert [o.shape for o in outs] == _expected_shapes(name, 1)
    assert all(np.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_weights_are_deterministic_and_batch_sets_the_input(name):
    again = models.build(name, batch=2)
    first = jax.tree_util.tree_leaves(_model(name).params)
    second = jax.tree_util.tree_leaves(again.params)
    assert len(first) == len(second)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert again.inputs[0].shape[0] == 2
    shapes = jax.eval_shape(again.apply, again.params, *again.inputs)
    assert [s.shape for s in jax.tree_util.tree_leaves(shapes)] == _expected_shapes(name, 2)


def test_mobilenet_v2_nchw_is_the_same_network():
    m = _model("mobilenet_v2", "nchw")
    assert m.inputs[0].shape == (1, 3, 224, 224)
    assert m.flops == _model("mobilenet_v2").flops
    out = jax.jit(m.apply)(m.params, *m.inputs)
    assert out.shape == (1, 1000) and np.isfinite(out).all()


@pytest.mark.parametrize("name", ["bert_layer", "bert_12", "gpt2_block", "gpt2_decode"])
def test_sequence_models_reject_nchw_with_the_fix(name):
    with pytest.raises(ValueError, match="layout='nhwc'"):
        models.build(name, layout="nchw")


# With a cold kernel cache the ResNets take ~10 s each (all five together > 30 s): slow; so
# do the long-sequence transformers (6-8 GFLOP a call, under jit and the kernels).
_SLOW = {"resnet18", "resnet50", "bert_layer_384", "gpt2_block_512"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n
                                  for n in sorted(models.MODELS)])
def test_optimize_matches_jit(kernel_cache, name):
    m = _model(name)
    optimized = alt_jax.optimize(m.apply, cache=kernel_cache, fallback="silent")
    got = [np.asarray(x) for x in jax.tree_util.tree_leaves(optimized(m.params, *m.inputs))]
    for g, w in zip(got, _reference(name), strict=True):
        assert g.shape == w.shape
        assert np.abs(g - w).max() / max(1.0, np.abs(w).max()) <= 1e-4

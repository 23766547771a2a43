"""Real clients: models written the way Flax (nnx and linen), Equinox and Keras 3 users write
them give jax.jit's outputs through alt_jax.optimize, with every conv and matmul on a kernel.

Entry points: one test per client (test_flax_nnx_cnn, test_flax_linen_transformer_block,
test_equinox_cnn, test_keras_mobilenet_v2); each counts its convs, matmuls and attentions from
the model's own layers, not from the plan, so an op the planner never saw or left to XLA fails
the test.
"""
import collections
import os

# Keras 3 picks its backend once, at import: it must be JAX, whatever the environment says
# for other programs (setdefault would keep a KERAS_BACKEND=tensorflow from the shell).
os.environ["KERAS_BACKEND"] = "jax"

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alt_jax

CONV = "conv_general_dilated"
DOT = "dot_general"
RTOL = 1e-4  # of max |reference|: the kernels reorder float32 sums, nothing more


def _check_against_jit(fn, args, kernel_cache, expected_ops: dict):
    """fn through alt_jax.optimize equals jax.jit(fn), and runs expected_ops (primitive ->
    count) on kernels, nothing left to XLA. min_flops=0: these models are small on purpose
    (fast tests), and the point is that every op of a real client gets a kernel."""
    want = jax.jit(fn)(*args)
    optimized = alt_jax.optimize(jax.jit(fn), cache=kernel_cache, min_flops=0)
    got = optimized(*args)
    plan = optimized.plan_for(*args)

    on_kernels = collections.Counter(d.primitive for d in plan.rewritten)
    assert on_kernels == collections.Counter(expected_ops), f"expected {expected_ops}\n{plan}"
    assert not plan.left_to_xla, str(plan)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype
        scale = np.abs(w).max()
        assert scale > 0 and np.isfinite(g).all()
        err = np.abs(g - w).max() / scale
        assert err <= RTOL, f"max |alt_jax - jit| / max |jit| = {err:.3g}\n{plan}"


# Test values come from numpy, not jax.random: each new shape would cost an XLA compile
# (MobileNetV2 has ~40 of them, ~15 s on a busy 2-core machine).
def _normal(rng, shape, std=1.0):
    return jnp.asarray(std * rng.standard_normal(shape, dtype=np.float32))


def _uniform(rng, shape, low, high):
    return jnp.asarray(rng.uniform(low, high, shape).astype(np.float32))


# -- Flax nnx: a CNN --------------------------------------------------------------------------
def _flax_nnx_cnn():
    nnx = pytest.importorskip("flax.nnx", reason="flax not installed (requirements-test.txt)")

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(16, rngs=rngs)
            self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
            self.bn2 = nnx.BatchNorm(32, rngs=rngs)
            self.conv3 = nnx.Conv(32, 32, (1, 1), rngs=rngs)
            self.fc1 = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
            self.fc2 = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):  # NHWC, 32x32
            x = nnx.relu(self.bn1(self.conv1(x)))
            x = nnx.relu(self.bn2(self.conv2(x)))                    # 16x16
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))              # 8x8
            x = nnx.relu(self.conv3(x))
            x = nnx.avg_pool(x, (2, 2), strides=(2, 2))              # 4x4
            x = x.reshape((x.shape[0], -1))
            return self.fc2(nnx.relu(self.fc1(x)))

    model = CNN(nnx.Rngs(0))
    model.eval()  # BatchNorm on its running statistics
    # Running statistics of a trained model, not the identity ones of a fresh one, so that
    # a wrongly folded batch norm shows.
    rng = np.random.default_rng(1)
    for bn in (model.bn1, model.bn2):
        n = (bn.num_features,)
        bn.mean[...] = _normal(rng, n, 0.5)
        bn.var[...] = _uniform(rng, n, 0.5, 2.0)
        bn.scale[...] = _uniform(rng, n, 0.5, 1.5)
        bn.bias[...] = _normal(rng, n, 0.5)
    graphdef, state = nnx.split(model)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    return apply, state


def test_flax_nnx_cnn(kernel_cache):
    apply, state = _flax_nnx_cnn()
    x = _normal(np.random.default_rng(2), (2, 32, 32, 3))
    _check_against_jit(apply, (state, x), kernel_cache, {CONV: 3, DOT: 2})


# -- Flax linen: a pre-norm transformer block --------------------------------------------------
def _flax_linen_block(width, heads):
    nn = pytest.importorskip("flax.linen", reason="flax not installed (requirements-test.txt)")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=heads)(h, h)
            h = nn.LayerNorm()(x)
            h = nn.gelu(nn.Dense(4 * width)(h))
            return x + nn.Dense(width)(h)

    return Block()


def test_flax_linen_transformer_block(kernel_cache):
    width, heads = 64, 4
    block = _flax_linen_block(width, heads)
    x = _normal(np.random.default_rng(0), (2, 16, width))
    params = block.init(jax.random.key(1), x)
    # query, key and value projections (rhs with two free dims: heads x head size), the
    # output projection, the two MLP layers; the two attention einsums and the softmax
    # between them as one attention kernel; its two LayerNorms on the row-wise kernel
    _check_against_jit(block.apply, (params, x), kernel_cache,
                       {DOT: 3 + 1 + 2, "attention": 1, "rownorm": 2})


# -- Equinox: a CNN on one image, vmapped over the batch ----------------------------------------
def _equinox_cnn():
    eqx = pytest.importorskip("equinox", reason="equinox not installed (requirements-test.txt)")

    class CNN(eqx.Module):
        conv1: eqx.nn.Conv2d
        conv2: eqx.nn.Conv2d
        pool: eqx.nn.MaxPool2d
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3, k4 = jax.random.split(key, 4)
            self.conv1 = eqx.nn.Conv2d(3, 16, 3, padding=1, key=k1)
            self.pool = eqx.nn.MaxPool2d(2, stride=2)
            self.conv2 = eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=k2)
            self.fc1 = eqx.nn.Linear(32 * 8 * 8, 64, key=k3)
            self.fc2 = eqx.nn.Linear(64, 10, key=k4)

        def __call__(self, x):  # one image, CHW 32x32
            x = self.pool(jax.nn.relu(self.conv1(x)))               # 16x16
            x = jax.nn.relu(self.conv2(x))                           # 8x8, straight into fc1
            x = jax.nn.relu(self.fc1(jnp.ravel(x)))
            return self.fc2(x)

    # Equinox's own filter_jit idiom: arrays are arguments, everything else is static.
    params, static = eqx.partition(CNN(jax.random.key(0)), eqx.is_array)

    def apply(params, x):
        return jax.vmap(eqx.combine(params, static))(x)

    return apply, params


def test_equinox_cnn(kernel_cache):
    apply, params = _equinox_cnn()
    x = _normal(np.random.default_rng(1), (4, 3, 32, 32))
    _check_against_jit(apply, (params, x), kernel_cache, {CONV: 2, DOT: 2})


# -- Keras 3 on JAX: keras.applications.MobileNetV2 -----------------------------------------
def _keras():
    keras = pytest.importorskip("keras", reason="keras not installed (requirements-test.txt)")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras was imported with the {keras.backend.backend()} backend before "
                    "this module set KERAS_BACKEND=jax")
    return keras


def _keras_weights(model, rng):
    """Values for model's variables that keep activations O(1) through 50 layers (Keras'
    glorot-initialised MobileNetV2 shrinks them to ~1e-11, where relu6's clamp at 6 and the
    batch norms' shifts never show): He-scaled kernels, batch norms of a trained model."""
    def value(variable):
        shape, name = tuple(variable.shape), variable.path.rsplit("/", 1)[-1]
        if name == "depthwise_kernel":        # (kh, kw, channels, 1): one filter per channel
            return _normal(rng, shape, np.sqrt(2.0 / (shape[0] * shape[1])))
        if name == "kernel":                  # (..., fan_in, fan_out)
            return _normal(rng, shape, np.sqrt(2.0 / np.prod(shape[:-1])))
        if name in ("gamma", "moving_variance"):
            return _uniform(rng, shape, 0.5, 2.0)
        if name in ("beta", "moving_mean", "bias"):
            return _normal(rng, shape, 1.0)
        raise AssertionError(f"no test value for the Keras variable {variable.path}")

    return ([value(v) for v in model.trainable_variables],
            [value(v) for v in model.non_trainable_variables])


def test_keras_mobilenet_v2(kernel_cache):
    keras = _keras()
    # weights=None: nothing is downloaded; logits (no softmax) so that the check sees them.
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                           classes=10, classifier_activation=None)
    rng = np.random.default_rng(0)
    trainable, non_trainable = _keras_weights(model, rng)
    x = _uniform(rng, (2, 32, 32, 3), -1.0, 1.0)  # the model's input range

    def predict(trainable, non_trainable, x):
        logits, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return logits

    layers = collections.Counter(type(layer) for layer in model.layers)
    convs = layers[keras.layers.Conv2D] + layers[keras.layers.DepthwiseConv2D]
    assert convs == 52 and layers[keras.layers.Dense] == 1  # 1 stem, 17 blocks, 1 head
    _check_against_jit(predict, (trainable, non_trainable, x), kernel_cache,
                       {CONV: convs, DOT: layers[keras.layers.Dense]})

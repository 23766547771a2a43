"""Row-wise kernels: a layer norm as users write it (by hand as BERT does, Flax's LayerNorm
and RMSNorm, Keras's LayerNormalization), a softmax standing alone, a norm over a middle
axis, runs on one rownorm kernel and gives jax.jit's answer, special values included;
regions it cannot compute as one (a value needed elsewhere, an operand computed from the
result) are left alone; gradients are the original's; the scheduler keeps every
dependency."""
import os

# Keras 3 picks its backend once, at import: JAX (as tests/test_clients.py sets it)
os.environ["KERAS_BACKEND"] = "jax"

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alt_jax
from alt_jax import jaxpr_pass, row_program, rownorm

RTOL = 1e-5  # of max |reference|: float32 sums in another order


def bert_ln(x, g, b, eps=1e-12):  # benchmarks/models/bert.py's: E[(x - mean)^2]
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * g + b


def rms_norm(x, g, b, eps=1e-6):  # LLaMA style, x ** 2 (integer_pow), sqrt and a divide
    del b
    return x / jnp.sqrt(jnp.mean(x ** 2, axis=-1, keepdims=True) + eps) * g


def softmax_last(x, g, b):
    del g, b
    return jax.nn.softmax(x, axis=-1)


def ln_fourth_power(x, g, b):  # x ** 4 (integer_pow: a chain of squares) and sqrt
    y = x - jnp.mean(x, axis=-1, keepdims=True)
    return y * jax.lax.rsqrt(jnp.sqrt(jnp.mean(y ** 4, axis=-1, keepdims=True)) + 1e-3) * g + b


def residual_then_ln(x, g, b):  # the residual add left to XLA, the norm after it
    return bert_ln(x + 0.5 * jnp.tanh(x), g, b)


FORMS = [bert_ln, rms_norm, softmax_last, ln_fourth_power, residual_then_ln]


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    n = shape[-1]
    return (jnp.asarray(2.0 * rng.standard_normal(shape) + 0.5, jnp.float32),
            jnp.asarray(rng.standard_normal(n), jnp.float32),
            jnp.asarray(rng.standard_normal(n), jnp.float32))


def _rownorm_decisions(optimized, *args):
    return [d for d in optimized.plan_for(*args).decisions if d.primitive == "rownorm"]


def _check(fn, args, kernel_cache, rtol=RTOL, equal_nan=False, count=1):
    want = jax.jit(fn)(*args)
    optimized = alt_jax.optimize(fn, cache=kernel_cache, fallback="error", min_flops=0)
    got = optimized(*args)
    found = _rownorm_decisions(optimized, *args)
    assert len(found) == count and all(d.on_kernel for d in found), str(
        optimized.plan_for(*args))
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape
        if equal_nan:
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
            np.testing.assert_array_equal(np.isinf(g), np.isinf(w))
            ok = np.isfinite(w)
            g, w = g[ok], w[ok]
        scale = max(np.abs(w).max(initial=0.0), 1e-30)
        err = np.abs(g - w).max(initial=0.0) / scale
        assert err <= rtol, f"{getattr(fn, '__name__', fn)}: max |alt_jax - jit| / max = {err:.3g}"
    return optimized


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(2, 37, 768), (1, 5, 77), (3, 16), (4, 3, 130)])
def test_forms_match_jit(form, shape, kernel_cache):
    _check(form, _inputs(shape), kernel_cache)


def test_norm_over_a_middle_axis(kernel_cache):
    """Rows that are strided (the reduced axis is not the last one), written back strided."""
    gamma = jnp.asarray(np.random.default_rng(2).standard_normal((41, 1)), jnp.float32)

    def ln_axis1(x, g, b):
        mean = x.mean(axis=1, keepdims=True)
        return (x - mean) / jnp.sqrt(x.var(axis=1, keepdims=True) + 1e-5) * gamma + b
    _check(ln_axis1, _inputs((3, 41, 5)), kernel_cache)


def test_externals_per_row_and_full_size(kernel_cache):
    """A per-row shift and a full-size operand from outside the region, read by strides."""
    x, g, b = _inputs((6, 50))
    shift = jnp.asarray(np.random.default_rng(3).standard_normal((6, 1)), jnp.float32)
    other = jnp.asarray(np.random.default_rng(4).standard_normal((6, 50)), jnp.float32)

    def fn(x, g, b):
        y = x - shift
        y = y / jnp.sum(jnp.abs(other) + y * y, axis=-1, keepdims=True)
        return y * g + other

    _check(fn, (x, g, b), kernel_cache)


def test_flax_layer_norm_and_rms_norm(kernel_cache):
    nn = pytest.importorskip("flax.linen", reason="flax not installed (requirements-test.txt)")
    x = _inputs((2, 19, 96), seed=1)[0]
    for layer in (nn.LayerNorm(), nn.RMSNorm(), nn.LayerNorm(use_scale=False, epsilon=1e-3)):
        params = layer.init(jax.random.key(0), x)
        _check(lambda p, x: layer.apply(p, x), (params, x), kernel_cache)


def test_keras_layer_normalization(kernel_cache):
    keras = pytest.importorskip("keras", reason="keras not installed (requirements-test.txt)")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras was imported with the {keras.backend.backend()} backend")
    layer = keras.layers.LayerNormalization(epsilon=1e-5)
    x = np.random.default_rng(10).standard_normal((2, 21, 64)).astype(np.float32)
    layer(x)  # builds the weights
    layer.set_weights([np.random.default_rng(s).standard_normal(64).astype(np.float32)
                       for s in (1, 2)])
    weights = [jnp.asarray(w) for w in layer.get_weights()]

    def apply(weights, x):
        from keras import StatelessScope
        with StatelessScope(state_mapping=list(zip(layer.weights, weights))):
            return layer(x)
    _check(apply, (weights, jnp.asarray(x)), kernel_cache)


def test_special_values_give_what_xla_gives(kernel_cache):
    """A row with an inf or a NaN is NaN throughout, as in XLA; a constant row divides 0 by
    sqrt(eps); huge values do not overflow the mean; the other rows are untouched."""
    x, g, b = _inputs((6, 40), seed=5)
    x = x.at[1, 3].set(jnp.inf).at[2, 7].set(jnp.nan).at[3].set(2.5).at[4, :].multiply(1e30)
    for form in (bert_ln, rms_norm, softmax_last):
        _check(form, (x, g, b), kernel_cache, equal_nan=True)
    _check(softmax_last, (x.at[5].set(-jnp.inf), g, b), kernel_cache, equal_nan=True)


def _no_rownorm(fn, args, kernel_cache):
    want = jax.jit(fn)(*args)
    optimized = alt_jax.optimize(fn, cache=kernel_cache, min_flops=0)
    got = optimized(*args)
    assert not _rownorm_decisions(optimized, *args), str(optimized.plan_for(*args))
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_regions_the_kernel_cannot_compute_stay_as_they_are(kernel_cache):
    x, g, b = _inputs((4, 33), seed=8)

    def mean_returned(x, g, b):  # the mean is needed outside the region
        mean = jnp.mean(x, axis=-1, keepdims=True)
        return (x - mean) * g, mean

    def two_axes(x, g, b):  # a reduction over two axes is not a row
        return x - jnp.mean(x, axis=(0, 1), keepdims=True)

    def elementwise_only(x, g, b):  # nothing reduces: XLA's fusion
        return jnp.tanh(x) * g + b

    def integer_rows(x, g, b):
        i = x.astype(jnp.int32)
        return i - jnp.max(i, axis=-1, keepdims=True)

    for fn in (mean_returned, two_axes, elementwise_only, integer_rows):
        _no_rownorm(fn, (x, g, b), kernel_cache)


def test_the_rest_of_a_row_computation_stays_in_xla(kernel_cache):
    """The kernel computes y; sin(y) is no row step, so y * sin(y) and its sum run in XLA
    after the kernel."""
    def partial_region(x, g, b):
        y = x / jnp.sum(x * x, axis=-1, keepdims=True)
        return jnp.sum(y * jnp.sin(y), axis=-1)
    _check(partial_region, _inputs((4, 33), seed=8), kernel_cache)


def test_the_matcher_reads_bert_layer_norm():
    x, g, b = _inputs((1, 8, 64))
    flat = jaxpr_pass.open_jaxpr(jaxpr_pass.inline_calls(jax.make_jaxpr(bert_ln)(x, g, b)))
    (m,) = rownorm.find_rownorm(flat)
    assert (m.batch, m.n, m.x_strides, m.out_strides) == ((8,), 64, (64, 0, 1), (64, 0, 1))
    # gamma and beta: one row each, the same for every row (zero row strides)
    assert [(e.dtype, e.strides) for e in m.externals] == [("f32", (0, 0, 1))] * 2
    ops = m.program.instructions[0::5]
    assert ops.count(row_program.OP_RSUM) == 2 and row_program.OP_RSQRT in ops
    assert m.region[-1].outvars[0] is m.out_var
    # every equation but the two that spread gamma and beta over the rows (read unspread)
    left = [e.primitive.name for e in flat.eqns if all(e is not r for r in m.region)]
    assert left == ["broadcast_in_dim"] * 2


def _interpret(program, row, externals):
    """The row program in numpy, instruction by instruction: what the executor computes
    (to rounding)."""
    slots = {}
    for i in range(0, len(program.constants), 2):
        slots[program.constants[i]] = np.frombuffer(
            np.int32(program.constants[i + 1]).tobytes(), np.float32)[0]
    slots[0] = row
    binary = {row_program.OP_ADD: np.add, row_program.OP_SUB: np.subtract,
              row_program.OP_MUL: np.multiply, row_program.OP_DIV: np.divide,
              row_program.OP_MAX: np.maximum, row_program.OP_MIN: np.minimum}
    code = program.instructions
    for k in range(0, len(code), 5):
        op, dst, a, b, c = code[k:k + 5]
        if op == row_program.OP_LOAD:
            slots[dst] = externals[a]
        elif op in binary:
            slots[dst] = binary[op](slots[a], slots[b])
        elif op == row_program.OP_RSUM:
            slots[dst] = np.sum(slots[a])
        elif op == row_program.OP_RMAX:
            slots[dst] = np.max(slots[a])
        elif op == row_program.OP_RSQRT:
            slots[dst] = 1 / np.sqrt(slots[a])
        elif op == row_program.OP_SQRT:
            slots[dst] = np.sqrt(slots[a])
        elif op == row_program.OP_EXP:
            slots[dst] = np.exp(slots[a])
        elif op == row_program.OP_NEG:
            slots[dst] = -slots[a]
        elif op == row_program.OP_ABS:
            slots[dst] = np.abs(slots[a])
        elif op == row_program.OP_COPY:
            slots[dst] = slots[a]
        else:
            slots[dst] = np.where(slots[a] != 0, slots[c], slots[b])
    return slots[program.result]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
def test_scheduling_keeps_every_dependency(form):
    """The scheduled program (per-row steps hoisted, runs made long) reads no slot before it
    is written and computes what the jaxpr computes."""
    x, g, b = _inputs((1, 4, 24), seed=2)
    closed = jaxpr_pass.inline_calls(jax.make_jaxpr(form)(x, g, b))
    flat = jaxpr_pass.open_jaxpr(closed)
    (m,) = rownorm.find_rownorm(flat)
    code = m.program.instructions
    written = set(range(len(m.program.full))) - set(code[1::5])
    for k in range(0, len(code), 5):
        assert set(row_program.operand_slots(code[k], *code[k + 2:k + 5])) <= written
        written.add(code[k + 1])
    x_value, *ext = _values_of(closed, (x, g, b), m.invars)
    assert all(np.size(e) == 24 for e in ext)  # these forms' externals: one row each
    got = _interpret(m.program, np.asarray(x_value, np.float64).reshape(4, 24)[1],
                     [np.asarray(e, np.float64).reshape(24) for e in ext])
    want = np.asarray(jax.jit(form)(x, g, b))[0, 1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _values_of(closed, args, wanted):
    """The values of a few vars of an inlined program."""
    from jax.extend import core as jcore
    flat = jaxpr_pass.open_jaxpr(closed)
    sub = jcore.ClosedJaxpr(jcore.Jaxpr(flat.constvars, flat.invars, list(wanted), flat.eqns),
                            jaxpr_pass.jaxpr_consts(closed))
    return jcore.jaxpr_as_fun(sub)(*args)


def test_gradients_are_the_originals(kernel_cache):
    x, g, b = _inputs((3, 40), seed=9)
    loss = lambda x, g, b: jnp.sum(jnp.sin(bert_ln(x, g, b)))
    want = jax.grad(loss, argnums=(0, 1, 2))(x, g, b)
    got = jax.grad(alt_jax.optimize(loss, cache=kernel_cache, min_flops=0),
                   argnums=(0, 1, 2))(x, g, b)
    for gg, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(gg), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_rownorm_off_leaves_the_norm_to_xla(kernel_cache):
    args = _inputs((4, 64))
    optimized = alt_jax.optimize(bert_ln, cache=kernel_cache, min_flops=0, rownorm=False)
    np.testing.assert_allclose(np.asarray(optimized(*args)), np.asarray(jax.jit(bert_ln)(*args)),
                               rtol=1e-6, atol=1e-6)
    assert not _rownorm_decisions(optimized, *args)


def test_small_norms_stay_in_xla_by_default(kernel_cache):
    args = _inputs((2, 16))
    optimized = alt_jax.optimize(bert_ln, cache=kernel_cache)
    optimized(*args)
    assert not _rownorm_decisions(optimized, *args)  # 32 elements: the size rule


def test_bert_layer_runs_its_norms_on_the_kernel(kernel_cache):
    from benchmarks import models
    model = models.build("bert_layer")
    optimized = alt_jax.optimize(jax.jit(model.apply), cache=kernel_cache, fallback="error")
    got = optimized(model.params, *model.inputs)
    want = jax.jit(model.apply)(model.params, *model.inputs)
    assert len(_rownorm_decisions(optimized, model.params, *model.inputs)) == 2
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa_name", ["avx2", "sse2", "scalar"])
def test_narrower_isas(isa_name, tmp_path):
    """The template for 8-, 4- and 1-lane vectors (this CPU runs them all): rows that are
    and are not whole vectors, copied or read in place."""
    from alt_jax import device, runtime
    isa = {"avx2": device.AVX2, "sse2": device.SSE2, "scalar": device.SCALAR}[isa_name]
    if isa_name == "avx2" and alt_jax.device.detect_isa().vector_floats < 8:
        pytest.skip("this CPU has no AVX2")
    cache = runtime.KernelCache(tmp_path, isa=isa)
    for form, shape in ((bert_ln, (3, 37)), (rms_norm, (2, 5, 64)), (softmax_last, (4, 9))):
        _check(form, _inputs(shape, seed=12), cache)


def _random_row_program(rng):
    """A random row-wise region: a centring (or none), a scale from a sum of squares, a max
    or a sum of |x|, gamma / beta / a per-row operand or none, exp or not, over the last or
    a middle axis."""
    centre = rng.random() < 0.6
    stat = rng.choice(["square", "abs", "max"])
    finish = rng.choice(["rsqrt", "sqrt_div", "div"])
    extra = rng.choice(["none", "gamma", "gamma_beta", "per_row"])
    use_exp = rng.random() < 0.3
    axis = -1 if rng.random() < 0.7 else 1
    shape = (int(rng.integers(1, 4)), int(rng.integers(2, 30)), int(rng.integers(2, 70)))
    n = shape[axis]
    gamma = jnp.asarray(rng.standard_normal(n), jnp.float32)
    beta = jnp.asarray(rng.standard_normal(n), jnp.float32)
    per_row = jnp.asarray(rng.standard_normal([s if a != axis % 3 else 1
                                               for a, s in enumerate(shape)]), jnp.float32)
    spread = (lambda v: v) if axis == -1 else (lambda v: v[:, None])

    def fn(x):
        y = x - jnp.mean(x, axis=axis, keepdims=True) if centre else x
        if use_exp:
            y = jnp.exp(y - jnp.max(y, axis=axis, keepdims=True))
        if stat == "square":
            s = jnp.mean(y * y, axis=axis, keepdims=True)
        elif stat == "abs":
            s = jnp.sum(jnp.abs(y), axis=axis, keepdims=True) + 1.0
        else:
            s = jnp.max(y, axis=axis, keepdims=True) + 2.0
        if finish == "rsqrt":
            y = y * jax.lax.rsqrt(jnp.abs(s) + 1e-5)
        elif finish == "sqrt_div":
            y = y / jnp.sqrt(jnp.abs(s) + 1e-5)
        else:
            y = y / (s + 1e-3)
        if extra in ("gamma", "gamma_beta"):
            y = y * spread(gamma)
        if extra == "gamma_beta":
            y = y + spread(beta)
        if extra == "per_row":
            y = y - per_row
        return y

    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    fn.__name__ = (f"row_{'c' if centre else ''}{stat}_{finish}_{extra}"
                   f"{'_exp' if use_exp else ''}_ax{axis}_{shape}")
    return fn, (x,)


@pytest.mark.parametrize("seed", range(24))
def test_random_row_programs(seed, kernel_cache):
    fn, args = _random_row_program(np.random.default_rng(2000 + seed))
    _check(fn, args, kernel_cache, rtol=1e-4)

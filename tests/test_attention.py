"""Fused attention: each form users write (hand-written softmax, jax.nn.softmax,
jax.nn.dot_product_attention with masks and causal, Flax's attention module, a decode step
against a KV cache) runs on one attention kernel and gives jax.jit's answer, at the head
sizes and odd sequence lengths transformers have, special values included; regions the
kernel cannot compute exactly are left alone, and gradients are the original's."""
import dataclasses
import math
import os

# Keras 3 picks its backend once, at import: JAX (as tests/test_clients.py sets it)
os.environ["KERAS_BACKEND"] = "jax"

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alt_jax
from alt_jax import attention, jaxpr_pass, row_program

RTOL = 1e-5  # of max |reference|: float32 sums in another order, exp to a few ulp


def _softmax(x):  # as the BERT zoo and many hand-written models write it
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def hand_bqhd(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", _softmax(s), v)


def hand_bhqd_nn_softmax(q, k, v):  # heads first, scale on q, jax.nn.softmax
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    s = jnp.einsum("bhqd,bhkd->bhqk", q * (q.shape[-1] ** -0.5), k)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def nn_plain(q, k, v):
    return jax.nn.dot_product_attention(q, k, v)


def nn_causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def _padding_mask(b, sq, sk):
    lengths = np.minimum(sk, np.arange(b) * 5 + sk // 2 + 1)  # a different length per item
    return jnp.asarray(np.arange(sk)[None, None, None, :] < lengths[:, None, None, None])


def nn_padding_mask(q, k, v):
    b, sq, _, _ = q.shape
    return jax.nn.dot_product_attention(q, k, v, mask=_padding_mask(b, sq, k.shape[1]))


def nn_bias(q, k, v):  # an additive bias per head and position (ALiBi / relative position)
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    bias = jnp.asarray(np.random.default_rng(7).standard_normal((1, h, sq, sk)), jnp.float32)
    return jax.nn.dot_product_attention(q, k, v, bias=bias)


def hand_where_mask(q, k, v):  # Keras / HF style: jnp.where(mask, scores, -1e9)
    b, sq, h, d = q.shape
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    s = jnp.where(_padding_mask(b, sq, k.shape[1]), s, -1e9)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)


FORMS = [hand_bqhd, hand_bhqd_nn_softmax, nn_plain, nn_causal, nn_padding_mask, nn_bias,
         hand_where_mask]


def _qkv(shape, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(scale * rng.standard_normal(shape), jnp.float32) for _ in range(3))


def _attention_decisions(optimized, *args):
    return [d for d in optimized.plan_for(*args).decisions if d.primitive == "attention"]


def _check(fn, args, kernel_cache, rtol=RTOL, equal_nan=False):
    want = jax.jit(fn)(*args)
    optimized = alt_jax.optimize(fn, cache=kernel_cache, fallback="error", min_flops=0)
    got = optimized(*args)
    fused = _attention_decisions(optimized, *args)
    assert len(fused) == 1 and fused[0].on_kernel, str(optimized.plan_for(*args))
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    if equal_nan:
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        ok = ~np.isnan(want)
        got, want = got[ok], want[ok]
    scale = max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want).max() / scale
    assert err <= rtol, f"{fn.__name__}: max |alt_jax - jit| / max |jit| = {err:.3g}"
    return optimized


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("b,s,h,d", [(2, 37, 3, 64), (1, 128, 4, 32), (1, 33, 2, 80),
                                     (1, 64, 2, 128)])
def test_forms_match_jit(form, b, s, h, d, kernel_cache):
    _check(form, _qkv((b, s, h, d)), kernel_cache)


def test_bert_layer_runs_its_attention_on_the_kernel(kernel_cache):
    from benchmarks import models
    m = models.build("bert_layer")
    optimized = alt_jax.optimize(jax.jit(m.apply), cache=kernel_cache, fallback="error")
    got = optimized(m.params, *m.inputs)
    want = jax.jit(m.apply)(m.params, *m.inputs)
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) <= 1e-4
    (fused,) = _attention_decisions(optimized, m.params, *m.inputs)
    assert fused.on_kernel and fused.spec.sq == fused.spec.sk == 128
    assert fused.spec.batch == (1, 12) and fused.spec.d == fused.spec.dv == 64


def test_decode_step_against_a_kv_cache(kernel_cache):
    """One new token attends to a cache of 37 positions (sq = 1), masked past its length."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 37, 4, 64)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([37, 20])

    def decode(q, k, v, lengths):
        mask = jnp.arange(37)[None, None, None, :] < lengths[:, None, None, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    _check(decode, (q, k, v, lengths), kernel_cache)


def test_flax_attention_module(kernel_cache):
    nn = pytest.importorskip("flax.linen", reason="flax not installed (requirements-test.txt)")
    layer = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=128)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 19, 96)), jnp.float32)
    mask = nn.make_attention_mask(jnp.ones((2, 19)), jnp.arange(19)[None, :] < 15)
    params = layer.init(jax.random.key(0), x, x, mask=mask)
    _check(lambda p, x: layer.apply(p, x, x, mask=mask), (params, x), kernel_cache)
    causal = nn.make_causal_mask(jnp.ones((2, 19)))
    _check(lambda p, x: layer.apply(p, x, x, mask=causal), (params, x), kernel_cache)


def test_keras_multi_head_attention(kernel_cache):
    keras = pytest.importorskip("keras", reason="keras not installed (requirements-test.txt)")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras was imported with the {keras.backend.backend()} backend")
    layer = keras.layers.MultiHeadAttention(num_heads=4, key_dim=32)
    x = np.random.default_rng(10).standard_normal((2, 21, 64)).astype(np.float32)
    mask = np.tril(np.ones((21, 21), bool))[None].repeat(2, axis=0)
    layer(x, x, attention_mask=mask)  # builds the weights
    weights = [jnp.asarray(w) for w in layer.get_weights()]

    def apply(weights, x):
        from keras import StatelessScope
        with StatelessScope(state_mapping=list(zip(layer.weights, weights))):
            return layer(x, x, attention_mask=mask)
    _check(apply, (weights, jnp.asarray(x)), kernel_cache, rtol=1e-4)


def test_special_values_give_what_xla_gives(kernel_cache):
    """A row masked with -inf everywhere is NaN in XLA (max - max = -inf + inf) and here; a
    row masked with a large negative finite value is uniform; a NaN in one query spoils its
    rows only; an inf in V behind a -inf mask still meets a weight of exactly 0."""
    q, k, v = _qkv((1, 24, 2, 32), seed=5)
    mask = np.ones((1, 2, 24, 24), bool)
    mask[0, 0, 3, :] = False          # one fully masked row
    mask[0, 1, :, 20:] = False        # keys 20.. hidden from head 1
    mask = jnp.asarray(mask)

    def minus_inf(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(mask, s, -jnp.inf)), v)

    def big_negative(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        return jnp.einsum("bhqk,bkhd->bqhd", _softmax(jnp.where(mask, s, -1e30)), v)

    _check(minus_inf, (q, k, v), kernel_cache, equal_nan=True)
    _check(big_negative, (q, k, v), kernel_cache)
    _check(nn_plain, (q.at[0, 5, 1, 7].set(jnp.nan), k, v), kernel_cache, equal_nan=True)
    v_inf = v.at[0, 22, 1, :].set(jnp.inf)  # key 22 of head 1 is masked in every row
    got = _check(minus_inf, (q, k, v_inf), kernel_cache, equal_nan=True)
    out = np.asarray(got(q, k, v_inf))
    assert np.isnan(out[0, :, 1, :]).all()  # 0 * inf = NaN, as XLA computes it


def test_large_scores_do_not_overflow(kernel_cache):
    """Scores near the float range: the max is subtracted before exp, as in XLA."""
    q, k, v = _qkv((1, 16, 2, 64), seed=6, scale=30.0)
    _check(hand_bqhd, (q, k, v), kernel_cache)


def _no_attention(fn, args, kernel_cache):
    want = jax.jit(fn)(*args)
    optimized = alt_jax.optimize(fn, cache=kernel_cache, min_flops=0)
    got = optimized(*args)
    assert not _attention_decisions(optimized, *args), str(optimized.plan_for(*args))
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_regions_the_kernel_cannot_compute_stay_as_they_are(kernel_cache):
    q, k, v = _qkv((1, 16, 2, 32), seed=8)

    def weights_returned(q, k, v):  # the probabilities are an output too
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k))
        return jnp.einsum("bhqk,bkhd->bqhd", p, v), p

    def softmax_over_queries(q, k, v):  # not row-wise over the keys D2 contracts
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-2)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    def scores_clipped_by_tanh(q, k, v):  # an op the row program does not have
        s = 30.0 * jnp.tanh(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 30.0)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)

    def mask_from_the_scores(q, k, v):  # a predicate computed from S itself
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(s > 0, s, -1e9)), v)

    def chained_matmuls(q, k, v):  # nothing normalises the rows: the matmul family's
        return jnp.einsum("bhqk,bkhd->bqhd", jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.5, v)

    for fn in (weights_returned, softmax_over_queries, scores_clipped_by_tanh,
               mask_from_the_scores, chained_matmuls):
        _no_attention(fn, (q, k, v), kernel_cache)


def test_row_program_of_a_softmax():
    """The structure the kernel runs: max, subtract, exp, sum, divide, in the jaxpr's order,
    with jax.nn.softmax's `max(-inf, m)` and stop_gradient as steps of their own."""
    q, k, v = _qkv((1, 8, 2, 16))
    flat = jaxpr_pass.open_jaxpr(jaxpr_pass.inline_calls(jax.make_jaxpr(nn_plain)(q, k, v)))
    (m,) = attention.find_attention(flat)
    ops = m.program.instructions[0::5]
    reductions = [op for op in ops if op in (row_program.OP_RMAX, row_program.OP_RSUM)]
    assert reductions == [row_program.OP_RMAX, row_program.OP_RSUM]
    assert row_program.OP_EXP in ops and row_program.OP_DIV in ops and row_program.OP_MUL in ops
    assert (m.sq, m.sk, m.d, m.dv, m.batch) == (8, 8, 16, 16, (1, 2))
    assert m.externals == ()  # the scale is a constant of the program, not an input


def test_the_kernel_writes_the_transpose_after_it(kernel_cache):
    """einsum's "bhqk,bkhd->bqhd" is a dot_general writing (b, h, q, d) and a transpose: the
    match takes the transpose, the kernel writes (b, q, h, d) itself, and no transpose is
    left for XLA."""
    q, k, v = _qkv((2, 24, 3, 32), seed=13)
    flat = jaxpr_pass.open_jaxpr(jaxpr_pass.inline_calls(jax.make_jaxpr(hand_bqhd)(q, k, v)))
    (m,) = attention.find_attention(flat)
    assert [e.primitive.name for e in m.tail] == ["transpose"]
    assert m.out_var.aval.shape == (2, 24, 3, 32) and m.out_var is flat.outvars[0]
    optimized = _check(hand_bqhd, (q, k, v), kernel_cache)
    lowered = jax.jit(optimized).lower(q, k, v).as_text()
    assert "transpose" not in lowered, lowered


def test_gradients_are_the_originals(kernel_cache):
    q, k, v = _qkv((1, 16, 2, 32), seed=9)
    loss = lambda q, k, v: jnp.sum(jnp.sin(nn_causal(q, k, v)))
    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(alt_jax.optimize(loss, cache=kernel_cache), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_attention_off_leaves_the_dots_to_the_matmul_family(kernel_cache):
    q, k, v = _qkv((1, 32, 2, 64))
    optimized = alt_jax.optimize(hand_bqhd, cache=kernel_cache, attention=False)
    np.testing.assert_allclose(np.asarray(optimized(q, k, v)),
                               np.asarray(jax.jit(hand_bqhd)(q, k, v)), rtol=1e-4, atol=1e-6)
    assert not _attention_decisions(optimized, q, k, v)
    assert [d.primitive for d in optimized.plan_for(q, k, v).rewritten] == ["dot_general"] * 2


@pytest.mark.parametrize("name", ["gpt2_block", "gpt2_decode"])
def test_gpt2_zoo_blocks(name, kernel_cache):
    """The zoo's GPT-2-style blocks (a causal prompt; one token against a KV cache) give
    jax.jit's outputs with their attention on the kernel and every matmul on kernels."""
    from benchmarks import models
    m = models.build(name)
    args = (m.params, *m.inputs)
    optimized = alt_jax.optimize(jax.jit(m.apply), cache=kernel_cache, fallback="error")
    got, want = optimized(*args), jax.jit(m.apply)(*args)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) <= 1e-4
    plan = optimized.plan_for(*args)
    assert [d.primitive for d in plan.rewritten].count("attention") == 1
    assert not plan.left_to_xla, str(plan)


@pytest.mark.parametrize("pack_k", [True, False])
@pytest.mark.parametrize("b,sq,sk,h,d", [(2, 1, 37, 3, 64), (1, 3, 130, 2, 32),
                                          (1, 17, 33, 2, 80), (1, 9, 21, 2, 40)])
def test_kernel_variants_match(pack_k, b, sq, sk, h, d, kernel_cache):
    """Both ways of computing scores (K^T packed; dots along d with K in place) and V read
    in place (dv a whole number of vectors) or packed (d = 40 with 16-float vectors), at a
    decode step's single row and ragged lengths."""
    from alt_jax.ops.attention import FAMILY, AttentionSpec

    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal((b, sq, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, sk, h, d)), jnp.float32) for _ in range(2))
    flat = jaxpr_pass.open_jaxpr(jaxpr_pass.inline_calls(jax.make_jaxpr(nn_plain)(q, k, v)))
    (m,) = attention.find_attention(flat)
    spec = AttentionSpec.from_match(m)
    isa = kernel_cache.isa or alt_jax.device.detect_isa()
    knobs = FAMILY.default_knobs(spec, isa)
    knobs = type(knobs)(tq=knobs.tq, serial=knobs.serial, pack_k=pack_k)
    if not pack_k and d % isa.vector_floats:
        with pytest.raises(Exception, match="pack_k=False"):
            FAMILY.validate(spec, knobs, isa)
        return
    kernel = kernel_cache.build(FAMILY.render(spec, knobs, isa))
    got = jax.jit(lambda q, k, v: FAMILY.lower(spec, kernel, [q, k, v])[0])(q, k, v)
    want = jax.jit(nn_plain)(q, k, v)
    # the kernel writes the match's result (nn_plain's transpose after D2 is part of it);
    # compare through whatever follows
    rest = jax.jit(lambda o: _after_match(flat, m, o))(got)
    np.testing.assert_allclose(np.asarray(rest), np.asarray(want), rtol=1e-5, atol=1e-6)


def _after_match(flat, m, out):
    """flat's outputs from the match's result onwards (the equations after the attention)."""
    env = {m.out_var: out}
    start = next(i for i, e in enumerate(flat.eqns) if e is m.eqns[-1]) + 1
    for e in flat.eqns[start:]:
        ins = [v.val if isinstance(v, jax.extend.core.Literal) else env[v] for v in e.invars]
        env.update(zip(e.outvars, jaxpr_pass.bind_eqn(e, ins)))
    return env[flat.outvars[0]]


@pytest.mark.parametrize("isa_name", ["avx2", "sse2", "scalar"])
def test_narrower_isas(isa_name, tmp_path):
    """The template for 8-, 4- and 1-lane vectors (this CPU runs them all): a causal mask and
    a padding mask, ragged lengths, V packed and in place."""
    from alt_jax import device, runtime
    isa = {"avx2": device.AVX2, "sse2": device.SSE2, "scalar": device.SCALAR}[isa_name]
    if isa_name == "avx2" and alt_jax.device.detect_isa().vector_floats < 8:
        pytest.skip("this CPU has no AVX2")
    cache = runtime.KernelCache(tmp_path, isa=isa)
    for form, shape in ((nn_causal, (1, 19, 2, 40)), (nn_padding_mask, (2, 23, 2, 32))):
        _check(form, _qkv(shape, seed=12), cache)


def _random_attention(rng):
    """A random attention program: layout of Q/K/V (heads before or after the sequence),
    dot operand order, a scale on q, on the scores or none, an additive bias or a boolean
    mask over some of (batch, head, query, key), a softmax written by hand or by jax.nn,
    and D2 with P or V first."""
    heads_first = rng.random() < 0.5
    scale_at = rng.choice(["q", "scores", "none"])
    extra = rng.choice(["none", "bias", "mask", "both"])
    softmax = rng.choice(["jax", "hand", "hand_div_mul"])
    v_first = rng.random() < 0.5
    b, s_q, s_k, h, d = (int(rng.integers(1, 3)), int(rng.integers(1, 40)),
                         int(rng.integers(2, 40)), int(rng.integers(1, 4)),
                         int(rng.choice([8, 16, 24, 32])))
    bcast = [rng.random() < 0.5 for _ in range(4)]  # which of (b, h, q, k) the extra has
    extra_shape = tuple(n if keep else 1 for n, keep in zip((b, h, s_q, s_k), bcast))
    bias = jnp.asarray(rng.standard_normal(extra_shape), jnp.float32)
    mask = jnp.asarray(rng.random(extra_shape) < 0.8)

    def fn(q, k, v):
        if scale_at == "q":
            q = q * (d ** -0.5)
        if heads_first:
            s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        else:
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        if scale_at == "scores":
            s = s / math.sqrt(d)
        if extra in ("bias", "both"):
            s = s + bias
        if extra in ("mask", "both"):
            s = jnp.where(mask, s, -1e9)
        if softmax == "jax":
            p = jax.nn.softmax(s, axis=-1)
        elif softmax == "hand":
            p = _softmax(s)
        else:
            e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
            p = e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))
        if heads_first:
            return (jnp.einsum("bhkd,bhqk->bhqd", v, p) if v_first
                    else jnp.einsum("bhqk,bhkd->bhqd", p, v))
        return (jnp.einsum("bkhd,bhqk->bqhd", v, p) if v_first
                else jnp.einsum("bhqk,bkhd->bqhd", p, v))

    shape_q = (b, h, s_q, d) if heads_first else (b, s_q, h, d)
    shape_kv = (b, h, s_k, d) if heads_first else (b, s_k, h, d)
    args = (jnp.asarray(rng.standard_normal(shape_q), jnp.float32),
            *(jnp.asarray(rng.standard_normal(shape_kv), jnp.float32) for _ in range(2)))
    fn.__name__ = (f"attn_{'bhsd' if heads_first else 'bshd'}_{scale_at}_{extra}{extra_shape}"
                   f"_{softmax}_{'vp' if v_first else 'pv'}")
    return fn, args


@pytest.mark.parametrize("seed", range(24))
def test_random_attention_programs(seed, kernel_cache):
    fn, args = _random_attention(np.random.default_rng(1000 + seed))
    _check(fn, args, kernel_cache)


def _fused_qkv_split(x, w):  # GPT-2: one projection split three ways, reshaped into heads
    b, s, _ = x.shape
    q, k, v = (t.reshape(b, s, 3, 32) for t in jnp.split(x @ w, 3, axis=-1))
    return nn_causal(q, k, v)


def _fused_qkv_heads_first(x, w):  # slices of the projection, heads moved first
    b, s, _ = x.shape
    qkv = x @ w
    q, k, v = (jnp.transpose(qkv[..., i * 96:(i + 1) * 96].reshape(b, s, 3, 32), (0, 2, 1, 3))
               for i in range(3))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(32)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)


def _fused_qkv_indexed(x, w):  # (b, s, 3, h, d) and an index per part, as in many ViTs
    b, s, _ = x.shape
    qkv = (x @ w).reshape(b, s, 3, 3, 32)
    return nn_plain(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])


@pytest.mark.parametrize("fn", [_fused_qkv_split, _fused_qkv_heads_first, _fused_qkv_indexed],
                         ids=lambda f: f.__name__)
def test_q_k_v_split_from_one_projection_are_read_in_place(fn, kernel_cache):
    """Q, K and V cut out of one projection (split, slices or indexing, then reshaped into
    heads, maybe transposed) are read by the kernel from the projection itself at their
    offsets: the result is jit's and no slice or copy of the projection is left to XLA."""
    rng = np.random.default_rng(21)
    x = jnp.asarray(rng.standard_normal((2, 37, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 288)) * 0.1, jnp.float32)
    flat = jaxpr_pass.open_jaxpr(jaxpr_pass.inline_calls(jax.make_jaxpr(fn)(x, w)))
    (m,) = attention.find_attention(flat)
    assert m.q is m.k is m.v and m.q.aval.shape[-1] == 288 and m.head
    assert sorted(m.offsets) == [0, 96, 192]
    optimized = _check(fn, (x, w), kernel_cache)
    hlo = jax.jit(optimized).lower(x, w).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert "slice" not in entry and "copy" not in entry, entry


def test_a_q_k_v_piece_also_returned_keeps_its_split(kernel_cache):
    """A decode step returns the new token's keys: the split stays in XLA for that output
    and the kernel reads the pieces; both results are jit's."""
    rng = np.random.default_rng(22)
    x = jnp.asarray(rng.standard_normal((1, 19, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 288)) * 0.1, jnp.float32)

    def fn(x, w):
        q, k, v = jnp.split(x @ w, 3, axis=-1)
        heads = [t.reshape(1, 19, 3, 32) for t in (q, k, v)]
        return nn_plain(*heads), k

    flat = jaxpr_pass.open_jaxpr(jaxpr_pass.inline_calls(jax.make_jaxpr(fn)(x, w)))
    (m,) = attention.find_attention(flat)
    assert m.head and {e.primitive.name for e in m.head} == {"reshape"}  # no split
    want = jax.jit(fn)(x, w)
    got = alt_jax.optimize(fn, cache=kernel_cache, fallback="error", min_flops=0)(x, w)
    for g, wnt in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(wnt), rtol=1e-4, atol=1e-5)


def test_a_view_reaching_past_its_buffer_is_refused():
    """The family checks every element the kernel would read lies in the buffer it gets."""
    from alt_jax.ops.attention import FAMILY, AttentionSpec
    from alt_jax.ops.base import KnobError

    q, k, v = _qkv((1, 16, 2, 32))
    flat = jaxpr_pass.open_jaxpr(jaxpr_pass.inline_calls(jax.make_jaxpr(nn_plain)(q, k, v)))
    (m,) = attention.find_attention(flat)
    spec = AttentionSpec.from_match(m)
    isa = alt_jax.device.detect_isa()
    knobs = FAMILY.default_knobs(spec, isa)
    FAMILY.validate(spec, knobs, isa)
    with pytest.raises(KnobError, match="K read at offset 1"):
        FAMILY.validate(dataclasses.replace(spec, offsets=(0, 1, 0)), knobs, isa)
